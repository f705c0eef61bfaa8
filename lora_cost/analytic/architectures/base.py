"""The architecture contract and its registry (one entry per family, keyed by config model_type)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Callable

from ...errors import LoraCostError
from ...registry import Registry
from ..stack import Stack

if TYPE_CHECKING:  # pragma: no cover
    from ..context import StepContext
    from ...spec import LinearSite, ModelSpec


@dataclass(frozen=True)
class ParamGroup:
    """`count` parameters of `numel` elements (e.g. one norm weight per layer); kind decides storage."""

    name: str
    numel: int
    count: int
    kind: str  # "linear" (a block's linear weight; NF4 under QLoRA), "embedding", "norm", "bias", "head"

    @property
    def total(self) -> int:
        return self.numel * self.count


@dataclass(frozen=True)
class Architecture:
    family: str
    model_types: tuple[str, ...]
    description: str
    from_config: Callable[[str, dict, str], "ModelSpec"]
    linear_sites: Callable[["ModelSpec"], tuple["LinearSite", ...]]
    default_targets: tuple[str, ...]  # the query and value projections, as in the LoRA paper
    params: Callable[["ModelSpec"], list[ParamGroup]]
    forward: Callable[["StepContext"], None]  # simulates embeddings, blocks, head and loss on ctx.tape
    # linear layers outside the blocks that peft would adapt by name (RoBERTa's lm_head.dense)
    head_sites: Callable[["ModelSpec"], tuple["LinearSite", ...]] = lambda spec: ()
    # the block plan (stack.py): which kinds of block, how many, in what order; one kind by default
    stack: Callable[["ModelSpec"], Stack] = lambda spec: Stack.uniform(spec.layers)


ARCHITECTURES: Registry[Architecture] = Registry("architecture")  # keyed by config model_type


def register_architecture(arch: Architecture) -> Architecture:
    return ARCHITECTURES.register(arch, arch.model_types)


def get_architecture(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES.get(model_type)
    except LoraCostError:
        raise LoraCostError(f"unsupported architecture {model_type!r}; supported model_type values: "
                            f"{', '.join(supported_model_types())}") from None


@lru_cache(maxsize=1024)
def stack_of(arch: Architecture, spec: "ModelSpec") -> Stack:
    """The architecture's block plan for these shapes (cached: its derived tables are reused)."""
    stack = arch.stack(spec)
    if stack.layers != spec.layers:
        raise LoraCostError(f"{spec.name}: the block plan has {stack.layers} blocks, the config {spec.layers}")
    return stack


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES.all())


def require(cfg: dict, key: str, name: str, *alternatives: str):
    """A positive integer field of config.json, or a clear error naming the file's model."""
    for k in (key, *alternatives):
        if k in cfg and cfg[k] is not None:
            value = cfg[k]
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise LoraCostError(f"{name}: config field {k!r} must be a positive integer, got {value!r}")
            return value
    raise LoraCostError(f"{name}: config.json lacks {key!r}")


def prob(cfg: dict, key: str, default: float) -> float:
    value = cfg.get(key, default)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise LoraCostError(f"config field {key!r} must be a probability in [0, 1), got {value!r}")
    return float(value)
