"""From a step's memory to what the GPU shows, and whether the step fits a GPU (torch-free).

Both engines end here: the analytic estimator with its predicted peak, the trace engine with its
replayed caching allocator. `device_memory` and `gpu_fit` are the only places these numbers are
combined:

    device = reserved (caching-allocator segments at the peak)
           + CUDA context and libraries outside the allocator (cuda_context.py, per GPU and family)
           + paged optimizer state (bitsandbytes paged optimizers: CUDA managed memory) unless the
             host may take it (--paged-evictable)

The trace engine's reserved memory is its replay through the allocator model (allocator/); the
analytic engine keeps a slack on its allocated peak by default, or (--reserved-model replay|auto)
replays its own allocation sequence composed from the tape (reserved_events.py, allocator/compose.py).
Each carries its stated uncertainty (the measured spread of the H100 calibration rows, see
docs/allocator.md), and the verdict is "tight" when the GPU's memory lies within it.
"""

from __future__ import annotations

from ..profiles import GpuProfile
from ..results import DeviceMemory, GpuFit
from ..units import fmt_bytes
from .cuda_context import context_for

# The analytic engine's reserved memory (no allocation sequence yet): the caching allocator reserves
# more than it hands out (segments rounded to 2 MiB, 20 MiB for 1-10 MiB requests, freed blocks cached
# and split). On the H100 calibration set the reserved peak exceeded the allocated peak by a median 10%
# (3% to 51%).
ALLOCATOR_SLACK = 0.10
# Stated uncertainty of each reserved model (relative, on reserved): the 90th percentile of its
# |error| against measured peak_reserved over the 29 H100 rows (benchmarks/reserved_calibration.py;
# docs/allocator.md). Not used to move a number, only to call a verdict "tight".
SLACK_UNCERTAINTY = 0.104  # peak x 1.10 vs measured reserved: median 3.9%, p90 10.4%, worst 27.4% (29 rows)
REPLAY_UNCERTAINTY = 0.116  # trace replay vs measured reserved: median 3.75%, p90 11.56%, worst 26.5% (29 rows)
# Sustained fraction of peak tensor throughput assumed for a step-time estimate (typical training MFU).
DEFAULT_UTILISATION = 0.4


def slack_reserved(peak_bytes: int) -> int:
    """The analytic engine's reserved memory: the allocated peak plus the allocator slack."""
    return int(peak_bytes * (1 + ALLOCATOR_SLACK))


def device_memory(reserved_bytes: int, *, peak_bytes: int, family: str, gpu: str | None = None,
                  paged_bytes: int = 0, paged_evictable: bool = False, libraries: tuple[str, ...] = (),
                  replayed: bool = False, fragmentation_bytes: int | None = None,
                  reserved_model: str | None = None, uncertainty: float | None = None) -> DeviceMemory:
    """Device memory in use at the peak (see the module docstring). `reserved_model` and `uncertainty`
    (relative) name another reserved model and its stated uncertainty (allocevents: the analytic replay)."""
    ctx = context_for(gpu, family, libraries)
    resident = 0 if paged_evictable else paged_bytes
    rel = uncertainty if uncertainty is not None else REPLAY_UNCERTAINTY if replayed else SLACK_UNCERTAINTY
    frag = max(reserved_bytes - peak_bytes, 0) if fragmentation_bytes is None else fragmentation_bytes
    return DeviceMemory(reserved_bytes=int(reserved_bytes), context_bytes=ctx.bytes, paged_bytes=int(paged_bytes),
                        paged_resident=not paged_evictable, fragmentation_bytes=int(frag),
                        device_bytes=device_total(reserved_bytes, ctx.bytes, resident),
                        uncertainty_bytes=int(rel * reserved_bytes) + ctx.spread_bytes,
                        context_measured=ctx.measured,
                        reserved_model=reserved_model or ("allocator replay" if replayed else "slack"))


def device_total(reserved_bytes: int, context_bytes: int, resident_paged_bytes: int) -> int:
    """What the GPU shows at the peak: reserved + the CUDA context + paged state resident on the device (one
    definition: `device_memory`, and batchlines.py per batch of a sweep)."""
    return int(reserved_bytes) + context_bytes + resident_paged_bytes


def device_bytes(peak_bytes: int, paged_bytes: int = 0, family: str = "llama") -> int:
    """The analytic device total for an allocated peak (the slack reserved model)."""
    return device_memory(slack_reserved(peak_bytes), peak_bytes=peak_bytes, family=family,
                         paged_bytes=paged_bytes).device_bytes


def peak_tflops(gpu: GpuProfile, precision: str) -> float:
    """The throughput a step in `precision` runs its matmuls at: fp32 on the fp32 units, every 16-bit
    and mixed-precision run on the dense bf16/fp16 tensor cores."""
    return gpu.fp32_tflops if precision == "fp32" else gpu.bf16_tflops_dense


def step_time_s(gpu: GpuProfile, flops: int | float, precision: str, utilisation: float = DEFAULT_UTILISATION) -> float:
    """FLOPs / (peak TFLOP/s x utilisation), as nanoGPT's estimate_mfu inverts it."""
    return flops / (peak_tflops(gpu, precision) * 1e12 * utilisation)


def verdict(memory_bytes: int, device: int, uncertainty: int) -> str:
    """fits / tight / does not fit: tight when the GPU's memory lies within the stated uncertainty."""
    if abs(memory_bytes - device) <= uncertainty:
        return "tight"
    return "fits" if device < memory_bytes else "does not fit"


def gpu_fit(gpu: GpuProfile, device: int, flops: int, precision: str,
            utilisation: float = DEFAULT_UTILISATION, uncertainty: int = 0) -> GpuFit:
    """Whether `device` bytes fit the GPU, and the step time of `flops` at `utilisation` of its peak
    throughput (FLOPs / (peak TFLOP/s x utilisation), as nanoGPT's estimate_mfu inverts it)."""
    return GpuFit(gpu=gpu.name, memory_bytes=gpu.memory_bytes, fits=device <= gpu.memory_bytes,
                  headroom_bytes=gpu.memory_bytes - device,
                  step_time_s=step_time_s(gpu, flops, precision, utilisation), utilisation=utilisation,
                  verdict=verdict(gpu.memory_bytes, device, uncertainty), uncertainty_bytes=int(uncertainty))


def device_formula(paged: bool, paged_evictable: bool = False, context_bytes: int | None = None,
                   reserved_model: str = "slack") -> str:
    """The device total in words, for the assumptions a result lists."""
    ctx = fmt_bytes(context_bytes) if context_bytes is not None else "measured"
    paged_part = ""
    if paged:
        paged_part = (" (paged optimizer state not counted: --paged-evictable lets the driver evict it to the host)"
                      if paged_evictable else " + paged optimizer state (resident: CUDA managed memory on the GPU)")
    how = (f"allocated peak x {1 + ALLOCATOR_SLACK:.2f}, caching-allocator slack" if reserved_model == "slack" else
           "the step's allocation sequence, composed from the analytic tape over the stack, replayed through the "
           "caching-allocator model: a first step, then the measured one")  # allocevents
    return (f"device memory = reserved ({how}) + "
            f"{ctx} CUDA context and libraries (measured per GPU: profiles/cuda_context.json)"
            + paged_part)
