"""Mixture of experts through the CLI and the estimate path, torch-free: bad input is one line and exit 2,
routing balance is stated, and a 94-layer MoE estimate stays fast."""

import json
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from lora_cost import estimate
from lora_cost.cli import main
from lora_cost.errors import LoraCostError

pytestmark = pytest.mark.fast


def run(*args):
    return CliRunner().invoke(main, ["estimate", *args])


@pytest.mark.parametrize("args,needle", [
    (("--model", "qwen3-30b-a3b", "--moe-imbalance", "0.5"), "--moe-imbalance must be a number from 1"),
    (("--model", "mixtral-8x7b", "--moe-imbalance", "nan"), "--moe-imbalance must be a number from 1"),
    (("--model", "llama-2-7b", "--moe-imbalance", "1.5"), "mixture-of-experts models only"),
    # adapters on the experts: lora.ParamWrapper refuses DoRA and dropout; peft fuses w1 and w3 (one needs the other)
    (("--model", "mixtral-8x7b", "--method", "dora", "--targets", "all-linear"), "lora.ParamWrapper"),
    (("--model", "qwen3-30b-a3b", "--targets", "q_proj,down_proj", "--dropout", "0.05"), "lora_dropout != 0"),
    (("--model", "mixtral-8x7b", "--targets", "w1,w2"), "needs w3 too"),
    (("--model", "mixtral-8x7b", "--targets", "up_proj"), "matches nothing"),  # Qwen3-MoE's v4 name, not Mixtral's
])
def test_moe_bad_input_is_one_line_exit_2(args, needle):
    result = run(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.output


def test_moe_config_field_checks(tmp_path):
    cfg = {"model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
           "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128, "max_position_embeddings": 64,
           "num_experts": 4, "num_experts_per_tok": 8}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(LoraCostError, match="num_experts_per_tok"):  # top-k above the number of experts
        estimate(str(path), "lora")
    path.write_text(json.dumps(dict(cfg, num_experts_per_tok=2, mlp_only_layers="all")))
    with pytest.raises(LoraCostError, match="mlp_only_layers"):
        estimate(str(path), "lora")
    path.write_text(json.dumps(dict(cfg, num_experts_per_tok=2, output_router_logits=True)))
    with pytest.raises(LoraCostError, match="output_router_logits"):
        estimate(str(path), "lora")


def test_routing_assumption_is_stated_and_imbalance_changes_nothing():
    """grouped_mm runs every (token, expert) row at once: the balance changes neither bytes nor FLOPs."""
    balanced = estimate("qwen3-30b-a3b", "lora", r=8, seq=1024)
    skewed = estimate("qwen3-30b-a3b", "lora", r=8, seq=1024, moe_imbalance=1.5)
    assert any("balanced routing assumed" in a for a in balanced.assumptions)
    assert any("--moe-imbalance 1.5 changes nothing" in a for a in skewed.assumptions)
    assert (skewed.memory.peak_bytes, skewed.flops.forward) == (balanced.memory.peak_bytes, balanced.flops.forward)


def test_moe_qlora_keeps_experts_unquantised():
    """bitsandbytes quantises nn.Linear only: Mixtral's 3-D experts stay, in fp32 after peft's kbit preparation,
    so QLoRA stores more than bf16 LoRA (the attention linears alone shrink to 4 bits)."""
    qlora = estimate("mixtral-8x7b", "qlora", r=16, seq=512)
    lora = estimate("mixtral-8x7b", "lora", r=16, seq=512)
    experts = 32 * 8 * 3 * 14336 * 4096  # 45,097,156,608 expert weights, 4 bytes each under QLoRA
    assert qlora.memory.steady_bytes > lora.memory.steady_bytes > 2 * experts


def test_94_layer_moe_estimate_is_fast():
    """The bundled 94-layer Qwen3-235B-A22B: the estimate path imports no torch and takes a small fraction
    of `import torch` (measured in fresh interpreters)."""
    code = ("import time, sys; t = time.perf_counter(); from lora_cost import estimate; "
            "estimate('qwen3-235b-a22b', 'lora', r=16, seq=2048); "
            "print(time.perf_counter() - t, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == "False"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, check=False)
    torch_import = time.perf_counter() - t0
    assert float(out[0]) < max(0.1 * torch_import, 0.5), (out, torch_import)


def test_expert_adapters_serving_gives_no_number():
    """peft's ParamWrapper rebuilds W + s B A per forward call, not per token: no unmerged serving number."""
    from lora_cost import estimate

    s = estimate("mixtral-8x7b", "lora", r=16, targets="all-linear", seq=64, serving=True).serving
    assert s.unmerged is None and s.merged is None and "ParamWrapper" in s.note
    assert estimate("mixtral-8x7b", "lora", r=16, seq=64, serving=True).serving.unmerged is not None
