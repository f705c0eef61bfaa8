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
from ..attention_kernels import check_kernel_run, get_kernel
from ..errors import LoraCostError
from .methods import get_method
from .budget import parameter_budget
from .device import DEFAULT_UTILISATION, device_formula, device_memory, gpu_fit, slack_reserved
from .explain import describe, flop_terms, memory_terms, saved_by_kind
from .fast import numbers_of, step_numbers  # speed: imported once, not per call (fast.py imports this module lazily)
from .methods.base import Method
from .optimizers import get_optimizer
from .peaks import activation_budget, phase_peaks
from ..profiles import load_gpu, load_model
from .record import affine_record, revalued
from .stepflops import step_flops
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
        wanted = tuple(dict.fromkeys(s.name for s in (*block_sites, *head_sites) if s.all_linear))
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
    return revalued(run, r=1 if run.r is not None and affine else run.r, optimizer="adamw", sharding=None,
                    master_weights=None, optimizer_in_backward=False)  # all valid values


def estimate(model: str | ModelSpec, method: str = "lora", *, r: int | None = None, targets=None, batch: int = 1,
             seq: int = 512, precision: str = "bf16", optimizer: str = "adamw", grad_checkpointing: bool = False,
             attention: str = "sdpa", dropout: float = 0.0, model_dropout: float | None = None,
             method_options: dict | None = None, gpu: str | None = None,
             utilisation: float = DEFAULT_UTILISATION, serving: bool = False,
             target_seq: int | None = None, moe_imbalance: float | None = None, task: str | None = None,
             num_labels: int | None = None, packing: bool = False, alloc_conf: str | None = None,
             paged_evictable: bool = False, gpus: int | None = None, nodes: int = 1,
             sharding: str | None = None, sharding_options: dict | None = None,
             master_weights: str | None = None, optimizer_in_backward: bool = False,
             loss: str = "standard", adapter_dtype: str | None = None, modules_to_save=None,
             liger_kernels=None,  # ligerkernels: 'all' (Trainer's use_liger_kernel) or a list (analytic/liger.py)
             # distprof: the numbers only (fast.StepNumbers), for sweeps
             numbers_only: bool = False,
             # allocevents: reserved memory from the slack, the analytic allocation replay, or auto (reserved_events.py)
             reserved_model: str | None = None) -> Estimate:
    """Estimate memory and FLOPs of one training step (and, with `serving`, the fine-tuned model's
    inference cost at a context of `seq` positions). `target_seq` is an encoder-decoder model's
    decoder length (default `seq`). `gpus`, `nodes`, `sharding` (ddp, fsdp, ... ; default fsdp) and
    `sharding_options` (analytic/sharding/config.py ShardingSpec fields): the busiest rank of a data-parallel
    run. `numbers_only`: return `fast.StepNumbers` (peak, device bytes, FLOPs, trainable parameters, step
    time: the same numbers, without the explanation; sweeps). Raises LoraCostError on bad input."""
    spec = model if isinstance(model, ModelSpec) else load_model(model)
    if isinstance(targets, str):
        targets = tuple(t for t in targets.split(","))
    if liger_kernels is not None:  # ligerkernels: the fused loss among them is --loss liger
        from .liger import resolve
        liger_kernels, loss = resolve(liger_kernels, loss)
    run = RunConfig(method=method, r=r, targets=tuple(targets) if targets is not None else None, batch=batch, seq=seq,
                    precision=precision, optimizer=optimizer, grad_checkpointing=grad_checkpointing,
                    attention=attention, dropout=dropout, model_dropout=model_dropout,
                    method_options=tuple(sorted((method_options or {}).items())), target_seq=target_seq,
                    moe_imbalance=moe_imbalance, task=task, num_labels=num_labels, packing=packing,
                    alloc_conf=alloc_conf, paged_evictable=paged_evictable,
                    sharding=sharding_spec(gpus, nodes, sharding, sharding_options),
                    master_weights=master_weights, optimizer_in_backward=optimizer_in_backward,
                    loss=loss, adapter_dtype=adapter_dtype,
                    modules_to_save=tuple(modules_to_save.split(",")) if isinstance(modules_to_save, str) else modules_to_save,
                    liger_kernels=liger_kernels or ())
    if numbers_only:
        numbers = step_numbers(spec, run, gpu=gpu, utilisation=utilisation)
        if reserved_model in (None, "slack"):
            return numbers
        from .reserved_events import replays  # allocevents: the replay's numbers come from the full path
        if not replays(reserved_model, gpu, numbers.device_bytes):
            return numbers
        return numbers_of(estimate_run(spec, run, gpu=gpu, utilisation=utilisation, reserved_model=reserved_model))
    return estimate_run(spec, run, gpu=gpu, utilisation=utilisation, serving=serving, reserved_model=reserved_model)


def sharding_spec(gpus: int | None, nodes: int = 1, sharding: str | None = None, options: dict | None = None):
    """The ShardingSpec of --gpus/--nodes/--sharding (None: one GPU, nothing changes)."""
    if gpus is None:
        if sharding is not None or nodes != 1 or options:
            raise LoraCostError("--sharding, --nodes and their options need --gpus N")
        return None
    if not options:  # speed: a sweep asks for the same few specs (frozen, so shared); errors are never cached
        return _plain_sharding_spec(gpus, nodes, sharding)
    from .sharding import ShardingSpec
    return ShardingSpec(strategy=sharding or "fsdp", gpus=gpus, nodes=nodes, **options)


@lru_cache(maxsize=1024, typed=True)  # typed: --gpus True is refused, never taken for 1
def _plain_sharding_spec(gpus, nodes, sharding):
    from .sharding import ShardingSpec
    return ShardingSpec(strategy=sharding or "fsdp", gpus=gpus, nodes=nodes)


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
    if run.sharding is not None:  # ZeRO in 16-bit casts the adapters with the module
        from .sharding import zero_adapter_cast
        run = zero_adapter_cast(run, method)
    check_kernel_run(spec, run, method)
    if run.packing and method.virtual_tokens(run):
        raise LoraCostError(f"--packing with {method.name} is not modelled (its virtual tokens are prepended to each "
                            "row, not to each packed sequence)")
    if run.loss != "standard" or run.modules_to_save:  # lossdtype
        from .heads import task_of
        from .losses import check_loss
        from .modules_to_save import check_modules_to_save
        check_loss(spec, run, task_of(arch, run))
        check_modules_to_save(spec, method.name, run, task_of(arch, run))
    if run.liger_kernels:  # ligerkernels
        from .liger import check_liger
        run = check_liger(spec, run)
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
    if run.paged_evictable and not get_optimizer(run.optimizer).paged:
        raise LoraCostError(f"--paged-evictable applies to paged optimizers only (their state lives in CUDA managed "
                            f"memory); {run.optimizer} keeps its state in device memory")
    if get_optimizer(run.optimizer).name == "galore-adamw" and not method.base_trainable:  # task "optim"
        raise LoraCostError(f"--optimizer galore-adamw projects the gradients of full-rank weights: it applies to "
                            f"--method full, not {method.name} (whose adapters are already low-rank)")
    if run.sharding is not None and (run.master_weights or run.optimizer_in_backward):
        raise LoraCostError("--master-weights and --optimizer-in-backward are modelled on one GPU only; "
                            "drop them or --gpus")
    return run, method


def estimate_run(spec: ModelSpec, run: RunConfig, *, gpu: str | None = None,
                 utilisation: float = DEFAULT_UTILISATION, serving: bool = False,
                 reserved_model: str | None = None) -> Estimate:
    run, method, target_names, sites, head_sites = validated_run(spec, run)
    arch = get_architecture(spec.model_type)
    opt = get_optimizer(run.optimizer)
    warnings = []
    if run.seq > spec.max_positions:
        warnings.append(f"sequence length {run.seq} exceeds the model's maximum of {spec.max_positions} positions")

    L = spec.layers
    stack = stack_of(arch, spec)
    # the forward does not depend on the optimizer, and depends on the rank affinely (record.py)
    rec = affine_record(spec, _forward_key(run), frozenset(target_names)).at(run.r)
    params = parameter_budget(arch, spec, method, run, opt, sites, head_sites)
    acts = activation_budget(rec, run, stack)
    rank = None
    if run.sharding is not None:
        from .sharding import check_run, rank_of  # only with --gpus: the one-GPU path stays as it was
        rank = rank_of(arch, spec, method, run, opt, sites, head_sites)
        warnings.extend(check_run(run, method))
    phases = phase_peaks(rec, acts, params, run, stack, adapted_blocks=bool(sites) or bool(method.block_trainable(spec, run)),
                         rank=rank)
    peak = max(phases, key=lambda p: p.peak_bytes)
    paged = params.state_bytes if params.paged else 0
    if rank is not None and params.paged:
        paged = rank.paged_state
    dev = device_memory(slack_reserved(peak.peak_bytes), peak_bytes=peak.peak_bytes, family=spec.model_type, gpu=gpu,
                        paged_bytes=paged, paged_evictable=run.paged_evictable, libraries=_libraries(run))
    if reserved_model not in (None, "slack"):  # allocevents: the analytic allocation replay (reserved_events.py)
        from .reserved_events import reserved_device
        dev, note = reserved_device(dev, spec, run, frozenset(target_names), peak.peak_bytes, gpu, reserved_model,
                                    paged, _libraries(run))
        if note:
            warnings.append(note)
    device = dev.device_bytes
    refresh = None
    if params.refresh_every:  # task "galore": the projector refresh step (refresh.py)
        refresh, note = _refresh(spec, run, gpu, rec, acts, params, stack, rank, peak, device, paged,
                                 adapted_blocks=bool(sites) or bool(method.block_trainable(spec, run)))
        warnings.append(note)

    sf = step_flops(rec, run.grad_checkpointing, stack)
    fwd, bwd, recomputed = sf.forward, sf.backward, sf.recomputed

    memory = MemoryEstimate(
        peak_bytes=peak.peak_bytes, peak_phase=peak.phase,
        components=tuple(Term(t.name, t.value, *describe(t.name), t.category) for t in peak.terms),
        phases=phases, device_bytes=device, saved_activation_bytes=acts.total,
        steady_bytes=params.steady_bytes if rank is None else rank.steady_bytes + params.loop_state_bytes,
        saved_by_kind=saved_by_kind(rec, run, acts.kept),
        terms=memory_terms(spec, run, method, opt, params, acts.total, rec) + (() if rank is None else _rank_terms(rank)),
        device=dev, host_bytes=None if rank is None else rank.host_bytes_per_rank * rank.sharding.gpus_per_node,
        refresh=refresh)
    flops = FlopEstimate(forward=fwd, backward=bwd, forward_uncounted=sf.forward_uncounted,
                         backward_uncounted=sf.backward_uncounted, terms=flop_terms(rec, run, recomputed))
    gpu_profile = load_gpu(gpu) if gpu is not None else None
    fit = (gpu_fit(gpu_profile, memory.fit_device_bytes, sf.step_total, run.precision, utilisation, dev.uncertainty_bytes)
           if gpu is not None else None)
    distributed = None
    if rank is not None:
        from .sharding import distributed_estimate
        distributed = distributed_estimate(rank, gpu_profile, fit.step_time_s if fit else None)
        if fit is not None:  # the step waits for the communication compute does not hide
            fit = replace(fit, step_time_s=fit.step_time_s + (distributed.exposed_communication_time_s or 0.0))
    return Estimate(
        model=spec.name, family=spec.model_type, method=method.name, r=run.r if not method.base_trainable else None,
        targets=target_names, batch=run.batch, seq=run.seq, precision=run.precision, optimizer=opt.name,
        grad_checkpointing=run.grad_checkpointing, attention=run.attention, dropout=run.dropout,
        method_options=method.option_values(run), trainable_params=params.trainable_params,
        total_params=params.total_params, adapted_modules=sum(s.blocks or L for s in sites) + method.modules_per_block * L + len(head_sites),
        memory=memory, flops=flops, gpu=fit, warnings=tuple(warnings),
        assumptions=_assumptions(run, opt, dev) + ((f"{method.name}: {method.note}",) if method.note else ())
        + ((f"encoder-decoder: the encoder runs at {run.seq} positions (--seq), the decoder at {run.decoder_seq} "
            "(--target-seq): labels of that length, shifted right as the decoder input; the loss is over them",)
           if spec.decoder_layers else ())
        + tuple(method.notes(spec, sites, head_sites, run)) + tuple(arch.notes(spec, run)) + _task_note(run)
        + _lossdtype_notes(spec, run),
        serving=_serving(arch, spec, method, sites, head_sites, run) if serving else None,
        distributed=distributed)


def _refresh(spec, run, gpu, rec, acts, params, stack, rank, steady, device, paged, adapted_blocks):
    """(memory.refresh, its warning): the steady step's moments over the refresh step's budget (refresh.py)."""
    from .refresh import refresh_step
    from .svd import SVD_WARNING
    if rank is not None:
        return None, ("GaLore's projector refresh step (the first and every update_proj_gap-th) is not modelled with "
                      "--gpus: its SVD temporaries are missing from this estimate")
    phases = phase_peaks(rec, acts, params.on_refresh_step(), run, stack, adapted_blocks=adapted_blocks)
    refresh = refresh_step(phases, steady, device, spec.model_type, gpu, paged, run.paged_evictable, _libraries(run),
                           params.refresh_every)
    from ..units import fmt_bytes
    return refresh, (f"{get_optimizer(run.optimizer).name}: the projector refresh step (the first, then every {params.refresh_every}) peaks "
                     f"at {fmt_bytes(refresh.peak_bytes)} ({refresh.peak_phase}), "
                     + (f"{fmt_bytes(refresh.above_steady_bytes)} above the steady step" if refresh.above_steady_bytes
                        else "not above the steady step")
                     + f" (memory.refresh; the GPU fit takes the larger); {SVD_WARNING}")


def _rank_terms(rank) -> tuple[Term, ...]:
    from .sharding import sharding_terms
    return sharding_terms(rank)


def _serving(arch, spec, method, sites, head_sites, run):
    from .serving import serving_estimate  # only when asked: the estimate path stays as it was
    return serving_estimate(arch, spec, method, sites, head_sites, run)


def _lossdtype_notes(spec: ModelSpec, run: RunConfig) -> tuple[str, ...]:
    if run.loss == "standard" and run.adapter_dtype in (None, "fp32") and not run.liger_kernels:
        return ()  # the output stays as it was
    from .liger import notes as liger_notes
    from .losses import notes
    return notes(spec, run) + liger_notes(spec, run)


def _task_note(run: RunConfig) -> tuple[str, ...]:
    """A classification head says what it is (absent for the family's own LM head: the output stays as it was)."""
    if run.task not in ("seq-cls", "token-cls"):
        return ()
    what = ("logits of one position per row (decoders: the last non-pad token; BERT/RoBERTa: [CLS])"
            if run.task == "seq-cls" else "per-token logits")
    return (f"task {run.task} with {run.labels} labels: the classifier replaces the LM head, {what}; with an adapter "
            "method peft trains a copy of it (task_type modules_to_save), counted as trainable",)


def _libraries(run: RunConfig) -> tuple[str, ...]:
    """Libraries with device state of their own that the step loads (cuda_context.py)."""
    return ("bitsandbytes",) if run.method in ("qlora", "lora-8bit") or get_optimizer(run.optimizer).paged or \
        run.optimizer.endswith("8bit") else ()


def _assumptions(run: RunConfig, opt, dev=None) -> tuple[str, ...]:
    packing = ((f"--packing: the {run.batch} sequences of {run.seq} tokens are flattened into one row with restarting "
                "position_ids (DataCollatorWithFlattening, TRL padding-free); the varlen kernel keeps them apart "
                "(cu_seqlens, no mask)",) if run.packing else ())
    return (
        "reference recipe: transformers + peft (+ bitsandbytes for QLoRA) on a CUDA GPU, loss = model(ids, labels=ids).loss",
        f"attention: {run.attention} ({get_kernel(run.attention).description})",
        *packing,
        device_formula(opt.paged, run.paged_evictable, dev.context_bytes if dev is not None else None,
                       dev.reserved_model if dev is not None else "slack"),
    ) + ((f"--alloc-conf {run.alloc_conf}: not modelled by the analytic engine's reserved memory (a slack on the "
          "allocated peak); --engine trace replays the step through the allocator with these settings",)
         if run.alloc_conf and (dev is None or dev.reserved_model == "slack") else ()) + _optimizer_notes(run, opt)


def _optimizer_notes(run: RunConfig, opt) -> tuple[str, ...]:
    """The optimizer's recipe, when it is not the default one (task "optim")."""
    notes = ()
    if opt.name != "adamw-torch":
        notes += (f"optimizer {opt.name}: {opt.description}",)
    if run.master_weights:
        notes += ("master weights: the optimizer keeps an fp32 copy of each 16-bit trainable tensor and fp32 states; "
                  "16-bit gradients are copied to fp32 at the step (Megatron-LM / DeepSpeed mixed precision)",)
    if run.optimizer_in_backward:
        notes += ("optimizer in backward (torchtune optimizer_in_bwd): each tensor is stepped and its gradient freed "
                  "from register_post_accumulate_grad_hook; opt.step() after backward does nothing",)
    return notes
