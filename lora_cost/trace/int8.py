"""A stand-in for bitsandbytes' 8-bit linear layer (LLM.int8(), `load_in_8bit`), documented as such.

bitsandbytes' int8 kernels need CUDA, so the trace replaces every quantised linear by `Linear8bitLtStandIn`,
which follows bitsandbytes 0.50.2 (`nn/modules.py` Linear8bitLt, `autograd/_functions.py` MatMul8bitLt,
`backends/default/ops.py` int8_mixed_scaled_mm; the excerpt the tests check is
tests/data/bnb_0.50.2_matmul8bitlt.py.txt):
  * storage: CB, the int8 weight [d_out, d_in], a frozen parameter; SCB, one fp32 absmax per output row;
  * forward with a frozen weight (the fast path): `F.int8_vectorwise_quant(A.to(torch.float16))` -> CA (int8)
    and SCA (fp32 per row), the fp16 copy freed after it; int8_scaled_mm: an int32 [rows, d_out] accumulator,
    dequantised into the output in A's dtype;
  * kept for backward when the input needs a gradient: `ctx.tensors = (CAt, subA, A)` - plain ctx attributes
    (saved_tensors_hooks do not see them, the memory stays alive all the same): CAt None (no weight
    gradient), subA the outlier columns (none for the trace's fake data), A the input;
  * backward: `state.CB.to(A.dtype, copy=True).mul_(state.SCB.unsqueeze(1).mul(1.0 / 127.0))`, then
    grad_A = grad @ that.
The int8 gemm is a custom op (`lora_cost_trace::int8_linear_matmul`), invisible to FlopCounterMode as
bitsandbytes' is; its FLOPs are counted by a registered formula and reported as uncounted.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.library.custom_op("lora_cost_trace::int8_vectorwise_quant", mutates_args=())
def int8_vectorwise_quant(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(a.shape, dtype=torch.int8, device=a.device), torch.empty(a.shape[0], device=a.device)


@int8_vectorwise_quant.register_fake
def _(a):
    return a.new_empty(a.shape, dtype=torch.int8), a.new_empty((a.shape[0],), dtype=torch.float32)


@torch.library.custom_op("lora_cost_trace::int8_linear_matmul", mutates_args=())
def int8_linear_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.empty(a.shape[0], b.shape[0], dtype=torch.int32, device=a.device)


@int8_linear_matmul.register_fake
def _(a, b):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


@torch.library.custom_op("lora_cost_trace::int8_mm_dequant", mutates_args=())
def int8_mm_dequant(acc: torch.Tensor, sca: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(acc.shape, dtype=dtype, device=acc.device)


@int8_mm_dequant.register_fake
def _(acc, sca, scb, dtype):
    return acc.new_empty(acc.shape, dtype=dtype)


def int8_matmul_flops(a_shape, b_shape, out_shape=None, **kwargs) -> int:
    """FlopCounterMode formula for the int8 gemm: 2 * rows * d_in * d_out."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[0]


class MatMul8bitLt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cb, scb, bias):
        shape = x.shape
        a = x.reshape(-1, shape[-1])
        ca, sca = int8_vectorwise_quant(a.to(torch.float16))  # the fp16 copy dies here
        acc = int8_linear_matmul(ca, cb)
        out = int8_mm_dequant(acc, sca, scb, a.dtype)
        del acc, ca, sca
        if bias is not None:
            out = out + bias
        ctx.cb, ctx.scb, ctx.shape, ctx.dtype_a = cb, scb, shape, a.dtype
        ctx.tensors = (None, None, a) if ctx.needs_input_grad[0] else (None, None, None)
        return out.reshape(*shape[:-1], cb.shape[0])

    @staticmethod
    def backward(ctx, grad):
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad = grad.reshape(-1, grad.shape[-1])
            w = ctx.cb.to(ctx.dtype_a, copy=True).mul_(ctx.scb.unsqueeze(1).mul(1.0 / 127.0))
            grad_x = torch.matmul(grad.to(ctx.dtype_a), w).view(ctx.shape)
        # as bitsandbytes, ctx.tensors is not cleared: autograd releases saved tensors after a node's backward,
        # not its ctx attributes, so A lives until the graph is freed (after the whole backward)
        return grad_x, None, None, None


class Linear8bitLtStandIn(nn.Linear):
    """Same storage, kept tensors and transients as bitsandbytes' Linear8bitLt (see module doc)."""

    def __init__(self, d_in: int, d_out: int, bias: bool) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = d_in, d_out
        self.weight = nn.Parameter(torch.empty(d_out, d_in, dtype=torch.int8), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(d_out), requires_grad=False) if bias else None
        self.register_buffer("SCB", torch.empty(d_out, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:  # Linear8bitLt casts the bias to x's dtype in place
            bias.data = bias.data.to(x.dtype)
        return MatMul8bitLt.apply(x, self.weight, self.SCB, bias)


def quantize_linears_8bit(model: nn.Module) -> int:
    """Replace every nn.Linear / Conv1D as transformers' bnb 8-bit loader does (quantizers/base.py: not the
    output embedding nor `_keep_in_fp32_modules`, which stay fp32 linears)."""
    from .qlora import replace_linears

    return replace_linears(model, Linear8bitLtStandIn, Linear8bitLtStandIn)
