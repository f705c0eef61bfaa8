"""From a step's allocated peak to what the GPU shows, and whether the step fits a GPU (torch-free).

Both engines end here: the analytic estimator with its predicted peak, the trace engine with its
simulated one. `device_bytes` and `gpu_fit` are the only places these numbers are combined.
"""

from __future__ import annotations

from ..profiles import GpuProfile
from ..results import GpuFit
from ..units import fmt_bytes

# The caching allocator reserves more than it hands out: segments are rounded to 2 MiB (20 MiB for
# requests of 1-10 MiB) and freed blocks stay cached for reuse, so fragments pile up. On the H100
# calibration set the reserved peak exceeded the allocated peak by a median 10% (3% to 51%).
ALLOCATOR_SLACK = 0.10
# The CUDA context (driver state, kernels, cuBLAS workspaces) is outside torch's counters: 0.73 to
# 0.76 GiB on the calibration H100 (device used minus reserved, torch 2.11).
CUDA_CONTEXT_BYTES = 3 * (1 << 28)  # 0.75 GiB
# Sustained fraction of peak tensor throughput assumed for a step-time estimate (typical training MFU).
DEFAULT_UTILISATION = 0.4


def device_bytes(peak_bytes: int, paged_bytes: int = 0) -> int:
    """Device memory in use at the peak: the allocated peak plus the caching allocator's slack (its
    reserved memory), the CUDA context, and optimizer state paged into CUDA managed memory
    (bitsandbytes paged optimizers), which torch's allocator does not count."""
    return int(peak_bytes * (1 + ALLOCATOR_SLACK)) + CUDA_CONTEXT_BYTES + paged_bytes


def peak_tflops(gpu: GpuProfile, precision: str) -> float:
    """The throughput a step in `precision` runs its matmuls at: fp32 on the fp32 units, every 16-bit
    and mixed-precision run on the dense bf16/fp16 tensor cores."""
    return gpu.fp32_tflops if precision == "fp32" else gpu.bf16_tflops_dense


def step_time_s(gpu: GpuProfile, flops: int | float, precision: str, utilisation: float = DEFAULT_UTILISATION) -> float:
    """FLOPs / (peak TFLOP/s x utilisation), as nanoGPT's estimate_mfu inverts it."""
    return flops / (peak_tflops(gpu, precision) * 1e12 * utilisation)


def gpu_fit(gpu: GpuProfile, device: int, flops: int, precision: str,
            utilisation: float = DEFAULT_UTILISATION) -> GpuFit:
    """Whether `device` bytes fit the GPU, and the step time of `flops` at `utilisation` of its peak
    throughput (FLOPs / (peak TFLOP/s x utilisation), as nanoGPT's estimate_mfu inverts it)."""
    return GpuFit(gpu=gpu.name, memory_bytes=gpu.memory_bytes, fits=device <= gpu.memory_bytes,
                  headroom_bytes=gpu.memory_bytes - device,
                  step_time_s=step_time_s(gpu, flops, precision, utilisation), utilisation=utilisation)


def device_formula(paged: bool) -> str:
    """`device_bytes` in words, for the assumptions a result lists."""
    return (f"device memory = peak x {1 + ALLOCATOR_SLACK:.2f} (caching-allocator slack) + "
            f"{fmt_bytes(CUDA_CONTEXT_BYTES)} CUDA context" + (" + paged optimizer state" if paged else ""))
