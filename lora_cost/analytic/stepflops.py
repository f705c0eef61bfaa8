"""The FLOPs of one step from a simulated forward (one definition, shared by the full estimate in
`estimator.py` and the numbers-only path in `fast.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from .record import StepRecord
from .stack import Stack


@dataclass(frozen=True)
class StepFlops:
    forward: int
    backward: int
    forward_uncounted: int
    backward_uncounted: int
    recomputed: int  # the forward FLOPs checkpointing reruns (in `backward` when checkpointing)
    step_total: int | float  # forward + backward before rounding: what a step time divides


def step_flops(rec: StepRecord, grad_checkpointing: bool, stack: Stack) -> StepFlops:
    reps = stack.repetitions  # each simulated block stands for this many layers (stack.py)
    scopes = ("embeddings", *stack.block_scopes, "head", "loss")
    fwd = sum(rec.flops.get((s, "fwd"), 0) * reps.get(s, 1) for s in scopes)
    bwd = sum(rec.flops.get((s, "bwd"), 0) * reps.get(s, 1) for s in scopes)
    layer_scopes = stack.block_scopes
    # Non-reentrant checkpointing reruns each block's forward inside backward, stopping as soon as
    # the last tensor the block saves has been recomputed (torch.utils.checkpoint early stop), so
    # the block's trailing kernels (usually the last projection's matmul) are not rerun.
    recomputed = sum((rec.flops.get((s, "fwd"), 0) - rec.flops_after_last_save.get(s, 0)) * reps[s] for s in layer_scopes)
    uncounted = sum(v * reps.get(s, 1) for s, v in rec.uncounted.items())
    uncounted_bwd = 0
    if grad_checkpointing:
        bwd += recomputed
        uncounted_bwd = sum((rec.uncounted.get(s, 0) - rec.uncounted_after_last_save.get(s, 0)) * reps[s] for s in layer_scopes)
    return StepFlops(int(fwd), int(bwd), int(uncounted), int(uncounted_bwd), recomputed, fwd + bwd)
