"""Choose rank, method and batch under a VRAM budget by sweeping the analytic estimator.

Peak memory grows monotonically with the rank and with the batch (every term does), so the largest
fitting value of each is found by bisection over the candidates. A configuration fits when the
estimate's `device_bytes` (what the GPU would show: allocator slack and CUDA context included) is
at most the budget less the user's margin.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..errors import LoraCostError, shown
from .device import DEFAULT_UTILISATION, verdict
from .estimator import estimate
from .fast import without_cyclic_gc
from .methods import get_method
from .methods.base import flag_of
from ..profiles import load_gpu, load_model
from ..results import Estimate, Term
from ..spec import MAX_BATCH, MAX_RANK, RunConfig

DEFAULT_METHODS = ("lora", "lora-fa", "dora", "vera", "qlora", "full")
MAX_BUDGET_BYTES = 1 << 60  # 1 EiB: a million times the memory of the largest GPU (H200, 141 GB)
# Below this a step time is no longer a measure of anything (1e-6 of peak turns 1 s into 11 days); it
# also keeps FLOPs / (peak x utilisation) finite for the tiniest floats (5e-324).
MIN_UTILISATION = 1e-6
SEQ_LADDER = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


@dataclass(frozen=True)
class PlanPoint:
    """One evaluated configuration."""

    method: str
    r: int | None
    batch: int
    seq: int
    grad_checkpointing: bool
    peak_bytes: int
    device_bytes: int  # the larger of the steady step's and the optimizer's refresh step's (fit_device_bytes)
    fits: bool
    trainable_params: int
    flops_per_step: int
    step_time_s: float | None
    tokens_per_s: float | None
    components: tuple[Term, ...]
    # fits / tight / does not fit against the usable budget (analytic/device.py verdict): "tight" when
    # the budget lies within the estimate's stated uncertainty; `fits` stays device_bytes <= usable
    verdict: str = ""


@dataclass(frozen=True)
class MethodPlan:
    method: str
    grad_checkpointing: bool
    reference_r: int | None  # the rank at which the largest batch is searched
    max_rank: PlanPoint | None  # largest rank that fits at the smallest batch
    max_batch: PlanPoint | None  # largest batch that fits at reference_r
    rank_curve: tuple[PlanPoint, ...]  # peak against rank at the smallest batch
    batch_by_seq: tuple[tuple[int, int], ...]  # (seq, largest fitting batch at reference_r; 0: none)


@dataclass(frozen=True)
class Plan:
    model: str
    budget_bytes: int
    margin: float
    usable_bytes: int
    gpu: str | None
    seq: int
    batch_range: tuple[int, int]
    ranks: tuple[int, ...]
    precision: str
    optimizer: str
    targets: tuple[str, ...] | None
    attention: str
    utilisation: float
    methods: tuple[MethodPlan, ...]
    smallest: PlanPoint | None  # when nothing fits: the cheapest configuration and what it needs
    skipped: tuple[str, ...]  # methods left out, with the reason
    assumptions: tuple[str, ...]
    estimates: int
    seconds: float
    method_options: dict = field(default_factory=dict)  # given options, each passed to the methods declaring it


def parse_range(text: str, name: str) -> tuple[int, int]:
    """'4-256' -> (4, 256); '8' -> (8, 8) for --r or --batch, within the run's bounds (spec.py).
    The range is bisected by the planner, never listed."""
    maximum = {"r": MAX_RANK, "batch": MAX_BATCH}[name]
    try:
        if "-" in text.strip("-"):
            lo, hi = text.split("-", 1)
            lo, hi = int(lo), int(hi)
        else:
            lo = hi = int(text)
    except ValueError:  # not an integer, or one of more than 4,300 digits
        raise LoraCostError(f"--{name} must be an integer or a range like 4-256, got {shown(text, 60)}") from None
    if lo <= 0 or hi < lo:
        raise LoraCostError(f"--{name} range must be positive and increasing, got {shown(text, 60)}")
    if hi > maximum:
        raise LoraCostError(f"--{name} must be at most {maximum:,}, got {shown(text, 60)}")
    return lo, hi


def rank_candidates(lo: int, hi: int) -> tuple[int, ...]:
    """Powers of two within [lo, hi], plus the endpoints."""
    out = {lo, hi}
    p = 1
    while p <= hi:
        if p >= lo:
            out.add(p)
        p *= 2
    return tuple(sorted(out))


def _largest(candidates: Sequence[int], fits: Callable[[int], bool]) -> int | None:
    """The largest candidate for which `fits` holds, assuming it is monotone (true then false)."""
    lo, hi, best = 0, len(candidates) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(candidates[mid]):
            best, lo = candidates[mid], mid + 1
        else:
            hi = mid - 1
    return best


@without_cyclic_gc  # speed2: a sweep makes no reference cycles (fast.py)
def plan(model: str, *, budget_bytes: int | None = None, gpu: str | None = None, margin: float = 0.0,
         methods: tuple[str, ...] = DEFAULT_METHODS, seq: int = 2048, batch_range: tuple[int, int] = (1, 64),
         rank_range: tuple[int, int] = (1, 1024), precision: str = "bf16", optimizer: str = "adamw",
         targets: tuple[str, ...] | None = None, attention: str = "sdpa", utilisation: float = DEFAULT_UTILISATION,
         method_options: dict | None = None, progress: Callable[[int], None] | None = None,
         task: str | None = None, num_labels: int | None = None) -> Plan:
    """Sweep methods x checkpointing x rank x batch and keep what fits the budget. Each method gets
    the `method_options` it declares; an option none of the planned methods takes is an error."""
    t0 = time.perf_counter()
    spec = load_model(model)
    gpu_profile = load_gpu(gpu) if gpu else None
    if budget_bytes is None:
        if gpu_profile is None:
            raise LoraCostError("give a --budget or a --gpu")
        budget_bytes = gpu_profile.memory_bytes
    if not isinstance(budget_bytes, int) or not 1 <= budget_bytes <= MAX_BUDGET_BYTES:
        raise LoraCostError(f"--budget must be from 1 byte to {MAX_BUDGET_BYTES:,} bytes (1 EiB), got {budget_bytes!r}")
    if not 0.0 <= margin < 1.0:  # NaN fails too
        raise LoraCostError(f"--margin must be in [0, 1), got {margin}")
    if not MIN_UTILISATION <= utilisation <= 1.0:  # a fraction of the GPU's peak throughput; NaN fails too
        raise LoraCostError(f"--utilisation must be a fraction in [{MIN_UTILISATION:g}, 1], got {utilisation}")
    RunConfig(batch=batch_range[1], seq=seq, r=rank_range[1])  # the largest values asked for, checked once
    usable = int(budget_bytes * (1 - margin))
    methods = tuple(get_method(m).name for m in methods)
    if not methods:
        raise LoraCostError("--methods is empty")
    skipped = []
    from .heads import CLASSIFIER_METHODS
    for m in (get_method(name) for name in methods):
        if m.precisions is not None and precision not in m.precisions:
            skipped.append(f"{m.name}: needs --precision {' or '.join(m.precisions)} (asked {precision})")
            methods = tuple(name for name in methods if name != m.name)
        elif task in ("seq-cls", "token-cls") and m.name not in CLASSIFIER_METHODS:  # as estimate refuses them
            skipped.append(f"{m.name}: --task {task} is not modelled for it (--engine trace runs it)")
            methods = tuple(name for name in methods if name != m.name)
    # absent flags leave every call (and its numbers) as they were; given, they are checked once, here
    task_kwargs = {} if task is None and num_labels is None else dict(task=task, num_labels=num_labels)
    if task_kwargs:
        from .architectures import get_architecture
        from .heads import check_task
        task_run = RunConfig(batch=batch_range[1], seq=seq, r=rank_range[1], **task_kwargs)  # --num-labels' own rules
        check_task(get_architecture(spec.model_type), spec, get_method("full"), task_run)  # the family has the task
    method_options = dict(method_options or {})
    own_options = {name: get_method(name).option_names for name in methods}
    for key in method_options:
        if not any(key in names for names in own_options.values()):
            raise LoraCostError(f"{flag_of(key)} does not apply to any method planned ({', '.join(methods) or 'none'})")
    cache: dict[tuple, Estimate] = {}
    count = [0]
    no_targets = {}

    def call(method: str, r: int | None, batch: int, s: int, ckpt: bool, numbers_only: bool = False):
        # full trains every weight, BitFit every bias, adapters every block; prompt and prefix tuning
        # adapt no linear: no targets
        if method not in no_targets:
            m = get_method(method)
            no_targets[method] = (not m.takes_targets or m.trains_biases
                                  or (m.default_targets is not None and not m.default_targets(spec)))
        adapter_targets = None if no_targets[method] else targets
        result = estimate(spec, method, r=r, targets=adapter_targets, batch=batch, seq=s, precision=precision,
                          optimizer=optimizer, grad_checkpointing=ckpt, attention=attention,
                          method_options={k: v for k, v in method_options.items() if k in own_options[method]},
                          gpu=gpu, utilisation=utilisation, numbers_only=numbers_only, **task_kwargs)
        count[0] += 1
        if progress:
            progress(1)
        return result

    def run(method: str, r: int | None, batch: int, s: int, ckpt: bool) -> Estimate:
        """The full estimate (its terms are shown)."""
        key = (method, r, batch, s, ckpt)
        if key not in cache:
            cache[key] = call(method, r, batch, s, ckpt)
        return cache[key]

    def fits(method: str, r: int | None, batch: int, s: int, ckpt: bool) -> bool:
        """Whether it fits, from the numbers alone (fast.py: the same numbers, no explanation)."""
        key = (method, r, batch, s, ckpt)
        if key in cache:
            return cache[key].memory.fit_device_bytes <= usable
        key = (*key, "numbers")
        if key not in cache:
            cache[key] = call(method, r, batch, s, ckpt, numbers_only=True)
        return cache[key].device_bytes <= usable

    def point(e: Estimate) -> PlanPoint:
        step = e.gpu.step_time_s if e.gpu else None
        return PlanPoint(method=e.method, r=e.r, batch=e.batch, seq=e.seq, grad_checkpointing=e.grad_checkpointing,
                         peak_bytes=e.memory.peak_bytes, device_bytes=e.memory.fit_device_bytes,
                         fits=e.memory.fit_device_bytes <= usable, trainable_params=e.trainable_params,
                         flops_per_step=e.flops.total, step_time_s=step,
                         tokens_per_s=(e.batch * e.seq / step) if step else None, components=e.memory.components,
                         verdict=verdict(usable, e.memory.fit_device_bytes,
                                         e.memory.device.uncertainty_bytes if e.memory.device else 0))

    batches = range(batch_range[0], batch_range[1] + 1)  # bisected, never listed
    seqs = sorted({s for s in SEQ_LADDER if s <= spec.max_positions} | {seq})
    out = []
    for method in methods:
        m = get_method(method)
        ranks: list[int | None]
        rankless = not m.takes_rank  # full, BitFit, (IA)3, bottleneck adapters: one configuration
        if rankless:
            ranks = [None]
        else:
            cap = _max_rank(spec, m, targets)
            candidates = set(rank_candidates(*rank_range))
            if m.default_r is not None and rank_range[0] <= m.default_r <= rank_range[1]:
                candidates.add(m.default_r)  # searched at it (below): AdaLoRA's 12 is no power of two
            ranks = [r for r in sorted(candidates) if cap is None or r <= cap] or [None]
            if ranks == [None]:
                skipped.append(f"{method}: no rank in {rank_range[0]}-{rank_range[1]} fits the adapted matrices")
                continue
        default = m.default_r
        for ckpt in (False, True):
            # a method may refuse a configuration (peft's prefix tuning refuses checkpointing, AdaLoRA an
            # initial rank below its target, virtual tokens a length past the model's positions): the plan
            # keeps what it accepts and says what it left out
            accepted, refusal = [], None
            for r in ranks:
                try:
                    run(method, r, batches[0], seq, ckpt)
                    accepted.append(r)
                except LoraCostError as exc:
                    refusal = refusal or exc
            where = f"{method}{' with checkpointing' if ckpt else ''}"
            if not accepted:
                skipped.append(f"{where}: {refusal}")
                continue
            if refusal is not None:
                skipped.append(f"{where}: ranks {', '.join(str(r) for r in ranks if r not in accepted)} left out: {refusal}")
            reference = None if rankless else (default if default in accepted else accepted[0])
            curve = tuple(point(run(method, r, batches[0], seq, ckpt)) for r in accepted)
            if rankless:  # no rank to choose: the one configuration fits or not
                max_rank = curve[0] if curve[0].fits else None
            else:
                best_r = _largest(accepted, lambda r: fits(method, r, batches[0], seq, ckpt))
                max_rank = point(run(method, best_r, batches[0], seq, ckpt)) if best_r is not None else None
            best_b = _largest(batches, lambda b: fits(method, reference, b, seq, ckpt))
            max_batch = point(run(method, reference, best_b, seq, ckpt)) if best_b is not None else None
            by_seq, left_out = [], []
            for s in seqs:
                try:
                    run(method, reference, batches[0], s, ckpt)
                except LoraCostError as exc:
                    left_out.append((s, exc))
                    continue
                b = _largest(batches, lambda b, s=s: fits(method, reference, b, s, ckpt))
                by_seq.append((s, b or 0))
            if left_out:
                skipped.append(f"{where}: lengths {', '.join(str(s) for s, _ in left_out)} left out: {left_out[0][1]}")
            out.append(MethodPlan(method, ckpt, reference, max_rank, max_batch, curve, tuple(by_seq)))

    smallest = None
    if not any(p.max_batch or p.max_rank for p in out):
        cheapest = [run(p.method, p.rank_curve[0].r, batches[0], seq, True) for p in out if p.grad_checkpointing]
        if cheapest:
            smallest = point(min(cheapest, key=lambda e: e.memory.fit_device_bytes))
    assumptions = (
        f"fits: estimated device memory (peak allocated + 10% allocator slack + the CUDA context measured per GPU, profiles/cuda_context.json) <= "
        f"budget {budget_bytes:,} B less a {100 * margin:.0f}% margin",
        f"step time: FLOPs / ({'GPU peak' if gpu_profile else 'no GPU given'} x {100 * utilisation:.0f}% utilisation)",
        f"precision {precision}, optimizer {optimizer}, attention {attention}, targets "
        f"{','.join(targets) if targets else 'query and value projections'}",
        "largest batch searched at each method's default rank (VeRA 256, AdaLoRA 12, others 8) or the smallest rank asked for",
    ) + tuple(f"{m.name}: {m.note}" for m in map(get_method, methods) if m.note)
    return Plan(model=spec.name, budget_bytes=int(budget_bytes), margin=margin, usable_bytes=usable,
                gpu=gpu_profile.name if gpu_profile else None, seq=seq, batch_range=batch_range,
                ranks=tuple(rank_candidates(*rank_range)), precision=precision, optimizer=optimizer, targets=targets,
                attention=attention, utilisation=utilisation, methods=tuple(out), smallest=smallest,
                skipped=tuple(skipped), assumptions=assumptions, estimates=count[0],
                seconds=time.perf_counter() - t0, method_options=method_options)


def _max_rank(spec, method, targets) -> int | None:
    """The largest rank the adapted matrices allow (None: the method has no such limit, e.g. VeRA)."""
    from .architectures import get_architecture
    from .estimator import resolve_targets
    _, sites, head = resolve_targets(get_architecture(spec.model_type), spec, method, targets)
    limits = [limit for limit in (method.max_rank(s) for s in (*sites, *head)) if limit is not None]
    return min(limits) if limits else None


def sweep_size(plan_methods: int, ranks: int, seqs: int) -> int:
    """Rough number of estimates a plan evaluates (for a progress bar's total)."""
    return plan_methods * 2 * (ranks + 8 + seqs * 7)
