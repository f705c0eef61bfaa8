"""`lora-cost estimate --gpus N --engine trace|both` (task "sharding2"): rank 0 of N traced under torch's fake
process group (lora_cost/trace/sharded.py) from the CLI, its JSON carrying `inputs.gpus`/`sharding`, and the
one-line refusals of what the trace cannot run (DeepSpeed ZeRO, HSDP, FSDP's CPU offload and mixed precision)."""

import json

import pytest
from click.testing import CliRunner

from lora_cost.cli import main

LLAMA = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 256,
         "tie_word_embeddings": False}


def _model(tmp_path) -> str:
    path = tmp_path / "llama.json"
    path.write_text(json.dumps(LLAMA))
    return str(path)


@pytest.mark.fast
@pytest.mark.parametrize("flags, says", [
    (["--sharding", "zero3"], "--sharding zero3 is analytic only (DeepSpeed cannot run on fake tensors)"),
    (["--sharding", "zero1"], "--sharding zero1 is analytic only"),
    (["--sharding", "hsdp", "--nodes", "2"], "--sharding hsdp is analytic only"),
    (["--sharding", "fsdp", "--cpu-offload"], "without --cpu-offload"),
    (["--sharding", "fsdp", "--fsdp-param-dtype", "bf16"], "--fsdp-param-dtype"),
])
@pytest.mark.parametrize("engine", ["trace", "both"])
def test_trace_refuses_what_it_cannot_run(tmp_path, flags, says, engine):
    result = CliRunner().invoke(main, ["estimate", "--model", _model(tmp_path), "--gpus", "4", "--engine", engine, *flags])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.output


def test_trace_with_gpus_is_rank_0_of_n(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    args = ["estimate", "--model", _model(tmp_path), "--method", "lora", "--targets", "all-linear", "--seq", "64",
            "--gpus", "4", "--sharding", "fsdp", "--engine", "both", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["trace"]["inputs"]["gpus"] == 4 and doc["trace"]["inputs"]["sharding"] == "fsdp"
    assert doc["analytic"]["inputs"]["gpus"] == 4
    a, t = doc["analytic"]["memory"]["peak_bytes"], doc["trace"]["memory"]["peak_bytes"]
    assert abs(a - t) <= 0.06 * t, (a, t)  # the grid's bound (tests/test_sharding_grid.py)
    # steady_bytes is the rank's too (its shards and optimizer state), not one GPU's whole model; the trace's is
    # what its simulated allocator holds when the step starts, each storage rounded up to 512 bytes: at most 512 B
    # more per storage, here 49 parameter shards (21 base + 28 LoRA) and 56 AdamW moments of the 28 LoRA shards
    a, t = doc["analytic"]["memory"]["steady_bytes"], doc["trace"]["memory"]["steady_bytes"]
    assert 0 <= t - a <= 512 * (49 + 56), (a, t)
    # the rank's own LoRA shards: every adapter matrix split on dim 0 over 4 ranks, so a quarter of one GPU's
    one = json.loads(CliRunner().invoke(main, args[:-7] + ["--engine", "analytic", "--json"]).output)
    per_rank = doc["trace"]["memory"]["components"]["trainable_weights"]
    assert per_rank < one["memory"]["components"]["trainable_weights"] / 3
