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
    sharding: object = None  # --gpus: the ShardingSpec the trace ran (rank 0 of N); None: one GPU


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
    sharding = traced_sharding(kwargs)
    analytic = None
    if both:
        from ..analytic.estimator import estimate
        analytic = estimate(model, method, gpu=gpu, **kwargs)  # validates the flags before torch loads
    for key in ("gpus", "nodes", "sharding", "sharding_options"):
        kwargs.pop(key, None)
    t = trace(model, method, gpu=gpu, sharding=sharding, **kwargs)
    fit = gpu_fit(t.device_bytes, t.flops_forward + t.flops_backward, t.precision, gpu,
                  t.device.uncertainty_bytes if t.device is not None else 0)
    diffs = tuple(differences(analytic, t)) if both else ()
    return EngineRun(trace=t, gpu=fit, analytic=analytic, differences=diffs, sharding=sharding)


# -- task "sharding2": the trace engine with --gpus (rank 0 of N under the fake process group, sharded.py)
TRACED_STRATEGIES = ("ddp", "fsdp", "fsdp-grad-op")


def traced_sharding(kwargs: dict):
    """The ShardingSpec of the --gpus flags for the trace (None: one GPU), refused in one line where the trace
    cannot run the library: DeepSpeed ZeRO (it cannot run on fake tensors), HSDP (a 2-D mesh of replicas over
    nodes), FSDP's CPU offload (host memory the simulated device allocator does not hold) and mixed precision."""
    from ..analytic.estimator import sharding_spec
    from ..errors import LoraCostError

    spec = sharding_spec(kwargs.get("gpus"), kwargs.get("nodes", 1), kwargs.get("sharding"), kwargs.get("sharding_options"))
    if spec is None:
        return None
    if spec.strategy not in TRACED_STRATEGIES:
        why = ("DeepSpeed cannot run on fake tensors" if spec.strategy.startswith("zero")
               else "HSDP replicates over nodes on a 2-D mesh the trace does not build")
        raise LoraCostError(f"--sharding {spec.strategy} is analytic only ({why}); the trace engine runs "
                            f"{', '.join(TRACED_STRATEGIES)}: use --engine analytic")
    if spec.cpu_offload or spec.param_dtype or spec.reduce_dtype or spec.nodes > 1:
        raise LoraCostError("the trace engine runs FSDP2/DDP on one node without --cpu-offload or "
                            "--fsdp-param-dtype/--fsdp-reduce-dtype; these are analytic only: use --engine analytic")
    return spec
