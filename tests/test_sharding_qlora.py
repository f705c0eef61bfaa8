"""Task "fsdpqlora": QLoRA across GPUs (lora_cost/analytic/sharding/qlora.py), torch-free: the busiest rank's bytes
of llama-3.1-70b on 2 GPUs derived by hand, the issue's example through the CLI, the plan, and the combinations
refused in one line."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_cost import estimate
from lora_cost.cli import main

pytestmark = pytest.mark.fast

H, F, KV, L, V = 8192, 28672, 1024, 80, 128256  # llama-3.1-70b config.json: hidden, intermediate, k/v width, layers, vocab


EXCERPT = Path(__file__).parent / "data" / "bnb_0.50.2_4bit_fsdp.py.txt"  # verbatim bitsandbytes 0.50.2


def test_modelled_rules_are_bitsandbytes_rules():
    """The rules sharding/qlora.py rests on, in bitsandbytes' own source."""
    src = EXCERPT.read_text()
    # the packed weight: [(n + 1) // (2 x itemsize), 1] in the storage dtype (its dim 0 is what FSDP2 shards)
    assert "out = torch.empty(((n + 1) // (quant_storage.itemsize * 2), 1), device=A.device, dtype=quant_storage)" in src
    # double quantisation: the absmax minus its mean, blockwise in 256s (the quant_state's bytes)
    assert "offset = _absmax.mean()" in src and "quantize_blockwise(_absmax - offset, blocksize=256)" in src
    # FSDP2's torch.chunk keeps the subclass and hands every chunk the same (whole) quant_state
    assert "if func in [torch.chunk, torch.split]:" in src and "quant_state=tensor.quant_state," in src
    # a replaced parameter gets the module's quant_state back: a Python attribute, never sharded
    assert "module.weight.quant_state = module.quant_state" in src
    assert "fix_4bit_weight_quant_state_from_module(self)" in src


def _quant_state(n: int) -> int:
    """One weight's QuantState, double quantisation (bitsandbytes quantize_4bit, blocksize 64; nested
    quantize_blockwise, blocksize 256): a uint8 absmax per 64 values, an fp32 absmax per 256 of those, the
    256-entry fp32 code and the fp32 offset."""
    blocks = n // 64
    return blocks + 4 * -(-blocks // 256) + 256 * 4 + 4


def _terms(e, phase=-1):
    return {t.name: t.value for t in e.memory.phases[phase].terms}


LINEARS = [H * H, H * KV, H * KV, H * H, H * F, H * F, F * H]  # q k v o gate up down, nn.Linear [d_out, d_in]


def test_70b_on_two_ranks_by_hand():
    """--quant-storage bf16: each weight of n values is a Params4bit [n / 4, 1] in bf16; FSDP2 gives rank 0
    ceil(n / 4 / 2) rows of 2 bytes. The quant_state is whole on each rank. prepare_model_for_kbit_training made
    embeddings, LM head and norms fp32: rank 0 holds ceil(rows / 2) rows of each. LoRA r=8 on q_proj, v_proj
    (fp32): lora_A [8, 8192] -> 4 rows, lora_B [8192, 8] / [1024, 8] -> 4096 / 512 rows."""
    e = estimate("llama-3.1-70b", "qlora", gpus=2, sharding="fsdp", method_options={"quant_storage": "bf16"})
    packed = L * sum(-(-(n // 4) // 2) * 2 for n in LINEARS)
    state = L * sum(_quant_state(n) for n in LINEARS)
    rest = 2 * -(-V // 2) * H * 4 + (2 * L + 1) * (H // 2) * 4
    lora = L * 4 * (4 * H + 4096 * 8 + 4 * H + 512 * 8)
    t = _terms(e)
    assert t["weights"] == packed + state + rest
    assert t["trainable_weights"] == lora and t["gradients"] == lora and t["optimizer_state"] == 2 * lora
    explained = {x.name: x.value for x in e.memory.terms}
    assert explained["rank weights kept whole"] == state  # the quant_state: not a parameter, not sharded
    # the all-gathers: every parameter's gathered bytes (2 x the rank's shard), forward and again in backward
    # for the layers (reshard_after_forward); the reduce-scatter: the LoRA gradients only (frozen weights never)
    comm = e.distributed.communication_bytes
    layer = sum(n // 4 * 2 for n in LINEARS) + 2 * H * 4 + 4 * (8 * H + H * 8 + 8 * H + KV * 8)
    root = 2 * V * H * 4 + H * 4
    assert comm["all_gather"] == 2 * L * layer + root
    assert comm["reduce_scatter"] == 2 * lora


def test_ranks_halve_the_packed_weights_and_keep_the_state():
    one = estimate("llama-3.1-70b", "qlora", method_options={"quant_storage": "bf16"})
    two = estimate("llama-3.1-70b", "qlora", gpus=2, sharding="fsdp", method_options={"quant_storage": "bf16"})
    four = estimate("llama-3.1-70b", "qlora", gpus=4, sharding="fsdp", method_options={"quant_storage": "bf16"})
    state = L * sum(_quant_state(n) for n in LINEARS)
    w1, w2, w4 = (_terms(e)["weights"] for e in (one, two, four))
    assert w1 - state == 2 * (w2 - state) == 4 * (w4 - state)  # 70B's rows divide by 4: no padding
    # DDP: every rank holds the one-GPU weights, uint8 storage included
    ddp = estimate("llama-3.1-70b", "qlora", gpus=2, sharding="ddp")
    assert _terms(ddp)["weights"] == _terms(estimate("llama-3.1-70b", "qlora"))["weights"]


def test_fsdp_qlora_recipe_keeps_the_rest_in_bf16():
    """--no-kbit-prepare --adapter-dtype bf16 (TRL's sharded-QLoRA path): embeddings, LM head, norms and LoRA in bf16."""
    e = estimate("llama-3.1-70b", "qlora", gpus=2, sharding="fsdp", adapter_dtype="bf16",
                 method_options={"quant_storage": "bf16", "kbit_prepare": False})
    t = _terms(e)
    packed = L * sum(n // 8 * 2 for n in LINEARS)
    state = L * sum(_quant_state(n) for n in LINEARS)
    assert t["weights"] == packed + state + 2 * (V // 2) * H * 2 + (2 * L + 1) * (H // 2) * 2
    assert t["trainable_weights"] == L * 2 * (4 * H + 4096 * 8 + 4 * H + 512 * 8)


def test_uint8_storage_stays_whole_under_fsdp():
    """The default uint8 storage: accelerate passes integer Params4bit to fully_shard's ignored_params, so each
    rank holds the whole packed weights (n / 2 bytes) and only the rest is sharded; a warning says so."""
    e = estimate("llama-3.1-70b", "qlora", gpus=2, sharding="fsdp")
    packed = L * sum(n // 2 for n in LINEARS)
    state = L * sum(_quant_state(n) for n in LINEARS)
    assert _terms(e)["weights"] == packed + state + 2 * (V // 2) * H * 4 + (2 * L + 1) * (H // 2) * 4
    assert {x.name: x.value for x in e.memory.terms}["rank weights kept whole"] == packed + state
    assert "ignored_params" in " ".join(e.warnings)
    assert e.distributed.communication_bytes["all_gather"] < 2 * 2 * V * H * 4 + L * 2 * 4 * (16 * H + 16 * KV + 4 * H)


def test_issue_example_cli():
    out = CliRunner().invoke(main, ["estimate", "--model", "llama-3.1-70b", "--method", "qlora", "--gpus", "2",
                                    "--sharding", "fsdp", "--quant-storage", "bf16", "--gpu", "rtx-4090-24gb", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)  # the recipe note goes to stderr
    assert doc["inputs"]["gpus"] == 2 and doc["inputs"]["sharding"] == "fsdp"
    comm = doc["communication"]["bytes_per_rank"]
    assert comm["all_gather"] > 0 and comm["reduce_scatter"] > 0
    one = json.loads(CliRunner().invoke(main, ["estimate", "--model", "llama-3.1-70b", "--method", "qlora",
                                               "--quant-storage", "bf16", "--json"]).output)
    assert doc["memory"]["steady_bytes"] < 0.6 * one["memory"]["steady_bytes"]  # the rank holds about half
    plain = CliRunner().invoke(main, ["estimate", "--model", "llama-3.1-70b", "--method", "qlora", "--gpus", "2",
                                      "--sharding", "fsdp", "--quant-storage", "bf16", "--gpu", "rtx-4090-24gb"])
    assert plain.exit_code == 0 and "fsdp over 2 GPUs" in plain.output
    assert "--no-kbit-prepare --adapter-dtype bf16" in plain.stderr  # the FSDP-QLoRA recipe named


@pytest.mark.parametrize("args,why", [
    (["--sharding", "zero3", "--precision", "bf16"], "ZeRO"),
    (["--sharding", "zero2"], "ZeRO"),
    (["--sharding", "fsdp", "--quant-storage", "bf16", "--fsdp-param-dtype", "fp32"], "destroy"),
    (["--sharding", "hsdp", "--nodes", "2", "--quant-storage", "fp16", "--fsdp-param-dtype", "bf16"], "destroy"),
])
def test_refused_in_one_line(args, why):
    out = CliRunner().invoke(main, ["estimate", "--model", "llama-3.1-8b", "--method", "qlora", "--gpus", "4", *args])
    assert out.exit_code == 2, out.output
    assert len(out.output.strip().splitlines()) == 1 and why in out.output


def test_plan_includes_qlora():
    out = CliRunner().invoke(main, ["plan", "--model", "llama-3.1-70b", "--gpu", "rtx-4090-24gb", "--gpus", "1,2,4,8",
                                    "--sharding", "fsdp,ddp", "--methods", "qlora", "--quant-storage", "bf16",
                                    "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    points = {(p["gpus"], p["sharding"]) for p in doc["points"] if p["method"] == "qlora"}
    assert {(2, "fsdp"), (4, "fsdp"), (8, "fsdp"), (2, "ddp")} <= points


def test_numbers_path_equals_the_estimate():
    """The planner's numbers-only path (analytic/fast.py) gives the full estimate's numbers for QLoRA across GPUs."""
    import itertools

    from lora_cost.analytic.fast import numbers_of
    strategies = (("ddp", {}, 1), ("fsdp", {}, 1), ("fsdp-grad-op", {}, 1), ("fsdp", {"cpu_offload": True}, 1),
                  ("fsdp", {"param_dtype": "bf16", "reduce_dtype": "fp32"}, 1), ("hsdp", {}, 2))
    checked = 0
    for (strategy, options, nodes), storage, prepare, ckpt in itertools.product(
            strategies, ("uint8", "bf16"), (True, False), (False, True)):
        kw = dict(model="llama-3.2-1b", method="qlora", r=16, targets="all-linear", batch=2, seq=256,
                  grad_checkpointing=ckpt, gpu="rtx-4090-24gb", gpus=4, nodes=nodes, sharding=strategy,
                  sharding_options=options, method_options={"quant_storage": storage, "kbit_prepare": prepare})
        assert estimate(**kw, numbers_only=True) == numbers_of(estimate(**kw)), kw
        checked += 1
    assert checked == 48


def test_axolotl_qlora_fsdp_reads_as_the_fsdp_recipe(tmp_path):
    """axolotl's QLoRA + FSDP: bf16 quant storage and no prepare_model_for_kbit_training (readers/axolotl.py)."""
    from lora_cost.readers import model_of, read_files, settings_for
    p = tmp_path / "a.yml"
    p.write_text("base_model: meta-llama/Llama-3.1-70B\nadapter: qlora\nload_in_4bit: true\nlora_r: 8\n"
                 "lora_target_linear: true\nsequence_len: 1024\nmicro_batch_size: 1\nbf16: true\n"
                 "gradient_checkpointing: true\nfsdp: full_shard auto_wrap\n")
    reading = read_files(None, None, str(p))
    f = settings_for(model_of(reading, "llama-3.1-70b"), reading)
    assert f.kwargs["method"] == "qlora" and f.kwargs["sharding"] == "fsdp"
    assert f.method_options["quant_storage"] == "bf16" and f.method_options["kbit_prepare"] is False
    out = CliRunner().invoke(main, ["estimate", "--axolotl", str(p), "--gpus", "2", "--gpu", "rtx-4090-24gb", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["inputs"]["sharding"] == "fsdp"
