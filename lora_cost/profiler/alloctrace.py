"""Diff the real caching allocator's history against the replay, segment by segment.

The replay (trace/replay.py) reproduces `memory_allocated()` of the calibration rows at the step's
phase boundaries but not every row's reserved memory: somewhere the real step asks cudaMalloc for a
segment the replay does not (docs/allocator.md). Where exactly needs the real sequence, which
`torch.cuda.memory._record_memory_history()` records on a GPU: `torch.cuda.memory._snapshot()`
returns `device_traces[device]`, one `TraceEntry` per allocator action (torch/cuda/memory.py
`_snapshot`): "alloc" (`size`: the bytes requested), "free_requested", "free_completed",
"segment_alloc" (cudaMalloc of `size` bytes), "segment_map" (expandable segments), "segment_free",
"segment_unmap", "oom", "snapshot".

This module is torch-free except `record_history`. Both sides become the same list of
`AllocEvent`s: an "alloc" (numbered in order: its ordinal), a "free", and a "segment" (new
reserved bytes) placed before the alloc that caused it, as the C++ records SEGMENT_ALLOC inside
`alloc_block` before `malloc` records ALLOC. `segment_diff` aligns the two histories on the alloc
ordinals: the first ordinal whose rounded request sizes differ (where the traced sequence departs
from the real one), and every segment one side creates and the other does not, with the request
that caused it and, for the replay, what that request was (the trace's op and module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from ..analytic.allocator import AllocatorConfig, CachingAllocator
from ..analytic.allocator.caching import round_size


@dataclass(frozen=True)
class AllocEvent:
    action: str  # "alloc", "free" or "segment"
    size: int  # bytes requested (alloc, free) or newly reserved (segment)
    ordinal: int  # alloc: its number; free/segment: the number of the next alloc
    label: str = ""


@dataclass(frozen=True)
class SegmentMismatch:
    side: str  # "real" (a segment the replay does not create) or "replay" (one the real run does not)
    ordinal: int  # the alloc whose request created it
    segment_bytes: int
    request_bytes: int
    label: str  # the replay's description of that request


@dataclass(frozen=True)
class TraceDiff:
    allocs_real: int
    allocs_replay: int
    first_size_mismatch: int | None  # first alloc ordinal whose rounded sizes differ (None: all agree)
    reserved_real: int
    reserved_replay: int
    mismatches: tuple[SegmentMismatch, ...]


def real_history(snapshot: dict, device: int = 0) -> list[AllocEvent]:
    """`torch.cuda.memory._snapshot()` (or a pickle of it) -> AllocEvents. Frees count when completed
    (one stream: right after the request); expandable segments' page maps count as segments."""
    entries = snapshot["device_traces"][device]
    out: list[AllocEvent] = []
    n = 0
    for e in entries:
        action = e.get("action")
        if action == "alloc":
            out.append(AllocEvent("alloc", int(e["size"]), n))
            n += 1
        elif action == "free_completed":
            out.append(AllocEvent("free", int(e["size"]), n))
        elif action in ("segment_alloc", "segment_map"):
            out.append(AllocEvent("segment", int(e["size"]), n))
        elif action in ("segment_free", "segment_unmap"):
            out.append(AllocEvent("segment", -int(e["size"]), n))
    return out


def simulated_history(events: Iterable[tuple], config: AllocatorConfig | None = None,
                      label: Callable[[object], str] | None = None) -> list[AllocEvent]:
    """Replay `events` (`(key, nbytes)`, nbytes None = free: replay.py's format) and record the same
    AllocEvents; `label(key)` describes a request."""
    allocator = CachingAllocator(config)
    live: dict = {}
    out: list[AllocEvent] = []
    n = 0
    for key, nbytes in events:
        if nbytes is None:
            if key in live:
                ptr = live.pop(key)
                size = allocator.active[ptr].requested
                allocator.free(ptr)
                out.append(AllocEvent("free", size, n))
            continue
        if nbytes <= 0:
            continue
        before = allocator.reserved
        live[key] = allocator.malloc(nbytes)
        text = label(key) if label is not None else str(key)
        if allocator.reserved != before:
            out.append(AllocEvent("segment", allocator.reserved - before, n, text))
        out.append(AllocEvent("alloc", nbytes, n, text))
        n += 1
    return out


def segment_diff(real: list[AllocEvent], replay: list[AllocEvent]) -> TraceDiff:
    """Align on alloc ordinals (see the module docstring)."""
    real_allocs = [e for e in real if e.action == "alloc"]
    sim_allocs = [e for e in replay if e.action == "alloc"]
    first = None
    for a, b in zip(real_allocs, sim_allocs):
        if round_size(a.size) != round_size(b.size):
            first = a.ordinal
            break
    if first is None and len(real_allocs) != len(sim_allocs):
        first = min(len(real_allocs), len(sim_allocs))

    def segments(history):
        return [(e.ordinal, e.size) for e in history if e.action == "segment" and e.size > 0]

    real_segs, sim_segs = segments(real), segments(replay)
    labels = {e.ordinal: e.label for e in sim_allocs}
    requests_real = {e.ordinal: e.size for e in real_allocs}
    requests_sim = {e.ordinal: e.size for e in sim_allocs}
    mismatches = []
    for side, mine, other, requests in (("real", real_segs, sim_segs, requests_real),
                                        ("replay", sim_segs, real_segs, requests_sim)):
        remaining = list(other)
        for seg in mine:
            if seg in remaining:
                remaining.remove(seg)
                continue
            ordinal, size = seg
            mismatches.append(SegmentMismatch(side, ordinal, size, requests.get(ordinal, 0), labels.get(ordinal, "")))
    mismatches.sort(key=lambda m: (m.ordinal, m.side))
    return TraceDiff(allocs_real=len(real_allocs), allocs_replay=len(sim_allocs), first_size_mismatch=first,
                     reserved_real=sum(e.size for e in real if e.action == "segment"),
                     reserved_replay=sum(e.size for e in replay if e.action == "segment"),
                     mismatches=tuple(mismatches))


def record_history(fn: Callable[[], object], device=None, max_entries: int = 2_000_000) -> dict:
    """Run `fn()` on a CUDA device with the allocator's history recorded; returns the snapshot
    (`torch.cuda.memory._snapshot()`). Record from the start of the process's GPU work (before the
    model is built) so the history holds every segment."""
    import torch

    torch.cuda.memory._record_memory_history("all", max_entries=max_entries, device=device)
    try:
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.memory._snapshot(device)
    finally:
        torch.cuda.memory._record_memory_history(None, device=device)
