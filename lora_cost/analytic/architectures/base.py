"""The architecture contract and its registry (one entry per family, keyed by config model_type).

The registry fills itself on demand: a lookup of a model_type imports the one family module that
registers it, found by its `register_architecture(Architecture(..., model_types=(...)))` call in the
module's source (`family_index`); anything else (a model_type no module names, `supported_model_types`)
imports every module of the package. So `lora-cost estimate` on a Llama imports llama.py alone, and a
new family is still one new module (tests/test_import_budget.py checks the index against the registry).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Callable

from ...errors import LoraCostError, shown
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
    kind: str  # "linear" (a block's linear weight; NF4 under QLoRA), "kept-linear" (one kept out of quantisation: T5's wo), "embedding", "norm", "bias", "head"
    bias_numel: int = 0  # of `numel`, the elements that are a bias (a LayerNorm's beta): BitFit trains them

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
    # lines the family adds to an estimate's assumptions (Gemma 2: eager attention whatever was asked;
    # mixture of experts: the routing); none by default
    notes: Callable[["ModelSpec", object], tuple[str, ...]] = lambda spec, run: ()
    # the --task values the family has (the first is its default); heads other than the LM head: heads.py
    tasks: tuple[str, ...] = ("causal-lm",)
    # ligeracc: the forward functions hold each tape tensor as transformers' modules hold the real one (a
    # sublayer's locals die when it returns, a rebound name frees its tensor), so the tape's op-by-op count of
    # what is alive (tape.forward_live) is the forward's; the forward's tracked moments (peaks.py) are taken
    # only for such families
    forward_lifetimes: bool = False


def family_modules() -> tuple[str, ...]:
    """The family modules of this package (every module but this one), sorted."""
    return _family_modules(os.path.dirname(__file__))


@lru_cache(maxsize=1)
def _family_modules(directory: str) -> tuple[str, ...]:
    return tuple(sorted(m.name for m in pkgutil.iter_modules([directory]) if m.name != "base"))


# a family module's registration names its model types as a literal: `model_types=("llama", "mistral")`
_MODEL_TYPES = re.compile(r"model_types\s*=\s*\(([^)]*)\)")
_QUOTED = re.compile(r"[\"']([^\"']+)[\"']")


@lru_cache(maxsize=1)
def family_index() -> dict[str, str]:
    """model_type -> the family module whose source registers it (read, not imported). A module whose
    source cannot be read (a sourceless install) is simply absent: its lookups import every module."""
    index: dict[str, str] = {}
    directory = os.path.dirname(__file__)
    for module in family_modules():
        try:
            with open(os.path.join(directory, f"{module}.py"), encoding="utf-8") as f:
                text = f.read()
        except OSError:
            continue
        for literal in _MODEL_TYPES.finditer(text):
            for model_type in _QUOTED.findall(literal.group(1)):
                index.setdefault(model_type, module)
    return index


def _load_families(model_type: str | None) -> None:
    """Registry loader: import the family module registering `model_type`, or every one (None)."""
    modules = family_modules() if model_type is None else (family_index().get(model_type),)
    for module in modules:
        if module is not None:
            importlib.import_module(f"{__package__}.{module}")


# keyed by config model_type; families register when their module is imported (_load_families)
ARCHITECTURES: Registry[Architecture] = Registry("architecture", load=_load_families)


def register_architecture(arch: Architecture) -> Architecture:
    return ARCHITECTURES.register(arch, arch.model_types)


def get_architecture(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES.get(model_type)
    except LoraCostError:
        raise LoraCostError(f"unsupported architecture {shown(model_type)}; supported model_type values: "
                            f"{', '.join(supported_model_types())} (--engine trace builds any model transformers "
                            "can build)") from None


@lru_cache(maxsize=1024)
def stack_of(arch: Architecture, spec: "ModelSpec") -> Stack:
    """The architecture's block plan for these shapes (cached: its derived tables are reused)."""
    stack = arch.stack(spec)
    if stack.layers != spec.layers:
        raise LoraCostError(f"{spec.name}: the block plan has {stack.layers} blocks, the config {spec.layers}")
    return stack


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES.all())


# ---- reading config.json -----------------------------------------------------------------------
# Each field is checked once, here, where the config is read: its JSON type (an integer field takes a
# JSON integer: not 16.0, "16", [16], true or NaN), its range and its consistency with the others.
# The upper bounds sit orders of magnitude above every published transformer, so no real config
# meets one; past them a file describes no model that could be trained, byte counts stop meaning
# anything, and per-layer structures would not fit in memory (10^12 layers).
MAX_LAYERS = 100_000  # the deepest published transformers have a few hundred layers (PaLM 540B: 118)
MAX_WIDTH = 1 << 20  # hidden, MLP and head sizes, head counts: the widest published MLP is PaLM's, 73,728
MAX_VOCAB = 1 << 24  # the largest published vocabularies hold about 256K tokens (Gemma: 262,144)
MAX_POSITIONS = 1 << 30  # the longest published contexts hold 10M tokens (Llama 4 Scout)
_REQUIRED = object()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(cfg: dict, key: str, name: str, *alternatives: str, default: object = _REQUIRED, minimum: int = 1,
            maximum: int = MAX_WIDTH) -> int:
    """An integer field of config.json in [minimum, maximum] (the first of key, *alternatives that is
    set and not null), else `default`; a missing field without a default is an error."""
    for k in (key, *alternatives):
        if cfg.get(k) is not None:
            value = cfg[k]
            if not _is_int(value) or not minimum <= value <= maximum:
                raise LoraCostError(f"{name}: config field {k!r} must be an integer from {minimum:,} to {maximum:,}, "
                                    f"got {shown(value)}")
            return value
    if default is _REQUIRED:
        raise LoraCostError(f"{name}: config.json lacks {key!r}")
    return default  # type: ignore[return-value]


def require(cfg: dict, key: str, name: str, *alternatives: str, maximum: int = MAX_WIDTH) -> int:
    """A positive integer field that must be there."""
    return integer(cfg, key, name, *alternatives, maximum=maximum)


def flag(cfg: dict, key: str, name: str, default: bool) -> bool:
    """A true/false field (null or absent: the default)."""
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise LoraCostError(f"{name}: config field {key!r} must be true or false, got {shown(value)}")
    return value


def prob(cfg: dict, key: str, name: str, default: float) -> float:
    """A dropout probability in [0, 1) (null or absent: the default)."""
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:  # NaN fails 0 <= v
        raise LoraCostError(f"{name}: config field {key!r} must be a probability in [0, 1), got {shown(value)}")
    return float(value)


def divisible(name: str, what: str, value: int, by_what: str, by: int) -> None:
    """A consistency rule between two fields (e.g. the hidden size splits evenly over the heads)."""
    if value % by:
        raise LoraCostError(f"{name}: {what} {value:,} is not divisible by {by_what} {by:,}")
