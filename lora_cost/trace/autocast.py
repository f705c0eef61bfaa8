"""CUDA autocast, emulated on the trace's CPU fake tensors.

`torch.autocast("cpu")` has different op lists from CUDA's (e.g. CPU keeps `pow`, `softmax` and
`layer_norm` in the input dtype), and CUDA autocast does not apply to CPU tensors. This
TorchFunctionMode applies CUDA's policy (aten/src/ATen/autocast_mode.cpp, KERNEL_CUDA lists) to the
functions the model calls: matmul-like ops and sdpa run in the low-precision dtype; the fp32 list
(pow, softmax, log_softmax, layer/group norm, exp, log, rsqrt, the losses, ...) runs in fp32; the
promote list in the widest input dtype. Like CUDA autocast, casts of leaf tensors that require grad
(the fp32 master weights) are cached for the whole forward, so each weight is cast once and the
copy stays alive until the forward ends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_T = torch.Tensor
LOW = {F.linear, torch.matmul, _T.matmul, _T.__matmul__, torch.mm, _T.mm, torch.bmm, _T.bmm, torch.addmm, _T.addmm,
       torch.baddbmm, _T.baddbmm, torch.addbmm, torch.einsum, torch.mv, torch.addmv, torch.addr, torch.chain_matmul,
       F.conv1d, F.conv2d, F.conv3d, F.prelu, F.scaled_dot_product_attention, torch.conv1d, torch.conv2d}
FP32 = {torch.pow, _T.pow, _T.__pow__, torch.softmax, _T.softmax, F.softmax, torch.log_softmax, _T.log_softmax,
        F.log_softmax, F.layer_norm, torch.layer_norm, F.group_norm, torch.exp, _T.exp, torch.log, _T.log,
        torch.log2, torch.log10, torch.log1p, torch.expm1, torch.rsqrt, _T.rsqrt, torch.reciprocal, _T.reciprocal,
        torch.acos, torch.asin, torch.cosh, torch.sinh, torch.tan, torch.erfinv, F.softplus, F.cross_entropy,
        F.nll_loss, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.kl_div, F.binary_cross_entropy_with_logits,
        torch.cumsum, _T.cumsum, torch.cumprod, torch.prod, torch.norm, _T.norm, torch.dist, torch.cdist,
        torch.logsumexp, _T.logsumexp, F.cosine_similarity, torch.nn.functional.normalize}
PROMOTE = {torch.addcdiv, torch.addcmul, torch.atan2, torch.cross, torch.dot, torch.tensordot, torch.index_put,
           torch.scatter_add, _T.index_put_, _T.scatter_add}


class CudaAutocast(TorchFunctionMode):
    # the modes entered now, innermost last: checkpointing's recomputation enters its own inside backward (task
    # "recast": transformers' flash `get_target_dtype` asks whether autocast is on there too; see `active`)
    _entered: list["CudaAutocast"] = []

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.cache: dict[int, torch.Tensor] = {}
        self.enabled = True

    def _cast(self, value, dtype):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
            if value.is_leaf and value.requires_grad and torch.is_grad_enabled():
                key = (id(value), dtype)
                if key not in self.cache:
                    self.cache[key] = value.to(dtype)
                return self.cache[key]
            return value.to(dtype)
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v, dtype) for v in value)
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.enabled:
            if func in LOW:
                args, kwargs = self._cast(args, self.dtype), {k: self._cast(v, self.dtype) for k, v in kwargs.items()}
            elif func in FP32:
                args, kwargs = self._cast(args, torch.float32), {k: self._cast(v, torch.float32) for k, v in kwargs.items()}
            elif func in PROMOTE:
                tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
                if tensors:
                    widest = torch.float32 if any(t.dtype == torch.float32 for t in tensors) else tensors[0].dtype
                    args = self._cast(args, widest)
        return func(*args, **kwargs)

    def __enter__(self):
        CudaAutocast._entered.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        CudaAutocast._entered.remove(self)
        return super().__exit__(*exc)

    @staticmethod
    def active() -> "CudaAutocast | None":
        """The innermost entered mode if it is enabled (torch.is_autocast_enabled("cuda") as CUDA would answer)."""
        inner = CudaAutocast._entered[-1] if CudaAutocast._entered else None
        return inner if inner is not None and inner.enabled else None

    def end_forward(self) -> None:
        """Leaving the autocast region clears the weight-cast cache (autocast's clear_cache)."""
        self.cache.clear()
