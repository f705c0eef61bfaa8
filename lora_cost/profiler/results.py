"""Frozen result types of the runtime profiler and their JSON form (no torch needed to read them).

JSON schema "lora-cost-profile/1" (what `ProfileResult.to_dict()` writes and `load_profile` reads);
bytes are integers, times are seconds:

  schema, status ("ok" | "error" | "interrupted" | "oom" | "no-optimizer-step"), exit_code,
  script, argv, warmup, steps_requested, steps_detected (optimizer steps seen in the whole run),
  device_type ("cuda" | "cpu"), memory_source ("cuda-allocator" | "live-storage-tracker"),
  measured: [ per measured optimizer step:
      {index, micro_batches, forward_calls, backward_calls, wall_s, peak_bytes, peak_reserved_bytes,
       saved_activation_bytes, instrumentation_s,
       phases: [{phase: forward|backward|optimizer, peak_bytes, wall_s}],
       boundaries: [{name: step_start|forward_end|backward_end|optimizer_end, micro_batch,
                     reserved_bytes, memory: {trainable_params, frozen_params, buffers, gradients,
                     optimizer_state, saved_activations, temporaries, live_total}}]} ],
  flops: {step_index, micro_batches, forward, backward, total, registered_formulas, fvcore_forward,
          fvcore_note, by_module: [{module, forward, backward}]} | null,
  params: [{module, params, trainable}]  (fvcore.nn.parameter_count, depth <= 3),
  model: {class_name, model_type, method, r, targets, batch, seq, precision, optimizer,
          grad_checkpointing, attention, dropout, trainable_params, total_params, estimable, note} | null,
  estimate: the analytic estimate for the same configuration, exactly as
            lora_cost.report.jsonout.estimate_to_json writes it | null (an `Estimate` in
            ProfileResult; read back with estimate_from_json),
  comparison: [{term, unit: bytes|flops, measured, estimated, rel_error}]  rel_error = (est - meas) / meas,
  environment: {python, platform, torch, transformers, peft, bitsandbytes, fvcore, device, device_type,
                cuda_context_bytes},
  oom: {step_index, phase, message, requested_bytes, allocated_bytes, reserved_bytes, device_free_bytes,
        memory} | null,
  overhead: {instrumentation_s_per_step, step_wall_s, fraction, note},
  warnings: [str],
  rank, world_size: this process's place in a distributed run (torchrun / accelerate launch: the RANK and
          WORLD_SIZE environment variables) | null outside one,
  error: "Type: message" of the exception that ended the script | null,
  communication: {backend_prefix, collectives: [{name, calls, seconds}], total_s, steps, per_step_s, note} | null
          (the collectives torch.profiler saw while the profiler ran; distributed runs only)

The "temporaries" category is the residual: live_total minus every named category (on CUDA it also
holds allocator rounding, library workspaces and any tensor the profiler cannot name).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import LoraCostError
from ..results import Estimate, MemoryCategory

SCHEMA = "lora-cost-profile/1"
# the memory categories the profiler measures, and the field (JSON name) each is stored under
MEASURED = {MemoryCategory.TRAINABLE_WEIGHTS: "trainable_params", MemoryCategory.WEIGHTS: "frozen_params",
            MemoryCategory.BUFFERS: "buffers", MemoryCategory.GRADIENTS: "gradients",
            MemoryCategory.OPTIMIZER_STATE: "optimizer_state", MemoryCategory.SAVED_ACTIVATIONS: "saved_activations",
            MemoryCategory.TEMPORARIES: "temporaries"}
CATEGORIES = tuple(MEASURED.values())  # the field names, in order


@dataclass(frozen=True)
class Categories:
    """Live bytes at one moment, split by what they are. The named categories plus `temporaries`
    (the residual) sum to `live_total`."""

    trainable_params: int
    frozen_params: int
    buffers: int
    gradients: int
    optimizer_state: int
    saved_activations: int
    temporaries: int
    live_total: int

    @property
    def named_total(self) -> int:
        return sum(getattr(self, c) for c in CATEGORIES)

    def bytes_of(self, category: MemoryCategory) -> int | None:
        """Measured bytes of a category (None for one the profiler does not measure)."""
        field = MEASURED.get(category)
        return None if field is None else getattr(self, field)


@dataclass(frozen=True)
class Boundary:
    name: str  # step_start | forward_end | backward_end | optimizer_end
    micro_batch: int
    memory: Categories
    reserved_bytes: int | None  # CUDA only


@dataclass(frozen=True)
class PhaseMeasurement:
    phase: str  # forward (model call + loss, up to backward()) | backward | optimizer
    peak_bytes: int  # max over the step's micro-batches of the peak allocated in the phase
    wall_s: float  # summed over micro-batches


@dataclass(frozen=True)
class StepMeasurement:
    index: int  # 1-based optimizer step number in the run (warm-up steps included)
    micro_batches: int  # forward/backward pairs before the optimizer step (gradient accumulation)
    forward_calls: int
    backward_calls: int
    wall_s: float
    peak_bytes: int
    peak_reserved_bytes: int | None
    saved_activation_bytes: int  # distinct non-parameter storages saved for backward and still alive when
    # backward starts (largest micro-batch)
    instrumentation_s: float  # time spent inside the profiler's own hooks during this step
    phases: tuple[PhaseMeasurement, ...]
    boundaries: tuple[Boundary, ...]
    segments: tuple | None = None  # CUDA: profiler/segments.py SegmentKind per kind at the step's end


@dataclass(frozen=True)
class ModuleFlops:
    module: str
    forward: int
    backward: int


@dataclass(frozen=True)
class FlopMeasurement:
    step_index: int
    micro_batches: int
    forward: int
    backward: int
    registered_formulas: tuple[str, ...]  # ops the profiler taught FlopCounterMode
    fvcore_forward: int | None  # fvcore FlopCountAnalysis of one micro-batch (1 multiply-add = 1 FLOP)
    fvcore_note: str
    by_module: tuple[ModuleFlops, ...]

    @property
    def total(self) -> int:
        return self.forward + self.backward


@dataclass(frozen=True)
class ParamRow:
    module: str
    params: int
    trainable: int


@dataclass(frozen=True)
class ModelInfo:
    class_name: str
    model_type: str | None
    method: str | None
    r: int | None
    targets: tuple[str, ...]
    batch: int | None
    seq: int | None
    precision: str | None
    optimizer: str | None
    grad_checkpointing: bool
    attention: str | None
    dropout: float
    trainable_params: int
    total_params: int
    estimable: bool
    note: str


@dataclass(frozen=True)
class TermComparison:
    term: str
    unit: str  # bytes | flops
    measured: int
    estimated: int
    rel_error: float | None  # (estimated - measured) / measured; None when nothing was measured


@dataclass(frozen=True)
class Environment:
    python: str
    platform: str
    torch: str | None
    transformers: str | None
    peft: str | None
    bitsandbytes: str | None
    fvcore: str | None
    device: str
    device_type: str
    cuda_context_bytes: int | None


@dataclass(frozen=True)
class OomEvent:
    step_index: int
    phase: str
    message: str
    requested_bytes: int | None
    allocated_bytes: int | None
    reserved_bytes: int | None
    device_free_bytes: int | None
    memory: Categories | None  # what was alive when it happened


@dataclass(frozen=True)
class Overhead:
    instrumentation_s_per_step: float
    step_wall_s: float
    fraction: float
    note: str


@dataclass(frozen=True)
class CollectiveTime:
    name: str  # the process group's own event name: gloo:all_reduce, nccl:all_reduce, gloo:broadcast...
    calls: int
    seconds: float  # summed over calls (the backend's work, as torch.profiler times it)


@dataclass(frozen=True)
class Communication:
    backend_prefix: str  # gloo | nccl | mixed
    collectives: tuple[CollectiveTime, ...]
    total_s: float
    steps: int  # optimizer steps the window held
    per_step_s: float | None  # total_s / steps
    note: str


@dataclass(frozen=True)
class ProfileResult:
    schema: str
    status: str
    exit_code: int
    script: str | None
    argv: tuple[str, ...]
    warmup: int
    steps_requested: int
    steps_detected: int
    device_type: str
    memory_source: str
    measured: tuple[StepMeasurement, ...]
    flops: FlopMeasurement | None
    params: tuple[ParamRow, ...]
    model: ModelInfo | None
    estimate: Estimate | None
    comparison: tuple[TermComparison, ...]
    environment: Environment
    oom: OomEvent | None
    overhead: Overhead | None
    warnings: tuple[str, ...]
    # distprof: a rank of a distributed run (None outside one; older profiles have neither)
    rank: int | None = None
    world_size: int | None = None
    communication: Communication | None = None
    error: str | None = None  # how the script failed ("ValueError: boom"), when it did

    def to_dict(self) -> dict:
        from ..report.jsonout import estimate_to_json

        d = asdict(self)
        if self.flops is not None:
            d["flops"]["total"] = self.flops.total
        d["estimate"] = None if self.estimate is None else estimate_to_json(self.estimate)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ---- reading back ------------------------------------------------------------------------------
def _build(cls, data):
    """Rebuild a (nested) frozen dataclass from `asdict` output; lists become tuples."""
    if data is None:
        return None
    from .segments import SegmentKind
    nested = {"memory": Categories, "phases": PhaseMeasurement, "boundaries": Boundary, "by_module": ModuleFlops,
              "segments": SegmentKind,
              "collectives": CollectiveTime}
    top = {"measured": StepMeasurement, "flops": FlopMeasurement, "params": ParamRow, "model": ModelInfo,
           "comparison": TermComparison, "environment": Environment, "oom": OomEvent, "overhead": Overhead,
           "communication": Communication}
    kwargs = {}
    for f in fields(cls):
        value = data.get(f.name)
        sub = (top if cls is ProfileResult else nested).get(f.name)
        if sub is not None and isinstance(value, list):
            value = tuple(_build(sub, v) for v in value)
        elif sub is not None and isinstance(value, dict):
            value = _build(sub, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    if cls is ProfileResult and kwargs.get("estimate") is not None:
        from ..report.jsonout import estimate_from_json
        kwargs["estimate"] = estimate_from_json(kwargs["estimate"])
    return cls(**kwargs)


def profile_from_dict(data: dict) -> ProfileResult:
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise LoraCostError(f"not a lora-cost profile (expected schema {SCHEMA!r})")
    try:
        return _build(ProfileResult, data)
    except (TypeError, KeyError, AttributeError) as exc:
        raise LoraCostError(f"malformed profile: {exc}") from None


def load_profile(path: str | Path) -> ProfileResult:
    """Read a profile written by `lora-cost profile` (or `ProfileResult.to_json()`)."""
    from ..profiles import read_json
    return profile_from_dict(read_json(Path(path)))


def save_profile(result: ProfileResult, path: str | Path) -> Path:
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(result.to_json())
    except OSError as exc:
        raise LoraCostError(f"cannot write {p}: {exc.strerror or exc}") from None
    return p
