"""FLOPs through torch.utils.flop_counter.FlopCounterMode, with formulas where it is wrong or silent.

Registered here (FlopCounterMode(custom_mapping=...)), for every torch version the engine supports:
  * the CUDA sdpa ops (flash, memory-efficient; forward and backward) with grouped-query shapes:
    torch 2.11's formula asserted that k/v have as many heads as q (the calibration's GQA rows have
    no FLOPs for that reason); the formulas are lora_cost/analytic/formulas/attention.py's, which
    the analytic engine and the profiler use too;
  * the QLoRA stand-in's 4-bit gemm (`lora_cost_trace::gemm_4bit`): bitsandbytes' forward gemm is
    invisible to FlopCounterMode; the trace counts it and reports it as `forward_uncounted`.
  * `aten._grouped_mm` (transformers' default mixture-of-experts path, integrations/moe.py): FlopCounterMode
    has no formula for it in torch 2.13 and would count the experts as 0;
CPU attention (`_scaled_dot_product_flash_attention_for_cpu`, counted 0 in torch 2.13) never runs:
attention.py redirects sdpa to the CUDA ops.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import kernels
from ..analytic.formulas.attention import sdpa_backward_from_shapes, sdpa_forward_from_shapes
from .int8 import int8_matmul_flops
from .qlora import gemm_4bit_flops

aten = torch.ops.aten


GEMM_4BIT = torch.ops.lora_cost_trace.gemm_4bit


def custom_mapping() -> dict:
    return {
        aten._scaled_dot_product_flash_attention: sdpa_forward_from_shapes,
        aten._scaled_dot_product_efficient_attention: sdpa_forward_from_shapes,
        aten._scaled_dot_product_flash_attention_backward: sdpa_backward_from_shapes,
        aten._scaled_dot_product_efficient_attention_backward: sdpa_backward_from_shapes,
        GEMM_4BIT: gemm_4bit_flops,
        torch.ops.lora_cost_trace.int8_linear_matmul: int8_matmul_flops,  # issue9b: LLM.int8()
        aten._grouped_mm: grouped_mm_flops,
        **kernels.flops_mapping(),  # flash-attention 2/3 and flex stand-ins (kernels.py)
    }


def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """aten._grouped_mm(a, b, offs): every row (2-D a against 3-D b: [S, k] x [E, k, n], each row in one
    group) or every reduction index (2-D x 2-D, the weight gradient: [m, S] x [S, n] -> [E, m, n]) is
    multiplied once, so 2 * m * k * n as for one plain matmul; 3-D x 3-D is a batched matmul."""
    if len(a_shape) == 3 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
    m, k = (a_shape[-2], a_shape[-1]) if len(a_shape) == 2 else (a_shape[0] * a_shape[1], a_shape[2])
    return 2 * m * k * b_shape[-1]


class _GlobalOnly:
    """Stands in for FlopCounterMode's ModuleTracker: its per-module attribution registers grad hooks
    on every module's inputs and outputs, and the handles keep checkpoint recomputation graphs (with
    their tensors) alive until the mode exits, which would distort the simulated memory. The trace
    only needs the global counts."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def counter() -> FlopCounterMode:
    mode = FlopCounterMode(display=False, custom_mapping=custom_mapping())
    mode.mod_tracker = _GlobalOnly()
    return mode


def by_op(mode: FlopCounterMode) -> dict[str, int]:
    counts = mode.get_flop_counts().get("Global", {})
    return {str(getattr(op, "__name__", op)): int(v) for op, v in counts.items()}


def difference(later: dict[str, int], earlier: dict[str, int]) -> dict[str, int]:
    """Per-op FLOPs counted between two snapshots of one counter."""
    out = {op: v - earlier.get(op, 0) for op, v in later.items()}
    return {op: v for op, v in out.items() if v}


def counted_op_names(mode: FlopCounterMode) -> set[str]:
    return {str(getattr(op, "__name__", op)) for op in mode.flop_registry}
