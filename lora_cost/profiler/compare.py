"""Measured vs estimated, term by term (no torch). Memory is matched by category
(results.MemoryCategory): what the profiler measured in a category against the estimate's stored
quantities of the same category."""

from __future__ import annotations

from ..results import Estimate, MemoryCategory
from .results import FlopMeasurement, StepMeasurement, TermComparison

# the categories compared, and the phase boundary each is measured at
_MEASURED_AT = ((MemoryCategory.TRAINABLE_WEIGHTS, "step_start"), (MemoryCategory.WEIGHTS, "step_start"),
                (MemoryCategory.GRADIENTS, "backward_end"), (MemoryCategory.OPTIMIZER_STATE, "step_start"))


def _row(term: str, unit: str, measured: int | None, estimated: int | None) -> TermComparison | None:
    if measured is None or estimated is None:
        return None
    rel = (estimated - measured) / measured if measured else None
    return TermComparison(term, unit, int(measured), int(estimated), rel)


def compare(step: StepMeasurement | None, flops: FlopMeasurement | None, estimate: Estimate | None,
            device_bytes: int | None) -> tuple[TermComparison, ...]:
    """Rows for the last measured step (steady state) and the sampled FLOP step, per micro-batch."""
    if estimate is None:
        return ()
    mem = estimate.memory
    rows = []
    if step is not None:
        phases = {p.phase: p.peak_bytes for p in step.phases}
        bounds = {b.name: b.memory for b in step.boundaries}
        est_phases = {p.phase: p.peak_bytes for p in mem.phases}
        start = bounds.get("step_start")
        rows += [
            _row("peak allocated (step)", "bytes", step.peak_bytes, mem.peak_bytes),
            _row("peak forward", "bytes", phases.get("forward"), est_phases.get("forward")),
            _row("peak backward", "bytes", phases.get("backward"), est_phases.get("backward")),
            _row("peak optimizer step", "bytes", phases.get("optimizer"), est_phases.get("optimizer")),
            _row("steady (step start)", "bytes", start.live_total if start else None, mem.steady_bytes),
        ]
        for category, boundary in _MEASURED_AT:
            measured = bounds.get(boundary)
            rows.append(_row(category.label, "bytes", measured.bytes_of(category) if measured else None,
                             mem.stored_bytes(category)))
        rows.append(_row(MemoryCategory.SAVED_ACTIVATIONS.label, "bytes", step.saved_activation_bytes,
                         mem.saved_activation_bytes))
        if device_bytes is not None:
            rows.append(_row("device (reserved + context)", "bytes", device_bytes, mem.device_bytes))
    if flops is not None and flops.micro_batches:
        n = flops.micro_batches
        rows += [
            _row("FLOPs forward (per micro-batch)", "flops", flops.forward // n, estimate.flops.forward),
            _row("FLOPs backward (per micro-batch)", "flops", flops.backward // n, estimate.flops.backward),
        ]
    return tuple(r for r in rows if r is not None)
