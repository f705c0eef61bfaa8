"""Frozen results of the trace engine (no torch here: rendering and comparison only read them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..results import DeviceMemory, MemoryCategory, RunHeader


@dataclass(frozen=True)
class Category:
    """Bytes of one memory category alive at a moment (allocator-rounded)."""

    name: MemoryCategory
    bytes: int


@dataclass(frozen=True)
class OpBytes:
    """Bytes saved for backward by one aten op."""

    name: str
    bytes: int


@dataclass(frozen=True)
class Peak:
    """The highest simulated allocated memory within one phase and what was alive then."""

    phase: str  # forward | backward | optimizer
    peak_bytes: int
    op: str  # the aten op whose output allocation reached the peak
    module: str  # innermost module running then ("" outside any module)
    categories: tuple[Category, ...]
    largest_temporaries: tuple[tuple[str, str, int], ...]  # (op, module, bytes) of the biggest non-categorised blocks


@dataclass(frozen=True)
class ModuleSaved:
    """Saved-activation bytes attributed to one module (innermost module active when autograd saved)."""

    module: str
    bytes: int
    tensors: int


@dataclass(frozen=True)
class OpFlops:
    op: str
    phase: str
    flops: int


@dataclass(frozen=True)
class TraceResult(RunHeader):
    """The trace engine's answer for one run. Its `total_params` counts parameter elements as
    model.parameters() does (a packed 4-bit weight: its bytes)."""

    peak_bytes: int
    peak_phase: str
    phases: tuple[Peak, ...]
    steady_bytes: int  # parameters + buffers + optimizer state before the step
    device_bytes: int
    saved_activation_bytes: int  # distinct storages saved by autograd, parameters and buffers excluded
    saved_by_module: tuple[ModuleSaved, ...]
    saved_by_kind: tuple[OpBytes, ...]  # by saving op (aten op name of the node that saved)
    flops_forward: int
    flops_backward: int
    flops_forward_uncounted: int  # counted through a registered formula where FlopCounterMode is silent for CUDA
    flops_backward_uncounted: int
    flops_by_op: tuple[OpFlops, ...]
    zero_flop_ops: tuple[str, ...]  # every op seen that FlopCounterMode counts as zero FLOPs
    attention_kernel: str  # the CUDA sdpa backend the trace ran (flash | efficient | math | eager)
    notes: tuple[str, ...]  # what the trace could not describe as CUDA would run it
    warnings: tuple[str, ...]
    trace_seconds: float
    trace_max_rss_bytes: int
    paged_optimizer_bytes: int = 0  # bitsandbytes paged optimizer state (CUDA managed memory, not allocated)
    # The step's allocations replayed through the caching-allocator model (lora_cost/trace/replay.py):
    reserved_peak_bytes: int = 0  # max_memory_reserved() in steady state (cache warm)
    reserved_after_step_bytes: int = 0  # memory_reserved() after the measured step
    fragmentation_bytes: int = 0  # reserved but unallocated bytes at the allocated peak
    allocator_retries: int = 0  # > 0: the step fits only because the cache was emptied and the allocation retried
    device: DeviceMemory | None = None  # reserved + context (+ resident paged state): analytic/device.py
    # task "galore": the optimizer's refresh step (GaLore's SVD), traced as a second step; None: every step alike
    refresh_peak_bytes: int | None = None
    refresh_peak_phase: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)
