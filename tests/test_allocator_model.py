"""The caching-allocator model driven by hand-made request sequences.

Every expected segment layout is derived by hand from c10/cuda/CUDACachingAllocator.cpp (the
revision named in docs/allocator.md): round_size (512-byte multiples), get_pool (<= 1 MiB: small),
get_allocation_size (small: 2 MiB; < 10 MiB: 20 MiB; else rounded up to 2 MiB), get_free_block
(smallest cached block >= request, then lowest address; max_split_size rules), should_split (small
pool: >= 512 B left; large pool: > 1 MiB left and request < max_split_size), free_block's merging,
and malloc's fallbacks (release_available_cached_blocks, release_cached_blocks + retry, OOM).
"""

from __future__ import annotations

import pytest

from lora_cost.analytic.allocator import (AllocatorConfig, CachingAllocator, SimulatedOutOfMemory, alloc, free,
                                          parse_alloc_conf, replay)
from lora_cost.analytic.allocator.caching import allocation_size, round_size
from lora_cost.errors import LoraCostError

pytestmark = pytest.mark.fast

KIB, MIB = 1 << 10, 1 << 20


def layout(a: CachingAllocator) -> list[tuple[str, list[tuple[int, bool]]]]:
    """Segments as (pool, [(block size in MiB or bytes, allocated)]) in address order."""
    return [(s.pool, [(b.size, b.allocated) for b in s.blocks]) for s in a.snapshot()]


def test_round_size_and_segment_sizes():
    assert round_size(1) == 512  # below kMinBlockSize
    assert round_size(513) == 1024  # next multiple of 512
    assert round_size(600 * KIB) == 600 * KIB  # 614400 = 1200 x 512
    # roundup_power2_divisions:4 splits [4 MiB, 8 MiB) into 4 steps of 1 MiB: 5 MiB + 1 -> 6 MiB
    assert round_size(5 * MIB + 1, 4) == 6 * MIB
    assert round_size(8 * MIB, 4) == 8 * MIB  # a power of two stays
    assert allocation_size(1 * MIB) == 2 * MIB  # small pool: kSmallBuffer
    assert allocation_size(1 * MIB + 512) == 20 * MIB  # 1-10 MiB: kLargeBuffer
    assert allocation_size(10 * MIB) == 10 * MIB  # from kMinLargeAlloc: rounded to 2 MiB
    assert allocation_size(11 * MIB + 512) == 12 * MIB


def test_three_small_requests_share_one_2mib_segment():
    a = CachingAllocator()
    for _ in range(3):
        a.malloc(600 * KIB)
    # one 2 MiB small segment: 3 x 614400 B handed out, 2097152 - 1843200 = 253952 B left (split: >= 512 B)
    assert layout(a) == [("small", [(614400, True)] * 3 + [(253952, False)])]
    s = a.stats()
    assert (s.allocated_bytes, s.reserved_bytes, s.segments) == (1843200, 2 * MIB, 1)
    assert s.free_in_segments_bytes == 253952 and s.largest_free_block_bytes == 253952
    a.malloc(600 * KIB)  # 614400 > 253952: a second 2 MiB segment
    assert a.stats().reserved_bytes == 4 * MIB


def test_5mib_request_splits_a_20mib_segment():
    a = CachingAllocator()
    a.malloc(5 * MIB)
    # 5 MiB < kMinLargeAlloc: a 20 MiB segment; 15 MiB left > kSmallSize: split
    assert layout(a) == [("large", [(5 * MIB, True), (15 * MIB, False)])]
    a.malloc(12 * MIB)
    # best fit: the cached 15 MiB block (>= 12 MiB); 3 MiB left > 1 MiB: split again, no new segment
    assert layout(a) == [("large", [(5 * MIB, True), (12 * MIB, True), (3 * MIB, False)])]
    assert a.stats().reserved_bytes == 20 * MIB


def test_12mib_request_on_an_empty_cache_gets_its_own_segment():
    a = CachingAllocator()
    a.malloc(12 * MIB)
    assert layout(a) == [("large", [(12 * MIB, True)])]  # >= 10 MiB: rounded to 2 MiB, exactly 12 MiB
    b = CachingAllocator()
    b.malloc(11 * MIB + 1)
    # round_size -> 11 MiB + 512; segment 12 MiB; 1 MiB - 512 left is not > 1 MiB: no split, and
    # memory_allocated counts the whole 12 MiB block
    assert layout(b) == [("large", [(12 * MIB, True)])]
    assert b.stats().allocated_bytes == 12 * MIB


def test_best_fit_takes_the_smallest_cached_block():
    a = CachingAllocator()
    p12, p14 = a.malloc(12 * MIB), a.malloc(14 * MIB)  # two segments of 12 and 14 MiB
    a.free(p12)
    a.free(p14)
    a.malloc(11 * MIB)
    # smallest cached block >= 11 MiB is the 12 MiB one; 1 MiB left is not > 1 MiB: whole block
    assert layout(a) == [("large", [(12 * MIB, True)]), ("large", [(14 * MIB, False)])]
    assert a.stats().reserved_bytes == 26 * MIB and a.stats().allocated_bytes == 12 * MIB


def test_free_coalesces_with_free_neighbours():
    a = CachingAllocator()
    p1, p2, p3 = (a.malloc(5 * MIB) for _ in range(3))
    # 20 -> 5 + 15 -> 5 + 5 + 10 -> 5 + 5 + 5 + 5 (each remainder > 1 MiB is split off)
    assert layout(a) == [("large", [(5 * MIB, True)] * 3 + [(5 * MIB, False)])]
    a.free(p3)  # merges with the free tail: 5 + 5 + 10
    a.free(p1)  # no free neighbour
    assert layout(a) == [("large", [(5 * MIB, False), (5 * MIB, True), (10 * MIB, False)])]
    a.free(p2)  # merges with both: one unsplit 20 MiB block again
    assert layout(a) == [("large", [(20 * MIB, False)])]
    assert a.stats().largest_free_block_bytes == 20 * MIB


def test_small_pool_splits_down_to_512_bytes():
    a = CachingAllocator()
    a.malloc(1 * MIB)  # <= kSmallSize: small pool, 2 MiB segment, 1 MiB left (>= 512): split
    a.malloc(1 * MIB)  # takes the cached 1 MiB exactly
    a.malloc(1 * MIB)  # nothing cached: a second segment
    assert [s.total_size for s in a.snapshot()] == [2 * MIB, 2 * MIB]
    a.malloc(1 * MIB + 512)  # large pool: the small segments are never used for it
    assert layout(a)[-1] == ("large", [(1 * MIB + 512, True), (19 * MIB - 512, False)])


def test_max_split_size_keeps_oversize_blocks_whole():
    a = CachingAllocator(parse_alloc_conf("max_split_size_mb:32"))
    p40 = a.malloc(40 * MIB)
    a.free(p40)
    a.malloc(8 * MIB)
    # 8 MiB < 32 MiB may not take the cached 40 MiB (>= max_split_size): a new 20 MiB segment
    assert a.stats().reserved_bytes == 60 * MIB
    a.malloc(30 * MIB)  # still below the limit: a new 30 MiB segment
    assert a.stats().reserved_bytes == 90 * MIB
    a.malloc(36 * MIB)
    # >= 32 MiB and 40 < 36 + 20 (kLargeBuffer): takes the 40 MiB block whole (no split above the limit)
    assert a.stats().reserved_bytes == 90 * MIB
    assert a.stats().allocated_bytes == (40 + 8 + 30) * MIB  # the 20 MiB segment is split 8 + 12


def test_oversize_request_refuses_a_block_20mib_too_large():
    a = CachingAllocator(parse_alloc_conf("max_split_size_mb:32"))
    a.free(a.malloc(60 * MIB))
    a.malloc(40 * MIB)  # 60 >= 40 + 20: refused, a new 40 MiB segment
    assert a.stats().reserved_bytes == 100 * MIB


def test_out_of_memory_empties_the_cache_and_retries():
    a = CachingAllocator(capacity_bytes=40 * MIB)
    a.free(a.malloc(12 * MIB))  # a cached, unsplit 12 MiB segment
    a.malloc(30 * MIB)
    # no cached block >= 30 MiB; 12 + 30 > 40: cudaMalloc fails; max_split_size unset, so
    # release_available_cached_blocks does nothing; release_cached_blocks frees the 12 MiB segment;
    # the retry fits (30 <= 40) and counts as an alloc retry
    s = a.stats()
    assert (s.reserved_bytes, s.alloc_retries, s.device_frees, s.ooms) == (30 * MIB, 1, 1, 0)
    with pytest.raises(SimulatedOutOfMemory):
        a.malloc(20 * MIB)  # 30 + 20 > 40 and nothing cached to release
    assert a.stats().ooms == 1 and a.stats().alloc_retries == 2


def test_a_split_segment_is_not_released():
    a = CachingAllocator(capacity_bytes=40 * MIB)
    a.malloc(5 * MIB)  # 20 MiB segment: 5 MiB used + 15 MiB cached, split
    with pytest.raises(SimulatedOutOfMemory):
        a.malloc(24 * MIB)  # 20 + 24 > 40; the cached 15 MiB is part of a split segment: kept
    assert a.stats().reserved_bytes == 20 * MIB


def test_release_available_cached_blocks_frees_oversize_blocks_first():
    a = CachingAllocator(parse_alloc_conf("max_split_size_mb:32"), capacity_bytes=100 * MIB)
    a.free(a.malloc(40 * MIB))
    a.malloc(70 * MIB)
    # 40 + 70 > 100; no cached block >= 70 MiB: the oversize 40 MiB is released (40 < 70, so the call
    # reports failure), then release_cached_blocks (nothing left) and the counted retry succeeds
    s = a.stats()
    assert (s.reserved_bytes, s.device_frees, s.alloc_retries) == (70 * MIB, 1, 1)


def test_garbage_collection_frees_old_segments_before_cudamalloc():
    conf = parse_alloc_conf("garbage_collection_threshold:0.5")
    a = CachingAllocator(conf, capacity_bytes=100 * MIB, memory_fraction=1.0)
    pa, pb = a.malloc(24 * MIB), a.malloc(26 * MIB)  # get_free_block calls 1, 2
    a.free(pa)
    a.free(pb)  # both cached at call count 2
    a.free(a.malloc(40 * MIB))  # call 3: nothing fits; reserved 50 <= 0.5 x 100: no GC; 90 MiB reserved
    a.malloc(60 * MIB)
    # call 4: ages 24 MiB: 2, 26 MiB: 2, 40 MiB: 1; 90 > 50, so GC frees blocks at least as old as the
    # mean 5/3: the 24 and 26 MiB segments; then 40 + 60 <= 100 fits without a retry
    s = a.stats()
    assert (s.reserved_bytes, s.alloc_retries, s.device_frees) == (100 * MIB, 0, 2)
    b = CachingAllocator(capacity_bytes=100 * MIB)  # the same without GC: 90 + 60 > 100, cache emptied
    pa, pb = b.malloc(24 * MIB), b.malloc(26 * MIB)
    b.free(pa)
    b.free(pb)
    b.free(b.malloc(40 * MIB))
    b.malloc(60 * MIB)
    assert (b.stats().reserved_bytes, b.stats().alloc_retries) == (60 * MIB, 1)


def test_expandable_segments_grow_one_segment_in_20mib_pages():
    a = CachingAllocator(parse_alloc_conf("expandable_segments:True"))
    p1 = a.malloc(12 * MIB)
    # a new expandable segment for the large pool; 12 MiB maps one 20 MiB page; 8 MiB left (>= 512): split
    assert layout(a) == [("large", [(12 * MIB, True), (8 * MIB, False)])]
    p2 = a.malloc(12 * MIB)
    # nothing cached >= 12 MiB: the free 8 MiB plus the unmapped range after it offer room; one more
    # 20 MiB page is mapped and merged: a 28 MiB block, split 12 + 16. Still one contiguous segment.
    assert layout(a) == [("large", [(12 * MIB, True), (12 * MIB, True), (16 * MIB, False)])]
    assert (a.stats().reserved_bytes, a.stats().segments) == (40 * MIB, 1)
    a.free(p1)
    a.free(p2)
    a.empty_cache()  # every whole free page is unmapped; the empty segment is released
    assert (a.stats().reserved_bytes, a.snapshot()) == (0, ())


def test_expandable_small_pool_maps_2mib_pages():
    a = CachingAllocator(parse_alloc_conf("expandable_segments:True"))
    a.malloc(600 * KIB)
    assert layout(a) == [("small", [(614400, True), (2 * MIB - 614400, False)])]


def test_parse_alloc_conf():
    c = parse_alloc_conf("expandable_segments:True,max_split_size_mb:512, garbage_collection_threshold:0.6")
    assert c == AllocatorConfig(max_split_size=512 * MIB, garbage_collection_threshold=0.6, expandable_segments=True)
    assert parse_alloc_conf("") == AllocatorConfig() == parse_alloc_conf(None)
    for bad in ("max_split_size_mb:20", "garbage_collection_threshold:1.5", "nonsense:1", "expandable_segments",
                "roundup_power2_divisions:3", "backend:cudaMallocAsync"):
        with pytest.raises(LoraCostError):
            parse_alloc_conf(bad)


def test_replay_reports_peaks_retries_and_oom():
    events = [alloc("a", 12 * MIB), free("a"), alloc("b", 30 * MIB), alloc("c", 5 * MIB), free("c"), free("b")]
    r = replay(events, capacity_bytes=60 * MIB)
    # a: 12 MiB segment, cached; b: 30 MiB segment (42 <= 60); c: 5 MiB from a's 12 MiB block
    # (7 MiB left > 1 MiB: split); nothing released
    assert (r.reserved_peak_bytes, r.reserved_after_bytes, r.allocated_peak_bytes) == (42 * MIB, 42 * MIB, 35 * MIB)
    assert r.reserved_at_allocated_peak_bytes == 42 * MIB and r.fragmentation_at_peak_bytes == 7 * MIB
    assert (r.alloc_retries, r.out_of_memory) == (0, False)
    # capacity 45 MiB: a's cached 12 MiB + a new 40 MiB segment would need 52 MiB, so the cache is emptied
    # and the allocation retried: the sequence fits only thanks to that (an alloc retry)
    tight = replay([alloc("a", 12 * MIB), free("a"), alloc("b", 40 * MIB), free("b")], capacity_bytes=45 * MIB)
    assert (tight.alloc_retries, tight.out_of_memory, tight.reserved_peak_bytes) == (1, False, 40 * MIB)
    # with b alive, c (5 MiB) needs a 20 MiB segment: 40 + 20 > 45 -> out of memory, reported, not raised
    oom = replay([alloc("b", 40 * MIB), alloc("c", 5 * MIB)], capacity_bytes=45 * MIB)
    assert (oom.out_of_memory, oom.oom_request_bytes, oom.reserved_after_bytes) == (True, 20 * MIB, 40 * MIB)


def test_replay_rejects_a_free_without_its_allocation():
    assert replay([alloc("e", 0), free("e")]).reserved_peak_bytes == 0  # an empty tensor: nothing reserved
    with pytest.raises(KeyError):
        replay([free("never")])


def test_a_workspace_carved_from_a_cached_logits_block_costs_a_new_segment():
    """Why the order of one 32 MiB cuBLAS workspace moves reserved memory by a logits-sized segment:
    a 400 MiB request gets its own 400 MiB segment (>= 10 MiB: rounded to 2 MiB); freed, it is cached;
    a 32 MiB request then takes it (best fit) and splits it (368 MiB > 1 MiB remain, no
    max_split_size), so the next 400 MiB request finds no block and needs a second segment: 800 MiB.
    The workspace taken first gets a 32 MiB segment of its own and the logits block is reused: 432 MiB."""
    late = replay([alloc("logits", 400 * MIB), free("logits"), alloc("ws", 32 * MIB), alloc("logits2", 400 * MIB)])
    assert late.reserved_peak_bytes == 800 * MIB and late.stats.segments == 2
    early = replay([alloc("ws", 32 * MIB), alloc("logits", 400 * MIB), free("logits"), alloc("logits2", 400 * MIB)])
    assert early.reserved_peak_bytes == 432 * MIB and early.stats.segments == 2
