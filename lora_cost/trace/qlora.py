"""A stand-in for bitsandbytes' 4-bit linear layer (QLoRA), documented as such.

bitsandbytes cannot run without its CUDA kernels, so the trace replaces every quantised linear by
`Linear4bitStandIn`, which reproduces what matters for memory and FLOPs (bitsandbytes 0.4x-0.50,
`nn/modules.py` Linear4bit and `autograd/_functions.py` MatMul4Bit; transformers' bnb integration):
  * storage: the packed weight (uint8, two 4-bit values per byte, shape [ceil(n/2), 1]) as a frozen
    parameter, and the quantisation state as buffers: with double quantisation a uint8 absmax per
    block of 64, an fp32 absmax per 256 blocks, the 256-entry fp32 code of the second level and an
    fp32 offset; without it one fp32 absmax per block of 64;
  * forward (Linear4bit.forward): x.to(compute dtype), bias.to(compute dtype), then MatMul4Bit:
    the weight is dequantised to a [d_out, d_in] compute-dtype transient and multiplied; the output
    is cast back to the input dtype. The gemm is a custom op here (`lora_cost_trace::gemm_4bit`), as
    bitsandbytes' is to FlopCounterMode, and its FLOPs are counted by a registered formula;
  * MatMul4Bit saves no activation (ctx.tensors, a plain attribute, holds only the packed weight); its
    backward dequantises the weight again (a compute-dtype transient) and computes grad_A with a
    matmul that FlopCounterMode sees. No weight gradient (the base is frozen).
Every linear except the output embedding is quantised (transformers skips only lm_head).
"""

from __future__ import annotations

import torch
from torch import nn

from ..analytic.formulas.storage import (DQ_CODE_BYTES, NF4_BLOCK, NF4_DQ_BLOCK, QUANT_STORAGE_BYTES, blocks as n_blocks,
                                         packed_4bit_numel)

QUANT_STORAGE_DTYPES = {"uint8": torch.uint8, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Params4bit(nn.Parameter):
    """The packed weight's class carries bitsandbytes' name: peft's prepare_model_for_kbit_training casts every
    fp16/bf16 parameter to fp32 except those whose class is named Params4bit (utils/other.py), which matters once
    the packed values are stored in a 16-bit dtype (--quant-storage)."""


@torch.library.custom_op("lora_cost_trace::dequantize_4bit", mutates_args=())
def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, d_out: int, d_in: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(d_out, d_in, dtype=dtype, device=packed.device)


@dequantize_4bit.register_fake
def _(packed, absmax, d_out, d_in, dtype):
    return packed.new_empty((d_out, d_in), dtype=dtype)


@torch.library.custom_op("lora_cost_trace::gemm_4bit", mutates_args=())
def gemm_4bit(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@gemm_4bit.register_fake
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def gemm_4bit_flops(x_shape, w_shape, out_shape=None, **kwargs) -> int:
    """FlopCounterMode formula for the 4-bit gemm: 2 * rows * d_in * d_out."""
    rows = 1
    for s in x_shape[:-1]:
        rows *= s
    return 2 * rows * x_shape[-1] * w_shape[0]


class MatMul4Bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, absmax, d_out, d_in, bias):
        w = dequantize_4bit(packed, absmax, d_out, d_in, x.dtype)  # transient, freed after the gemm
        out = gemm_4bit(x, w)
        del w
        if bias is not None:
            out = out + bias
        # bnb 0.50.2 autograd/_functions.py MatMul4Bit.forward: `ctx.tensors = (None, B)`, an attribute, not
        # save_for_backward (task "recast"): no saved-tensor hook sees it, so non-reentrant checkpointing's
        # recomputation, which stops once every saved tensor is back, need not rerun a trailing 4-bit linear
        ctx.tensors = (None, packed)
        ctx.absmax, ctx.shape = absmax, (d_out, d_in)
        return out

    @staticmethod
    def backward(ctx, grad):
        _, packed = ctx.tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = dequantize_4bit(packed, ctx.absmax, ctx.shape[0], ctx.shape[1], grad.dtype)
            grad_x = torch.matmul(grad, w)
        return grad_x, None, None, None, None, None


class Linear4bitStandIn(nn.Linear):
    """Same storage, saved tensors and transients as bitsandbytes' Linear4bit (see module doc)."""

    def __init__(self, d_in: int, d_out: int, bias: bool, compute_dtype: torch.dtype, double_quant: bool = True,
                 quant_storage: str = "uint8") -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = d_in, d_out
        self.compute_dtype = compute_dtype
        numel = d_in * d_out
        blocks = n_blocks(numel, NF4_BLOCK)
        # functional.py quantize_4bit: zeros(((n + 1) // (2 * itemsize), 1), dtype=quant_storage)
        packed = packed_4bit_numel(numel, QUANT_STORAGE_BYTES[quant_storage])
        self.weight = Params4bit(torch.empty(packed, 1, dtype=QUANT_STORAGE_DTYPES[quant_storage]), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(d_out, dtype=compute_dtype), requires_grad=False) if bias else None
        if double_quant:
            self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8))
            self.register_buffer("absmax2", torch.empty(n_blocks(blocks, NF4_DQ_BLOCK), dtype=torch.float32))
            self.register_buffer("code2", torch.empty(DQ_CODE_BYTES // 4, dtype=torch.float32))
            self.register_buffer("offset", torch.empty((), dtype=torch.float32))
        else:
            self.register_buffer("absmax", torch.empty(blocks, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return MatMul4Bit.apply(x, self.weight, self.absmax, self.out_features, self.in_features, bias).to(inp_dtype)


def replace_linears(model: nn.Module, stand_in: type, make) -> int:
    """Replace every nn.Linear / Conv1D by `make(d_in, d_out, bias)` except the output embedding, the stand-ins
    already there, and the modules the model keeps in fp32 (`_keep_in_fp32_modules`, T5's wo: quantizers/base.py
    adds them to modules_to_not_convert), which stay fp32 linears, as transformers' bnb loaders do."""
    from transformers.pytorch_utils import Conv1D

    skip = model.get_output_embeddings()
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child is skip or isinstance(child, stand_in):
                continue
            if name in keep:
                child.to(torch.float32)
                continue
            if isinstance(child, nn.Linear):
                d_in, d_out = child.in_features, child.out_features
            elif isinstance(child, Conv1D):
                d_in, d_out = child.weight.shape
            else:
                continue
            setattr(parent, name, make(d_in, d_out, child.bias is not None))
            count += 1
    return count


def quantize_linears(model: nn.Module, compute_dtype: torch.dtype, double_quant: bool, quant_storage: str = "uint8") -> int:
    """Replace every nn.Linear / Conv1D except the output embedding and the modules the model keeps in
    fp32 (`_keep_in_fp32_modules`, T5's wo: quantizers/base.py adds them to modules_to_not_convert), as
    transformers' bnb loader does; those stay fp32 linears."""
    return replace_linears(model, Linear4bitStandIn, lambda d_in, d_out, bias: Linear4bitStandIn(
        d_in, d_out, bias, compute_dtype, double_quant, quant_storage))


def cast_unquantised(model: nn.Module, dtype: torch.dtype) -> None:
    """Every floating-point parameter outside the 4-bit stand-ins to `dtype`: a 4-bit model loaded with
    from_pretrained(dtype=...) holds its embeddings, norms, LM head (and biases, which the stand-in creates in its
    compute dtype) in that dtype. The stand-ins' packed weight and quantisation-state buffers are left alone
    (bitsandbytes' QuantState is no tensor of the module)."""
    for module in model.modules():
        if isinstance(module, Linear4bitStandIn):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)


def script_recast(model: nn.Module) -> None:
    """The QLoRA paper script's loop after get_peft_model (artidoro/qlora qlora.py get_accelerate_model, under
    --bf16; analytic/qlora_recast.py quotes it): LoraLayer modules to bf16, modules named '*norm*' to fp32,
    'lm_head' / 'embed_tokens' modules with an fp32 weight to bf16. A LoraLayer's cast reaches only its LoRA
    factors here: `module.to` casts floating-point tensors only, so bitsandbytes' packed uint8 (or bf16) weight
    stays as it is and its QuantState, a Python attribute there, is not touched; the stand-in keeps that state
    as buffers (some fp32), which the cast must not reach (a bias there is refused by the engines' checks)."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for part in (module.lora_A, module.lora_B):
                part.to(torch.bfloat16)
        if "norm" in name:
            module.to(torch.float32)
        if ("lm_head" in name or "embed_tokens" in name) and hasattr(module, "weight"):
            if module.weight.dtype == torch.float32:
                module.to(torch.bfloat16)
