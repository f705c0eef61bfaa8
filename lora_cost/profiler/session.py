"""The profiler core: a thin coordinator between step detection, measurement and fault handling.

- steps.py (`StepDetector`): optimizer, module and autograd hooks -> step and phase boundaries;
- measure.py (`Measurement`): peaks per phase, live bytes by category at the boundaries, saved
  activations, timing;
- faults.py: a hook that fails switches the profiler off; the OOM record; how the script ended.
The monitor decides which steps are measured (after `warmup` optimizer steps, `steps` of them),
samples FLOPs on the last warm-up step (an extra step that is not measured for memory or time, so
FlopCounterMode never slows a measured step) and notes what the estimate needs from the live call
(input shape, autocast dtype, one sample input for fvcore).
"""

from __future__ import annotations

import torch

from .faults import Guard, attach_oom_observer, detach_oom_observer, oom_event
from .flops import FlopSampler
from .measure import Measurement
from .results import OomEvent, StepMeasurement
from .steps import StepDetector, StepPosition


class StepMonitor:
    """Installs the hooks, follows the loop, keeps the measured steps. Never raises into the user's
    code: a failure inside a hook is recorded as a warning and switches the profiler off."""

    def __init__(self, warmup: int, steps: int, count_flops: bool, track_cpu_memory: bool = True) -> None:
        self.warmup, self.steps, self.count_flops = warmup, steps, count_flops
        self.warnings: list[str] = []
        self.measurement = Measurement(track_cpu_memory, self.warnings)
        self.guard = Guard(self.warnings, self._switch_off, self.measurement.add_instrumentation)
        self.detector = StepDetector(self, self.guard, self.warnings)
        self.flops: FlopSampler | None = None
        self.flop_step_index: int | None = None
        self.input_shape = None
        self.autocast_dtype = None
        self.sample_inputs = None  # (args, kwargs) of the last measured forward, for fvcore
        self.oom: OomEvent | None = None

    # ---- what api.py reads -------------------------------------------------------------------
    model = property(lambda self: self.detector.model)
    optimizer = property(lambda self: self.detector.optimizer)
    device = property(lambda self: self.detector.device)
    steps_detected = property(lambda self: self.detector.steps_detected)

    @property
    def measured(self) -> list[StepMeasurement]:
        return self.measurement.measured

    # ---- install / remove ------------------------------------------------------------------
    def install(self) -> None:
        self.detector.install()
        attach_oom_observer(self)
        self.detector.enabled = True

    def remove(self) -> None:
        """Remove every hook and restore `torch.autograd.backward`."""
        self.detector.enabled = False
        self._detach_measurement()
        self.detector.remove()
        detach_oom_observer(self)

    def _detach_measurement(self) -> None:
        """Leave the modes and hooks that only matter while measuring (LIFO order)."""
        if self.flops is not None and self.flops.phase is not None:
            self.flops.stop()
        self.measurement.detach()

    def _switch_off(self) -> None:
        self.detector.enabled = False
        self._detach_measurement()

    def _is_measured(self, step: StepPosition) -> bool:
        return self.warmup < step.index <= self.warmup + self.steps

    def _samples_flops(self, step: StepPosition) -> bool:
        return self.flops is not None and step.index == self.flop_step_index

    # ---- the detector's events (steps.StepListener) -----------------------------------------
    def model_found(self, model, optimizer) -> None:
        self.measurement.follow(model, optimizer)

    def step_opened(self, step: StepPosition) -> None:
        if self._is_measured(step):
            self.measurement.begin_step(step.index)
        if self.count_flops and step.index == self.warmup and self.flops is None:
            self.flops = FlopSampler()
            self.flop_step_index = step.index

    def forward_started(self, step: StepPosition, args, kwargs) -> None:
        if self._is_measured(step):
            self._observe_inputs(step, args, kwargs)
            self.measurement.forward_begins()
        if self._samples_flops(step):
            self.flops.start("forward")

    def backward_started(self, step: StepPosition) -> None:
        if self._samples_flops(step):
            self.flops.start("backward")
        if self._is_measured(step):
            self.measurement.backward_begins(step.forward_calls - 1)

    def backward_ended(self, step: StepPosition) -> None:
        if self._samples_flops(step):
            self.flops.stop()
        if self._is_measured(step):
            self.measurement.backward_ends(step.backward_calls - 1)

    def optimizer_started(self, step: StepPosition) -> None:
        if self._samples_flops(step):
            self.flops.stop()
        if self._is_measured(step):
            self.measurement.optimizer_begins()

    def optimizer_ended(self, step: StepPosition | None, steps_detected: int) -> None:
        if step is not None and self._is_measured(step):
            self.measurement.end_step(step.forward_calls, step.backward_calls)
        if steps_detected == self.warmup and self.steps > 0:
            self.measurement.start(self.device or torch.device("cpu"))
        if steps_detected == self.warmup + self.steps:
            self._detach_measurement()
            self.detector.keep_only_optimizer_hooks()

    def _observe_inputs(self, step: StepPosition, args, kwargs) -> None:
        kwargs = kwargs or {}
        ids = kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            ids = next((a for a in list(args) + list(kwargs.values())
                        if isinstance(a, torch.Tensor) and not a.is_floating_point() and a.dim() == 2), None)
        if ids is not None:
            self.input_shape = tuple(ids.shape)
        self.autocast_dtype = _autocast_dtype((self.device or torch.device("cpu")).type)
        if step.index == self.warmup + self.steps:
            self.sample_inputs = (tuple(args), dict(kwargs))

    # ---- faults ------------------------------------------------------------------------------
    def record_oom(self, message: str, requested: int | None = None, device_free: int | None = None) -> None:
        """What was alive when memory ran out (called from the allocator's OOM observer on CUDA, or
        when the script's exception reaches the runner while its frames still hold the tensors)."""
        if self.oom is not None:
            return
        step = self.detector.step
        self.oom = oom_event(message, step.index if step else self.steps_detected + 1,
                             step.phase if step is not None and step.phase else "outside a step",
                             self.measurement.alive_now(self.model, self.optimizer, self.device),
                             requested, device_free)


def _autocast_dtype(device_type: str):
    """The autocast dtype in force for `device_type`, or None (torch.is_autocast_enabled /
    torch.get_autocast_dtype, torch >= 2.4)."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except (AttributeError, TypeError, RuntimeError):
        return None
