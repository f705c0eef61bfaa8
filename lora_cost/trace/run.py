"""`estimate --engine trace|both` as one computation: the trace, its GPU fit and, with `both`, the
analytic estimate of the same flags and the term-by-term differences. Returns a frozen result;
rendering is in report/trace_terminal.py and report/trace_json.py. torch loads only in `trace()`."""

from __future__ import annotations

from dataclasses import dataclass

from ..results import Estimate, GpuFit
from .compare import Difference, differences
from .results import TraceResult


@dataclass(frozen=True)
class EngineRun:
    trace: TraceResult
    gpu: GpuFit | None  # the trace's device estimate against `--gpu`
    analytic: Estimate | None  # `--engine both` only
    differences: tuple[Difference, ...]  # trace - analytic per term; empty without `both`


def gpu_fit(device_bytes: int, flops: int, precision: str, gpu: str | None, uncertainty: int = 0) -> GpuFit | None:
    """The trace's device estimate and FLOPs against a bundled GPU, by the analytic engine's rule
    (analytic/device.py)."""
    if gpu is None:
        return None
    from ..analytic.device import gpu_fit as fit
    from ..profiles import load_gpu

    return fit(load_gpu(gpu), device_bytes, flops, precision, uncertainty=uncertainty)


def run_engines(model, method: str, *, gpu: str | None, both: bool, **kwargs) -> EngineRun:
    """Trace `model` x `method` (kwargs as `lora_cost.estimate`); with `both`, estimate it too."""
    from . import trace

    if gpu is not None:  # a bad --gpu fails before the trace runs
        from ..profiles import load_gpu
        load_gpu(gpu)
    analytic = None
    if both:
        from ..analytic.estimator import estimate
        analytic = estimate(model, method, gpu=gpu, **kwargs)  # validates the flags before torch loads
    t = trace(model, method, gpu=gpu, **kwargs)
    fit = gpu_fit(t.device_bytes, t.flops_forward + t.flops_backward, t.precision, gpu,
                  t.device.uncertainty_bytes if t.device is not None else 0)
    diffs = tuple(differences(analytic, t)) if both else ()
    return EngineRun(trace=t, gpu=fit, analytic=analytic, differences=diffs)
