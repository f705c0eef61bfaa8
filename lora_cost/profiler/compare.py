"""Measured vs estimated, term by term (no torch)."""

from __future__ import annotations

from .results import FlopMeasurement, StepMeasurement, TermComparison


def _term(estimate: dict, name: str) -> int | None:
    for t in estimate["memory"]["terms"]:
        if t["name"] == name:
            return int(t["bytes"])
    return None


def _row(term: str, unit: str, measured: int | None, estimated: int | None) -> TermComparison | None:
    if measured is None or estimated is None:
        return None
    rel = (estimated - measured) / measured if measured else None
    return TermComparison(term, unit, int(measured), int(estimated), rel)


def compare(step: StepMeasurement | None, flops: FlopMeasurement | None, estimate: dict | None,
            device_bytes: int | None) -> tuple[TermComparison, ...]:
    """Rows for the last measured step (steady state) and the sampled FLOP step, per micro-batch."""
    if estimate is None:
        return ()
    mem = estimate["memory"]
    rows = []
    if step is not None:
        phases = {p.phase: p.peak_bytes for p in step.phases}
        bounds = {b.name: b.memory for b in step.boundaries}
        start, bwd_end = bounds.get("step_start"), bounds.get("backward_end")
        est_phases = {k: v["peak_bytes"] for k, v in mem["phases"].items()}
        full = estimate["method"] == "full"
        trainable = _term(estimate, "trainable weights")
        frozen = (0 if full else (_term(estimate, "base weights") or 0)) + (_term(estimate, "frozen adapter tensors") or 0)
        rows += [
            _row("peak allocated (step)", "bytes", step.peak_bytes, mem["peak_bytes"]),
            _row("peak forward", "bytes", phases.get("forward"), est_phases.get("forward")),
            _row("peak backward", "bytes", phases.get("backward"), est_phases.get("backward")),
            _row("peak optimizer step", "bytes", phases.get("optimizer"), est_phases.get("optimizer")),
            _row("steady (step start)", "bytes", start.live_total if start else None, mem["steady_bytes"]),
            _row("trainable weights", "bytes", start.trainable_params if start else None, trainable),
            _row("frozen weights", "bytes", start.frozen_params if start else None, frozen),
            _row("gradients", "bytes", bwd_end.gradients if bwd_end else None, _term(estimate, "gradients")),
            _row("optimizer state", "bytes", start.optimizer_state if start else None, _term(estimate, "optimizer state")),
            _row("saved activations", "bytes", step.saved_activation_bytes, mem["saved_activation_bytes"]),
        ]
        if device_bytes is not None:
            rows.append(_row("device (reserved + context)", "bytes", device_bytes, mem["device_bytes"]))
    if flops is not None and flops.micro_batches:
        est_f = estimate["flops"]
        n = flops.micro_batches
        rows += [
            _row("FLOPs forward (per micro-batch)", "flops", flops.forward // n, est_f["forward"]),
            _row("FLOPs backward (per micro-batch)", "flops", flops.backward // n, est_f["backward"]),
        ]
    return tuple(r for r in rows if r is not None)
