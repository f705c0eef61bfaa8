"""The profiler's segment record (profiler/segments.py) on a fake memory_snapshot(), compared per kind
with the allocator model driven by the same requests (segments follow from CUDACachingAllocator.cpp)."""

from __future__ import annotations

import pytest

from lora_cost.analytic.allocator import CachingAllocator
from lora_cost.errors import LoraCostError
from lora_cost.profiler.segments import alloc_conf_from_env, compare, kind_of, summarise

pytestmark = pytest.mark.fast
MIB = 1 << 20


def _fake_snapshot():
    """What torch.cuda.memory_snapshot() returns after: 4 KiB (small pool: one 2 MiB segment),
    5 MiB (a 20 MiB large buffer), 64 MiB (its own 64 MiB segment), with the 5 MiB block freed."""
    return [
        {"device": 0, "address": 1 << 30, "total_size": 2 * MIB, "allocated_size": 4096, "segment_type": "small",
         "is_expandable": False, "blocks": [{"size": 4096, "state": "active_allocated"},
                                            {"size": 2 * MIB - 4096, "state": "inactive"}]},
        {"device": 0, "address": 2 << 30, "total_size": 20 * MIB, "allocated_size": 0, "segment_type": "large",
         "is_expandable": False, "blocks": [{"size": 20 * MIB, "state": "inactive"}]},
        {"device": 0, "address": 3 << 30, "total_size": 64 * MIB, "allocated_size": 64 * MIB, "segment_type": "large",
         "is_expandable": False, "blocks": [{"size": 64 * MIB, "state": "active_allocated"}]},
    ]


def test_kinds_follow_the_allocation_size_rule():
    assert kind_of("small", 2 * MIB, False) == "small"
    assert kind_of("large", 20 * MIB, False) == "large-buffer"
    assert kind_of("large", 22 * MIB, False) == "large-sized"
    assert kind_of("large", 40 * MIB, True) == "expandable"


def test_simulation_matches_the_fake_snapshot_per_kind():
    real = summarise(_fake_snapshot())
    a = CachingAllocator()
    a.malloc(4096)
    mid = a.malloc(5 * MIB)
    a.malloc(64 * MIB)
    a.free(mid)
    sim = summarise(a.snapshot())
    assert [(k.kind, k.segments, k.total_bytes, k.allocated_bytes) for k in sim] == \
        [("small", 1, 2 * MIB, 4096), ("large-buffer", 1, 20 * MIB, 0), ("large-sized", 1, 64 * MIB, 64 * MIB)]
    assert all(d.bytes_difference == 0 and d.simulated_segments == d.real_segments for d in compare(sim, real))


def test_a_missing_segment_shows_in_its_kind():
    real = summarise(_fake_snapshot())
    a = CachingAllocator()
    a.malloc(4096)
    diff = {d.kind: d for d in compare(summarise(a.snapshot()), real)}
    assert diff["large-sized"].bytes_difference == -64 * MIB and diff["small"].bytes_difference == 0


def test_alloc_conf_is_read_from_the_environment():
    conf = alloc_conf_from_env({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True,max_split_size_mb:128"})
    assert conf.expandable_segments and conf.max_split_size == 128 * MIB
    assert alloc_conf_from_env({}).max_split_size is None
    with pytest.raises(LoraCostError):
        alloc_conf_from_env({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:10"})  # must exceed 20 MiB


def test_a_step_with_segments_reads_back():
    import json
    from dataclasses import asdict

    from lora_cost.profiler.results import StepMeasurement, _build
    step = StepMeasurement(index=1, micro_batches=1, forward_calls=1, backward_calls=1, wall_s=0.1, peak_bytes=1,
                           peak_reserved_bytes=2 * MIB, saved_activation_bytes=0, instrumentation_s=0.0, phases=(),
                           boundaries=(), segments=summarise(_fake_snapshot()))
    assert _build(StepMeasurement, json.loads(json.dumps(asdict(step)))) == step  # as a saved profile holds it
