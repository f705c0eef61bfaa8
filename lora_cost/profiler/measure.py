"""Measurement of the steps the detector (steps.py) delimits: peaks per phase, live bytes by category
at the boundaries, saved activations and timing.

Peak allocated memory of each phase comes from the allocator's counters on CUDA
(`torch.cuda.max_memory_allocated`, reset at each phase start) or from `LiveStorageTracker` on CPU;
at the boundaries `step_start`, `forward_end[i]`, `backward_end[i]` and `optimizer_end` the live bytes
are split by category (`CategoryWalker`); saved activations are counted with
`torch.autograd.graph.saved_tensors_hooks` (pushed at forward start, popped at backward start).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .memory import CategoryWalker, CudaCounters, LiveStorageTracker, SavedRegistry
from .results import Boundary, Categories, PhaseMeasurement, StepMeasurement
from .steps import PHASES


class Clock:
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


class NoCounters:
    """CPU without the live-storage tracker (`track_cpu_memory=False`): no totals, no peaks."""

    current = 0
    peak = 0

    def reset_peak(self) -> None:
        pass


@dataclass
class StepRecord:
    """What is measured of one step while it runs (frozen into a StepMeasurement at the end)."""

    index: int
    start_mark: object = None
    end_mark: object = None
    phase: str | None = None  # the phase whose peak is being accumulated
    phase_mark: object = None
    peaks: dict = field(default_factory=dict)
    walls: list = field(default_factory=list)  # (phase, start mark, end mark)
    boundaries: list = field(default_factory=list)
    saved_max: int = 0
    reserved_peak: int | None = None
    segments: tuple | None = None  # the real allocator's segments per kind at the step's end (CUDA only)
    forward_calls: int = 0  # from the detector, at the step's end
    backward_calls: int = 0
    instr_s: float = 0.0


class Measurement:
    """Counters, category walker and saved-tensor hooks for the measured steps; `measured` gives the
    frozen results."""

    def __init__(self, track_cpu_memory: bool, warnings: list[str]) -> None:
        self.track_cpu_memory, self.warnings = track_cpu_memory, warnings
        self.saved = SavedRegistry()
        self.clock = Clock(False)
        self.counters = None  # CudaCounters | LiveStorageTracker | NoCounters, once measuring
        self.tracker: LiveStorageTracker | None = None
        self.walker: CategoryWalker | None = None
        self.model = None
        self.optimizer = None
        self.record: StepRecord | None = None  # the measured step now running
        self._done: list[StepRecord] = []
        self._frozen: list[StepMeasurement] = []
        self._saved_ctx = None
        self._tracker_seen = 0.0

    def follow(self, model, optimizer) -> None:
        """What the categories are counted over; parameter and buffer storages are not activations."""
        self.model, self.optimizer = model, optimizer
        if model is not None:
            self.saved.excluded = {p.untyped_storage()._cdata for p in model.parameters()} | \
                                  {b.untyped_storage()._cdata for b in model.buffers()}

    # ---- counters ----------------------------------------------------------------------------
    def start(self, device: torch.device) -> None:
        self.walker = CategoryWalker(device.type)
        if device.type == "cuda":
            self.clock = Clock(True)
            self.counters = CudaCounters(device)
        elif not self.track_cpu_memory:
            self.counters = NoCounters()  # categories by walking only; no live total, no peak
        else:
            # No allocator counters: track live storages ourselves. Start from what exists.
            self.tracker = LiveStorageTracker(device.type)
            self.walker.split(self.model, [self.optimizer], self.saved, 0, self.tracker)
            self.tracker.reset_peak()
            self._tracker_seen = self.tracker.bookkeeping_s
            self.tracker.__enter__()
            self.counters = self.tracker

    def detach(self) -> None:
        """Leave the saved-tensor hooks and the CPU tracker's dispatch mode (LIFO order)."""
        self.pop_saved_hooks()
        if self.tracker is not None:
            try:
                self.tracker.__exit__(None, None, None)
            except Exception:  # noqa: BLE001 - a mode stack the script disturbed
                pass
            self.tracker = None

    # ---- a measured step, boundary by boundary -------------------------------------------------
    def begin_step(self, index: int) -> None:
        self.record = StepRecord(index=index, start_mark=self.clock.mark())
        self._boundary("step_start", 0)

    def forward_begins(self) -> None:
        self._enter_phase("forward")
        self.push_saved_hooks()

    def backward_begins(self, micro_batch: int) -> None:
        """micro_batch: 0-based index of the forward that just ended."""
        record = self.record
        self.pop_saved_hooks()
        # what autograd keeps for this backward: the saved storages still alive now
        record.saved_max = max(record.saved_max, self.saved.live_bytes())
        self._boundary("forward_end", micro_batch)
        self._enter_phase("backward")

    def backward_ends(self, micro_batch: int) -> None:
        self._boundary("backward_end", micro_batch)

    def optimizer_begins(self) -> None:
        self.pop_saved_hooks()
        self._enter_phase("optimizer")

    def end_step(self, forward_calls: int, backward_calls: int) -> None:
        record = self.record
        record.forward_calls, record.backward_calls = forward_calls, backward_calls
        self._enter_phase(None)
        self._boundary("optimizer_end", backward_calls - 1)
        if isinstance(self.counters, CudaCounters):
            from .segments import record_segments  # memory_snapshot(): per segment kind (segments.py)
            record.segments = record_segments()
        record.end_mark = self.clock.mark()
        self.record = None
        if self.tracker is not None:  # the CPU tracker's per-op bookkeeping is instrumentation too
            record.instr_s += self.tracker.bookkeeping_s - self._tracker_seen
            self._tracker_seen = self.tracker.bookkeeping_s
        # Frozen later: on CUDA the event times need a synchronisation, done once at the end.
        self._done.append(record)

    def add_instrumentation(self, seconds: float) -> None:
        if self.record is not None:
            self.record.instr_s += seconds

    def _enter_phase(self, phase: str | None) -> None:
        """Close the current phase (its peak is the counter's peak since it began) and open `phase`."""
        record, counters = self.record, self.counters
        if record.phase is not None and counters is not None and record.phase in PHASES:
            record.peaks[record.phase] = max(record.peaks.get(record.phase, 0), counters.peak)
            record.walls.append((record.phase, record.phase_mark, self.clock.mark()))
            if isinstance(counters, CudaCounters):  # reset_peak_memory_stats resets the reserved peak too
                record.reserved_peak = max(record.reserved_peak or 0, counters.peak_reserved())
        if counters is not None:
            counters.reset_peak()
        record.phase = phase
        record.phase_mark = self.clock.mark() if phase else None

    def _boundary(self, name: str, micro_batch: int) -> None:
        if self.counters is None or self.walker is None:
            return
        live = self.counters.current
        cats = self.walker.split(self.model, [self.optimizer], self.saved, live, self.tracker,
                                 fresh=name == "step_start")
        reserved = self.counters.reserved() if isinstance(self.counters, CudaCounters) else None
        self.record.boundaries.append(Boundary(name, max(micro_batch, 0), cats, reserved))

    # ---- saved tensors -----------------------------------------------------------------------
    def push_saved_hooks(self) -> None:
        if self._saved_ctx is not None:
            return
        saved, tracker, measurement = self.saved, self.tracker, self

        def pack(t):
            t0 = time.perf_counter()
            saved.add(t)
            if tracker is not None:
                tracker.adopt(t)
            measurement.add_instrumentation(time.perf_counter() - t0)
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

    def pop_saved_hooks(self) -> None:
        if self._saved_ctx is not None:
            ctx, self._saved_ctx = self._saved_ctx, None
            ctx.__exit__(None, None, None)

    # ---- results -----------------------------------------------------------------------------
    def alive_now(self, model, optimizer, device: torch.device | None) -> tuple[Categories | None, int | None, int | None]:
        """(categories, allocated, reserved) at this moment, best effort: for the OOM record, taken
        inside a failure, so whatever cannot be read stays None."""
        cats: Categories | None = None
        allocated = reserved = None
        try:
            if self.walker is None and model is not None:
                self.walker = CategoryWalker((device or torch.device("cpu")).type)
            if isinstance(self.counters, CudaCounters) or (device is not None and device.type == "cuda"):
                allocated = torch.cuda.memory_allocated(device)
                reserved = torch.cuda.memory_reserved(device)
            elif self.counters is not None:
                allocated = self.counters.current
            if self.walker is not None:
                cats = self.walker.split(model, [optimizer] if optimizer else [], self.saved, allocated or 0, self.tracker)
        except Exception:  # noqa: BLE001 - best effort inside a failure
            pass
        return cats, allocated, reserved

    @property
    def measured(self) -> list[StepMeasurement]:
        if len(self._frozen) != len(self._done):
            self._frozen = [self._freeze(record) for record in self._done]
        return self._frozen

    def _freeze(self, r: StepRecord) -> StepMeasurement:
        walls: dict[str, float] = {}
        for phase, a, b in r.walls:
            if a is not None:
                walls[phase] = walls.get(phase, 0.0) + self.clock.seconds(a, b)
        phases = tuple(PhaseMeasurement(p, int(r.peaks.get(p, 0)), walls.get(p, 0.0)) for p in PHASES if p in r.peaks)
        wall = self.clock.seconds(r.start_mark, r.end_mark) if r.end_mark is not None else 0.0
        return StepMeasurement(index=r.index, micro_batches=r.backward_calls, forward_calls=r.forward_calls,
                               backward_calls=r.backward_calls, wall_s=wall,
                               peak_bytes=max((p.peak_bytes for p in phases), default=0),
                               peak_reserved_bytes=r.reserved_peak, saved_activation_bytes=int(r.saved_max),
                               instrumentation_s=r.instr_s, phases=phases, boundaries=tuple(r.boundaries),
                               segments=r.segments)
