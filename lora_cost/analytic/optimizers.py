"""Optimizer state and step temporaries, one registry entry per optimizer.

State sizes follow the implementations: torch.optim.AdamW keeps exp_avg and exp_avg_sq shaped and
typed like the parameter (its `step` counters are CPU scalars); SGD with momentum one buffer; the
bitsandbytes 8-bit optimizers (`bitsandbytes/optim/optimizer.py`, Optimizer8bit) keep uint8 states
plus one fp32 absmax per block of 256 for every tensor of at least 4096 elements
(`min_8bit_size`) and fp32 states for smaller ones (constants in `formulas/storage.py`); paged variants allocate their states in CUDA
managed memory, outside PyTorch's caching allocator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..registry import Registry, dashed
from .formulas.storage import BNB_8BIT_BLOCK, BNB_8BIT_MIN_SIZE, blocks
from .methods.base import TensorGroup
from ..units import DTYPE_BYTES


def _adam32(g: TensorGroup) -> int:
    return 2 * g.total_numel * DTYPE_BYTES[g.dtype]


def _adam8(g: TensorGroup) -> int:
    if g.numel < BNB_8BIT_MIN_SIZE:
        return 2 * g.total_numel * 4
    return 2 * g.count * (g.numel + 4 * blocks(g.numel, BNB_8BIT_BLOCK))


def _sgd(g: TensorGroup) -> int:
    return g.total_numel * DTYPE_BYTES[g.dtype]


def _foreach_adam_temporaries(groups: list[TensorGroup]) -> int:
    """PyTorch's foreach AdamW computes `torch._foreach_sqrt(exp_avg_sqs)` for a whole dtype group
    at once (torch/optim/adam.py `_multi_tensor_adam`): one state-sized temporary per group, the
    largest group being the peak."""
    per_dtype: dict[str, int] = {}
    for g in groups:
        per_dtype[g.dtype] = per_dtype.get(g.dtype, 0) + g.total_numel * DTYPE_BYTES[g.dtype]
    return max(per_dtype.values(), default=0)


@dataclass(frozen=True)
class Optimizer:
    name: str
    description: str
    state_bytes: Callable[[TensorGroup], int]
    step_temporaries: Callable[[list[TensorGroup]], int]
    paged: bool = False  # states live in managed memory, outside torch's allocated counters


OPTIMIZERS: Registry[Optimizer] = Registry("optimizer", dashed)


def register_optimizer(opt: Optimizer) -> Optimizer:
    return OPTIMIZERS.register(opt, [opt.name])


def get_optimizer(name: str) -> Optimizer:
    return OPTIMIZERS.get(name)


def all_optimizers() -> dict[str, Optimizer]:
    return OPTIMIZERS.all()


register_optimizer(Optimizer("adamw", "torch.optim.AdamW (foreach): exp_avg + exp_avg_sq in the parameter dtype",
                             _adam32, _foreach_adam_temporaries))
register_optimizer(Optimizer("sgd", "torch.optim.SGD(momentum=0.9): one momentum buffer, updated in place",
                             _sgd, lambda groups: 0))
register_optimizer(Optimizer("adamw-8bit", "bitsandbytes AdamW8bit: uint8 states + fp32 absmax per 256 (fp32 below 4096 elements)",
                             _adam8, lambda groups: 0))
register_optimizer(Optimizer("paged-adamw-32bit", "bitsandbytes PagedAdamW32bit: fp32 states in CUDA managed memory",
                             lambda g: 2 * g.total_numel * 4, lambda groups: 0, paged=True))
register_optimizer(Optimizer("paged-adamw-8bit", "bitsandbytes PagedAdamW8bit: 8-bit states in CUDA managed memory",
                             _adam8, lambda groups: 0, paged=True))
