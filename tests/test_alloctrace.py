"""profiler/alloctrace.py: the real allocator history (a `torch.cuda.memory._snapshot()` with
`_record_memory_history`) against the replay, on hand-made histories (torch-free)."""

from __future__ import annotations

import pytest

from lora_cost.analytic.allocator import alloc, free
from lora_cost.profiler.alloctrace import real_history, segment_diff, simulated_history

pytestmark = pytest.mark.fast

MIB = 1 << 20


def _entry(action, size, addr=0):
    return {"action": action, "size": size, "addr": addr, "stream": 0, "frames": []}


def test_segment_diff_names_the_request_whose_segment_differs():
    """Replay (by hand, CUDACachingAllocator.cpp): a 400 MiB request gets a 400 MiB segment; freed and
    cached, it is split by a 32 MiB request (best fit, 368 MiB > 1 MiB remain), so the next 400 MiB
    request needs a second 400 MiB segment: 800 MiB. The hand-made real history gave the 32 MiB
    request a segment of its own and reused the 400 MiB block: 432 MiB. The diff names both: a real
    32 MiB segment at alloc 1 the replay lacks, a replay 400 MiB segment at alloc 2 the real run lacks."""
    events = [alloc("logits", 400 * MIB), free("logits"), alloc("ws", 32 * MIB), alloc("logits2", 400 * MIB)]
    replay = simulated_history(events, label=lambda key: f"op {key}")
    snapshot = {"device_traces": [[
        _entry("segment_alloc", 400 * MIB, 1 << 30), _entry("alloc", 400 * MIB, 1 << 30),
        _entry("free_requested", 400 * MIB, 1 << 30), _entry("free_completed", 400 * MIB, 1 << 30),
        _entry("segment_alloc", 32 * MIB, 3 << 30), _entry("alloc", 32 * MIB, 3 << 30),
        _entry("alloc", 400 * MIB, 1 << 30),
    ]]}
    real = real_history(snapshot)
    assert [e.action for e in real] == ["segment", "alloc", "free", "segment", "alloc", "alloc"]
    diff = segment_diff(real, replay)
    assert diff.first_size_mismatch is None and diff.allocs_real == diff.allocs_replay == 3
    assert (diff.reserved_real, diff.reserved_replay) == (432 * MIB, 800 * MIB)
    assert [(m.side, m.ordinal, m.segment_bytes, m.request_bytes) for m in diff.mismatches] == [
        ("real", 1, 32 * MIB, 32 * MIB), ("replay", 2, 400 * MIB, 400 * MIB)]
    assert diff.mismatches[1].label == "op logits2"


def test_segment_diff_reports_where_the_request_sizes_part():
    """Rounded sizes are compared (round_size: 512-byte multiples): 1000 and 1024 B agree, 6 MiB and
    7 MiB do not; the second alloc is where the traced sequence departs from the real one. Both
    requests are 1-10 MiB, so both sides open a 20 MiB large-pool segment (kLargeBuffer) there."""
    replay = simulated_history([alloc("a", 1000), alloc("b", 6 * MIB)])
    real = real_history({"device_traces": [[_entry("segment_alloc", 2 * MIB), _entry("alloc", 1024),
                                              _entry("segment_alloc", 20 * MIB), _entry("alloc", 7 * MIB)]]})
    diff = segment_diff(real, replay)
    assert diff.first_size_mismatch == 1
    assert not diff.mismatches  # both made a 2 MiB small and a 20 MiB large-pool segment at the same allocs
