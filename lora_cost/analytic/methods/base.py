"""The contract every fine-tuning method fulfils, and the one registry of methods.

A method is a small set of pure functions of shapes: which tensors train, what its adapter
stores, how a targeted linear layer runs (what it saves for backward, its FLOPs), and how the
base weights are stored. The estimator composes a method with an architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ...errors import LoraCostError
from ...registry import Registry, dashed

if TYPE_CHECKING:  # pragma: no cover
    from ..context import StepContext
    from ...spec import LinearSite, ModelSpec, RunConfig
    from ..tape import Tensor


@dataclass(frozen=True)
class TensorGroup:
    """`count` tensors of `numel` elements each, stored in `dtype` (e.g. every layer's lora_A)."""

    name: str
    numel: int
    count: int
    dtype: str

    @property
    def total_numel(self) -> int:
        return self.numel * self.count


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    paper: str  # citation of the method's paper (arXiv id / venue)
    recipe: str  # the library behaviour modelled
    default_r: int | None
    # per targeted linear site: trainable tensors, frozen adapter tensors (each a list of TensorGroups, count 1)
    trainable: Callable[["LinearSite", "RunConfig"], list[TensorGroup]]
    frozen: Callable[["LinearSite", "RunConfig"], list[TensorGroup]]
    # the forward of a targeted linear layer, recording saved tensors and FLOPs on ctx.tape
    adapted_linear: Callable[["StepContext", "Tensor", "LinearSite"], "Tensor"]
    # tensors shared by all adapted layers (VeRA's projections); gets every targeted site
    shared_frozen: Callable[[list["LinearSite"], "RunConfig"], list[TensorGroup]] = lambda sites, run: []
    base_trainable: bool = False  # full fine-tuning trains the base weights
    quantized_base: bool = False  # QLoRA: linear weights in NF4, the rest cast to fp32
    options: tuple[str, ...] = ()  # method option names this method accepts
    option_defaults: dict = field(default_factory=dict)
    validate: Callable[["ModelSpec", list["LinearSite"], "RunConfig"], None] = lambda spec, sites, run: None

    def rank(self, run: "RunConfig") -> int:
        return run.r if run.r is not None else (self.default_r or 0)

    def option(self, run: "RunConfig", key: str):
        return run.option(key, self.option_defaults.get(key))


METHODS: Registry[Method] = Registry("method", dashed)


def register_method(method: Method) -> Method:
    return METHODS.register(method, [method.name])


def get_method(name: str) -> Method:
    return METHODS.get(name)


def all_methods() -> dict[str, Method]:
    return METHODS.all()


def check_rank(sites: list["LinearSite"], r: int, method: str) -> None:
    """A rank above min(d_in, d_out) of an adapted matrix cannot add expressiveness and peft would
    build a factor larger than the matrix: reject it."""
    for site in sites:
        limit = min(site.d_in, site.d_out)
        if r > limit:
            raise LoraCostError(
                f"rank {r} is larger than {site.name} allows for {method} (min(d_in, d_out) = min({site.d_in}, {site.d_out}) = {limit})")
