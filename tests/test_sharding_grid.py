"""Trace (rank 0 of N: real FSDP2 fully_shard / DDP on fake tensors under the fake process group) vs the
analytic per-rank model, on a grid of sharded configurations: strategies x world sizes x methods x
checkpointing x families. The test runs a bounded subset; as a script it runs the whole grid and prints
the per-rank peak's median and worst disagreement:
    python tests/test_sharding_grid.py                  # the whole grid (180 configurations)
    python tests/test_sharding_grid.py llama,ddp gpt2   # filters

Measured (torch 2.13, transformers 5.24, peft 0.21.2): 180 configurations, per-rank peak |analytic - trace| / trace
median 0.17%, worst 6.62% (gpt2, fsdp, 8 ranks, LoRA, checkpointing); by strategy median/worst: fsdp 0.27/6.62%,
fsdp-grad-op 0.22/5.80%, ddp 0.03/5.75%; without checkpointing 0.06/4.53%, with 0.88/6.62%. The four rows above 6%
are gpt2 + FSDP + LoRA/DoRA + checkpointing (8 and 16 ranks), where the one-GPU model's block moment (its
activation-gradient buffers and recomputed block, tests/test_trace_grid.py) lands on the moment the unit's gathered
parameters and the prefetch are alive; at 64 ranks the trace's 512-byte rounding of many tiny shards (not in the
analytic shard bytes, which are the storages' exact sizes) adds about 80 KB.

Task "sharding2" added LoRA-FA, (IA)3 and VeRA (180 more configurations; the 180 above do not move): median 0.17%,
worst 6.71% (gpt2, fsdp, 64 ranks, (IA)3, checkpointing, under); by method lora-fa 0.16/1.15%, ia3 0.15/6.71%, vera
0.19/2.28%; without checkpointing 0.05/0.22%, with 0.71/6.71%. All 360: median 0.17%, worst 6.71%, 5 rows above 6%,
all gpt2 + fsdp + checkpointing. Their cause, read moment by moment with `python tests/sharding_moments.py gpt2 fsdp 8
lora 1` (the analytic candidates beside the trace's backward allocator timeline): the gathered terms agree exactly
(root 1,491,968 + the block's unit 1,710,592 + the next unit's all-gather buffer 1,710,592 in both engines); the
difference is the one-GPU model of a checkpointed block's backward (analytic/peaks.py `in_block` and `recompute`),
which becomes the peak once the weights are sharded. LoRA: `in_block` adds the whole recomputed block (4,890,624)
and 2 x the widest activation's gradient (2 x 1,048,576, the fp32 input copy of mlp.c_proj) to the residual
gradients, but when that gradient is made the trace holds 4,553,728 recomputed (the ops after it have freed their
saves) and one 1,048,576 fp32 gradient plus its 524,288 bf16 cast: the analytic is 1.17 MB over; the trace's own
peak is the end of the recomputation (14,336,000: 262,144-byte LoRA branch outputs in flight, not saved), which the
`recompute` moment misses by 1.41 MB. (IA)3: the feed-forward scaling's fp32 gradients outnumber the 2 x widest
assumed, 1.5 MB under. On one GPU these moments are hidden below the loss's; a fix needs the order of saves inside
a block in the record (which saves the backward has freed when the widest gradient exists), left open: it moves
one-GPU golden rows whose peak is a block moment (the checkpointed 7B calibration rows fixed the factor 2).

Task "fsdpqlora" added QLoRA (60 more configurations, `--quant-storage bf16`; the 360 above do not move): the
stand-in's packed Params4bit [n / 4, 1] in bf16 sharded by the real fully_shard, its quantisation state whole on
the rank: median 0.20%, worst 1.26% (gpt2, fsdp, 64 ranks, checkpointing, under); by strategy fsdp 0.20/1.26%,
fsdp-grad-op 0.18/0.67%, ddp 0.21/0.41%; without checkpointing 0.08/0.23%, with 0.41/1.26%. "qlora-recipe" (60):
median 0.40%, worst 1.54% (gpt2, fsdp, 64 ranks, checkpointing, under); under fsdp 0.37/1.54%, without checkpointing
0.17/0.33%. "qlora-uint8" (60; FSDP leaves the packed weights whole): median 0.17%, worst 1.21% (gpt2, fsdp, 64,
checkpointing); without checkpointing 0.08/0.18%. All 180 QLoRA rows: median 0.25%, worst 1.54%. The checkpointed
rows' larger gaps are the one-GPU block moment described above.

Task "moments" (in-block gradients formed so far, the recomputation at each end of a repeated block): with today's
trace, median 0.15%, worst 6.89% before and after (no row worse by more than 0.3 points, 15 better); the two rows
above 6% are llama + fsdp + 64 ranks + DoRA + checkpointing (6.89% low: the recomputation of DoRA's last linear
holds its eye(d_in) and four [d_in, d_out] weight-norm products, beyond the one transient modelled) and gpt2 + fsdp +
2 ranks + full fine-tuning + checkpointing (6.27% low; its one-GPU moment agrees within 0.4%, so the gap is in the
FSDP terms at gelu_new's backward).

The FSDP terms of those rows, fixed from torch's _fsdp_param_group.py (post_backward): the unit above's
reduce-scatter input stays alive through this unit's backward (reduce_scatter_max_input_buffers = 1 retained
ReduceScatterState, reclaimed before the next is appended), and the unit's unsharded gradients at an in-block
moment are only those formed so far (the one-GPU rule of peaks.in_block). All 540 configurations: median 0.16%,
worst 4.84% (gpt2 + fsdp + 2 ranks + full fine-tuning + checkpointing, low); the 360 above 0.15% / 4.84%, the 180
QLoRA 0.17% / 1.54%; no row over 6%.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TINY = {
    "llama": {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 3072, "max_position_embeddings": 512,
              "tie_word_embeddings": False},
    "gpt2": {"model_type": "gpt2", "n_embd": 256, "n_layer": 4, "n_head": 4, "vocab_size": 2400, "n_positions": 512},
}
STRATEGIES = ("fsdp", "fsdp-grad-op", "ddp")
WORLDS = (2, 3, 8, 16, 64)
METHODS = ("full", "lora", "dora", "lora-fa", "ia3", "vera",  # task "sharding2": + LoRA-FA, (IA)3, VeRA
           "qlora", "qlora-recipe", "qlora-uint8")  # task "fsdpqlora": the 4-bit stand-in, --quant-storage bf16
# (pair()); the grid label "qlora-recipe" is QLoRA as TRL's FSDP-QLoRA path runs it (--no-kbit-prepare --adapter-dtype
# bf16), "qlora-uint8" the default uint8 storage (under FSDP: fully_shard's ignored_params, as accelerate passes them)
CKPT = (False, True)
BATCH, SEQ = 2, 128


def grid():
    return list(itertools.product(TINY, STRATEGIES, WORLDS, METHODS, CKPT))


def pair(tmp: Path, family, strategy, world, method, ckpt) -> tuple[int, int]:
    """(analytic, trace) per-rank peak bytes."""
    from lora_cost import estimate
    from lora_cost.analytic.sharding import ShardingSpec
    from lora_cost.trace import trace

    path = tmp / f"{family}.json"
    if not path.exists():
        path.write_text(json.dumps(TINY[family]))
    kw = dict(batch=BATCH, seq=SEQ, grad_checkpointing=ckpt)
    if method not in ("full", "ia3"):  # (IA)3: peft's per-family default targets and feedforward modules
        kw["targets"] = "all-linear"
    if method.startswith("qlora"):  # task "fsdpqlora": FSDP2 shards the packed 4-bit weights stored in bf16
        kw["method_options"] = {"quant_storage": "uint8" if method == "qlora-uint8" else "bf16"}
        if method == "qlora-recipe":
            kw["adapter_dtype"] = "bf16"
            kw["method_options"]["kbit_prepare"] = False
        method = "qlora"
    e = estimate(str(path), method, gpus=world, sharding=strategy, **kw)
    t = trace(str(path), method, sharding=ShardingSpec(strategy, world), **kw)
    return e.memory.peak_bytes, t.peak_bytes


SUBSET = [("llama", "fsdp", 3, "lora", True), ("llama", "ddp", 4, "full", True),
          ("llama", "fsdp", 3, "qlora", True)]  # task "fsdpqlora"


@pytest.mark.parametrize("config", SUBSET, ids=lambda c: "-".join(map(str, c)))
def test_sharded_peak_agrees(tmp_path, config):
    pytest.importorskip("torch")
    a, t = pair(tmp_path, *config)
    assert abs(t - a) <= 0.06 * t, f"per-rank peak: analytic {a} vs trace {t}"


if __name__ == "__main__":
    import tempfile
    tmp = Path(tempfile.mkdtemp())
    rows, t0 = [], time.time()
    # filters: each argument a comma-separated group of values a configuration must all hold
    # ("llama,ddp gpt2": llama under DDP, and every gpt2 configuration)
    groups = [set(a.split(",")) for a in sys.argv[1:]]
    for config in grid():
        if groups and not any(g <= set(map(str, config)) for g in groups):
            continue
        try:
            a, t = pair(tmp, *config)
        except Exception as exc:  # report, keep going
            print("ERROR", config, type(exc).__name__, str(exc)[:200], flush=True)
            continue
        rel = (a - t) / t
        rows.append((abs(rel), config))
        print(f"{'-'.join(map(str, config)):40s} analytic {a:>12,} trace {t:>12,} {100 * rel:+6.2f}%", flush=True)
    errs = [r for r, _ in rows]
    print(f"configurations: {len(rows)} in {time.time() - t0:.0f} s; median |rel| {100 * statistics.median(errs):.2f}%, "
          f"worst {100 * max(errs):.2f}% ({max(rows)[1]})")
