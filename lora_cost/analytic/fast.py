"""The numbers of an estimate without its explanation: a lean path for sweeps (the planner's
bisections, benchmarks/sweep_speed.py).

`step_numbers(spec, run)` returns exactly what `estimate_run(spec, run).memory.peak_bytes`,
`.memory.device_bytes`, `.flops.total`, `.trainable_params` and `.gpu.step_time_s` would be: it
calls the same functions (`validated_run`, the cached `affine_record`, `parameter_budget`,
`activation_budget`, the candidate moments of `phase_peaks` (`peaks.peak_bytes`), `step_flops`, `device_memory`, `gpu_fit`), and only skips what
explains the numbers (term descriptions, per-kind tables, assumptions, the `Estimate` object).
`tests/test_fast_path.py` checks the equality on a grid of methods, ranks, batches and lengths;
`tests/test_sharding_fast_path.py` on a grid of --gpus strategies, world sizes, methods and offloads (the busiest
rank's RankModel is cached per run key in sharding/__init__.py `rank_of`).

Cache layers, each keyed on everything its value depends on:
  - at batch >= 2, one `batchlines.NumbersLine` per (spec, run at batch 2, gpu, utilisation): once the forward's
    batch line is verified, every candidate peak moment as exact lines in the batch (`peaks._moments` evaluated
    on them), so a new batch costs a few integer operations; it keeps the numbers of each batch it answered;
  - at batch 1 the numbers themselves per (spec, run, gpu, utilisation) (`_numbers`: a sweep that revisits);
  - the validated run (method defaults, targets resolved) per (spec, run at batch 2): checks read no batch;
  - the forward per (spec, run at rank 1 without its optimizer, targets), and at batch >= 2 its exact
    line in the batch (record.py's `affine_record`, `BatchLine`);
  - the record at a rank per (affine record, rank) (record.py's `AffineRecord.at`);
  - the parameter budget per (spec, method, rank, precision, optimizer, targets) (budget.py).
"""

from __future__ import annotations

import gc
from dataclasses import MISSING, dataclass, fields
from functools import lru_cache, wraps

from .architectures import get_architecture
from .architectures.base import stack_of
from .budget import parameter_budget
from .device import DEFAULT_UTILISATION, device_memory, slack_reserved, step_time_s
from .optimizers import get_optimizer
from .peaks import activation_budget, peak_bytes
from .batchlines import FIRST as BATCH_LINE_FIRST, numbers_line
from .record import affine_record, revalued
from .stepflops import step_flops
from ..profiles import load_gpu
from ..spec import MAX_BATCH, ModelSpec, RunConfig


@dataclass(frozen=True, slots=True)
class StepNumbers:
    """The headline numbers of one estimate (their meaning is `Estimate`'s)."""

    peak_bytes: int
    device_bytes: int  # `Estimate.memory.fit_device_bytes`: the larger of the steady and refresh steps'
    flops: int  # forward + backward, as `Estimate.flops.total`
    trainable_params: int
    step_time_s: float | None  # with a GPU: `Estimate.gpu.step_time_s`


# What `activation_budget` and `phase_peaks` read of a StepRecord (peaks.py); the rest is left empty.
# tests/test_fast_path.py would see a field read and missing here (the numbers would differ).
PEAK_FIELDS = frozenset({"saved", "block_input", "orphaned", "kept_past_checkpoint", "forward_transient",
                         "backward_transient", "largest", "norm_backward", "widest_moment",
                         "widest_gradients", "forward_live", "recompute_live"})
# What `step_flops` reads of a StepRecord (stepflops.py): the per-kind tables are left empty.
FLOP_FIELDS = frozenset({"flops", "flops_after_last_save", "uncounted", "uncounted_after_last_save"})


@lru_cache(maxsize=65536)
def _validated(spec: ModelSpec, run: RunConfig):
    """`validated_run` is a pure function of its arguments (errors are raised, never cached)."""
    from .estimator import validated_run
    run, method, target_names, sites, head_sites = validated_run(spec, run)
    arch = get_architecture(spec.model_type)
    adapted = bool(sites) or bool(method.block_trainable(spec, run))
    return run, method, arch, frozenset(target_names), tuple(sites), tuple(head_sites), adapted


def _validated_at(spec: ModelSpec, run: RunConfig):
    """`_validated` of the run at batch FIRST, moved to the run's own batch: checking a run reads no batch
    (tests/test_fast_path.py traces every read), so a batch sweep checks each run once, shared with its lines
    (batchlines.py)."""
    if run.batch == BATCH_LINE_FIRST:
        return _validated(spec, run)
    checked = _validated(spec, revalued(run, batch=BATCH_LINE_FIRST))
    return (revalued(checked[0], batch=run.batch),) + checked[1:]


# The run settings this path was written and tested for. A setting added to RunConfig later (and set)
# sends the run through the full estimate, whose numbers are then returned: never a number that
# ignores an option.
_KNOWN = frozenset({"method", "r", "targets", "batch", "seq", "precision", "optimizer", "grad_checkpointing",
                    "attention", "dropout", "model_dropout", "method_options", "target_seq", "moe_imbalance", "task",
                    "num_labels",
                    "sharding"})  # task "sharding2": the busiest rank (tests/test_sharding_fast_path.py: equality)
_OTHERS = tuple((f.name, f.default_factory() if f.default is MISSING else f.default)
                for f in fields(RunConfig) if f.name not in _KNOWN)


def step_numbers(spec: ModelSpec, run: RunConfig, *, gpu: str | None = None,
                 utilisation: float = DEFAULT_UTILISATION) -> StepNumbers:
    """The numbers `estimate_run(spec, run, gpu=gpu, utilisation=utilisation)` reports. Raises
    LoraCostError on bad input, as it does."""
    values = run.__dict__
    for name, default in _OTHERS:  # a plain loop: a generator per call was a tenth of a warm estimate
        if values[name] != default:
            return numbers_of(_full(spec, run, gpu, utilisation))
    if _refreshes(run):
        return numbers_of(_full(spec, run, gpu, utilisation))
    if run.batch >= BATCH_LINE_FIRST:  # task "speed": the run's lines in the batch, which keep what they answered
        return numbers_line(spec, revalued(run, batch=BATCH_LINE_FIRST), gpu, utilisation).numbers(run)
    return _numbers(spec, run, gpu, utilisation)


def batch_sweep(spec: ModelSpec, run: RunConfig, batches, *, gpu: str | None = None,
                utilisation: float = DEFAULT_UTILISATION) -> tuple[StepNumbers, ...]:
    """`step_numbers(spec, replace(run, batch=b), ...)` for each b of `batches`, the run checked once: a sweep's
    batches read the run's lines in the batch (batchlines.py) without building and checking a RunConfig per
    batch. Raises LoraCostError on bad input, as step_numbers does."""
    from dataclasses import replace
    values, known = run.__dict__, not _refreshes(run)
    for name, default in _OTHERS:
        if values[name] != default:
            known = False
    line, out = None, []
    for b in batches:
        if known and type(b) is int and BATCH_LINE_FIRST <= b <= MAX_BATCH:
            if line is None:
                line = numbers_line(spec, revalued(run, batch=BATCH_LINE_FIRST), gpu, utilisation)
            out.append(line.numbers(revalued(run, batch=b)))
            continue
        out.append(step_numbers(spec, replace(run, batch=b), gpu=gpu, utilisation=utilisation))  # checks b
    return tuple(out)


def direct_numbers(spec: ModelSpec, run: RunConfig, gpu: str | None, utilisation: float) -> StepNumbers:
    """`step_numbers` of a run fast.py knows every setting of, computed for that run alone: a pure function of
    its arguments (errors are raised). Cached (`_numbers`) for batch 1 and for batches the lines cannot answer;
    the lines keep those they answer (batchlines.py `NumbersLine.numbers`): a sweep that comes back to a
    configuration, as a planner's bisections do, gets it again."""
    from .estimator import _forward_key, _libraries
    run, method, arch, targets, sites, head_sites, adapted = _validated_at(spec, run)
    stack = stack_of(arch, spec)
    key = _forward_key(run)
    rec, acts = _activations(spec, key, targets, run.r)
    opt = get_optimizer(run.optimizer)
    params = parameter_budget(arch, spec, method, run, opt, sites, head_sites)
    rank = None
    if run.sharding is not None:  # the busiest rank, as estimate_run reads it (cached per run key)
        from .sharding import rank_of
        rank = rank_of(arch, spec, method, run, opt, sites, head_sites)
    peak = peak_bytes(rec, acts, params, run, stack, adapted_blocks=adapted, rank=rank)
    paged = params.state_bytes if params.paged else 0
    if rank is not None and params.paged:
        paged = rank.paged_state
    device = device_memory(slack_reserved(peak), peak_bytes=peak, family=spec.model_type, gpu=gpu,
                           paged_bytes=paged, paged_evictable=run.paged_evictable,
                           libraries=_libraries(run)).device_bytes
    lines = _flop_lines(spec, key, targets)
    if lines is None:  # not all integers: evaluated at the rank itself
        flops = step_flops(affine_record(spec, key, targets).at(run.r, only=FLOP_FIELDS), run.grad_checkpointing, stack)
        total, raw = flops.forward + flops.backward, flops.step_total
    else:
        dr = (run.r or 1) - 1
        (total, slope), (raw, raw_slope) = lines
        total, raw = total + slope * dr, raw + raw_slope * dr
    step = step_time_s(load_gpu(gpu), raw, run.precision, utilisation) if gpu is not None else None
    if rank is not None and step is not None:  # the step waits for the communication compute does not hide
        from .sharding import exposed_time_s
        step = step + exposed_time_s(rank, load_gpu(gpu), step)
    return StepNumbers(peak, device, total, params.trainable_params, step)


_numbers = lru_cache(maxsize=65536)(direct_numbers)


@lru_cache(maxsize=16384)
def _activations(spec: ModelSpec, key: RunConfig, targets: frozenset, r: int | None):
    """The record at rank r and its activation budget, shared by every run that differs only in what
    the forward does not see (the optimizer; the sharding of the parameters)."""
    rec = affine_record(spec, key, targets).at(r, only=PEAK_FIELDS)
    return rec, activation_budget(rec, key, stack_of(get_architecture(spec.model_type), spec))


@lru_cache(maxsize=8192)
def _flop_lines(spec: ModelSpec, key: RunConfig, targets: frozenset) -> tuple[tuple, tuple] | None:
    """A step's FLOPs (rounded, and raw for the step time) as value at r = 1 and slope per unit of rank.
    `step_flops` only adds record entries times layer counts, and every entry is affine in r (record.py),
    so the total is too: two evaluations give it exactly (tests/test_fast_path.py compares). None when a
    sum is not an integer (a float would not be reproduced to the last bit)."""
    affine, stack = affine_record(spec, key, targets), stack_of(get_architecture(spec.model_type), spec)
    return flop_lines_of(lambda r: affine.at(r, only=FLOP_FIELDS), key.grad_checkpointing, stack)


def flop_lines_of(record_at, grad_checkpointing: bool, stack) -> tuple[tuple, tuple] | None:
    """`_flop_lines` from `record_at(r)`, the record at rank r with (at least) FLOP_FIELDS (one definition: the
    batch lines evaluate it at batches no forward was asked for, batchlines.py `flop_batch_lines`)."""
    f1, f2 = (step_flops(record_at(r), grad_checkpointing, stack) for r in (1, 2))
    t1, t2 = f1.forward + f1.backward, f2.forward + f2.backward
    if not all(type(v) is int for v in (f1.step_total, f2.step_total)):
        return None
    return (t1, t2 - t1), (f1.step_total, f2.step_total - f1.step_total)


def _refreshes(run: RunConfig) -> bool:
    """An optimizer with a heavier step now and then (GaLore's projector refresh, task "galore"): its figure, the
    one the GPU fit takes, comes with the full estimate (refresh.py), not the peak moments read here."""
    return bool(get_optimizer(run.optimizer).refresh_every)


def _full(spec, run, gpu, utilisation):
    from .estimator import estimate_run
    return estimate_run(spec, run, gpu=gpu, utilisation=utilisation)


def numbers_of(e) -> StepNumbers:
    """The headline numbers of a full `Estimate`."""
    return StepNumbers(e.memory.peak_bytes, e.memory.fit_device_bytes, e.flops.total, e.trainable_params,
                       e.gpu.step_time_s if e.gpu is not None else None)


def without_cyclic_gc(sweep):
    """Run a sweep (the planner's) with Python's cyclic garbage collector paused, and restore it after.

    A sweep allocates many objects that live on in the estimator's caches (runs, records, budgets) and
    makes no reference cycles (a whole benchmark sweep: `gc.get_stats()` counts 0 collected); each
    full collection traverses every cached object again, a quarter of a 70B plan's time
    (benchmarks/sweep_speed.py: 0.36 s with the collector, 0.28 s without). Reference counting
    frees everything as usual; the collector resumes, as it was, when the sweep returns or raises."""
    @wraps(sweep)
    def paused(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return sweep(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()
    return paused
