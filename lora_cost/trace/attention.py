"""Run attention (and dropout) as CUDA would: the sdpa backend an sm80+ GPU picks, not the CPU's.

`F.scaled_dot_product_attention` chooses its kernel from the tensors' device. On the fake CPU
tensors of the trace it would pick `_scaled_dot_product_flash_attention_for_cpu` (different saved
tensors, counted as 0 FLOPs). `CudaAttention` intercepts the call above autograd (a
TorchFunctionMode) and calls the op the CUDA dispatcher would have called, so autograd records that
op's derivative formula and saves what the CUDA kernel saves (their meta kernels give the shapes).

Backend choice, following torch/csrc/aten/native/transformers/cuda/sdp_utils.cpp on sm80+ (flash,
then memory-efficient, then math; cuDNN attention is not preferred by default):
  * flash: fp16/bf16, no explicit mask, head_dim <= 256 and equal for q/k/v; grouped k/v heads are
    supported natively (enable_gqa). Saves q, k, v, out, logsumexp [b, h, s] fp32, RNG state.
  * memory-efficient: fp32 (or a mask), head_dim <= 256, no grouped k/v (enable_gqa with fewer k/v
    heads is rejected). Saves q, k, v, out and logsumexp padded to a multiple of 32 along seq.
  * math: everything else (fp32 with grouped heads): explicit matmuls and softmax, decomposed under
    autograd, so the [b, h, s, s] probabilities are saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

aten = torch.ops.aten


def choose_backend(q, k, v, attn_mask, enable_gqa: bool) -> str:
    head_dim_ok = q.shape[-1] <= 256 and q.shape[-1] == k.shape[-1] == v.shape[-1]
    gqa = enable_gqa and k.shape[-3] != q.shape[-3]
    if q.dtype in (torch.float16, torch.bfloat16) and attn_mask is None and head_dim_ok:
        return "flash"
    if head_dim_ok and not gqa:
        return "efficient"
    return "math"


class CudaAttention(TorchFunctionMode):
    """Redirect F.scaled_dot_product_attention to the CUDA backend's op; records the choices."""

    def __init__(self, backends: dict | None = None) -> None:
        super().__init__()
        self.backends: dict[str, int] = {} if backends is None else backends

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            return self.dropout(*args, **kwargs)
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        return self.sdpa(*args, **kwargs)

    @staticmethod
    def dropout(input, p=0.5, training=True, inplace=False):
        """aten/src/ATen/native/Dropout.cpp: CUDA tensors take the fused `native_dropout` kernel (it
        saves a bool mask); CPU tensors take `_dropout_impl` (a mask in the input's dtype). p == 0
        or eval returns the input itself on both."""
        if not training or p == 0.0 or not input.is_floating_point():
            return F.dropout(input, p, training, inplace)
        out = torch.native_dropout(input, p, True)[0]
        if inplace:
            return input.copy_(out)
        return out

    def sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        backend = choose_backend(q, k, v, attn_mask, enable_gqa)
        self.backends[backend] = self.backends.get(backend, 0) + 1
        if backend == "flash":
            return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if backend == "efficient":
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill_(attn_mask.logical_not(), float("-inf"))
            return aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, needs_grad, dropout_p, is_causal,
                                                                scale=scale)[0]
        return aten._scaled_dot_product_attention_math(q, k, v, attn_mask, dropout_p, is_causal, None, scale=scale,
                                                       enable_gqa=enable_gqa)[0]
