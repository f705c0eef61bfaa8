"""The JSON contract of `lora-cost estimate --json` (other tools depend on these names)."""

from __future__ import annotations

from ..results import Estimate, GpuFit, RunHeader, Term


def _terms(terms: tuple[Term, ...]) -> dict[str, int]:
    return {t.name: t.value for t in terms}


def run_header(r: RunHeader) -> dict:
    """The inputs echoed back and the parameter counts: the head of both engines' JSON (an Estimate
    and a TraceResult are each a RunHeader)."""
    return {
        "inputs": {
            "model": r.model, "method": r.method, "r": r.r, "targets": list(r.targets), "batch": r.batch, "seq": r.seq,
            "precision": r.precision, "optimizer": r.optimizer, "grad_checkpointing": r.grad_checkpointing,
            "attention": r.attention, "dropout": r.dropout, "method_options": r.method_options,
        },
        "model": r.model,
        "family": r.family,
        "method": r.method,
        "trainable_params": r.trainable_params,
        "total_params": r.total_params,
        "trainable_percent": 100.0 * r.trainable_params / r.total_params if r.total_params else 0.0,
        "adapted_modules": r.adapted_modules,
    }


def estimate_to_json(e: Estimate) -> dict:
    m, f = e.memory, e.flops
    doc = {
        **run_header(e),
        "memory": {
            "peak_bytes": m.peak_bytes,
            "peak_phase": m.peak_phase,
            "device_bytes": m.device_bytes,
            "steady_bytes": m.steady_bytes,
            "saved_activation_bytes": m.saved_activation_bytes,
            "components": _terms(m.components),
            "phases": {p.phase: {"peak_bytes": p.peak_bytes, "moment": p.moment, "terms": _terms(p.terms)} for p in m.phases},
            "saved_by_kind": _terms(m.saved_by_kind),
            "terms": [{"name": t.name, "bytes": t.value, "formula": t.formula, "explanation": t.explanation} for t in m.terms],
        },
        "flops": {
            "forward": f.forward, "backward": f.backward, "total": f.total,
            "forward_uncounted_by_flopcounter": f.forward_uncounted,
            "backward_uncounted_by_flopcounter": f.backward_uncounted,
            "convention": "2 FLOPs per multiply-add (torch.utils.flop_counter); fvcore reports half",
            "terms": [{"name": t.name, "flops": t.value, "formula": t.formula} for t in f.terms],
        },
        "gpu": gpu_fit_json(e.gpu),
        "warnings": list(e.warnings),
        "assumptions": list(e.assumptions),
    }
    return doc


def gpu_fit_json(g: GpuFit | None) -> dict | None:
    if g is None:
        return None
    return {"name": g.gpu, "memory_bytes": g.memory_bytes, "fits": g.fits, "headroom_bytes": g.headroom_bytes,
            "step_time_s": g.step_time_s, "utilisation": g.utilisation}
