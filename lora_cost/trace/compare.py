"""Put an analytic Estimate and a TraceResult side by side, term by term (no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from ..results import MemoryCategory
from .results import TraceResult

# The trace only knows what a storage is: the parts of a peak the analytic engine names by what
# they are for (logits, loss and activation-gradient buffers, ...) are temporaries to it.
_C = MemoryCategory
SAME_IN_TRACE = {_C.WEIGHTS, _C.TRAINABLE_WEIGHTS, _C.OPTIMIZER_STATE, _C.SAVED_ACTIVATIONS, _C.GRADIENTS,
                 _C.RECOMPUTED_ACTIVATIONS, _C.LOOP_STATE, _C.MASTER_WEIGHTS}


def trace_category(name: str) -> MemoryCategory:
    """The trace category an analytic peak term falls in."""
    return MemoryCategory(name) if name in SAME_IN_TRACE else MemoryCategory.TEMPORARIES


@dataclass(frozen=True)
class Difference:
    term: str
    analytic: int
    trace: int

    @property
    def diff(self) -> int:
        return self.trace - self.analytic

    @property
    def rel(self) -> float | None:
        return None if not self.analytic else (self.trace - self.analytic) / self.analytic


def _categories(terms) -> dict[MemoryCategory, int]:
    out: dict[MemoryCategory, int] = {}
    for t in terms:
        key = trace_category(t.name)
        out[key] = out.get(key, 0) + t.value
    return out


def differences(estimate, traced: TraceResult) -> list[Difference]:
    e, m, f = estimate, estimate.memory, estimate.flops
    rows = [
        Difference("trainable_params", e.trainable_params, traced.trainable_params),
        Difference("peak_bytes", m.peak_bytes, traced.peak_bytes),
        Difference("saved_activation_bytes", m.saved_activation_bytes, traced.saved_activation_bytes),
        Difference("steady_bytes", m.steady_bytes, traced.steady_bytes),
    ]
    analytic_phases = {p.phase: p for p in m.phases}
    for p in traced.phases:
        a = analytic_phases.get(p.phase)
        if a is None:
            continue
        rows.append(Difference(f"{p.phase}.peak_bytes", a.peak_bytes, p.peak_bytes))
        cats = _categories(a.terms)
        trace_cats = {c.name: c.bytes for c in p.categories}
        for key in sorted(set(cats) | set(trace_cats)):
            rows.append(Difference(f"{p.phase}.{key}", cats.get(key, 0), trace_cats.get(key, 0)))
    if m.refresh is not None and traced.refresh_peak_bytes is not None:  # task "galore": the refresh step
        rows.append(Difference("refresh.peak_bytes", m.refresh.peak_bytes, traced.refresh_peak_bytes))
    rows += [
        Difference("flops.forward", f.forward, traced.flops_forward),
        Difference("flops.backward", f.backward, traced.flops_backward),
        Difference("flops.forward_uncounted", f.forward_uncounted, traced.flops_forward_uncounted),
    ]
    return rows
