"""The analytic replay's fast paths give what the plain ones give (issue 11's speed line).

`compose.replay_run` hands each event to a `Replayer` as the run is composed instead of building the
list `run_events` returns and replaying it; `CachingAllocator.stats` counts segments without building
the snapshot. Both must be exact: same ReplayResult (every counter), same segment count.
"""

import random

import pytest

from lora_cost.analytic import reserved_events
from lora_cost.analytic.allocator import CachingAllocator, replay
from lora_cost.analytic.allocator.compose import run_events
from lora_cost.analytic.allocator.config import MIB, parse_alloc_conf
from lora_cost.analytic.estimator import estimate

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("model, kwargs", [
    ("gpt2", dict(method="lora", r=8, seq=256, batch=2)),
    ("gpt2", dict(method="full", seq=256, batch=2, grad_checkpointing=True, alloc_conf="expandable_segments:True")),
    ("llama-3.2-1b", dict(method="qlora", r=16, seq=512, optimizer="paged-adamw-8bit")),
    ("qwen3-0.6b", dict(method="dora", r=8, seq=512, alloc_conf="max_split_size_mb:64")),
    ("gemma-2-2b", dict(method="lora", r=8, seq=512, grad_checkpointing=True, optimizer="sgd",
                        alloc_conf="garbage_collection_threshold:0.6,max_split_size_mb:256")),
])
def test_streamed_replay_equals_replaying_the_list(monkeypatch, model, kwargs):
    calls = []
    streamed = reserved_events.replay_run

    def both(program, sizes, parts, config=None, steps=2):
        result = streamed(program, sizes, parts, config, steps=steps)
        calls.append((result, replay(run_events(program, sizes, parts, steps), config)))
        return result

    monkeypatch.setattr(reserved_events, "replay_run", both)
    reserved_events.events_reserved.cache_clear()
    estimate(model, reserved_model="replay", **kwargs)
    reserved_events.events_reserved.cache_clear()
    assert len(calls) == 1
    fused, listed = calls[0]
    assert fused == listed
    assert fused.events > 1000 and fused.reserved_peak_bytes > 0


@pytest.mark.parametrize("conf", [None, "expandable_segments:True", "max_split_size_mb:64"])
def test_segment_count_equals_the_snapshot(conf):
    rng = random.Random(11)
    allocator = CachingAllocator(parse_alloc_conf(conf))
    live = []
    for i in range(2000):
        if live and rng.random() < 0.45:
            allocator.free(live.pop(rng.randrange(len(live))))
        else:
            live.append(allocator.malloc(rng.choice([100, 5000, 600_000, 2 * MIB, 7 * MIB, 30 * MIB])))
        if i % 50 == 0:
            assert allocator.stats().segments == len(allocator.snapshot())
        if i % 700 == 0:
            allocator.empty_cache()
            assert allocator.stats().segments == len(allocator.snapshot())
