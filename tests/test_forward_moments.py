"""The forward's tracked moments (task "ligeracc"): the tape counts, op by op, what the forward holds (analytic/tape.py
forward_live, recompute_live; peaks.py), and a LoRA layer's input gradient is its two paths' summed (tape.gradient_summed).

Hand arithmetic on the tape (torch-free), then the issue-9 grid's rows that these moments decide, against the trace
engine (real transformers + peft on fake tensors; its peaks are the allocator's, 512-byte rounded, so the tolerance).
Measured on the 300 rows of tests/test_grid_issue9.py: peak median 0.64% -> 0.21%, worst 7.91% -> 2.45%.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_cost.analytic.tape import Tape  # noqa: E402


@pytest.mark.fast
def test_forward_live_by_hand():
    tape = Tape(tokens=1)
    tape.scope = "layer0"
    x = tape.new(10, "fp32", True)  # 40 B held by Python
    y = tape.new(5, "fp32", True)  # 20 B more: 60 alive
    tape.save(y, "k")  # 20 B saved, 40 held: still 60
    del x  # x dies: the moment before it (60) is recorded; 0 held, 20 saved
    z = tape.new(4, "fp32", True)  # 20 saved + 16 held = 36 (pending)
    tape.transient(100)  # an op's buffer with them: 20 + 16 + 100 = 136 (the pending 36 is below it)
    tape.flush_live()
    assert tape.forward_live["layer0"] == [60, 136]
    del y, z


@pytest.mark.fast
def test_checkpointed_block_and_its_recomputation_by_hand():
    tape = Tape(tokens=1)
    tape.checkpointed_scopes = frozenset({"layer0"})
    tape.scope = "embeddings"
    x = tape.new(8, "fp32", True)  # 32 B: the block's input
    tape.scope = "layer0"
    tape.hold(x)  # the checkpoint keeps it (counted with the checkpoint's saves, peaks.py): not held by Python
    tape.save(x, "norm inputs")  # saved again inside the block: one storage, not counted twice
    h = tape.new(16, "fp32", True)  # 64 B held
    tape.save(h, "k")  # dropped by the checkpoint in the forward; kept (stashed) in the recomputation
    del h  # the forward frees it: moment 64 (forward), 64 (recomputation)
    o = tape.new(2, "fp32", True)  # forward: 8 held; recomputation: 64 kept + 8 held = 72
    tape.flush_live()
    assert tape.forward_live["layer0"] == [64, 8]
    assert tape.recompute_live["layer0"] == [64, 72]
    del x, o


@pytest.mark.fast
def test_untracked_tape_records_nothing():
    tape = Tape(tokens=1, track_live=False)
    tape.scope = "layer0"
    a = tape.new(10, "fp32", True)
    tape.transient(40)
    tape.flush_live()
    assert not tape.forward_live and not tape.recompute_live
    del a


# rows of the issue-9 grid each decided by one of the new moments (before -> after, trace vs analytic peak):
ROWS = {
    # inside a block, every tensor alive (Liger's SwiGLU output, the MLP input): +2.79% -> +0.13%
    "llama-lora-fa-flex-adamw-torch-liger-bf16-liger": 0.01,
    # Phi-3's fused gate_up output alive to the MLP's return, gemm_4bit's dequantised weight with its output
    "phi3-qlora-sdpa-adafactor-liger-bf16-adbf16-liger": 0.01,
    # the LoRA down_proj's input gradient: two paths and their sum of Liger's SwiGLU output: +7.91% -> -0.72%
    "llama-qlora-flash-attention-2-adamw-bnb-8bit-liger-bf16-ckpt-adbf16-liger": 0.015,
    # checkpointing's recomputation with what Python holds: +2.56% -> +0.67%
    "qwen2-lora-fa-flex-adamw-bnb-8bit-liger-bf16-ckpt-adbf16": 0.015,
    # the chunked loss with the final hidden states held: +4.39% -> +0.28%
    "qwen2-qlora-flex-paged-adamw-32bit-chunked:4-bf16-ckpt": 0.01,
}


@pytest.mark.parametrize("row", sorted(ROWS))
def test_rows_the_tracked_moments_decide(row):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import test_grid_issue9 as grid

    case = next(c for c in grid.CASES + grid.LIGER_CASES if grid.name(c) == row)
    a, t = grid.compare(case)["peak_bytes"]
    assert abs(t - a) <= ROWS[row] * t, f"{row}: analytic {a} vs trace {t} ({(t - a) / a:+.2%})"
