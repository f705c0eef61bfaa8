"""The contract every fine-tuning method fulfils, and the one registry of methods.

A method is one module owning everything about it: which tensors train, what its adapter stores,
how a targeted linear layer runs (what it saves for backward, its FLOPs), how the base weights are
stored (`storage.py`), its typed options (`options.py`; the CLI generates its flags from them), its
rank limit, how the trace engine applies it to a real model and how the profiler recognises a live
one. The analytic parts are pure functions of shapes; the trace and profiler hooks import torch and
peft inside the function, so the estimate path never does. Every module of this package is imported
by `__init__.py`, so adding a method is adding its module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ...errors import LoraCostError
from ...registry import Registry, dashed
from .options import MethodOption
from .storage import BaseStorage, dense

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
    # its gradient exists from the start of backward (AdaLoRA's orthogonal regulariser, which runs after
    # the loss, reaches lora_A and lora_B before any block does) instead of arriving with its block
    grad_at_backward_start: bool = False
    # the tensor's shape where a method knows it (Adafactor factors the second moment of matrices); () unknown
    shape: tuple[int, ...] = ()
    # a weight of a torch nn.Linear (GaLore projects the gradients of these: Trainer optim_target_modules="all-linear")
    linear_weight: bool = False

    @property
    def total_numel(self) -> int:
        return self.numel * self.count


def matrix_rank(site: "LinearSite") -> int:
    """A rank above min(d_in, d_out) of the adapted matrix adds no expressiveness, and peft would build
    a factor larger than the matrix: the limit of every method with low-rank factors. Not on a parameter peft
    wraps in lora.ParamWrapper (`site.experts`): all-linear reaches the MoE router ([E, d], E = 8 in Mixtral) at
    the run's rank whatever E is, and peft builds it so (ParamWrapper.update_layer checks only r > 0)."""
    return None if site.experts else min(site.d_in, site.d_out)


def no_rank_limit(site: "LinearSite") -> None:
    return None


def plain_attention(ctx: "StepContext", q, k, v, shape, **kwargs):
    from .. import ops
    return ops.attention(ctx.tape, q, k, v, shape, **kwargs)


def plain_residual(ctx: "StepContext", point: str, out, x, norm):
    """x + sublayer output, then the post-norm if the family has one."""
    from .. import ops
    y = ops.add(ctx.tape, out, x)
    return norm(y) if norm is not None else y


# trace hook: (meta-device model, run, target module names, notes to append to) -> (model, adapted modules)
ApplyToModel = Callable[[Any, "RunConfig", tuple, list], tuple]


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
    storage: Callable[["RunConfig"], BaseStorage] = dense  # how the pretrained weights are stored
    options: tuple[MethodOption, ...] = ()
    max_rank: Callable[["LinearSite"], int | None] = matrix_rank  # None: no limit
    precisions: tuple[str, ...] | None = None  # the --precision values it runs at (None: all)
    validate: Callable[["ModelSpec", list["LinearSite"], "RunConfig"], None] = lambda spec, sites, run: None
    # where a method reaches beyond linear layers (the defaults change nothing): virtual tokens prepended
    # to the sequence, the embeddings handed to the first block, the attention core, a sublayer's output
    # joining the residual stream
    # inference: (model shapes, adapted block sites, adapted head sites, run) -> ServingCost (serving.py);
    # None: not described yet
    serving: Callable[..., Any] | None = None
    virtual_tokens: Callable[["RunConfig"], int] = lambda run: 0
    input_embeddings: Callable[["StepContext", "Tensor"], "Tensor"] = lambda ctx, x: x
    attention: Callable[..., "Tensor"] = plain_attention
    residual: Callable[..., "Tensor"] = plain_residual
    # a method that adapts no targeted linear layer and has no rank (bottleneck adapters): --r and
    # --targets do not apply, and its trainable tensors are per block (`block_trainable`, count per block)
    adapts_linears: bool = True
    block_trainable: Callable[["ModelSpec", "RunConfig"], list[TensorGroup]] = lambda spec, run: []
    modules_per_block: int = 0  # adapter modules it adds to every block (counted in `adapted_modules`)
    # the forward after the loss (AdaLoRA's orthogonal regulariser in AdaLoraModel.forward)
    after_loss: Callable[["StepContext"], None] = lambda ctx: None
    # (run) -> the run with the method's derived settings filled in (AdaLoRA: the rank from --init-r)
    resolve: Callable[["RunConfig"], "RunConfig"] = lambda run: run
    # every simulated size is affine in the rank (record.py simulates r = 1 and 2); False: simulated at the
    # run's own rank (AdaLoRA's regulariser forms r x r products)
    rank_affine: bool = True
    # what the training loop keeps and does outside the optimizer, from the run's trainable tensors:
    # (bytes kept between steps, bytes of the temporaries of its update after opt.step()); AdaLoRA's
    # rank allocator
    loop_state: Callable[[list["TensorGroup"]], tuple[int, int]] = lambda trainable: (0, 0)
    # lines added to the estimate's assumptions: (model shapes, block sites, head sites, run)
    notes: Callable[..., tuple[str, ...]] = lambda spec, sites, head_sites, run: ()
    # prefix tuning: keys/values prepended to every attention layer's own (extra_keys of them), and the
    # hook that joins them to the layer's k and v (as the cache update's torch.cat does)
    extra_keys: Callable[["RunConfig"], int] = lambda run: 0
    key_values: Callable[..., tuple] = lambda ctx, k, v: (k, v)
    # trace engine: applies the method to the real model (imports torch/peft inside); None: not traceable
    apply_to_model: ApplyToModel | None = None
    # trace engine: (model, run) -> (tensors the training loop keeps between steps, created in the fake mode,
    # and the call it makes after opt.step() and before zero_grad); None: a plain loop
    trace_loop: Callable[[Any, "RunConfig"], tuple] | None = None
    # profiler: does this live model (and its peft config, or None) run this method? Higher priority is
    # asked first, so a method refining another (QLoRA, DoRA, LoRA-FA refine LoRA) claims the model first.
    recognise: Callable[[Any, Any], bool] | None = None
    recognise_priority: int = 0
    observed_options: Callable[[Any], dict] = lambda model: {}  # its options as read from a live model
    observed_precision: Callable[[Any], str | None] | None = None  # when parameter dtypes do not tell
    # profiler: a method told apart by its optimizer (LoRA+'s learning-rate groups): (model, peft config,
    # optimizer) -> its observed options when it recognises the run, else None; asked before `recognise`
    recognise_optimizer: Callable[[Any, Any, Any], dict | None] | None = None
    # BitFit: every bias of the model trains (ops save and flow gradients accordingly; the budget counts
    # the architecture's bias parameters as trainable)
    trains_biases: bool = False
    # trainable tensors outside the adapted linears, from the architecture's parameter groups
    # (spec, groups, run) -> TensorGroups; `per_layer` of them repeat in every block
    model_trainable: Callable[["ModelSpec", tuple, "RunConfig"], list[TensorGroup]] = lambda spec, groups, run: []
    # the modules adapted when --targets is not given ((IA)3: peft's per-family defaults); None: the
    # architecture's query and value projections
    default_targets: Callable[["ModelSpec"], tuple[str, ...]] | None = None
    uses_rank: bool = True  # False: the method has no rank (BitFit, (IA)3); --r is refused
    note: str = ""  # shown beside the method's estimates and plan rows (LoRA+: costs equal LoRA's)
    # ligeracc: its adapted linear holds each tape tensor as peft's forward holds the real one (Architecture.
    # forward_lifetimes, tape.forward_live): only then are the forward's and the recomputation's tracked moments taken
    forward_lifetimes: bool = False

    @property
    def takes_targets(self) -> bool:
        """Whether --targets applies (the method adapts linear layers chosen by name)."""
        return self.adapts_linears and not self.base_trainable

    @property
    def takes_rank(self) -> bool:
        """Whether --r applies (a low-rank adapter on targeted linear layers; not BitFit, (IA)3, adapters)."""
        return self.takes_targets and self.uses_rank

    @property
    def option_names(self) -> frozenset[str]:
        """The names of the options it takes (RunConfig.method_options keys)."""
        return frozenset(o.name for o in self.options)

    def rank(self, run: "RunConfig") -> int:
        return run.r if run.r is not None else (self.default_r or 0)

    def option_values(self, run: "RunConfig") -> dict:
        """Every option of the method with the run's value or its default (the JSON `method_options`)."""
        return {o.name: o.value(run) for o in self.options}

    def check_options(self, run: "RunConfig") -> None:
        """Each given option must be one of this method's, of its type, range and choices."""
        own = {o.name: o for o in self.options}
        for key, value in run.method_options:
            if key not in own:
                raise LoraCostError(f"{flag_of(key)} does not apply to method {self.name}")
            own[key].check(value)

    def check(self, spec: "ModelSpec", sites: list["LinearSite"], run: "RunConfig") -> None:
        """The run's precision and rank against what the method allows, then its own checks."""
        if self.precisions is not None and run.precision not in self.precisions:
            raise LoraCostError(f"{self.name} needs --precision {' or '.join(self.precisions)}, not {run.precision}")
        if not self.base_trainable and run.r is not None:
            for site in sites:
                limit = self.max_rank(site)
                if limit is not None and run.r > limit:
                    raise LoraCostError(f"rank {run.r} is larger than {site.name} allows for {self.name} "
                                        f"(at most {limit} for a {site.d_in} x {site.d_out} matrix)")
        self.validate(spec, sites, run)


METHODS: Registry[Method] = Registry("method", dashed)


def register_method(method: Method) -> Method:
    """Add a method; its options must agree with any other method's option of the same name or flag
    (one option name means one thing, and one flag sets one option)."""
    for opt in method.options:
        for other in (o for m in METHODS.all().values() for o in m.options):
            if (other.name == opt.name or other.flag == opt.flag) and other != opt:
                raise ValueError(f"method {method.name}: option {opt.name} ({opt.flag}) clashes with {other}")
    return METHODS.register(method, [method.name])


def get_method(name: str) -> Method:
    return METHODS.get(name)


def all_methods() -> dict[str, Method]:
    """Full fine-tuning (the baseline) first, then the methods by name: an order that does not depend on
    which module happened to be imported first."""
    return dict(sorted(METHODS.all().items(), key=lambda kv: (not kv[1].base_trainable, kv[0])))


def all_options() -> dict[MethodOption, tuple[str, ...]]:
    """Every distinct option with the methods that take it, in registration order (the CLI's flags)."""
    out: dict[MethodOption, tuple[str, ...]] = {}
    for method in all_methods().values():
        for opt in method.options:
            out[opt] = out.get(opt, ()) + (method.name,)
    return out


def recognisers() -> list[Method]:
    """The methods the profiler can recognise on a live model, in the order it asks them."""
    found = [m for m in METHODS.all().values() if m.recognise is not None]
    return sorted(found, key=lambda m: (-m.recognise_priority, m.name))


def optimizer_recognisers() -> list[Method]:
    """The methods the profiler tells apart by the optimizer (asked before `recognisers()`)."""
    found = [m for m in METHODS.all().values() if m.recognise_optimizer is not None]
    return sorted(found, key=lambda m: (-m.recognise_priority, m.name))


def flag_of(key: str) -> str:
    """The CLI flag of the option named `key` (the key itself when no method declares it)."""
    return next((o.flag for o in all_options() if o.name == key), key)
