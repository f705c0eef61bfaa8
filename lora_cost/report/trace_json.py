"""JSON of `estimate --engine trace|both --json`: a TraceResult under the keys of `estimate --json`
(report/jsonout.py) plus the trace's detail; with `both`, the analytic estimate and the differences."""

from __future__ import annotations

from ..results import GpuFit
from ..trace.results import TraceResult
from .jsonout import device_json, estimate_to_json, gpu_fit_json, run_header


def _gpu(g: GpuFit | None) -> dict | None:
    if g is None:
        return None
    return gpu_fit_json(g)


def trace_to_json(t: TraceResult, gpu: GpuFit | None = None) -> dict:
    top = next(p for p in t.phases if p.phase == t.peak_phase)
    doc = {
        "engine": "trace",
        **run_header(t),
        "memory": {
            "peak_bytes": t.peak_bytes,
            "peak_phase": t.peak_phase,
            "device_bytes": t.device_bytes,
            **device_json(t.device),
            "allocator_retries": t.allocator_retries,
            "steady_bytes": t.steady_bytes,
            "saved_activation_bytes": t.saved_activation_bytes,
            "paged_optimizer_bytes": t.paged_optimizer_bytes,
            "components": {c.name: c.bytes for c in top.categories},
            "phases": {p.phase: {"peak_bytes": p.peak_bytes, "moment": f"{p.op} in {p.module or '(no module)'}",
                                 "terms": {c.name: c.bytes for c in p.categories}} for p in t.phases},
            "saved_by_kind": {c.name: c.bytes for c in t.saved_by_kind},
            "terms": [{"name": c.name, "bytes": c.bytes, "formula": "sum of allocator-rounded storages alive at the peak",
                       "explanation": "simulated CUDA caching allocator over the traced step"} for c in top.categories],
            # task "galore": the optimizer's refresh step, traced as a second step (absent when every step is alike)
            **({} if t.refresh_peak_bytes is None else
               {"refresh": {"peak_bytes": t.refresh_peak_bytes, "peak_phase": t.refresh_peak_phase}}),
        },
        "flops": {
            "forward": t.flops_forward, "backward": t.flops_backward, "total": t.flops_forward + t.flops_backward,
            "forward_uncounted_by_flopcounter": t.flops_forward_uncounted,
            "backward_uncounted_by_flopcounter": t.flops_backward_uncounted,
            "convention": "2 FLOPs per multiply-add (torch.utils.flop_counter); fvcore reports half",
            "terms": [{"name": f"{o.op} {o.phase}", "flops": o.flops, "formula": "FlopCounterMode"} for o in t.flops_by_op],
        },
        "gpu": _gpu(gpu),
        "warnings": list(t.warnings),
        "assumptions": list(t.notes),
        "trace": {
            "attention_kernel": t.attention_kernel,
            "saved_by_module": [{"module": s.module, "bytes": s.bytes, "tensors": s.tensors} for s in t.saved_by_module],
            "peaks": [{"phase": p.phase, "peak_bytes": p.peak_bytes, "op": p.op, "module": p.module,
                       "largest_temporaries": [{"op": o, "module": m, "bytes": b} for o, m, b in p.largest_temporaries]}
                      for p in t.phases],
            "zero_flop_ops": list(t.zero_flop_ops),
            "seconds": t.trace_seconds,
            "max_rss_bytes": t.trace_max_rss_bytes,
        },
    }
    return doc


def engines_to_json(run) -> dict:
    """An `EngineRun` (trace/run.py): the trace document alone, or with `both` the analytic one beside
    it and the differences term by term."""
    doc = trace_to_json(run.trace, run.gpu)
    if run.sharding is not None:  # --gpus: the names keep their meaning for rank 0 of N (the busiest rank)
        sh = run.sharding
        doc["inputs"].update(gpus=sh.gpus, nodes=sh.nodes, sharding=sh.strategy)
    if run.analytic is None:
        return doc
    return {"analytic": estimate_to_json(run.analytic), "trace": doc,
            "differences": [{"term": d.term, "analytic": d.analytic, "trace": d.trace, "diff": d.diff, "rel": d.rel}
                            for d in run.differences]}
