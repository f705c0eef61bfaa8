"""Frozen result types shared by the estimator, the CLI and the reports. Rendering only reads them."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Term:
    """One named quantity with the formula that produced it and a sentence on what it is."""

    name: str
    value: int
    formula: str
    explanation: str


@dataclass(frozen=True)
class PhasePeak:
    """Predicted peak of allocated memory within one phase of the step, and what is alive then."""

    phase: str  # forward | backward | optimizer
    peak_bytes: int
    moment: str  # where in the phase the peak happens
    terms: tuple[Term, ...]


@dataclass(frozen=True)
class MemoryEstimate:
    peak_bytes: int
    peak_phase: str
    components: tuple[Term, ...]  # what is alive at the peak; sums to peak_bytes
    phases: tuple[PhasePeak, ...]
    device_bytes: int  # what the GPU would show at the peak: reserved memory + CUDA context (+ paged state)
    steady_bytes: int  # allocated between steps: weights + optimizer state
    saved_activation_bytes: int  # what autograd keeps for backward (saved_tensors_hooks' count)
    saved_by_kind: tuple[Term, ...]
    terms: tuple[Term, ...]  # every stored quantity (weights, grads, states, ...), peak or not


@dataclass(frozen=True)
class FlopEstimate:
    forward: int
    backward: int
    forward_uncounted: int  # part of `forward` that FlopCounterMode does not see (bitsandbytes 4-bit gemm)
    backward_uncounted: int  # the same kernels rerun by gradient checkpointing inside backward
    terms: tuple[Term, ...]

    @property
    def total(self) -> int:
        return self.forward + self.backward


@dataclass(frozen=True)
class GpuFit:
    gpu: str
    memory_bytes: int
    fits: bool
    headroom_bytes: int  # memory_bytes - device_bytes
    step_time_s: float  # FLOPs / (peak TFLOP/s x utilisation)
    utilisation: float


@dataclass(frozen=True)
class RunHeader:
    """The run as both engines describe it: the inputs after defaults are filled in, and the
    parameter counts. An `Estimate` and a `TraceResult` are each a header plus their engine's
    numbers (report/jsonout.py `run_header` writes it, once for both)."""

    model: str
    family: str
    method: str
    r: int | None  # None for full fine-tuning
    targets: tuple[str, ...]
    batch: int
    seq: int
    precision: str
    optimizer: str
    grad_checkpointing: bool
    attention: str
    dropout: float
    method_options: dict
    trainable_params: int
    total_params: int
    adapted_modules: int


@dataclass(frozen=True)
class Estimate(RunHeader):
    """The analytic engine's answer for one run."""

    memory: MemoryEstimate
    flops: FlopEstimate
    gpu: GpuFit | None
    warnings: tuple[str, ...]
    assumptions: tuple[str, ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["flops"]["total"] = self.flops.total
        return d
