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


def replay(events: Iterable[tuple], config: AllocatorConfig | None = None, capacity_bytes: int | None = None,
           memory_fraction: float | None = None) -> ReplayResult:
    allocator = CachingAllocator(config, capacity_bytes, memory_fraction)
    live: dict = {}
    empty: set = set()  # keys of zero-byte allocations (nothing to free)
    peak_allocated, reserved_at_peak = -1, 0
    count = 0
    oom = 0
    malloc, release = allocator.malloc, allocator.free  # looked up once: ~10^4 events per replay
    try:
        for key, nbytes in events:
            count += 1
            if nbytes is None:
                if key in empty:
                    empty.discard(key)
                else:
                    release(live.pop(key))  # KeyError: a free without its allocation
                continue
            if nbytes <= 0:  # an empty tensor allocates nothing
                empty.add(key)
                continue
            if key in live:
                raise ValueError(f"allocation {key!r} is already live")
            live[key] = malloc(nbytes)
            if allocator.allocated > peak_allocated:
                peak_allocated, reserved_at_peak = allocator.allocated, allocator.reserved
    except SimulatedOutOfMemory as exc:
        oom = exc.request_bytes
    return ReplayResult(
        reserved_peak_bytes=allocator.reserved_peak, reserved_after_bytes=allocator.reserved,
        allocated_peak_bytes=allocator.allocated_peak, reserved_at_allocated_peak_bytes=reserved_at_peak,
        fragmentation_at_peak_bytes=max(reserved_at_peak - max(peak_allocated, 0), 0),
        alloc_retries=allocator.alloc_retries, out_of_memory=bool(oom), oom_request_bytes=oom, events=count,
        stats=allocator.stats())
