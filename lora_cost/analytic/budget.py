"""Parameters, gradients and optimizer state of one run: what is stored, what trains, what the
optimizer keeps. Pure arithmetic over the architecture's parameter groups and the method's tensors."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from .architectures.base import Architecture
from .methods.base import Method, TensorGroup, get_method
from .methods.storage import BaseStorage
from .optimizer_budget import OptimizerBudget, optimizer_budget
from .optimizers import Optimizer
from ..errors import LoraCostError
from ..spec import LinearSite, ModelSpec, RunConfig
from ..units import DTYPE_BYTES


@dataclass(frozen=True)
class ParameterBudget:
    total_params: int
    trainable_params: int
    base_weight_bytes: int  # the pretrained weights as stored (the method's BaseStorage: NF4 + fp32 under QLoRA)
    trainable_bytes: int  # = gradient bytes
    frozen_adapter_bytes: int  # frozen A (LoRA-FA), shared projections (VeRA), initial factors (NoLA)
    per_layer_trainable_bytes: int  # trainable bytes inside one block (gradients accumulate block by block)
    state_bytes: int  # optimizer state
    paged: bool  # state lives outside torch's allocator
    optimizer_temporaries: int  # alive during opt.step()
    base_trainable: bool
    early_gradient_bytes: int = 0  # gradients that exist from the start of backward (AdaLoRA's regulariser)
    loop_state_bytes: int = 0  # kept by the training loop outside the optimizer (AdaLoRA's rank allocator)
    loop_temporaries: int = 0  # that state's update after opt.step()
    # gradients that arrive only at the end of backward (trained embeddings no LM head is tied to: a classifier)
    late_gradient_bytes: int = 0
    # --- task "optim": fp32 master copies, and steps inside backward (optimizer_budget.py) ---
    master_bytes: int = 0
    in_backward: bool = False
    block_step_transient: int = 0  # in backward: the largest block tensor's gradient + its step's temporaries
    head_step_transient: int = 0  # ... the largest tensor outside the blocks
    lm_head_steps_early: bool = False  # an untied trained LM head: stepped right after the loss's backward
    # allocevents: every trainable tensor group (the event replay creates their gradients and optimizer state)
    trainable_groups: tuple = ()
    # --- task "galore": an optimizer's occasional heavier step (GaLore's projector refresh: optimizers.py
    # `refresh_temporaries`): the optimizer's budget on that step; refresh_every 0: every step is alike
    refresh_every: int = 0
    refresh: OptimizerBudget | None = None
    # --optimizer-in-backward with a word embedding tied to the LM head: the head's contribution to the shared
    # weight's gradient waits in AccumulateGrad's input buffer from the head's backward until the embedding's, at the
    # end (torch/csrc/autograd/input_buffer.cpp: a node's inputs are summed when all have arrived): alive through
    # every block's backward (the moment GaLore's refresh in a block's hook shows; peaks.py `_hook_moments`)
    held_in_backward_bytes: int = 0
    refresh_step: bool = False  # this budget is the refresh step's (on_refresh_step): peaks.py `_hook_moments`

    def on_refresh_step(self) -> "ParameterBudget":
        """This budget as the refresh step has it (the step's own temporaries replaced)."""
        rb = self.refresh
        return replace(self, optimizer_temporaries=rb.step_temporaries, block_step_transient=rb.block_transient,
                       head_step_transient=rb.head_transient, refresh_step=True)

    @property
    def frozen_bytes(self) -> int:
        return (0 if self.base_trainable else self.base_weight_bytes) + self.frozen_adapter_bytes

    @property
    def allocated_state_bytes(self) -> int:
        return 0 if self.paged else self.state_bytes

    @property
    def steady_bytes(self) -> int:
        """Allocated between steps: every weight, the optimizer state and the training loop's own state."""
        return (self.frozen_bytes + self.trainable_bytes + self.allocated_state_bytes + self.loop_state_bytes
                + self.master_bytes)


@lru_cache(maxsize=512)
def param_groups(arch: Architecture, spec: ModelSpec, task: str | None = None, labels: int = 2):
    """The base model's parameters; a classification task replaces the LM head by its classifier (heads.py)."""
    groups = arch.params(spec)
    if task in ("seq-cls", "token-cls"):
        from .heads import param_groups as with_classifier
        groups = with_classifier(spec, groups, task, labels)
    return tuple(groups)


@lru_cache(maxsize=2048)
def base_weight_bytes(arch: Architecture, spec: ModelSpec, storage: BaseStorage, task: str | None = None,
                      labels: int = 2) -> int:
    """The pretrained weights as the method stores them: each block linear as its storage says (4-bit
    under QLoRA), every other parameter (embeddings, norms, biases, head) in the storage's other dtype (embeddings
    and head in its `embed_head_dtype`: bf16 under the QLoRA script's recast)."""
    total = 0.0
    for g in param_groups(arch, spec, task, labels):
        if g.kind == "linear":
            shape = param_shape(arch, spec, g)
            total += g.count * storage.linear_bytes(g.numel, shape[0] if shape else 0)
        elif g.kind in ("embedding", "head"):  # task "recast": the QLoRA script's bf16 embeddings and head
            total += g.total * DTYPE_BYTES[storage.embed_head_dtype]
        else:
            total += g.total * DTYPE_BYTES[storage.other_dtype]
    return int(total)


def groups_bytes(groups: list[TensorGroup]) -> int:
    return sum(g.total_numel * DTYPE_BYTES[g.dtype] for g in groups)


def site_gradient_bytes(spec: ModelSpec, method: Method, run: RunConfig, site: LinearSite, adapted: bool) -> int:
    """moments: the gradient bytes one block's linear `site` contributes to `per_layer_trainable_bytes`, read
    from the same groups `_parameter_budget` counts: the method's trainable tensors of the site (one block's,
    those present from backward's start left out as there), or under full fine-tuning the architecture's
    parameter groups of this linear (its weight, whose numel is d_in x d_out, and its bias) in the run's dtype.
    0 when nothing of it trains or no group is found (its gradient is then counted with the block's rest,
    present from the block's first backward moment: never less than before). The tape records when each
    site first runs (tape.trainable_used): peaks.py `in_block` counts only those formed by then."""
    if method.base_trainable:
        from .architectures import get_architecture
        arch = get_architecture(spec.model_type)
        groups = [g for g in param_groups(arch, spec, run.task, run.labels) if "*" in g.name
                  and (f".{site.path or site.name}." in g.name or f".{site.name}." in g.name)]
        weight = next((g.numel for g in groups if g.kind == "linear" and g.numel == site.d_in * site.d_out), 0)
        bias = next((g.numel for g in groups if g.kind == "bias" and g.numel == site.d_out), 0) if site.bias else 0
        total = weight + bias
        return total * DTYPE_BYTES[run.weight_dtype]
    if not adapted:
        return 0
    return sum(g.numel * DTYPE_BYTES[g.dtype] for g in method.trainable(site, run) if not g.grad_at_backward_start)


def parameter_budget(arch: Architecture, spec: ModelSpec, method: Method, run: RunConfig, opt: Optimizer,
                     sites: list[LinearSite], head_sites: list[LinearSite]) -> ParameterBudget:
    """Independent of batch and sequence length: cached, so batch and length sweeps reuse it."""
    sites, head_sites = tuple(sites), tuple(head_sites)
    lookup = (arch, spec, method.name, run.r, run.precision, run.optimizer, run.method_options, run.targets,
              run.task, run.num_labels, run.master_weights, run.optimizer_in_backward, run.adapter_dtype,
              run.modules_to_save, opt, sites, head_sites)
    found = _BUDGETS.get(lookup)
    if found is not None:  # a plain dict in front of the lru_cache: no RunConfig to build and validate
        return found
    key = RunConfig(method=method.name, r=run.r, precision=run.precision, optimizer=run.optimizer,
                    adapter_dtype=run.adapter_dtype, modules_to_save=run.modules_to_save,  # lossdtype
                    method_options=run.method_options, targets=run.targets,  # (IA)3's vectors depend on the targets
                    task=run.task, num_labels=run.num_labels, master_weights=run.master_weights,
                    optimizer_in_backward=run.optimizer_in_backward)
    found = _parameter_budget(arch, spec, key, opt, sites, head_sites)
    if len(_BUDGETS) >= 8192:
        _BUDGETS.clear()
    _BUDGETS[lookup] = found
    return found


_BUDGETS: dict[tuple, ParameterBudget] = {}


@lru_cache(maxsize=8192)
def _parameter_budget(arch: Architecture, spec: ModelSpec, run: RunConfig, opt: Optimizer,
                      sites: tuple[LinearSite, ...], head_sites: tuple[LinearSite, ...]) -> ParameterBudget:
    method = get_method(run.method)
    sites, head_sites = list(sites), list(head_sites)
    L = spec.layers
    dtype = run.weight_dtype
    groups = param_groups(arch, spec, run.task, run.labels)
    stored = base_weight_bytes(arch, spec, method.storage(run), run.task, run.labels)
    if method.base_trainable:
        trainable = [TensorGroup(g.name, g.numel, g.count, dtype, shape=param_shape(arch, spec, g),
                                 linear_weight=is_linear_weight(arch, spec, g)) for g in groups]
        # groups named "...*..." repeat in every block (their count is a multiple of L)
        per_layer = sum(g.total // L for g in groups if "*" in g.name) * DTYPE_BYTES[dtype]
        frozen: list[TensorGroup] = []
    else:
        trainable, frozen = [], []
        for s in sites:
            trainable += [replace(g, count=s.blocks or L) for g in method.trainable(s, run)]
            frozen += [replace(g, count=s.blocks or L) for g in method.frozen(s, run)]
        # tensors of every block that no targeted linear owns (bottleneck adapters)
        trainable += [replace(g, count=g.count * L) for g in method.block_trainable(spec, run)]
        # gradients arrive block by block in backward, except those present from its start
        per_layer = groups_bytes([g for g in trainable if not g.grad_at_backward_start]) // max(L, 1)
        for s in head_sites:
            trainable += method.trainable(s, run)
            frozen += method.frozen(s, run)
        # trainable tensors outside the adapted linears (BitFit's biases); "*" groups repeat per block
        beyond = method.model_trainable(spec, groups, run)
        trainable += beyond
        per_layer += sum(g.total_numel // L * DTYPE_BYTES[g.dtype] for g in beyond if "*" in g.name)
        if sites or head_sites:
            frozen += method.shared_frozen(sites + head_sites, run)
        if run.task in ("seq-cls", "token-cls"):  # peft modules_to_save: a trainable copy of the classifier
            from .heads import trainable_copy
            trainable += trainable_copy(spec, run, run.task)
        if run.modules_to_save:  # lossdtype: --modules-to-save embed_tokens,lm_head (modules_to_save.py)
            from .modules_to_save import copies
            trainable += copies(spec, run)
    loop_state, loop_temporaries = method.loop_state(trainable)
    if run.optimizer_in_backward and loop_state:
        raise LoraCostError(f"--optimizer-in-backward: {method.name}'s training loop reads the gradients after the "
                            "optimizer step, and stepping in backward frees each one right after its own step")
    # tensors inside the blocks: their gradients arrive block by block ("*" names repeat per block)
    # (adapters: all but the LM head's, a classifier copy's and a prompt encoder's)
    outside = tuple(f"{s.name}." for s in head_sites) + ("modules_to_save", "prompt_encoder")
    block_groups = [g for g in trainable if "*" in g.name] if method.base_trainable else \
        [g for g in trainable if not g.name.startswith(outside)]
    ob = optimizer_budget(opt, trainable, run.master_weights, run.optimizer_in_backward, block_groups)
    refreshing = opt.refreshing()  # galore: the projector refresh step's temporaries
    rb = optimizer_budget(refreshing, trainable, run.master_weights, run.optimizer_in_backward, block_groups) \
        if refreshing is not None else None
    return ParameterBudget(
        total_params=sum(g.total for g in groups), trainable_params=sum(g.total_numel for g in trainable),
        base_weight_bytes=stored, trainable_bytes=groups_bytes(trainable), frozen_adapter_bytes=groups_bytes(frozen),
        per_layer_trainable_bytes=per_layer, state_bytes=ob.state_bytes, paged=opt.paged,
        optimizer_temporaries=ob.step_temporaries, base_trainable=method.base_trainable,
        early_gradient_bytes=groups_bytes([g for g in trainable if g.grad_at_backward_start]),
        loop_state_bytes=loop_state, loop_temporaries=loop_temporaries,
        # moments: under full fine-tuning every embedding's gradient is complete only once backward has passed
        # the lookup, the step's first op (AccumulateGrad, torch/csrc/autograd/engine.cpp), except a word
        # embedding tied to the LM head, whose head contribution is alive from the loss on (the same rule as
        # sharding/tensors.py's `late`); a classifier's head is its own, so all of them are late there
        late_gradient_bytes=sum(g.total for g in groups if g.kind == "embedding" and not (
            spec.tie_embeddings and run.task not in ("seq-cls", "token-cls") and g.numel == spec.vocab * spec.hidden))
        * DTYPE_BYTES[dtype] if method.base_trainable
        # the trained embedding copy (--modules-to-save embed_tokens) gets its gradient at the end of backward
        else spec.vocab * spec.hidden * DTYPE_BYTES[dtype] if run.modules_to_save and "embed_tokens" in run.modules_to_save
        else 0,
        master_bytes=ob.master_bytes, in_backward=run.optimizer_in_backward,
        block_step_transient=ob.block_transient, head_step_transient=ob.head_transient,
        # a tied LM head is the input embedding: its gradient is complete (and stepped) only at the end
        lm_head_steps_early=method.base_trainable and not spec.tie_embeddings and run.task not in ("seq-cls", "token-cls"),
        trainable_groups=tuple(trainable),  # allocevents
        held_in_backward_bytes=spec.vocab * spec.hidden * DTYPE_BYTES[dtype] if run.optimizer_in_backward
        and method.base_trainable and spec.tie_embeddings and run.task not in ("seq-cls", "token-cls") else 0,
        refresh_every=opt.refresh_every if rb is not None else 0, refresh=rb)


def is_linear_weight(arch: Architecture, spec: ModelSpec, g) -> bool:
    """A torch nn.Linear's weight: a block linear (not GPT-2's Conv1D) or an untied LM head (a tied one is
    the embedding's parameter, named after it)."""
    if g.kind == "head":
        return True
    if g.kind not in ("linear", "kept-linear") or not param_shape(arch, spec, g):
        return False
    return not any(s.fan_in_fan_out for s in arch.linear_sites(spec) if f".{s.path or s.name}.weight" in g.name
                   or g.name.endswith(f"{s.name}.weight"))


def param_shape(arch: Architecture, spec: ModelSpec, g) -> tuple[int, ...]:
    """The shape of one tensor of a base parameter group where it is known (Adafactor factors matrices):
    a block linear [d_out, d_in] (GPT-2's Conv1D stores [d_in, d_out]: the same two sides), an embedding or
    LM head [rows, hidden], a norm or bias a vector; () where not known (routers, experts)."""
    if g.kind in ("linear", "kept-linear"):
        for s in arch.linear_sites(spec):
            if f".{s.path or s.name}.weight" in g.name or g.name.endswith(f"{s.name}.weight"):
                if s.d_in * s.d_out == g.numel:
                    return (s.d_out, s.d_in)
        return ()
    if g.kind in ("embedding", "head") and g.numel % spec.hidden == 0:
        return (g.numel // spec.hidden, spec.hidden)
    if g.kind in ("norm", "bias"):
        return (g.numel,)
    return ()
