"""One simulated forward pass, reduced to the numbers the estimator needs, and cached for sweeps.

Every size the tape sees is affine in the adapter rank r once the model, the method, the targets,
the precision, the batch and the sequence length are fixed (LoRA's [n, r] projections, NoLA's
[r, d] factors, DoRA's eye(d_in) @ A^T products: all linear in r). So the forward is simulated at
r = 1 and r = 2 and every quantity kept as value(1) + slope * (r - 1); a sweep over ranks then
costs one simulation. Quantities that are maxima (the largest buffer of a block) keep all their
candidate lines, pruned to those that can win for some r >= 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache

from .architectures import get_architecture
from .architectures.base import stack_of
from .context import make_context
from .methods import get_method
from .tape import Tape

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
    widest_moment: dict  # scope -> max over its activations of 3 x bytes + the scope's saves before it
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

    @property
    def logits_at_loss_bytes(self) -> int:
        return self.logits_bytes if self.loss_logits_bytes is None else self.loss_logits_bytes
    final_norm_saved_bytes: int = 0  # what the head's scope saved before the classifier (the final norm's saves)


def _flatten(tape: Tape, ctx) -> tuple[dict, dict]:
    """(scalars, candidate lists) of one simulated forward."""
    scalars = {("logits",): ctx.logits_bytes, ("loss_copy",): ctx.loss_copy_bytes, ("log_softmax",): ctx.log_softmax_bytes,
               ("checkpoint_extra",): ctx.checkpoint_extra_bytes,
               ("final_norm_saved",): ctx.final_norm_saved_bytes}
    if ctx.loss_logits_bytes is not None:  # lossdtype: only a loss other than the standard one sets it
        scalars[("loss_logits",)] = ctx.loss_logits_bytes
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
    for name in ("forward_transient", "backward_transient", "created", "norm_backward", "widest_moment"):
        for scope, values in getattr(tape, name).items():
            lists[(name, scope)] = values
    return scalars, lists


def _envelope(lines: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Drop lines (value at r=1, slope) that never exceed another for r >= 1."""
    kept = []
    for a, b in sorted(set(lines), key=lambda ab: (-ab[0], -ab[1])):
        if not any(a2 >= a and b2 >= b for a2, b2 in kept):
            kept.append((a, b))
    return tuple(kept)


_FIELDS = ("block_input", "saved", "saved_by_kind", "kind_totals", "flops", "flops_by_kind", "flop_totals", "flops_after_last_save",
           "uncounted", "uncounted_after_last_save", "orphaned", "kept_past_checkpoint")
_MAXIMA = {"forward_transient": "forward_transient", "backward_transient": "backward_transient", "created": "largest",
           "norm_backward": "norm_backward", "widest_moment": "widest_moment"}


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
        for name in ("forward_transient", "backward_transient", "largest", "norm_backward", "widest_moment"):
            values.setdefault(name, {})
        single = {name: a + b * dr for name, (a, b) in singles.items()}
        return StepRecord(logits_bytes=single["logits"],
                          loss_copy_bytes=single["loss_copy"], log_softmax_bytes=single["log_softmax"],
                          checkpoint_extra_bytes=single["checkpoint_extra"], loss_logits_bytes=single.get("loss_logits"),
                          final_norm_saved_bytes=single["final_norm_saved"],
                          **values)


def simulate(spec, run, method, arch, targets) -> tuple[dict, dict]:
    tape = Tape(run.tokens, autocast=run.autocast_dtype)
    stack = stack_of(arch, spec)
    ctx = make_context(tape, spec, run, method, targets, stack)
    arch.forward(ctx)
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


@lru_cache(maxsize=4096)
def affine_record(spec, run, targets) -> AffineRecord:
    """Simulate at r = 1 and r = 2 (once when the method has no rank) and keep the affine form."""
    method, arch = get_method(run.method), get_architecture(spec.model_type)
    s1, l1 = simulate(spec, run, method, arch, targets)
    if run.r is None or not method.rank_affine:  # no rank, or simulated at the run's own rank
        s2, l2 = s1, l1
    else:
        s2, l2 = simulate(spec, replace(run, r=2), method, arch, targets)
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
