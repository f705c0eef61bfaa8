"""Replay an allocation/free sequence through the allocator model and report what a GPU would reserve.

An event is `alloc(key, nbytes)` or `free(key)`; keys are any hashable naming one allocation. The
result holds the counters a run reads after its step (`max_memory_reserved()`,
`memory_reserved()`, `max_memory_allocated()`), the reserved memory at the moment of the allocated
peak and the free bytes inside segments then (fragmentation), and whether the sequence needed the
cache to be emptied (an alloc retry: the step fits only because cached segments were released) or
ran out of memory against `capacity_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .caching import CachingAllocator, SimulatedOutOfMemory
from .config import AllocatorConfig
from .stats import AllocatorStats


def alloc(key, nbytes: int) -> tuple:
    return (key, nbytes)


def free(key) -> tuple:
    return (key, None)


@dataclass(frozen=True)
class ReplayResult:
    reserved_peak_bytes: int  # max_memory_reserved() over the sequence
    reserved_after_bytes: int  # memory_reserved() after the last event
    allocated_peak_bytes: int  # max_memory_allocated()
    reserved_at_allocated_peak_bytes: int  # segments held when the allocated peak was reached
    fragmentation_at_peak_bytes: int  # reserved - allocated at that moment: cached bytes no tensor used
    alloc_retries: int  # > 0: some allocation succeeded only after the cache was emptied
    out_of_memory: bool
    oom_request_bytes: int  # the segment size that could not be reserved (0 when none)
    events: int
    stats: AllocatorStats  # the counters after the last event replayed


class Replayer:
    """The allocator model driven one event at a time (`alloc`, `free`), keeping what a replay reports
    (`result`). `replay` feeds it a sequence; compose.replay_run feeds it the run's events as they are
    composed (no list of ~10^4 events)."""

    def __init__(self, config: AllocatorConfig | None = None, capacity_bytes: int | None = None,
                 memory_fraction: float | None = None) -> None:
        self.allocator = CachingAllocator(config, capacity_bytes, memory_fraction)
        self.live: dict = {}
        self.empty: set = set()  # keys of zero-byte allocations (nothing to free)
        self.peak_allocated, self.reserved_at_peak = -1, 0
        self.count = 0
        self.oom = 0  # the request that could not be served (SimulatedOutOfMemory), 0 when none
        self._malloc, self._release = self.allocator.malloc, self.allocator.free  # looked up once

    def alloc(self, key, nbytes: int) -> None:
        self.count += 1
        if nbytes <= 0:  # an empty tensor allocates nothing
            self.empty.add(key)
            return
        if key in self.live:
            raise ValueError(f"allocation {key!r} is already live")
        self.live[key] = self._malloc(nbytes)
        allocator = self.allocator
        if allocator.allocated > self.peak_allocated:
            self.peak_allocated, self.reserved_at_peak = allocator.allocated, allocator.reserved

    def free(self, key) -> None:
        self.count += 1
        if key in self.empty:
            self.empty.discard(key)
        else:
            self._release(self.live.pop(key))  # KeyError: a free without its allocation

    def result(self) -> ReplayResult:
        allocator, oom = self.allocator, self.oom
        return ReplayResult(
            reserved_peak_bytes=allocator.reserved_peak, reserved_after_bytes=allocator.reserved,
            allocated_peak_bytes=allocator.allocated_peak, reserved_at_allocated_peak_bytes=self.reserved_at_peak,
            fragmentation_at_peak_bytes=max(self.reserved_at_peak - max(self.peak_allocated, 0), 0),
            alloc_retries=allocator.alloc_retries, out_of_memory=bool(oom), oom_request_bytes=oom, events=self.count,
            stats=allocator.stats())


def replay(events: Iterable[tuple], config: AllocatorConfig | None = None, capacity_bytes: int | None = None,
           memory_fraction: float | None = None) -> ReplayResult:
    replayer = Replayer(config, capacity_bytes, memory_fraction)
    alloc, free = replayer.alloc, replayer.free
    try:
        for key, nbytes in events:
            if nbytes is None:
                free(key)
            else:
                alloc(key, nbytes)
    except SimulatedOutOfMemory as exc:
        replayer.oom = exc.request_bytes
    return replayer.result()
