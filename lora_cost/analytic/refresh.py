"""An optimizer step heavier than the steady one: GaLore's projector refresh (task "galore", issue 9).

galore_torch's projector recomputes its orthogonal matrix from the gradient on the first step and whenever
`step % update_proj_gap == 0` (galore_projector.py `project`), one parameter at a time inside optimizer.step: a
float() copy of a 16-bit gradient, torch.linalg.svd (svd.py: U, S, Vh, and inside the call an int32 info and a
column-major copy of the input), the rank slice multiplied by diag(S) and cast back (optimizers.py
`_galore_refresh_tensor`, `_galore_refresh_temporaries`). The refresh step is the steady step with those
temporaries in place of the steady ones (budget.py `ParameterBudget.on_refresh_step`), in the optimizer phase, or in
backward with --optimizer-in-backward (each tensor refreshes in its own gradient hook). The step at multiples of
update_proj_gap is modelled: every state exists and the old matrix lives until the new one replaces it; the first
step, with no old matrix and the states of later tensors not made yet, allocates no more.

Design: the steady step stays `memory.peak_bytes` (what a profiler measures on a warmed-up step, and what the
calibration compares); the refresh step is its own figure, `memory.refresh`, with its own components, and the GPU
fit verdict takes the larger device figure of the two (the first step refreshes: if it does not fit, nothing trains).
"""

from __future__ import annotations

from ..results import MemoryCategory as C, PhasePeak, RefreshStep, Term
from .device import slack_reserved, device_memory
from .explain import describe


def refresh_step(phases: tuple[PhasePeak, ...], steady: PhasePeak, steady_device: int, family: str, gpu: str | None,
                 paged_bytes: int, paged_evictable: bool, libraries: tuple[str, ...], every: int) -> RefreshStep:
    """The refresh step's peak from its phase peaks (phase_peaks over the refresh budget); its optimizer
    temporaries (and in-backward step transients) are the refresh's, filed as `projector_refresh`."""
    top = max(phases, key=lambda p: p.peak_bytes)
    components = tuple(Term(t.name if t.category != C.OPTIMIZER_TEMPORARIES else C.PROJECTOR_REFRESH.value, t.value,
                            *describe(C.PROJECTOR_REFRESH.value if t.category == C.OPTIMIZER_TEMPORARIES else t.name),
                            C.PROJECTOR_REFRESH if t.category == C.OPTIMIZER_TEMPORARIES else t.category)
                       for t in top.terms)
    dev = device_memory(slack_reserved(top.peak_bytes), peak_bytes=top.peak_bytes, family=family, gpu=gpu,
                        paged_bytes=paged_bytes, paged_evictable=paged_evictable, libraries=libraries)
    return RefreshStep(every_steps=every, peak_bytes=top.peak_bytes, peak_phase=top.phase, moment=top.moment,
                       components=components, device_bytes=max(dev.device_bytes, steady_device),
                       above_steady_bytes=max(top.peak_bytes - steady.peak_bytes, 0))
