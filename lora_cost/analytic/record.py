"""One simulated forward pass, reduced to the numbers the estimator needs, and cached for sweeps.

Every size the tape sees is affine in the adapter rank r once the model, the method, the targets,
the precision, the batch and the sequence length are fixed (LoRA's [n, r] projections, NoLA's
[r, d] factors, DoRA's eye(d_in) @ A^T products: all linear in r). So the forward is simulated at
r = 1 and r = 2 and every quantity kept as value(1) + slope * (r - 1); a sweep over ranks then
costs one simulation. Quantities that are maxima (the largest buffer of a block) keep all their
candidate lines, pruned to those that can win for some r >= 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields as dataclass_fields
from functools import cached_property, lru_cache

from .architectures import get_architecture
from .architectures.base import stack_of
from .context import make_context
from .methods import get_method
from .tape import Tape
from ..spec import RunConfig

def revalued(run: RunConfig, **changes) -> RunConfig:
    """`dataclasses.replace(run, **changes)` for changes known valid (rank 1 or 2, batch 2, AdamW), without
    running RunConfig's validation again: the record caches derive keys from every run they see,
    and re-validating each (`replace` calls `__post_init__`) was a tenth of a sweep's time. Only the
    dataclass fields are copied (never a cached value of the old run); equal to `replace`'s result
    (tests/test_batch_line.py)."""
    new = object.__new__(RunConfig)
    values, old = new.__dict__, run.__dict__
    if len(old) == len(_RUN_FIELDS):  # every field and nothing else (a cached value would be one more key)
        values.update(old)
    else:
        for name in _RUN_FIELDS:
            values[name] = old[name]
    for name, value in changes.items():
        if name not in values:
            raise TypeError(f"RunConfig has no field {name!r}")
        values[name] = value
    return new


_RUN_FIELDS = tuple(f.name for f in dataclass_fields(RunConfig))


@dataclass(frozen=True)
class StepRecord:
    """What one forward pass keeps and computes, per scope (embeddings, each simulated block of the
    stack, head, loss)."""

    saved: dict  # scope -> bytes autograd keeps
    saved_by_kind: dict  # (scope, kind) -> bytes
    kind_totals: dict  # kind -> bytes autograd keeps over the whole model (blocks expanded; checkpointed blocks left out)
    flop_totals: dict  # (kind, fwd|bwd) -> FLOPs over the whole model
    flops: dict  # (scope, fwd|bwd) -> FLOPs
    flops_by_kind: dict  # (scope, kind, fwd|bwd) -> FLOPs
    flops_after_last_save: dict  # scope -> forward FLOPs after the last save (not recomputed)
    uncounted: dict  # scope -> forward FLOPs FlopCounterMode misses
    uncounted_after_last_save: dict
    orphaned: dict  # scope -> bytes saved for graphs dropped before backward (held by checkpoint recomputation)
    forward_transient: dict  # scope -> largest short-lived buffer
    backward_transient: dict
    widest_moment: dict  # scope -> max over its activations of 3 x bytes + the scope's saves before it (less held ones)
    norm_backward: dict  # scope -> the gradient buffers at the peak of its largest norm backward
    largest: dict  # scope -> largest activation created
    block_input: dict  # block scope -> bytes of its input (the residual stream)
    logits_bytes: int
    loss_copy_bytes: int
    log_softmax_bytes: int
    checkpoint_extra_bytes: int
    # logits alive while the loss runs, where they differ from logits_bytes (--loss liger | chunked); None: the same
    loss_logits_bytes: int | None = None
    # issue9b: scope -> bytes kept by ctx attributes that checkpointing cannot drop (tape.keep_past_checkpoint)
    kept_past_checkpoint: dict = field(default_factory=dict)
    # moments: scope -> max over its activations of widest_moment's entry less the trainable bytes of the linears
    # run before it (tape.widest_gradients); absent: every gradient of the block counted at its in-block moment
    widest_gradients: dict = field(default_factory=dict)
    # ligeracc: scope -> the most bytes the forward holds inside it (tape.forward_live: its saves so far, the
    # storages only Python holds, the op's buffers); absent: no tracked forward moment
    forward_live: dict = field(default_factory=dict)
    # ligeracc: block scope -> the same under checkpointing's recomputation (tape.recompute_live: the block's saves kept)
    recompute_live: dict = field(default_factory=dict)

    @property
    def logits_at_loss_bytes(self) -> int:
        return self.logits_bytes if self.loss_logits_bytes is None else self.loss_logits_bytes
    final_norm_saved_bytes: int = 0  # what the head's scope saved before the classifier (the final norm's saves)
    # moments: a trained LM head's gradient summed over --loss chunked's chunks (losses.chunked_loss); 0: none
    head_accumulation_bytes: int = 0


def _flatten(tape: Tape, ctx) -> tuple[dict, dict]:
    """(scalars, candidate lists) of one simulated forward."""
    scalars = {("logits",): ctx.logits_bytes, ("loss_copy",): ctx.loss_copy_bytes, ("log_softmax",): ctx.log_softmax_bytes,
               ("checkpoint_extra",): ctx.checkpoint_extra_bytes,
               ("final_norm_saved",): ctx.final_norm_saved_bytes}
    if ctx.loss_logits_bytes is not None:  # lossdtype: only a loss other than the standard one sets it
        scalars[("loss_logits",)] = ctx.loss_logits_bytes
    if ctx.head_accumulation_bytes:  # moments: only --loss chunked with a trained head sets it
        scalars[("head_accumulation",)] = ctx.head_accumulation_bytes
    for scope, b in ctx.block_input_bytes.items():
        scalars[("block_input", scope)] = b
    for scope, v in tape.saved_by_scope.items():
        scalars[("saved", scope)] = v
    for key, v in tape.saved.items():
        scalars[("saved_by_kind", key)] = v
    for key, v in tape.flops_by_scope.items():
        scalars[("flops", key)] = v
    for key, v in tape.flops.items():
        scalars[("flops_by_kind", key)] = v
    for name in ("flops_after_last_save", "uncounted_after_last_save", "orphaned", "kept_past_checkpoint"):
        for scope, v in getattr(tape, name).items():
            scalars[(name, scope)] = v
    for scope, v in tape.uncounted_flops.items():
        scalars[("uncounted", scope)] = v
    lists = {}
    for name in ("forward_transient", "backward_transient", "created", "norm_backward", "widest_moment",
                 "widest_gradients", "forward_live", "recompute_live"):
        for scope, values in getattr(tape, name).items():
            lists[(name, scope)] = values
    return scalars, lists


def _envelope(lines: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Drop lines (value at r=1, slope) that never exceed another for r >= 1."""
    # sorted by value then slope, both descending: every earlier line has a value >= this one's, so this one
    # never exceeds them all iff an earlier slope is >= its own (the running maximum; the same lines as testing
    # each against those kept, in the same order, without the quadratic scan)
    kept = []
    top = None
    for a, b in sorted(set(lines), reverse=True):  # (integer pairs: the same order as key (-a, -b), without a key call)
        if top is None or b > top:
            kept.append((a, b))
            top = b
    return tuple(kept)


_FIELDS = ("block_input", "saved", "saved_by_kind", "kind_totals", "flops", "flops_by_kind", "flop_totals", "flops_after_last_save",
           "uncounted", "uncounted_after_last_save", "orphaned", "kept_past_checkpoint")
_MAXIMA = {"forward_transient": "forward_transient", "backward_transient": "backward_transient", "created": "largest",
           "norm_backward": "norm_backward", "widest_moment": "widest_moment", "widest_gradients": "widest_gradients",
           "forward_live": "forward_live", "recompute_live": "recompute_live"}


@dataclass(frozen=True)
class AffineRecord:
    """Every quantity of a StepRecord as value at r = 1 plus a slope per unit of rank."""

    fields: tuple  # ((field, ((subkey, value_at_1, slope), ...)), ...)
    maxima: tuple  # ((field, ((scope, lines), ...)), ...)
    singles: tuple  # ((name, value_at_1, slope), ...): logits, loss_copy, log_softmax, checkpoint_extra

    @cached_property
    def _split(self) -> tuple:
        """For `at`: each field's values at r = 1 as a dict and the entries with a slope (most of the
        model, everything the rank does not touch, has none: copying the dict is all it costs); each
        maximum's lines (a single line needs no max)."""
        base = tuple((name, {k: a for k, a, _ in items}, tuple((k, b) for k, _, b in items if b))
                     for name, items in self.fields)
        maxima = tuple((name, tuple((scope, lines[0] if len(lines) == 1 else None, lines) for scope, lines in items))
                       for name, items in self.maxima)
        return base, maxima, {name: (a, b) for name, a, b in self.singles}

    def at(self, r: int | None, only: frozenset | None = None) -> StepRecord:
        """The record at rank r: value(1) + slope * (r - 1) for every quantity, and the largest line of
        each maximum. `only`: the fields to evaluate, the others left empty (the numbers-only path,
        `fast.py`, needs neither the per-kind tables that explain the numbers nor, once its FLOPs
        are known, the per-scope FLOPs)."""
        dr = (r or 1) - 1
        base, maxima, singles = self._split
        values = {}
        for name, at_1, sloped in base:
            if only is not None and name not in only:
                values[name] = {}
                continue
            d = at_1.copy()
            for k, b in sloped:
                d[k] += b * dr
            values[name] = d
        for name, items in maxima:
            if only is not None and name not in only:
                values[name] = {}
                continue
            values[name] = {scope: line[0] + line[1] * dr if line is not None else max(a + b * dr for a, b in lines)
                            for scope, line, lines in items}
        for name in ("forward_transient", "backward_transient", "largest", "norm_backward", "widest_moment",
                     "widest_gradients", "forward_live", "recompute_live"):
            values.setdefault(name, {})
        single = {name: a + b * dr for name, (a, b) in singles.items()}
        return StepRecord(logits_bytes=single["logits"],
                          loss_copy_bytes=single["loss_copy"], log_softmax_bytes=single["log_softmax"],
                          checkpoint_extra_bytes=single["checkpoint_extra"], loss_logits_bytes=single.get("loss_logits"),
                          final_norm_saved_bytes=single["final_norm_saved"],
                          head_accumulation_bytes=single.get("head_accumulation", 0),
                          **values)


def simulate(spec, run, method, arch, targets) -> tuple[dict, dict]:
    # ligeracc: the forward's references are followed only where the family and the method mirror the libraries'
    tape = Tape(run.tokens, autocast=run.autocast_dtype, track_live=arch.forward_lifetimes and method.forward_lifetimes)
    stack = stack_of(arch, spec)
    ctx = make_context(tape, spec, run, method, targets, stack)
    arch.forward(ctx)
    tape.flush_live()
    for scope in ("embeddings", "head"):  # peaks.py takes the blocks' and the loss's tracked moments only
        tape.forward_live.pop(scope, None)
    scalars, lists = _flatten(tape, ctx)
    # whole-model totals per kind (each simulated block counted for the layers it stands for), for the explanation
    reps = stack.repetitions
    for (scope, kind), v in tape.saved.items():
        if not (run.grad_checkpointing and scope in reps):
            key = ("kind_totals", kind)
            scalars[key] = scalars.get(key, 0) + v * reps.get(scope, 1)
    for (scope, kind, phase), v in tape.flops.items():
        key = ("flop_totals", (kind, phase))
        scalars[key] = scalars.get(key, 0) + v * reps.get(scope, 1)
    return scalars, lists


def _simulate_ranks(spec, run, targets) -> tuple:
    """The raw forward at r = 1 and r = 2 (the same simulation twice when the method has no rank, or
    is simulated at the run's own rank): (scalars at 1, lists at 1, scalars at 2, lists at 2)."""
    method, arch = get_method(run.method), get_architecture(spec.model_type)
    s1, l1 = simulate(spec, run, method, arch, targets)
    if run.r is None or not method.rank_affine:
        return s1, l1, s1, l1
    s2, l2 = simulate(spec, revalued(run, r=2), method, arch, targets)
    return s1, l1, s2, l2


@lru_cache(maxsize=4096)
def affine_record(spec, run, targets) -> AffineRecord:
    """Simulate at r = 1 and r = 2 (once when the method has no rank) and keep the affine form; at a
    batch >= 2 the simulation may be replaced by the batch line's exact interpolation (`BatchLine`)."""
    if run.batch >= BatchLine.FIRST:
        line = _batch_line(spec, revalued(run, batch=BatchLine.FIRST), targets)
        if line.state == "affine":
            return line.record_at(run.batch)
        return _affine_of(*line.raw_at(spec, run, targets))
    return _affine_of(*_simulate_ranks(spec, run, targets))


def _affine_of(s1, l1, s2, l2) -> AffineRecord:
    grouped: dict[str, list] = {name: [] for name in _FIELDS}
    singles = []
    for key, v in s1.items():
        slope = s2.get(key, 0) - v
        if len(key) == 1:
            singles.append((key[0], v, slope))
        else:
            grouped[key[0]].append((key[1], v, slope))
    maxima: dict[str, list] = {}
    for (name, scope), v in l1.items():
        maxima.setdefault(_MAXIMA[name], []).append((scope, _envelope([(a, b - a) for a, b in zip(v, l2[(name, scope)])])))
    return AffineRecord(fields=tuple((k, tuple(v)) for k, v in grouped.items()),
                        maxima=tuple((k, tuple(v)) for k, v in maxima.items()),
                        singles=tuple(singles))


class BatchLine:
    """The raw forward of one run at every batch >= 2, as an exact integer line in the batch.

    Every size the tape sees is a count of rows (batch x seq tokens, batch x heads x seq x seq scores)
    times widths fixed by the model, plus sizes that do not depend on the batch (weights cast for the
    forward, adapter factors): so each byte count and FLOP count is affine in the batch. Not at batch 1:
    transformers takes other paths there (Phi-3's eager attention keeps a view of the fused qkv only
    when `bsz == 1`, phi3.py; GPT-2's cross-attention mask likewise), so batch 1 is always simulated.
    A family may also branch on the data (a max(...) whose winner changes with the batch): that is what
    the check below catches, and then every batch is simulated, as without this line.

    Lazy, so that a sweep that asks for one or two batches pays nothing extra: the first two batches
    asked for (>= 2) are simulated and give the line; the third is simulated too and compared, entry by
    entry, with the line's value there; only once it is equal is the line used (exact integers:
    value at b1 + slope * (b - b1), the slope an integer; any entry that is not an integer, a key or a
    candidate list that is not in both samples, or a slope that is not whole, and the line is refused).
    tests/test_fast_path.py and tests/test_batch_line.py compare with direct simulation."""

    FIRST = 2  # the smallest batch on the line (batch 1 takes other code paths, see above)
    __slots__ = ("points", "line", "state", "compiled")

    def __init__(self):
        self.points: dict[int, tuple] = {}  # batch -> raw forward (at most three, until decided)
        self.line = None  # (b1, values at b1, slopes) once two points are known
        self.state = "sampling"  # -> "affine" (verified) or "simulate" (not affine: every batch simulated)
        self.compiled = None  # once affine: the AffineRecord's entries with their slopes in the batch

    def record_at(self, b: int) -> AffineRecord:
        """`_affine_of(*self.raw_at(...))` at batch b once the line is verified, without the raw dicts:
        each entry (value at r = 1, slope in r) is itself affine in the batch (a difference of two
        lines), so it is evaluated directly, in the order `_affine_of` gives (tests compare)."""
        if self.compiled is None:
            self.compiled = _compile(self.line)
        b1, fields, singles, maxima = self.compiled
        d = b - b1
        return AffineRecord(
            fields=tuple((name, tuple((k, a + da * d, s + ds * d) for k, a, s, da, ds in items)) for name, items in fields),
            maxima=tuple((name, tuple((scope, _envelope([(a + da * d, s + ds * d) for a, s, da, ds in lines]))
                                      for scope, lines in items)) for name, items in maxima),
            singles=tuple((name, a + da * d, s + ds * d) for name, a, s, da, ds in singles))

    def raw_at(self, spec, run, targets) -> tuple:
        b = run.batch
        if self.state == "affine":
            return _line_value(self.line, b)
        if b in self.points:
            return self.points[b]
        raw = _simulate_ranks(spec, run, targets)
        if self.state == "simulate":
            return raw
        self.points[b] = raw
        if len(self.points) == 2:
            (b1, r1), (b2, r2) = sorted(self.points.items())
            self.line = _line_through(b1, r1, b2, r2)
            if self.line is None:
                self._decide("simulate")
        elif len(self.points) == 3:
            self._decide("affine" if _line_value(self.line, b) == raw else "simulate")
        return raw

    def _decide(self, state: str) -> None:
        self.state = state
        self.points = {}
        if state == "simulate":
            self.line = None


@lru_cache(maxsize=4096)
def _batch_line(spec, run, targets) -> BatchLine:
    """One line per run less its batch (the key is the run at batch FIRST)."""
    return BatchLine()


def _clear_records_and_lines(clear_records=affine_record.cache_clear) -> None:
    """`affine_record.cache_clear()` forgets the batch lines too: they hold raw simulations, and whoever
    clears the records (a test that swaps an architecture) means the forward to be simulated again."""
    clear_records()
    _batch_line.cache_clear()
    from .batchlines import clear_lines  # task "speed": the numbers read from those lines go with them
    clear_lines()


affine_record.cache_clear = _clear_records_and_lines


def _compile(line) -> tuple:
    """The line as AffineRecord entries: (b1, fields, singles, maxima), each entry's value at r = 1 and
    slope in r at b1 with their slopes per unit of batch, grouped and ordered as `_affine_of` does."""
    b1, (s1, l1, s2, l2), (t1, m1, t2, m2) = line
    grouped: dict[str, list] = {name: [] for name in _FIELDS}
    singles = []
    for key, v in s1.items():
        entry = (v, s2.get(key, 0) - v, t1[key], t2.get(key, 0) - t1[key])
        if len(key) == 1:
            singles.append((key[0], *entry))
        else:
            grouped[key[0]].append((key[1], *entry))
    maxima: dict[str, list] = {}
    for (name, scope), v in l1.items():
        w, dv, dw = l2[(name, scope)], m1[(name, scope)], m2[(name, scope)]
        maxima.setdefault(_MAXIMA[name], []).append(
            (scope, tuple((a, c - a, da, dc - da) for a, c, da, dc in zip(v, w, dv, dw))))
    return (b1, tuple((k, tuple(v)) for k, v in grouped.items()), tuple(singles),
            tuple((k, tuple(v)) for k, v in maxima.items()))


def _line_through(b1: int, r1: tuple, b2: int, r2: tuple):
    """(b1, raw at b1, slopes per unit of batch) or None when an entry has no exact integer line."""
    db, slopes = b2 - b1, []
    for part1, part2 in zip(r1, r2):
        if part1.keys() != part2.keys():
            return None
        if part1 and isinstance(next(iter(part1.values())), list):  # candidate lists
            slope = {}
            for k, v1 in part1.items():
                v2 = part2[k]
                if len(v1) != len(v2):
                    return None
                row = []
                for a, c in zip(v1, v2):
                    if type(a) is not int or type(c) is not int or (c - a) % db:
                        return None
                    row.append((c - a) // db)
                slope[k] = row
        else:
            slope = {}
            for k, a in part1.items():
                c = part2[k]
                if type(a) is not int or type(c) is not int or (c - a) % db:
                    return None
                slope[k] = (c - a) // db
        slopes.append(slope)
    return b1, r1, tuple(slopes)


def _line_value(line, b: int) -> tuple:
    b1, raw, slopes = line
    d = b - b1
    out = []
    for part, slope in zip(raw, slopes):
        if part and isinstance(next(iter(part.values())), list):
            out.append({k: [a + s * d for a, s in zip(v, slope[k])] for k, v in part.items()})
        else:
            out.append({k: a + slope[k] * d for k, a in part.items()})
    return tuple(out)
