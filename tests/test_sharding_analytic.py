"""The per-rank analytic model (lora_cost/analytic/sharding): hand arithmetic of each library's padding,
DeepSpeed's own model-state estimators, the JSON contract and bad input (torch-free)."""

import json

import pytest
from click.testing import CliRunner

from lora_cost import estimate
from lora_cost.analytic.sharding.rank import fsdp_shard_numel, zero12_partition_numel, zero3_partition_numel
from lora_cost.analytic.sharding.tensors import ShardTensor
from lora_cost.cli import main

pytestmark = pytest.mark.fast


def test_fsdp2_pads_dim0_to_the_world():
    # GPT-2's wte [50257, 768] over 8 ranks: torch.chunk gives ceil(50257 / 8) = 6283 rows to rank 0
    wte = ShardTensor("wte", 50257, 50257 * 768, 1, "bf16", True, "root")
    assert fsdp_shard_numel(wte, 8) == 6283 * 768
    # a 1-D norm of 64 over 5 ranks: 13 elements each (5 x 13 = 65, one padding element)
    assert fsdp_shard_numel(ShardTensor("ln", 64, 64, 1, "fp32", True, "layer"), 5) == 13


def test_zero_partitions():
    # ZeRO-1/2: the flat group padded to 2 x W: 1001 elements over 4 ranks -> 1008 / 4 = 252
    assert zero12_partition_numel(1001, 4) == 252
    # ZeRO-3: each parameter padded to W: 1001 over 4 -> 251
    assert zero3_partition_numel(1001, 4) == 251


def _states(e):
    """Model states of the busiest rank: the optimizer phase's steady terms and the step's fp32 gradient."""
    t = {x.name: x.value for x in e.memory.phases[-1].terms}
    return sum(t.get(k, 0) for k in ("weights", "trainable_weights", "gradients", "optimizer_state",
                                       "optimizer_temporaries"))


# DeepSpeed 0.19.8's estimators, vendored (deepspeed/runtime/zero/stage_1_and_2.py
# estimate_zero2_model_states_mem_needs, stage3.py estimate_zero3_model_states_mem_needs), no offload:
def ds_zero2_gpu(P, gpus_per_node, nodes):
    return 2 * P + int(18 * P / (gpus_per_node * nodes))


def ds_zero3_gpu(P, largest_layer, gpus_per_node, nodes):
    return 4 * largest_layer + int(18 * P / (gpus_per_node * nodes))


@pytest.mark.parametrize("gpus", [2, 8, 64])
def test_zero2_model_states_equal_deepspeeds_estimator(gpus):
    e = estimate("llama-3.1-8b", "full", gpus=gpus, sharding="zero2")
    P = e.total_params  # 8,030,261,248 = 2^12 x 1,960,513: the 2 x W alignment adds nothing
    assert _states(e) == ds_zero2_gpu(P, gpus, 1)


@pytest.mark.parametrize("gpus", [2, 8])
def test_zero3_model_states_equal_deepspeeds_estimator(gpus):
    # DeepSpeed's estimator partitions every parameter (no persistence): threshold 0 here. Its 18 x P / W
    # counts the 16-bit params, fp32 master, fp32 gradient and both Adam states; our gradients term adds
    # the 16-bit gradient partition (2 x P / W), which its comment lists for stage 2 only.
    e = estimate("llama-3.1-8b", "full", gpus=gpus, sharding="zero3",
                 sharding_options={"param_persistence_threshold": 0})
    P = e.total_params
    ds = ds_zero3_gpu(P, 0, gpus, 1)
    assert _states(e) - 2 * P // gpus == ds


def test_ddp_keeps_buckets_of_the_trainable_only():
    one = estimate("llama-3.1-8b", "lora", r=16)
    e = estimate("llama-3.1-8b", "lora", r=16, gpus=4, sharding="ddp")
    peak = {t.name: t.value for t in e.memory.components}
    trainable = next(t.value for t in one.memory.terms if t.name == "trainable weights")
    assert peak["gradient_buckets"] == trainable  # frozen base weights are never bucketed
    assert e.memory.peak_bytes == one.memory.peak_bytes + trainable


def test_fsdp_shards_and_gathers():
    e = estimate("llama-3.1-8b", "full", gpus=8, sharding="fsdp", grad_checkpointing=True, seq=2048)
    one = estimate("llama-3.1-8b", "full", grad_checkpointing=True, seq=2048)
    assert e.memory.peak_bytes < one.memory.peak_bytes / 3
    kinds = {t.name for p in e.memory.phases for t in p.terms}
    assert {"gathered_parameters", "prefetched_parameters"} <= kinds
    c = e.distributed.communication_bytes
    # every bf16 parameter is all-gathered in forward and, but for the root's (embed_tokens and lm_head
    # [128256, 4096], the final norm [4096]: the root does not reshard after forward), again in backward;
    # 8 divides every dim 0 here, so no padding
    root = 2 * 128256 * 4096 + 4096
    assert c["all_gather"] == 2 * (2 * e.total_params - root)
    assert c["reduce_scatter"] == 2 * e.total_params


def test_json_contract_and_unchanged_without_gpus():
    run = lambda *a: CliRunner().invoke(main, ["estimate", "--model", "gpt2", "--json", *a])  # noqa: E731
    plain = json.loads(run().output)
    assert "communication" not in plain and "host_bytes" not in plain["memory"] and "gpus" not in plain["inputs"]
    doc = json.loads(run("--gpus", "4", "--sharding", "zero3", "--offload", "optimizer", "--gpu", "h100-80gb").stdout)
    assert doc["inputs"]["gpus"] == 4 and doc["inputs"]["sharding"] == "zero3"
    assert doc["memory"]["host_bytes"] > 0 and doc["communication"]["bytes_per_rank"]["all_gather"] > 0
    assert doc["communication"]["link"] == "nvlink"


def test_deepspeed_config_auto(tmp_path):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto",
                                                     "offload_optimizer": {"device": "cpu"}}}))
    e = estimate("gpt2", "full", gpus=2, sharding="zero2", sharding_options={"deepspeed_config": str(cfg)})
    assert e.memory.host_bytes > 0  # offload read from the file
    assert e.distributed.settings["deepspeed_config"] == str(cfg)


@pytest.mark.parametrize("args", [
    ["--gpus", "0"], ["--gpus", "6", "--nodes", "4"], ["--gpus", "4", "--sharding", "fsdp", "--offload", "optimizer"],
    ["--gpus", "4", "--sharding", "ddp", "--offload", "optimizer"], ["--gpus", "4", "--sharding", "ddp", "--cpu-offload"],
    ["--sharding", "zero2"], ["--gpus", "2", "--sharding", "zero2", "--reshard-after-forward"],
    ["--gpus", "2", "--sharding", "zero1", "--offload", "params"], ["--gpus", "2", "--sharding", "hsdp"],
    ["--gpus", "2", "--method", "nola"], ["--gpus", "2", "--sharding", "zero2", "--precision", "amp-bf16"],
])
def test_bad_input_is_one_line(args):
    out = CliRunner().invoke(main, ["estimate", "--model", "gpt2", *args])
    assert out.exit_code == 2, out.output
    assert len(out.output.strip().splitlines()) == 1


def test_plan_over_gpu_counts_and_strategies():
    out = CliRunner().invoke(main, ["plan", "--model", "llama-3.1-8b", "--gpu", "rtx-4090-24gb", "--gpus", "1,2,4",
                                    "--sharding", "ddp,fsdp,zero3", "--methods", "full", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert len(doc["points"]) == 1 + 2 * 3  # one GPU alone, then 2 and 4 GPUs under each strategy
    # full fine-tuning of 8B (16 B per parameter for bf16 AdamW) fits no 24 GB card alone; FSDP/ZeRO-3 over 4 do not
    # either at 8B x 16 B / 4 = 32 GB of model states; the cheapest fitting point, if any, uses the fewest GPUs
    assert not doc["points"][0]["fits"]
    best = doc["best"]
    assert best is None or best["gpus"] == min(p["gpus"] for p in doc["points"] if p["fits"])


def test_zero_says_deepspeed_casts_the_adapters():
    """DeepSpeed's bf16 mode casts the module, adapters included (engine.py _configure_distributed_model): the
    estimate keeps peft's fp32 adapters and says so; full fine-tuning (already bf16) and fp32 runs say nothing."""
    warned = lambda *a, **k: [w for w in estimate("gpt2", *a, gpus=2, **k).warnings if "DeepSpeed casts" in w]  # noqa: E731
    assert warned("lora", sharding="zero2") and warned("dora", sharding="zero3")
    assert not warned("full", sharding="zero2") and not warned("lora", sharding="zero2", precision="fp32")
    assert not warned("lora", sharding="fsdp")


def test_zero_in_16_bit_casts_the_adapters_with_the_module():
    # DeepSpeed's bf16 mode casts the module, peft's fp32 LoRA factors included (engine.py
    # _configure_distributed_model): 2 bytes per trainable element on each ZeRO-2 rank (parameters unsharded)
    e = estimate("llama-3.2-1b", "lora", gpus=2, sharding="zero2")
    trainable = {t.name: t.value for t in e.memory.terms}["rank trainable weights"]
    assert trainable == 2 * e.trainable_params
    assert any("counted as --adapter-dtype bf16" in w for w in e.warnings)
    # one GPU keeps peft's fp32 factors
    assert {t.name: t.value for t in estimate("llama-3.2-1b", "lora").memory.terms}["trainable weights"] \
        == 4 * e.trainable_params


def test_fsdp_backward_holds_the_unit_above_reduce_scatter_input():
    """FSDP2 retains one ReduceScatterState (torch _fsdp_param_group.py post_backward,
    reduce_scatter_max_input_buffers = 1): the unit above's reduce-scatter input, one decoder layer's unsharded
    bf16 gradients, is alive through every block's backward but the top one's, which comes first."""
    from lora_cost.analytic import peaks
    from lora_cost.results import MemoryCategory as C

    seen = {}
    original = peaks._moments

    def spy(*a, **k):
        steady, candidates = original(*a, **k)
        seen.update({where: dict(terms) for where, terms in candidates["backward"]})
        return steady, candidates

    peaks._moments = spy
    try:
        estimate("llama-3.1-8b", "full", gpus=8, sharding="fsdp", grad_checkpointing=True, seq=2048)
    finally:
        peaks._moments = original
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096  # q, o; k, v; the MLP; two norms
    first, below = seen["backward through the first block"], seen["backward through the block below the last"]
    assert first[C.REDUCE_SCATTER_BUFFERS] == below[C.REDUCE_SCATTER_BUFFERS] == 2 * layer  # bf16, 8 divides dim 0
    assert C.REDUCE_SCATTER_BUFFERS not in seen["backward through the last block"]
    # beside the LM head's unsharded gradient (the root's, reduced at the end), of the block's own unsharded
    # gradients only those formed when its widest gradient forms
    head = 2 * 128256 * 4096
    assert head < first[C.UNSHARDED_GRADIENTS] < head + 2 * layer
