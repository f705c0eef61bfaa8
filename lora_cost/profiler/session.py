"""The profiler core: finds step boundaries in an unmodified training loop and measures each step.

Step boundaries, found without help from the script:
- optimizer steps: `torch.optim.optimizer.register_optimizer_step_pre_hook` / `..._post_hook`
  (global: fire for every optimizer's `step()`; the first optimizer that steps is the one followed);
- forward: `torch.nn.modules.module.register_module_forward_pre_hook` / `register_module_forward_hook`
  (global, `always_call=True`) until the model is known; then only `model.register_forward_pre_hook`
  on the model (the module whose parameters the optimizer holds), which is far cheaper;
- backward: the autograd engine's Python entry point `torch.autograd.backward` (which
  `Tensor.backward` calls) is wrapped while the profiler runs; nested calls (reentrant checkpointing)
  are not new passes.
A step runs from the first forward (with grad enabled) after an optimizer step to the next optimizer
step; gradient accumulation gives several forward/backward pairs per step. Phases: forward = model
call and loss, up to `backward()`; backward = `backward()` and anything before the optimizer step
(clipping); optimizer = `optimizer.step()`.

Per measured step the peak allocated memory of each phase comes from the allocator's counters on
CUDA (`torch.cuda.max_memory_allocated`, reset at each phase start) or from `LiveStorageTracker` on
CPU; saved activations are counted with `torch.autograd.graph.saved_tensors_hooks` (pushed at
forward start, popped at backward start). FLOPs are counted on the last warm-up step (an extra step
that is not measured for memory or time), so they never slow a measured step.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field

import torch

from .flops import FlopSampler
from .memory import CategoryWalker, CudaCounters, LiveStorageTracker, SavedRegistry
from .results import Boundary, Categories, OomEvent, PhaseMeasurement, StepMeasurement

PHASES = ("forward", "backward", "optimizer")


class _Clock:
    """Wall-clock marks: CUDA events on a GPU (`torch.cuda.Event(enable_timing=True)`, resolved once
    at the end so no step is synchronised), `time.perf_counter` otherwise."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        return b - a


@dataclass
class _Step:
    index: int
    measured: bool
    start_mark: object = None
    end_mark: object = None
    forward_calls: int = 0
    backward_calls: int = 0
    phase: str | None = None
    phase_mark: object = None
    peaks: dict = field(default_factory=dict)
    walls: list = field(default_factory=list)  # (phase, start mark, end mark)
    boundaries: list = field(default_factory=list)
    saved_max: int = 0
    reserved_peak: int | None = None
    instr_s: float = 0.0


class StepMonitor:
    """Installs the hooks, follows the loop, keeps the measured steps. Never raises into the user's
    code: a failure inside a hook is recorded as a warning and switches the profiler off."""

    def __init__(self, warmup: int, steps: int, count_flops: bool, track_cpu_memory: bool = True) -> None:
        self.warmup, self.steps, self.count_flops = warmup, steps, count_flops
        self.track_cpu_memory = track_cpu_memory
        self.optimizer = None
        self.model = None
        self.candidates: dict[int, torch.nn.Module] = {}
        self.steps_detected = 0
        self._done: list[tuple[_Step, int | None]] = []
        self._frozen: list[StepMeasurement] = []
        self.step: _Step | None = None
        self.warnings: list[str] = []
        self.flops: FlopSampler | None = None
        self.flop_step_index: int | None = None
        self.device: torch.device | None = None
        self.counters = None  # CudaCounters | LiveStorageTracker, during measurement
        self.tracker: LiveStorageTracker | None = None
        self.walker: CategoryWalker | None = None
        self.saved = SavedRegistry()
        self.input_shape = None
        self.autocast_dtype = None
        self.sample_inputs = None  # (args, kwargs) of the last measured forward, for fvcore
        self.oom: OomEvent | None = None
        self.clock = _Clock(False)
        self._handles: list = []
        self._model_handles: list = []
        self._depth = 0
        self._bw_depth = 0
        self._saved_ctx = None
        self._orig_backward = None
        self._enabled = False
        self._instr = 0.0
        self._tracker_seen = 0.0

    # ---- install / remove ------------------------------------------------------------------
    def install(self) -> None:
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
        self._handles = [register_optimizer_step_pre_hook(self._opt_pre),
                         register_optimizer_step_post_hook(self._opt_post),
                         register_module_forward_pre_hook(self._global_pre),
                         register_module_forward_hook(self._global_post, always_call=True)]
        self._orig_backward = torch.autograd.backward
        monitor = self

        def backward(*args, **kwargs):  # torch.autograd.backward, instrumented
            if not monitor._enabled or monitor._bw_depth or monitor.step is None:
                return monitor._orig_backward(*args, **kwargs)
            monitor._bw_depth += 1
            monitor._guard(monitor._backward_start)
            try:
                return monitor._orig_backward(*args, **kwargs)
            finally:
                monitor._bw_depth -= 1
                monitor._guard(monitor._backward_end)

        backward.__wrapped__ = self._orig_backward
        torch.autograd.backward = backward
        _attach_oom_observer(self)
        self._enabled = True

    def _remove_forward_hooks(self) -> None:
        for h in self._handles[2:] + self._model_handles:
            h.remove()
        self._handles = self._handles[:2]
        self._model_handles = []

    def _detach_measurement(self) -> None:
        """Leave the modes and hooks that only matter while measuring (LIFO order)."""
        if self.flops is not None and self.flops.phase is not None:
            self.flops.stop()
        self._pop_saved_hooks()
        if self.tracker is not None:
            try:
                self.tracker.__exit__(None, None, None)
            except Exception:  # noqa: BLE001 - a mode stack the script disturbed
                pass
            self.tracker = None

    def remove(self) -> None:
        """Remove every hook and restore `torch.autograd.backward`."""
        self._enabled = False
        self._detach_measurement()
        for h in self._handles + self._model_handles:
            h.remove()
        self._handles, self._model_handles = [], []
        if self._orig_backward is not None and torch.autograd.backward is not self._orig_backward:
            torch.autograd.backward = self._orig_backward
        _detach_oom_observer(self)

    def _guard(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - the user's training must go on
            self.warnings.append(f"profiler switched off after an internal error in {fn.__name__}: "
                                 f"{type(exc).__name__}: {exc}")
            self._enabled = False
            self._detach_measurement()
        finally:
            dt = time.perf_counter() - t0
            self._instr += dt
            if self.step is not None:
                self.step.instr_s += dt

    # ---- hooks -----------------------------------------------------------------------------
    def _global_pre(self, module, args):
        if self._enabled and self._depth == 0 and torch.is_grad_enabled():
            self.candidates.setdefault(id(module), module)
            self._guard(self._forward_start, module, args, None)
        self._depth += 1

    def _global_post(self, module, args, output):
        self._depth = max(self._depth - 1, 0)

    def _model_pre(self, module, args, kwargs):
        if self._enabled and torch.is_grad_enabled():
            self._guard(self._forward_start, module, args, kwargs)

    def _opt_pre(self, optimizer, args, kwargs):
        if self._enabled:
            self._guard(self._optimizer_start, optimizer)

    def _opt_post(self, optimizer, args, kwargs):
        if optimizer is self.optimizer or self.optimizer is None:
            self._guard(self._optimizer_end, optimizer)

    # ---- events ----------------------------------------------------------------------------
    def _forward_start(self, module, args, kwargs) -> None:
        if self._bw_depth:
            return  # modules rerun inside backward (gradient checkpointing) are not a new forward
        if self.step is None:
            index = self.steps_detected + 1
            measured = self.warmup < index <= self.warmup + self.steps
            self.step = _Step(index=index, measured=measured)
            if measured:
                self.step.start_mark = self.clock.mark()
                self._boundary("step_start")
            if self.count_flops and index == self.warmup and self.flops is None:
                self.flops = FlopSampler()
                self.flop_step_index = index
        step = self.step
        if step.phase == "forward":
            return  # a second top-level call inside the same forward (e.g. a loss module)
        step.forward_calls += 1
        if step.measured:
            self._observe_inputs(args, kwargs)
            self._enter_phase("forward")
            self._push_saved_hooks()
        else:
            step.phase = "forward"
        if self.flops is not None and step.index == self.flop_step_index:
            self.flops.start("forward")

    def _backward_start(self) -> None:
        step = self.step
        step.backward_calls += 1
        if self.flops is not None and step.index == self.flop_step_index:
            self.flops.start("backward")
        if step.measured:
            self._pop_saved_hooks()
            # what autograd keeps for this backward: the saved storages still alive now
            step.saved_max = max(step.saved_max, self.saved.live_bytes())
            self._boundary("forward_end")
            self._enter_phase("backward")
        else:
            step.phase = "backward"

    def _backward_end(self) -> None:
        step = self.step
        if step is None:
            return
        if self.flops is not None and step.index == self.flop_step_index:
            self.flops.stop()
        if step.measured:
            self._boundary("backward_end")

    def _optimizer_start(self, optimizer) -> None:
        if self.optimizer is None:
            self.optimizer = optimizer
        elif optimizer is not self.optimizer:
            msg = f"several optimizers step; following the first ({type(self.optimizer).__name__})"
            if msg not in self.warnings:
                self.warnings.append(msg)
            return
        if self.model is None:
            self._identify_model()
        step = self.step
        if step is None:  # a step without a forward seen (e.g. the model ran under no_grad)
            return
        if self.flops is not None and step.index == self.flop_step_index:
            self.flops.stop()
        if step.measured:
            self._pop_saved_hooks()
            self._enter_phase("optimizer")
        else:
            step.phase = "optimizer"

    def _optimizer_end(self, optimizer) -> None:
        if self.optimizer is None:
            self.optimizer = optimizer
        self.steps_detected += 1
        step, self.step = self.step, None
        if not self._enabled:
            return
        if step is not None and step.measured:
            self.step = step  # boundaries below belong to it
            self._enter_phase(None)
            self._boundary("optimizer_end")
            step.end_mark = self.clock.mark()
            self.step = None
            self._finish_step(step)
        if self.steps_detected == self.warmup:
            self._start_measuring()
        if self.steps_detected == self.warmup + self.steps:
            self._stop_measuring()

    # ---- measuring -------------------------------------------------------------------------
    def _identify_model(self) -> None:
        from .introspect import pick_model
        self.model = pick_model(list(self.candidates.values()), [self.optimizer])
        self.candidates.clear()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.device = params[0].device if params else torch.device("cpu")
        if self.model is None:
            self.warnings.append("could not tell which module the optimizer trains: categories use the optimizer's parameters")
            return
        # From now on only the model's own pre-hook marks a forward.
        self._remove_forward_hooks()
        self._model_handles = [self.model.register_forward_pre_hook(self._model_pre, with_kwargs=True)]
        self.saved.excluded = {p.untyped_storage()._cdata for p in self.model.parameters()} | \
                              {b.untyped_storage()._cdata for b in self.model.buffers()}

    def _start_measuring(self) -> None:
        if self.steps <= 0:
            return
        dev = self.device or torch.device("cpu")
        self.walker = CategoryWalker(dev.type)
        if dev.type == "cuda":
            self.clock = _Clock(True)
            self.counters = CudaCounters(dev)
        elif not self.track_cpu_memory:
            self.counters = _NoCounters()  # categories by walking only; no live total, no peak
        else:
            # No allocator counters: track live storages ourselves. Start from what exists.
            self.tracker = LiveStorageTracker(dev.type)
            self.walker.split(self.model, [self.optimizer], self.saved, 0, self.tracker)
            self.tracker.reset_peak()
            self._tracker_seen = self.tracker.bookkeeping_s
            self.tracker.__enter__()
            self.counters = self.tracker

    def _stop_measuring(self) -> None:
        self._detach_measurement()
        # Keep only the optimizer hooks (they count the remaining steps); drop the rest.
        self._remove_forward_hooks()

    def _observe_inputs(self, args, kwargs) -> None:
        kwargs = kwargs or {}
        ids = kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            ids = next((a for a in list(args) + list(kwargs.values())
                        if isinstance(a, torch.Tensor) and not a.is_floating_point() and a.dim() == 2), None)
        if ids is not None:
            self.input_shape = tuple(ids.shape)
        self.autocast_dtype = _autocast_dtype((self.device or torch.device("cpu")).type)
        if self.step.index == self.warmup + self.steps:
            self.sample_inputs = (tuple(args), dict(kwargs))

    def _enter_phase(self, phase: str | None) -> None:
        """Close the current phase (its peak is the counter's peak since it began) and open `phase`."""
        step = self.step
        counters = self.counters
        if step.phase is not None and counters is not None and step.phase in PHASES:
            step.peaks[step.phase] = max(step.peaks.get(step.phase, 0), counters.peak)
            step.walls.append((step.phase, step.phase_mark, self.clock.mark()))
            if isinstance(counters, CudaCounters):  # reset_peak_memory_stats resets the reserved peak too
                step.reserved_peak = max(step.reserved_peak or 0, counters.peak_reserved())
        if counters is not None:
            counters.reset_peak()
        step.phase = phase
        step.phase_mark = self.clock.mark() if phase else None

    def _boundary(self, name: str) -> None:
        if self.counters is None or self.walker is None:
            return
        live = self.counters.current
        cats = self.walker.split(self.model, [self.optimizer], self.saved, live, self.tracker,
                                 fresh=name == "step_start")
        reserved = self.counters.reserved() if isinstance(self.counters, CudaCounters) else None
        step = self.step
        micro = {"step_start": 0, "forward_end": step.forward_calls - 1}.get(name, step.backward_calls - 1)
        step.boundaries.append(Boundary(name, max(micro, 0), cats, reserved))

    def _finish_step(self, step: _Step) -> None:
        if self.tracker is not None:  # the CPU tracker's per-op bookkeeping is instrumentation too
            step.instr_s += self.tracker.bookkeeping_s - self._tracker_seen
            self._tracker_seen = self.tracker.bookkeeping_s
        reserved_peak = step.reserved_peak
        # Frozen later: on CUDA the event times need a synchronisation, done once at the end.
        self._done.append((step, reserved_peak))

    @property
    def measured(self) -> list[StepMeasurement]:
        if len(self._frozen) != len(self._done):
            self._frozen = [self._freeze(step, reserved) for step, reserved in self._done]
        return self._frozen

    def _freeze(self, step: _Step, reserved_peak) -> StepMeasurement:
        walls: dict[str, float] = {}
        for phase, a, b in step.walls:
            if a is not None:
                walls[phase] = walls.get(phase, 0.0) + self.clock.seconds(a, b)
        phases = tuple(PhaseMeasurement(p, int(step.peaks.get(p, 0)), walls.get(p, 0.0)) for p in PHASES if p in step.peaks)
        wall = self.clock.seconds(step.start_mark, step.end_mark) if step.end_mark is not None else 0.0
        return StepMeasurement(index=step.index, micro_batches=step.backward_calls, forward_calls=step.forward_calls,
                               backward_calls=step.backward_calls, wall_s=wall,
                               peak_bytes=max((p.peak_bytes for p in phases), default=0),
                               peak_reserved_bytes=reserved_peak, saved_activation_bytes=int(step.saved_max),
                               instrumentation_s=step.instr_s, phases=phases, boundaries=tuple(step.boundaries))

    # ---- saved tensors ---------------------------------------------------------------------
    def _push_saved_hooks(self) -> None:
        if self._saved_ctx is not None:
            return
        saved, tracker = self.saved, self.tracker
        monitor = self

        def pack(t):
            t0 = time.perf_counter()
            saved.add(t)
            if tracker is not None:
                tracker.adopt(t)
            monitor._instr_add(time.perf_counter() - t0)
            return t

        def unpack(t):
            return t

        try:
            ctx = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
            ctx.__enter__()
            self._saved_ctx = ctx
        except RuntimeError as exc:  # hooks disabled (e.g. under torch.compile)
            msg = f"saved activations not counted: {exc}"
            if msg not in self.warnings:
                self.warnings.append(msg)

    def _pop_saved_hooks(self) -> None:
        if self._saved_ctx is not None:
            ctx, self._saved_ctx = self._saved_ctx, None
            ctx.__exit__(None, None, None)

    def _instr_add(self, dt: float) -> None:
        self._instr += dt
        if self.step is not None:
            self.step.instr_s += dt

    # ---- faults ----------------------------------------------------------------------------
    def record_oom(self, message: str, requested: int | None = None, device_free: int | None = None) -> None:
        """What was alive when memory ran out (called from the allocator's OOM observer on CUDA, or
        when the script's exception reaches the runner while its frames still hold the tensors)."""
        if self.oom is not None:
            return
        step = self.step
        phase = step.phase if step is not None and step.phase else "outside a step"
        cats: Categories | None = None
        allocated = reserved = None
        try:
            if self.walker is None and self.model is not None:
                self.walker = CategoryWalker((self.device or torch.device("cpu")).type)
            if isinstance(self.counters, CudaCounters) or (self.device is not None and self.device.type == "cuda"):
                allocated = torch.cuda.memory_allocated(self.device)
                reserved = torch.cuda.memory_reserved(self.device)
            elif self.counters is not None:
                allocated = self.counters.current
            if self.walker is not None:
                cats = self.walker.split(self.model, [self.optimizer] if self.optimizer else [], self.saved,
                                         allocated or 0, self.tracker)
        except Exception:  # noqa: BLE001 - best effort inside a failure
            pass
        self.oom = OomEvent(step_index=step.index if step else self.steps_detected + 1, phase=phase,
                            message=message.strip().splitlines()[0][:300] if message else "out of memory",
                            requested_bytes=requested, allocated_bytes=allocated, reserved_bytes=reserved,
                            device_free_bytes=device_free, memory=cats)


def _autocast_dtype(device_type: str):
    """The autocast dtype in force for `device_type`, or None (torch.is_autocast_enabled /
    torch.get_autocast_dtype, torch >= 2.4)."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except (AttributeError, TypeError, RuntimeError):
        return None


class _NoCounters:
    """CPU without the live-storage tracker (`track_cpu_memory=False`): no totals, no peaks."""

    current = 0
    peak = 0

    def reset_peak(self) -> None:
        pass


# ---- CUDA out-of-memory observer (torch._C._cuda_attach_out_of_memory_observer, the hook
# torch.cuda.memory._record_memory_history's OOM dumps use); it cannot be detached, so one
# observer forwards to whichever monitor is active.
_ACTIVE: list = []
_OBSERVER_ATTACHED = False


def _attach_oom_observer(monitor: StepMonitor) -> None:
    global _OBSERVER_ATTACHED
    _ACTIVE.append(weakref.ref(monitor))
    attach = getattr(torch._C, "_cuda_attach_out_of_memory_observer", None)
    if _OBSERVER_ATTACHED or attach is None or not torch.cuda.is_available():
        return

    def observer(device, alloc, device_allocated, device_free):
        for ref in reversed(_ACTIVE):
            m = ref()
            if m is not None:
                m.record_oom(f"CUDA out of memory: tried to allocate {alloc} bytes", alloc, device_free)
                return

    try:
        attach(observer)
        _OBSERVER_ATTACHED = True
    except RuntimeError:
        pass


def _detach_oom_observer(monitor: StepMonitor) -> None:
    _ACTIVE[:] = [r for r in _ACTIVE if r() is not None and r() is not monitor]
