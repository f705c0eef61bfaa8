"""The trace engine's allocation sequence and its replay through the allocator model.

`step_events` is checked on a hand-made simulator record (the sequence follows from the rules in
lora_cost/trace/replay.py: setup storages first, the optimizer state inside the first optimizer
step, the step repeated with its own keys). On a real (tiny) trace, the replay's allocated counter
must reproduce the trace's own allocated peak exactly: every request there is <= 1 MiB, so the small
pool splits blocks down to the 512-byte rounding the trace applies, and the replay allocates what
the trace counted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_cost.trace.replay import step_events  # noqa: E402

MIB = 1 << 20


class FakeBlock:
    def __init__(self, name, raw, alloc, free=None, kind=None):
        self.name, self.raw, self.size, self.alloc, self.free, self.kind = name, raw, raw, alloc, free, kind


class FakeSim:
    """What step_events reads from an AllocatorSim: blocks with event numbers, and the phase marks."""

    def __init__(self, blocks, marks, event):
        self.blocks, self.marks, self.event = blocks, marks, event


def _named(sim, events):
    names = {id(b): b.name for b in sim.blocks}
    return [(key[0], names[key[1]], "free" if n is None else n) for key, n in events]


@pytest.mark.fast
def test_plain_trace_replays_the_step_twice_with_the_state_created_in_the_first_optimizer_step():
    w = FakeBlock("w", 100, 1, kind="weights")
    m = FakeBlock("m", 100, 2, kind="optimizer_state")
    act = FakeBlock("act", 50, 3, 5)  # forward activation, freed in backward
    grad = FakeBlock("grad", 100, 4, 7)  # gradient, freed by zero_grad in the optimizer phase
    tmp = FakeBlock("tmp", 10, 6, 6 + 0)  # an optimizer temporary: allocated and freed...
    tmp.free = 8
    sim = FakeSim([w, m, act, grad, tmp], [("forward", 2), ("backward", 4), ("optimizer", 5), ("end", 8)], 8)
    events = _named(sim, step_events(sim, steps=2))
    assert events == [
        ("setup", "w", 100),
        (0, "act", 50), (0, "grad", 100), (0, "act", "free"),
        ("setup", "m", 100),  # created lazily by the first optimizer.step()
        (0, "tmp", 10), (0, "grad", "free"), (0, "tmp", "free"),
        (1, "act", 50), (1, "grad", 100), (1, "act", "free"), (1, "tmp", 10), (1, "grad", "free"), (1, "tmp", "free"),
    ]


@pytest.mark.fast
def test_calibration_trace_is_replayed_once_with_the_state_in_the_first_warmup():
    w = FakeBlock("w", 100, 1)
    m = FakeBlock("m", 100, 2, kind="optimizer_state")
    a1 = FakeBlock("a1", 50, 3, 4)  # warm-up activation
    a2 = FakeBlock("a2", 50, 6, 7)  # measured-step activation
    marks = [("warmup", 2), ("warmup_optimizer", 4), ("forward", 5), ("optimizer", 7)]
    sim = FakeSim([w, m, a1, a2], marks, 7)
    events = _named(sim, step_events(sim, steps=2))
    assert events == [("setup", "w", 100), (0, "a1", 50), (0, "a1", "free"), ("setup", "m", 100),
                      (0, "a2", 50), (0, "a2", "free")]


LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 256,
         "tie_word_embeddings": False}


@pytest.fixture()
def llama(config_file) -> str:
    return config_file(LLAMA, "llama")


@pytest.mark.parametrize("calibration", [False, True])
def test_replay_reproduces_the_traced_allocated_peak(llama, calibration):
    pytest.importorskip("torch")
    from lora_cost.trace import trace

    t = trace(llama, "lora", r=4, batch=2, seq=32, precision="fp32", calibration=calibration)
    # every storage here is <= 1 MiB (the largest, the logits, is 2 x 32 x 256 x 4 B = 64 KiB): small-pool
    # segments of 2 MiB only, and since they are split down to 512 B, no more of them than the peak needs;
    # plus the two 32 MiB cuBLAS workspaces (forward and backward thread), each its own large segment
    workspaces = 2 * 32 * MIB
    assert t.reserved_peak_bytes % (2 * MIB) == 0
    assert t.peak_bytes + workspaces <= t.reserved_peak_bytes < t.peak_bytes + workspaces + 4 * MIB
    assert t.reserved_after_step_bytes == t.reserved_peak_bytes  # nothing is ever released (no OOM)
    assert t.allocator_retries == 0


def test_replayed_allocated_peak_equals_the_trace(llama):
    pytest.importorskip("torch")
    import warnings

    import transformers

    from lora_cost.analytic.allocator import replay
    from lora_cost.trace.build import build, raw_config
    from lora_cost.trace.engine import plan
    from lora_cost.trace.replay import step_events
    from lora_cost.trace.step import run_step

    spec, run, m, names = plan(llama, "lora", r=4, batch=2, seq=32, precision="fp32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        built = build(spec, raw_config(llama), run, m, names)
        rec, _ = run_step(built.model, run, run.optimizer, spec.vocab)
    traced_peak = max(p[0] for phase, p in rec.sim.peaks.items() if phase in ("forward", "backward", "optimizer"))
    result = replay(step_events(rec.sim, steps=2))
    assert result.allocated_peak_bytes == traced_peak


class OpBlock(FakeBlock):
    def __init__(self, name, raw, alloc, free=None, kind=None, op="add"):
        super().__init__(name, raw, alloc, free, kind)
        self.op = op


@pytest.mark.fast
def test_cublas_workspaces_follow_the_first_matmul_of_each_thread():
    """CublasHandlePool.cpp: one workspace per (handle, stream), handles per thread: the first cuBLAS
    op of the forward (Python thread) and of the backward (autograd's device thread) each allocate
    one, kept for the process's life; later matmuls reuse them."""
    w = OpBlock("w", 100, 1, kind="weights")
    x = OpBlock("x", 10, 2, 9, op="embedding")
    h = OpBlock("h", 10, 3, 8, op="mm")  # forward matmul: the Python thread's workspace after it
    h2 = OpBlock("h2", 10, 4, 7, op="addmm")  # a second forward matmul: no new workspace
    g = OpBlock("g", 10, 6, 9, op="mm")  # backward matmul: autograd thread's workspace
    marks = [("forward", 1), ("backward", 5), ("optimizer", 9)]
    sim = FakeSim([w, x, h, h2, g], marks, 9)
    events = step_events(sim, steps=2, workspace=64)
    ws = [(i, key) for i, (key, n) in enumerate(events) if key[0] == "cublas_workspace"]
    names = {id(b): b.name for b in sim.blocks}
    before = [names[events[i - 1][0][1]] for i, _ in ws]
    assert before == ["h", "g"]  # right after the first forward and the first backward matmul output
    assert all(events[i][1] == 64 for i, _ in ws)
    assert not any(key[0] == "cublas_workspace" and n is None for key, n in events)  # never freed
    assert sum(1 for key, _ in events if key[0] == "cublas_workspace") == 2  # the second step reuses them
    per_call = step_events(sim, steps=2, workspace=64, workspace_mode="per_call")
    assert sum(1 for key, n in per_call if key[0] == "cublas_call" and n == 64) == 3 * 2  # 3 matmuls, 2 steps


@pytest.mark.fast
def test_cublas_workspaces_before_the_step_take_segments_of_their_own():
    """workspace_mode="before" (the engine's default, replay.py docstring): one workspace per cuBLAS
    thread (CUBLAS_THREADS = 2), allocated ahead of the weights and never freed. By hand
    (CUDACachingAllocator.cpp): 64 B requests -> the small pool's 2 MiB segment, shared; a 32 MiB
    workspace (>= kMinLargeAlloc) gets a 32 MiB segment, remaining 0: not split, so nothing of the
    step can land in it."""
    w = OpBlock("w", 100, 1, kind="weights")
    h = OpBlock("h", 10, 2, 5, op="mm")
    g = OpBlock("g", 10, 4, 6, op="mm")
    sim = FakeSim([w, h, g], [("forward", 1), ("backward", 3), ("optimizer", 6)], 6)
    events = step_events(sim, steps=2, workspace=64, workspace_mode="before")
    assert events[:2] == [(("cublas_workspace", 0), 64), (("cublas_workspace", 1), 64)]
    assert sum(1 for key, _ in events if key[0] == "cublas_workspace") == 2  # not again after a matmul
    assert not any(key[0] == "cublas_workspace" and n is None for key, n in events)  # never freed
    big = step_events(sim, steps=2, workspace=32 * MIB, workspace_mode="before")
    from lora_cost.analytic.allocator import replay

    result = replay(big)
    assert result.stats.segments == 3  # two 32 MiB workspace segments + one 2 MiB small segment
    assert result.reserved_peak_bytes == 2 * 32 * MIB + 2 * MIB
    with pytest.raises(ValueError):
        step_events(sim, steps=2, workspace=64, workspace_mode="eager")


@pytest.mark.fast
def test_allocated_at_marks_counts_a_block_handed_out_whole():
    """allocated_at_marks reads memory_allocated() as the real counter does. By hand
    (CUDACachingAllocator.cpp): a 19.5 MiB request is >= kMinLargeAlloc, so its segment is the
    request rounded up to 2 MiB, 20 MiB; 0.5 MiB would remain, not > kSmallSize (1 MiB), so the
    block is not split and the whole 20 MiB counts as allocated after the forward; the 100 B weight
    counts 512 B (round_size). The first step's blocks are freed: only the measured step counts."""
    from lora_cost.trace.replay import allocated_at_marks

    w = FakeBlock("w", 100, 1, kind="weights")
    act = FakeBlock("act", 19 * MIB + MIB // 2, 2, 4)  # a forward activation freed in the backward
    sim = FakeSim([w, act], [("forward", 1), ("backward", 3), ("optimizer", 5), ("end", 7)], 7)
    at = allocated_at_marks(sim, steps=2)
    assert at == {"forward": 512, "backward": 512 + 20 * MIB, "optimizer": 512, "end": 512}


def test_alloc_conf_reaches_the_replay(llama):
    """expandable_segments:True: the two 32 MiB workspaces share the large pool's one segment, mapped in
    20 MiB pages (64 MiB -> 4 pages, 80 MiB), the rest in 2 MiB small-pool pages."""
    pytest.importorskip("torch")
    from lora_cost.trace import trace

    t = trace(llama, "lora", r=4, batch=2, seq=32, precision="fp32", alloc_conf="expandable_segments:True")
    assert t.device.reserved_model == "allocator replay" and "expandable_segments:True" in " ".join(t.notes)
    small = t.reserved_peak_bytes - 80 * MIB
    assert small % (2 * MIB) == 0 and t.peak_bytes <= small + 80 * MIB < t.peak_bytes + 64 * MIB + 20 * MIB


def test_replay_against_a_small_gpu_reports_running_out(llama, monkeypatch):
    """With --gpu the replay is bounded by the GPU's memory less its CUDA context: a T4 holds this tiny
    step; a made-up GPU leaving 8 MiB beside its context (the largest H100 figure, 772.8 MiB, for a GPU
    without a measurement) cannot hold one 32 MiB sm90 workspace: the trace warns, and its numbers are
    the unbounded replay's."""
    pytest.importorskip("torch")
    from lora_cost import profiles
    from lora_cost.trace import trace

    fine = trace(llama, "lora", r=4, batch=2, seq=32, precision="fp32", gpu="t4-16gb")
    assert not fine.warnings and fine.device.reserved_bytes == fine.reserved_peak_bytes
    tinier = profiles.GpuProfile("tinier", "made up", 810_352_640 + 8 * MIB, 1.0, 1.0, "test", (9, 0))
    monkeypatch.setattr(profiles, "load_gpu", lambda name: tinier)
    t = trace(llama, "lora", r=4, batch=2, seq=32, precision="fp32", gpu="tinier")
    assert any("runs out of memory" in w for w in t.warnings)
    assert t.device_bytes > tinier.memory_bytes
