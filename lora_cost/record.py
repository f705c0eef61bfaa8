"""One simulated forward pass, reduced to the numbers the estimator needs, and cached for sweeps.

Every size the tape sees is affine in the adapter rank r once the model, the method, the targets,
the precision, the batch and the sequence length are fixed (LoRA's [n, r] projections, NoLA's
[r, d] factors, DoRA's eye(d_in) @ A^T products: all linear in r). So the forward is simulated at
r = 1 and r = 2 and every quantity kept as value(1) + slope * (r - 1); a sweep over ranks then
costs one simulation. Quantities that are maxima (the largest buffer of a block) keep all their
candidate lines, pruned to those that can win for some r >= 1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from .architectures import get_architecture
from .context import make_context
from .methods import get_method
from .tape import Tape

SCOPES = ("embeddings", "layer0", "layer1", "head", "loss")


@dataclass(frozen=True)
class StepRecord:
    """What one forward pass keeps and computes, per scope (embeddings, layer0, layer1, head, loss)."""

    saved: dict  # scope -> bytes autograd keeps
    saved_by_kind: dict  # (scope, kind) -> bytes
    flops: dict  # (scope, fwd|bwd) -> FLOPs
    flops_by_kind: dict  # (scope, kind, fwd|bwd) -> FLOPs
    flops_after_last_save: dict  # scope -> forward FLOPs after the last save (not recomputed)
    uncounted: dict  # scope -> forward FLOPs FlopCounterMode misses
    uncounted_after_last_save: dict
    forward_transient: dict  # scope -> largest short-lived buffer
    backward_transient: dict
    largest: dict  # scope -> largest activation created
    layer_input_bytes: tuple
    logits_bytes: int
    loss_copy_bytes: int
    log_softmax_bytes: int
    checkpoint_extra_bytes: int


def _flatten(tape: Tape, ctx) -> tuple[dict, dict]:
    """(scalars, candidate lists) of one simulated forward."""
    scalars = {("logits",): ctx.logits_bytes, ("loss_copy",): ctx.loss_copy_bytes, ("log_softmax",): ctx.log_softmax_bytes,
               ("checkpoint_extra",): ctx.checkpoint_extra_bytes}
    for i, b in enumerate(ctx.layer_input_bytes):
        scalars[("layer_input", i)] = b
    for scope, v in tape.saved_by_scope.items():
        scalars[("saved", scope)] = v
    for key, v in tape.saved.items():
        scalars[("saved_by_kind", key)] = v
    for key, v in tape.flops_by_scope.items():
        scalars[("flops", key)] = v
    for key, v in tape.flops.items():
        scalars[("flops_by_kind", key)] = v
    for name in ("flops_after_last_save", "uncounted_after_last_save"):
        for scope, v in getattr(tape, name).items():
            scalars[(name, scope)] = v
    for scope, v in tape.uncounted_flops.items():
        scalars[("uncounted", scope)] = v
    lists = {}
    for name in ("forward_transient", "backward_transient", "created"):
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


@dataclass(frozen=True)
class AffineRecord:
    """Every quantity of a StepRecord as value at r = 1 plus a slope per unit of rank."""

    scalars: tuple  # ((key, value_at_1, slope), ...)
    maxima: tuple  # ((key, lines), ...)

    def at(self, r: int | None) -> StepRecord:
        dr = (r or 1) - 1
        fields: dict = {k: {} for k in ("saved", "saved_by_kind", "flops", "flops_by_kind", "flops_after_last_save",
                                         "uncounted", "uncounted_after_last_save", "forward_transient",
                                         "backward_transient", "largest")}
        inputs: dict[int, int] = {}
        single = {}
        for key, a, b in self.scalars:
            value = a + b * dr
            head = key[0]
            if head == "layer_input":
                inputs[key[1]] = value
            elif len(key) == 1:
                single[head] = value
            else:
                fields[head][key[1]] = value
        for (name, scope), lines in self.maxima:
            fields["largest" if name == "created" else name][scope] = max(a + b * dr for a, b in lines)
        return StepRecord(layer_input_bytes=tuple(inputs[i] for i in sorted(inputs)), logits_bytes=single["logits"],
                          loss_copy_bytes=single["loss_copy"], log_softmax_bytes=single["log_softmax"],
                          checkpoint_extra_bytes=single["checkpoint_extra"], **fields)


def simulate(spec, run, method, arch, targets) -> tuple[dict, dict]:
    tape = Tape(run.tokens, autocast=run.autocast_dtype)
    ctx = make_context(tape, spec, run, method, targets)
    arch.forward(ctx)
    return _flatten(tape, ctx)


@lru_cache(maxsize=4096)
def affine_record(spec, run, targets) -> AffineRecord:
    """Simulate at r = 1 and r = 2 (once when the method has no rank) and keep the affine form."""
    method, arch = get_method(run.method), get_architecture(spec.model_type)
    s1, l1 = simulate(spec, run, method, arch, targets)
    if run.r is None:
        s2, l2 = s1, l1
    else:
        s2, l2 = simulate(spec, replace(run, r=2), method, arch, targets)
    scalars = tuple((k, v, s2.get(k, 0) - v) for k, v in s1.items())
    maxima = tuple((k, _envelope([(a, b - a) for a, b in zip(v, l2[k])])) for k, v in l1.items())
    return AffineRecord(scalars, maxima)
