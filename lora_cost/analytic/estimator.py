"""Compose an architecture, a method and a run into an `Estimate` of one training step.

The step modelled is the reference recipe of transformers + peft (+ bitsandbytes for QLoRA):
`loss = model(input_ids, labels=input_ids).loss; loss.backward(); opt.step();
opt.zero_grad(set_to_none=True)`, in steady state (optimizer state allocated, gradients freed
between steps). Memory is PyTorch's *allocated* memory on a CUDA device.

The pieces: the architecture's forward runs on the symbolic tape (`tape.py`, `ops.py`; cached per
structure in `record.py`) and gives the bytes autograd keeps and the FLOPs per scope; `budget.py`
counts parameters, gradients and optimizer state; `peaks.py` finds the moments where allocated memory
peaks; `explain.py` names every term.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

from .architectures import get_architecture
from .architectures.base import Architecture, stack_of
from ..errors import LoraCostError
from .methods import get_method
from .budget import parameter_budget
from .device import DEFAULT_UTILISATION, device_bytes, device_formula, gpu_fit
from .explain import describe, flop_terms, memory_terms, saved_by_kind
from .methods.base import Method
from .optimizers import get_optimizer
from .peaks import activation_budget, phase_peaks
from ..profiles import load_gpu, load_model
from .record import affine_record
from ..results import Estimate, FlopEstimate, MemoryEstimate, Term
from ..spec import LinearSite, ModelSpec, RunConfig

ALL_LINEAR = "all-linear"


# ---------------------------------------------------------------------------------------------
def resolve_targets(arch: Architecture, spec: ModelSpec, method: Method, targets) -> tuple[tuple[str, ...], list[LinearSite], list[LinearSite]]:
    """The target names, the per-block sites they adapt and the head sites they adapt."""
    defaults = method.default_targets(spec) if method.default_targets is not None and targets is None else None
    names, sites, head = _resolve_targets(arch, spec, not method.takes_targets,
                                          tuple(targets) if targets is not None else None, defaults)
    return names, list(sites), list(head)


@lru_cache(maxsize=4096)
def _resolve_targets(arch: Architecture, spec: ModelSpec, base_trainable: bool, targets, defaults=None):
    block_sites = arch.linear_sites(spec)
    head_sites = arch.head_sites(spec)
    names = {s.name for s in block_sites} | {s.name for s in head_sites}
    if base_trainable:
        return (), (), ()
    if targets is None:
        wanted = tuple(arch.default_targets) if defaults is None else tuple(defaults)
    elif tuple(targets) == (ALL_LINEAR,):
        wanted = tuple(dict.fromkeys(s.name for s in (*block_sites, *head_sites)))
    else:
        wanted = tuple(t.strip() for t in targets if t.strip())
        if not wanted:
            raise LoraCostError("--targets is empty")
        for t in wanted:
            if t not in names and not any(s.matches(t) for s in (*block_sites, *head_sites)):
                raise LoraCostError(f"target module {t!r} matches nothing in {spec.name}; its linear modules are "
                                    f"{', '.join(sorted(names))} (or use all-linear)")
    chosen = set(wanted)
    picked = lambda site: site.name in chosen or any(site.matches(t) for t in chosen)  # noqa: E731
    return wanted, tuple(s for s in block_sites if picked(s)), tuple(s for s in head_sites if picked(s))


@lru_cache(maxsize=4096)
def _forward_key(run: RunConfig) -> RunConfig:
    """The run as far as the forward simulation is concerned: rank 1 (the record is affine in r;
    a method whose sizes are not keeps its rank) and no optimizer."""
    affine = get_method(run.method).rank_affine
    return replace(run, r=1 if run.r is not None and affine else run.r, optimizer="adamw")


def estimate(model: str | ModelSpec, method: str = "lora", *, r: int | None = None, targets=None, batch: int = 1,
             seq: int = 512, precision: str = "bf16", optimizer: str = "adamw", grad_checkpointing: bool = False,
             attention: str = "sdpa", dropout: float = 0.0, model_dropout: float | None = None,
             method_options: dict | None = None, gpu: str | None = None,
             utilisation: float = DEFAULT_UTILISATION, serving: bool = False,
             target_seq: int | None = None, moe_imbalance: float | None = None, task: str | None = None,
             num_labels: int | None = None, loss: str = "standard", adapter_dtype: str | None = None,
             modules_to_save=None) -> Estimate:
    """Estimate memory and FLOPs of one training step (and, with `serving`, the fine-tuned model's
    inference cost at a context of `seq` positions). `target_seq` is an encoder-decoder model's
    decoder length (default `seq`). Raises LoraCostError on bad input."""
    spec = model if isinstance(model, ModelSpec) else load_model(model)
    if isinstance(targets, str):
        targets = tuple(t for t in targets.split(","))
    run = RunConfig(method=method, r=r, targets=tuple(targets) if targets is not None else None, batch=batch, seq=seq,
                    precision=precision, optimizer=optimizer, grad_checkpointing=grad_checkpointing,
                    attention=attention, dropout=dropout, model_dropout=model_dropout,
                    method_options=tuple(sorted((method_options or {}).items())), target_seq=target_seq,
                    moe_imbalance=moe_imbalance, task=task, num_labels=num_labels, loss=loss, adapter_dtype=adapter_dtype,
                    modules_to_save=tuple(modules_to_save.split(",")) if isinstance(modules_to_save, str) else modules_to_save)
    return estimate_run(spec, run, gpu=gpu, utilisation=utilisation, serving=serving)


def validated_run(spec: ModelSpec, run: RunConfig):
    """Check a run against the model and the method (both engines share this) and fill in the
    method's defaults. Returns (run, method, target names, adapted block sites, adapted head sites)."""
    if run.target_seq is not None and not spec.decoder_layers:
        raise LoraCostError(f"--target-seq (the decoder length) applies to encoder-decoder models only; "
                            f"{spec.name} has no separate decoder")
    if run.moe_imbalance is not None and spec.moe is None:
        raise LoraCostError(f"--moe-imbalance applies to mixture-of-experts models only; {spec.name} is dense")
    run, method = validated_method_run(run)
    arch = get_architecture(spec.model_type)
    if run.task is not None:
        from .heads import check_targets, check_task
        check_task(arch, spec, method, run)
        if run.task in ("seq-cls", "token-cls"):
            check_targets(spec, run.task, run.labels, run.targets, run.targets is not None
                          and tuple(run.targets) == (ALL_LINEAR,))
    target_names, sites, head_sites = resolve_targets(arch, spec, method, run.targets)
    if run.task in ("seq-cls", "token-cls"):
        head_sites = []  # the LM head (RoBERTa's lm_head.dense) is not there; the classifier's linears are refused above
    method.check(spec, sites + head_sites, run)
    if run.loss != "standard" or run.modules_to_save:  # lossdtype
        from .heads import task_of
        from .losses import check_loss
        from .modules_to_save import check_modules_to_save
        check_loss(spec, run, task_of(arch, run))
        check_modules_to_save(spec, method.name, run, task_of(arch, run))
    return run, method, target_names, sites, head_sites


def validated_method_run(run: RunConfig):
    """The checks of a run that need no model (the method's options, rank, targets and dropout as
    flags) and the method's defaults filled in: (run, method). The trace engine's path for families
    the analytic engine does not know uses these alone (the real model checks the rest)."""
    method = get_method(run.method)
    method.check_options(run)
    if run.adapter_dtype is not None:  # lossdtype
        from .adapter_dtypes import check_adapter_dtype
        check_adapter_dtype(method.name, run)
    if method.base_trainable:
        if run.r is not None:
            raise LoraCostError("--r does not apply to full fine-tuning")
        if run.dropout:
            raise LoraCostError("--dropout (adapter dropout) does not apply to full fine-tuning")
        if run.targets is not None:
            raise LoraCostError("--targets does not apply to full fine-tuning (every weight is trained)")
    elif not method.adapts_linears:  # bottleneck adapters: no rank, no targeted linear layers
        if run.r is not None:
            raise LoraCostError(f"--r does not apply to {method.name} (it adapts no linear layer with a rank)")
        if run.targets is not None:
            raise LoraCostError(f"--targets does not apply to {method.name} (it adapts every block, not linear layers)")
    elif not method.uses_rank and run.r is not None:
        raise LoraCostError(f"--r does not apply to {method.name} (it has no rank)")
    run = method.resolve(run)
    if run.method != method.name or (method.takes_rank and run.r is None):
        run = replace(run, method=method.name, r=method.rank(run) if method.takes_rank else None)
    get_optimizer(run.optimizer)
    return run, method


def estimate_run(spec: ModelSpec, run: RunConfig, *, gpu: str | None = None,
                 utilisation: float = DEFAULT_UTILISATION, serving: bool = False) -> Estimate:
    run, method, target_names, sites, head_sites = validated_run(spec, run)
    arch = get_architecture(spec.model_type)
    opt = get_optimizer(run.optimizer)
    warnings = []
    if run.seq > spec.max_positions:
        warnings.append(f"sequence length {run.seq} exceeds the model's maximum of {spec.max_positions} positions")

    L = spec.layers
    stack = stack_of(arch, spec)
    reps = stack.repetitions  # each simulated block stands for this many layers (stack.py)
    scopes = ("embeddings", *stack.block_scopes, "head", "loss")
    # the forward does not depend on the optimizer, and depends on the rank affinely (record.py)
    rec = affine_record(spec, _forward_key(run), frozenset(target_names)).at(run.r)
    params = parameter_budget(arch, spec, method, run, opt, sites, head_sites)
    acts = activation_budget(rec, run, stack)
    phases = phase_peaks(rec, acts, params, run, stack, adapted_blocks=bool(sites) or bool(method.block_trainable(spec, run)))
    peak = max(phases, key=lambda p: p.peak_bytes)
    paged = params.state_bytes if params.paged else 0
    device = device_bytes(peak.peak_bytes, paged)

    fwd = sum(rec.flops.get((s, "fwd"), 0) * reps.get(s, 1) for s in scopes)
    bwd = sum(rec.flops.get((s, "bwd"), 0) * reps.get(s, 1) for s in scopes)
    layer_scopes = stack.block_scopes
    # Non-reentrant checkpointing reruns each block's forward inside backward, stopping as soon as
    # the last tensor the block saves has been recomputed (torch.utils.checkpoint early stop), so
    # the block's trailing kernels (usually the last projection's matmul) are not rerun.
    recomputed = sum((rec.flops.get((s, "fwd"), 0) - rec.flops_after_last_save.get(s, 0)) * reps[s] for s in layer_scopes)
    uncounted = sum(v * reps.get(s, 1) for s, v in rec.uncounted.items())
    uncounted_bwd = 0
    if run.grad_checkpointing:
        bwd += recomputed
        uncounted_bwd = sum((rec.uncounted.get(s, 0) - rec.uncounted_after_last_save.get(s, 0)) * reps[s] for s in layer_scopes)

    memory = MemoryEstimate(
        peak_bytes=peak.peak_bytes, peak_phase=peak.phase,
        components=tuple(Term(t.name, t.value, *describe(t.name), t.category) for t in peak.terms),
        phases=phases, device_bytes=device, steady_bytes=params.steady_bytes, saved_activation_bytes=acts.total,
        saved_by_kind=saved_by_kind(rec, run, acts.kept),
        terms=memory_terms(spec, run, method, opt, params, acts.total, rec))
    flops = FlopEstimate(forward=int(fwd), backward=int(bwd), forward_uncounted=int(uncounted),
                         backward_uncounted=int(uncounted_bwd), terms=flop_terms(rec, run, recomputed))
    fit = gpu_fit(load_gpu(gpu), device, fwd + bwd, run.precision, utilisation) if gpu is not None else None
    return Estimate(
        model=spec.name, family=spec.model_type, method=method.name, r=run.r if not method.base_trainable else None,
        targets=target_names, batch=run.batch, seq=run.seq, precision=run.precision, optimizer=opt.name,
        grad_checkpointing=run.grad_checkpointing, attention=run.attention, dropout=run.dropout,
        method_options=method.option_values(run), trainable_params=params.trainable_params,
        total_params=params.total_params, adapted_modules=sum(s.blocks or L for s in sites) + method.modules_per_block * L + len(head_sites),
        memory=memory, flops=flops, gpu=fit, warnings=tuple(warnings),
        assumptions=_assumptions(run, opt) + ((f"{method.name}: {method.note}",) if method.note else ())
        + ((f"encoder-decoder: the encoder runs at {run.seq} positions (--seq), the decoder at {run.decoder_seq} "
            "(--target-seq): labels of that length, shifted right as the decoder input; the loss is over them",)
           if spec.decoder_layers else ())
        + tuple(method.notes(spec, sites, head_sites, run)) + tuple(arch.notes(spec, run)) + _task_note(run)
        + _lossdtype_notes(spec, run),
        serving=_serving(arch, spec, method, sites, head_sites, run) if serving else None)


def _serving(arch, spec, method, sites, head_sites, run):
    from .serving import serving_estimate  # only when asked: the estimate path stays as it was
    return serving_estimate(arch, spec, method, sites, head_sites, run)


def _lossdtype_notes(spec: ModelSpec, run: RunConfig) -> tuple[str, ...]:
    if run.loss == "standard" and run.adapter_dtype in (None, "fp32"):
        return ()  # the output stays as it was
    from .losses import notes
    return notes(spec, run)


def _task_note(run: RunConfig) -> tuple[str, ...]:
    """A classification head says what it is (absent for the family's own LM head: the output stays as it was)."""
    if run.task not in ("seq-cls", "token-cls"):
        return ()
    what = ("logits of one position per row (decoders: the last non-pad token; BERT/RoBERTa: [CLS])"
            if run.task == "seq-cls" else "per-token logits")
    return (f"task {run.task} with {run.labels} labels: the classifier replaces the LM head, {what}; with an adapter "
            "method peft trains a copy of it (task_type modules_to_save), counted as trainable",)


def _assumptions(run: RunConfig, opt) -> tuple[str, ...]:
    kernel = ("kernel chosen as torch does on sm80+: flash for 16-bit, memory-efficient for fp32, math for fp32 "
              "grouped-query" if run.attention == "sdpa" else "transformers eager path")
    return (
        "reference recipe: transformers + peft (+ bitsandbytes for QLoRA) on a CUDA GPU, loss = model(ids, labels=ids).loss",
        f"attention: {run.attention} ({kernel})",
        device_formula(opt.paged),
    )
