"""A sweep's numbers at every batch from lines in the batch, built once per run-without-its-batch (task "speed").

Once a forward's batch line is verified (record.py `BatchLine`: every byte and FLOP count the tape sees is an
exact integer line in the batch, for batch >= 2), every term of every candidate peak moment (peaks.py
`_moments`) is made of those counts by additions, integer multiples and comparisons (max, min, a branch).
Evaluating `_moments` itself on `Lin` values (c + s x batch) gives each moment's total as a line, with every
comparison decided over a range of batches: where a comparison's outcome changes inside the range (a 4-bit
weight's dequantised copy wins over the activations at small batches, loses at large ones) the range is split
at the first batch where it changes, and the part holding the batch asked for is evaluated again. So a
moment total is exact on its range, never interpolated, and a formula change in peaks.py flows through: it is
the same code, on other numbers. An operation that is not exact on lines (a float factor, `int()`, a division)
raises NotAffine, and that run is computed batch by batch as before (fast.py's direct path).

Per batch, what is left is the largest of a few lines, the device memory of that peak (device.py), and the
step's FLOPs, exact lines in the batch too: `step_flops` only adds record entries times layer counts (one
line from batches 2 and 3, checked at 4 as BatchLine checks its own). What else a number needs does not
depend on the batch: the checks of a run read none (tests/test_fast_path.py traces them), the parameter budget
and the busiest rank are keyed without it (budget.py, sharding/__init__.py `rank_of`). tests/test_fast_path.py
compares with the full estimate on a grid of batches, methods, ranks, checkpointing, optimizers and sharding.
"""

from __future__ import annotations

from functools import lru_cache

from .cuda_context import context_for
from .device import device_total, slack_reserved, step_time_s
from .record import BatchLine
from ..spec import MAX_BATCH

FIRST = BatchLine.FIRST  # batch 1 takes other code paths in transformers: never on a line
_MAX_SPLITS = 24  # ranges split this often without success: the run is computed batch by batch instead


class NotAffine(Exception):
    """An operation whose result is not an exact integer line in the batch."""


class Split(Exception):
    """A comparison whose outcome changes at batch `at` (the first batch of the range where it differs)."""

    def __init__(self, at: int):
        super().__init__(at)
        self.at = at


# The batches the comparisons are decided over, set by `moment_lines` and `_lin_activations` while they evaluate
# (module state: a sweep runs on one thread, as the estimator's other caches assume).
_RANGE = [FIRST, MAX_BATCH]


class Lin:
    """An integer c + s x batch, for batches in the current range (_RANGE). Arithmetic stays exact;
    comparisons are decided for the whole range or raise Split."""

    __slots__ = ("c", "s")

    def __init__(self, c: int, s: int):
        self.c, self.s = c, s

    def at(self, b: int) -> int:
        return self.c + self.s * b

    def __add__(self, other):
        if type(other) is Lin:
            return Lin(self.c + other.c, self.s + other.s)
        if type(other) is int:
            return Lin(self.c + other, self.s)
        raise NotAffine(f"{type(other).__name__} added")

    __radd__ = __add__

    def __sub__(self, other):
        if type(other) is Lin:
            return Lin(self.c - other.c, self.s - other.s)
        if type(other) is int:
            return Lin(self.c - other, self.s)
        raise NotAffine(f"{type(other).__name__} subtracted")

    def __rsub__(self, other):
        if type(other) is int:
            return Lin(other - self.c, -self.s)
        raise NotAffine(f"{type(other).__name__} subtracted from")

    def __neg__(self):
        return Lin(-self.c, -self.s)

    def __mul__(self, other):
        if type(other) is int:
            return Lin(self.c * other, self.s * other)
        if type(other) is Lin and other.s == 0:
            return Lin(self.c * other.c, self.s * other.c)
        if type(other) is Lin and self.s == 0:
            return Lin(other.c * self.c, other.s * self.c)
        if type(other) is float and self.s == 0:  # a line constant in the batch (e.g. a gradient's bytes) times
            return self.c * other  # a share: the same number at every batch, so a plain number is exact
        raise NotAffine(f"multiplied by {type(other).__name__}")

    __rmul__ = __mul__

    def __int__(self):  # int() must return an int: a line only where it is constant in the batch
        if self.s == 0:
            return self.c
        raise NotAffine("int()")

    def __float__(self):
        if self.s == 0:
            return float(self.c)
        raise NotAffine("float()")

    def __floordiv__(self, other):
        if type(other) is int and self.s == 0 and other:
            return Lin(self.c // other, 0)
        raise NotAffine("division")

    def __truediv__(self, other):
        raise NotAffine("division")

    __rtruediv__ = __rfloordiv__ = __mod__ = __truediv__

    __hash__ = None

    # comparisons: decided over the whole range, or Split where the outcome changes
    def __gt__(self, other):
        return _monotone(self - other, _POSITIVE)

    def __ge__(self, other):
        return _monotone(self - other, _NON_NEGATIVE)

    def __lt__(self, other):
        return _monotone(self - other, _NEGATIVE)

    def __le__(self, other):
        return _monotone(self - other, _NON_POSITIVE)

    def __eq__(self, other):
        if type(other) not in (Lin, int):
            return NotImplemented
        return _is_zero(self - other)

    def __ne__(self, other):
        if type(other) not in (Lin, int):
            return NotImplemented
        return not _is_zero(self - other)

    def __bool__(self):
        return not _is_zero(self)

    def __repr__(self) -> str:
        return f"Lin({self.c} + {self.s} b)"


_POSITIVE, _NON_NEGATIVE = (lambda v: v > 0), (lambda v: v >= 0)
_NEGATIVE, _NON_POSITIVE = (lambda v: v < 0), (lambda v: v <= 0)


def _monotone(d, holds) -> bool:
    """`holds(d(b))` for every batch of the range (an affine d: the outcome changes at most once)."""
    lo, hi = _RANGE
    if d.s == 0:
        return holds(d.c)
    first, last = holds(d.c + d.s * lo), holds(d.c + d.s * hi)
    if first == last:
        return first
    a, b = lo, hi  # holds at a as at lo, not at b: the first change lies in (a, b]
    while b - a > 1:
        m = (a + b) // 2
        if holds(d.c + d.s * m) == first:
            a = m
        else:
            b = m
    raise Split(b)


def _is_zero(d) -> bool:
    """Whether d is zero, for every batch of the range (a non-constant line is zero at one batch at most)."""
    if type(d) is int:
        return d == 0
    lo, hi = _RANGE
    if d.s == 0:
        return d.c == 0
    if (-d.c) % d.s or not lo <= -d.c // d.s <= hi:
        return False
    root = -d.c // d.s
    if lo == hi:
        return True
    raise Split(root if root > lo else root + 1)


def lin_record(compiled: tuple, r: int | None, only: frozenset):
    """The StepRecord at rank r with every entry a Lin in the batch: record.py `AffineRecord.at` of
    `BatchLine.record_at(b)`, both evaluated symbolically (an entry at (r, b) is a + s dr + (da + ds dr)(b - b1);
    a maximum is the largest of its candidate lines, the envelope `at` keeps never changing which)."""
    from .record import StepRecord
    b1, fields, singles, maxima = compiled
    dr = (r or 1) - 1

    def line(a, s, da, ds):
        slope = da + ds * dr
        return Lin(a + s * dr - slope * b1, slope)

    values = {}
    for name, items in fields:
        values[name] = {k: line(a, s, da, ds) for k, a, s, da, ds in items} if name in only else {}
    for name, items in maxima:
        values[name] = {scope: max([line(*cand) for cand in lines]) for scope, lines in items} if name in only else {}
    for name in ("forward_transient", "backward_transient", "largest", "norm_backward", "widest_moment"):
        values.setdefault(name, {})
    single = {name: line(a, s, da, ds) for name, a, s, da, ds in singles}
    return StepRecord(logits_bytes=single["logits"], loss_copy_bytes=single["loss_copy"],
                      log_softmax_bytes=single["log_softmax"], checkpoint_extra_bytes=single["checkpoint_extra"],
                      loss_logits_bytes=single.get("loss_logits"), final_norm_saved_bytes=single["final_norm_saved"],
                      **values)


@lru_cache(maxsize=16384)
def _lin_activations(spec, key, targets, r, lo: int, hi: int):
    """`lin_record` at rank r on batches lo..hi and its activation budget (with the forward's run, as fast.py
    `_activations`), shared by the runs that differ only in what the forward does not see (the optimizer,
    the sharding, the GPU). `key`: the forward's run at batch FIRST, whose batch line is verified."""
    from .architectures import get_architecture
    from .architectures.base import stack_of
    from .fast import PEAK_FIELDS
    from .peaks import activation_budget
    from .record import _batch_line
    _RANGE[0], _RANGE[1] = lo, hi
    try:
        rec = lin_record(_batch_line(spec, key, targets).compiled, r, PEAK_FIELDS)
        return rec, activation_budget(rec, key, stack_of(get_architecture(spec.model_type), spec))
    finally:
        _RANGE[0], _RANGE[1] = FIRST, MAX_BATCH


def moment_lines(spec, key, targets, r, run, stack, params, adapted: bool, rank, batch: int) -> tuple[int, int, tuple]:
    """(lo, hi, pieces): on batches lo..hi (holding `batch`), the peak is `peak_of(pieces, b)`, the upper envelope
    of the candidate moments' totals (the steady terms included): peaks.py `peak_bytes`, every comparison of
    `_moments` decided on lo..hi. Raises NotAffine (or TypeError) where a term is not an exact line."""
    from .peaks import _moments
    lo, hi = FIRST, MAX_BATCH
    for _ in range(_MAX_SPLITS):
        _RANGE[0], _RANGE[1] = lo, hi
        try:
            rec, acts = _lin_activations(spec, key, targets, r, lo, hi)
            _RANGE[0], _RANGE[1] = lo, hi
            steady, candidates = _moments(rec, acts, params, run, stack, adapted, rank)
            return lo, hi, _lines(steady, candidates, lo, hi)
        except Split as split:
            if batch >= split.at:
                lo = split.at
            else:
                hi = split.at - 1
        finally:
            _RANGE[0], _RANGE[1] = FIRST, MAX_BATCH
    raise NotAffine(f"more than {_MAX_SPLITS} ranges")


def _lines(steady, candidates, lo: int, hi: int) -> tuple:
    """The upper envelope of the candidate moments' totals (steady terms included) on lo..hi. Every term must be
    an int or a Lin: `peak_bytes` adds int(v) while `_largest` compares raw sums, the same only for integers."""
    base = 0
    for _, v in steady:
        if type(v) is not int:
            raise NotAffine(f"steady term {type(v).__name__}")
        base += v
    lines = []
    for options in candidates.values():
        for _, terms in options:
            c, s = base, 0
            for _, v in terms:
                if type(v) is int:
                    c += v
                elif type(v) is Lin:
                    c, s = c + v.c, s + v.s
                else:
                    raise NotAffine(f"term {type(v).__name__}")
            lines.append((c, s))
    return upper_envelope(lines, lo, hi)


def upper_envelope(lines, lo: int, hi: int) -> tuple:
    """max(0, max(c + s b for c, s in lines)) on the integers lo..hi as pieces ((first batch, c, s), ...), in
    order: from each piece's first batch on, its line is the largest until the next piece's first batch (the
    maximum of lines is convex: the slope only grows). Exact integer arithmetic; `peak_of` evaluates it."""
    lines = set(lines) | {(0, 0)}  # peak_bytes starts from 0
    pieces, b = [], lo
    c, s = max(lines, key=lambda cs: (cs[0] + cs[1] * lo, cs[1]))
    while True:
        pieces.append((b, c, s))
        nxt = None  # the first batch after b where a steeper line is larger than (c, s)
        for c2, s2 in lines:
            if s2 > s:
                at = (c - c2) // (s2 - s) + 1  # c2 + s2 x > c + s x  <=>  x > (c - c2) / (s2 - s)
                at = max(at, b + 1)
                if nxt is None or (at, -(c2 + s2 * at), -s2) < nxt:
                    nxt = (at, -(c2 + s2 * at), -s2)
        if nxt is None or nxt[0] > hi:
            return tuple(pieces)
        b, s = nxt[0], -nxt[2]
        c = -nxt[1] - s * b


def peak_of(pieces: tuple, b: int) -> int:
    """The envelope's value at batch b (within its range)."""
    for first, c, s in reversed(pieces):
        if b >= first:
            return c + s * b
    raise ValueError(b)


def record_at(compiled: tuple, b: int, r: int | None, only: frozenset):
    """The StepRecord at batch b and rank r from the batch line's compiled entries, the fields of `only` filled:
    record.py `BatchLine.record_at(b).at(r, only)` without building the whole AffineRecord (an entry at (r, b) is
    a + s dr + (da + ds dr)(b - b1); a maximum the largest of its candidates, which the envelope never changes)."""
    from .record import StepRecord
    b1, fields, singles, maxima = compiled
    d, dr = b - b1, (r or 1) - 1
    values = {}
    for name, items in fields:
        values[name] = {k: a + da * d + (s + ds * d) * dr for k, a, s, da, ds in items} if name in only else {}
    for name, items in maxima:
        values[name] = ({scope: max(a + da * d + (s + ds * d) * dr for a, s, da, ds in lines) for scope, lines in items}
                        if name in only else {})
    for name in ("forward_transient", "backward_transient", "largest", "norm_backward", "widest_moment"):
        values.setdefault(name, {})
    single = {name: a + da * d + (s + ds * d) * dr for name, a, s, da, ds in singles}
    return StepRecord(logits_bytes=single["logits"], loss_copy_bytes=single["loss_copy"],
                      log_softmax_bytes=single["log_softmax"], checkpoint_extra_bytes=single["checkpoint_extra"],
                      loss_logits_bytes=single.get("loss_logits"), final_norm_saved_bytes=single["final_norm_saved"],
                      **values)


@lru_cache(maxsize=8192)
def flop_batch_lines(spec, key2, targets) -> tuple | None:
    """fast.py `_flop_lines` (value at r = 1 and slope in r, rounded and raw) as lines in the batch: four pairs
    (at batch FIRST, per unit of batch), or None when a value is not an integer or the line misses batch 4. The
    records at batches 2-4 come from the forward's verified batch line (`record_at`), none simulated."""
    from .architectures import get_architecture
    from .architectures.base import stack_of
    from .fast import FLOP_FIELDS, flop_lines_of
    from .record import _batch_line
    compiled, stack = _batch_line(spec, key2, targets).compiled, stack_of(get_architecture(spec.model_type), spec)
    samples = [flop_lines_of(lambda r, b=b: record_at(compiled, b, r, FLOP_FIELDS), key2.grad_checkpointing, stack)
               for b in (FIRST, FIRST + 1, FIRST + 2)]
    if any(s is None for s in samples):
        return None
    flat = [(t, ts, raw, raws) for (t, ts), (raw, raws) in samples]
    out = tuple((v0, v1 - v0) for v0, v1 in zip(flat[0], flat[1]))
    if any(v0 + 2 * dv != v2 for (v0, dv), v2 in zip(out, flat[2])):
        return None
    return out


class NumbersLine:
    """fast.py's numbers of one run (without its batch) at every batch >= FIRST, once the forward's batch line
    is verified: built on first use after that, then a few integer operations and the device memory per batch.
    `at` returns None where it cannot answer exactly (the batch line still sampling, or refused; a moment that
    is not a line): fast.py then computes that batch directly, as before."""

    __slots__ = ("spec", "run", "gpu", "utilisation", "state", "fixed", "segments", "known")

    # numbers kept per line (a sweep coming back to a batch gets them again), at most: with numbers_line's
    # maxsize, about a million StepNumbers in all; a line answers any other batch in a few integer operations
    MEMO = 64

    def __init__(self, spec, run, gpu, utilisation):
        self.spec, self.run, self.gpu, self.utilisation = spec, run, gpu, utilisation
        self.state, self.fixed, self.segments, self.known = "new", None, [], {}

    def numbers(self, run):
        """fast.py's StepNumbers of `run` (this line's run at its own batch >= FIRST): from the lines when they
        can answer, else computed directly (fast._numbers); kept per batch (the first MEMO batches). Raises
        LoraCostError on bad input, as fast.py does."""
        b = run.batch
        numbers = self.known.get(b)
        if numbers is None:
            numbers = self.at(b)
            if numbers is None:
                from .fast import _numbers  # computed for the run alone, kept there (bounded)
                numbers = _numbers(self.spec, run, self.gpu, self.utilisation)
            if len(self.known) < self.MEMO:
                self.known[b] = numbers
        return numbers

    def at(self, b: int):
        """The StepNumbers at batch b (>= FIRST) from the lines, or None where they cannot answer (yet)."""
        if self.state != "built":
            if self.state == "refused" or (self.state == "sampling" and self.fixed.state == "sampling"):
                return None  # (while sampling, `fixed` is the forward's BatchLine)
            if not self._build():
                return None
        return self._at(b)

    def _at(self, b: int):
        for seg in self.segments:
            if seg[0] <= b <= seg[1]:
                break
        else:
            seg = self._segment(b)
            if seg is None:
                return None
        (spec, run, gpu, params, rank, stack, adapted, _, flops, paged, libraries, gpu_profile, r,
         make, exposed_time_s) = self.fixed
        peak = peak_of(seg[2], b)
        device = device_total(slack_reserved(peak), *paged)  # device.py device_memory's device_bytes
        d, dr = b - FIRST, (r or 1) - 1
        (t, tb), (ts, tsb), (raw, rawb), (raws, rawsb) = flops
        total, raw = t + tb * d + (ts + tsb * d) * dr, raw + rawb * d + (raws + rawsb * d) * dr
        step = step_time_s(gpu_profile, raw, run.precision, self.utilisation) if gpu is not None else None
        if rank is not None and step is not None:
            step = step + exposed_time_s(rank, gpu_profile, step)
        return make(peak, device, total, params.trainable_params, step)

    def _segment(self, b: int):
        spec, run, gpu, params, rank, stack, adapted, (key, targets) = self.fixed[:8]
        r = self.fixed[12]
        try:
            seg = moment_lines(spec, key, targets, r, run, stack, params, adapted, rank, b)
        except Exception:  # NotAffine, or an operation Lin does not have: the direct path computes (and judges) it
            self.state = "refused"
            return None
        self.segments.append(seg)
        return seg

    def _build(self) -> bool:
        from .architectures.base import stack_of
        from .budget import parameter_budget
        from .estimator import _forward_key, _libraries
        from .fast import StepNumbers, _validated
        from .optimizers import get_optimizer
        from .record import _batch_line, _compile
        from ..profiles import load_gpu
        spec = self.spec
        run, method, arch, targets, sites, head_sites, adapted = _validated(spec, self.run)  # raises as fast.py does
        key = _forward_key(run)
        line = _batch_line(spec, key, targets)  # the line affine_record uses for every batch of this run
        if line.state == "simulate":
            self.state = "refused"
        if line.state != "affine":
            if line.state == "sampling":  # asked again once the forward's line has decided
                self.state, self.fixed = "sampling", line
            return False
        if line.compiled is None:
            line.compiled = _compile(line.line)
        flops = flop_batch_lines(spec, key, targets)
        if flops is None:
            self.state = "refused"
            return False
        opt = get_optimizer(run.optimizer)
        params = parameter_budget(arch, spec, method, run, opt, sites, head_sites)  # independent of the batch
        rank = exposed_time_s = None
        if run.sharding is not None:  # the busiest rank: independent of the batch (sharding/__init__.py rank_of)
            from .sharding import exposed_time_s, rank_of
            rank = rank_of(arch, spec, method, run, opt, sites, head_sites)
        paged = params.state_bytes if params.paged else 0
        if rank is not None and params.paged:
            paged = rank.paged_state
        # device_memory's context and resident paged state, the same at every batch: (context, resident)
        paged = (context_for(self.gpu, spec.model_type, _libraries(run)).bytes, 0 if run.paged_evictable else paged)
        self.fixed = (spec, run, self.gpu, params, rank, stack_of(arch, spec), adapted, (key, targets), flops, paged,
                      _libraries(run), load_gpu(self.gpu) if self.gpu is not None else None, run.r,
                      StepNumbers, exposed_time_s)
        self.state = "built"
        return True


@lru_cache(maxsize=16384)
def numbers_line(spec, run, gpu, utilisation) -> NumbersLine:
    """One NumbersLine per run at batch FIRST (its key), GPU and utilisation."""
    return NumbersLine(spec, run, gpu, utilisation)


def clear_lines() -> None:
    """Forget every line (record.py's `affine_record.cache_clear()` calls this: the lines are read from its
    batch lines)."""
    numbers_line.cache_clear()
    _lin_activations.cache_clear()
    flop_batch_lines.cache_clear()
