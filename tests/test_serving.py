"""The serving block (estimate --serving): base model per generated token and what each method adds,
merged and unmerged, against hand arithmetic. Torch-free; tests/test_serving_vs_torch.py measures the
same quantities on real peft models."""

import json
from dataclasses import replace

import pytest

from lora_cost.errors import LoraCostError
from click.testing import CliRunner
from rich.console import Console

from lora_cost import estimate
from lora_cost.analytic.architectures import get_architecture
from lora_cost.analytic.estimator import validated_run
from lora_cost.analytic.methods import all_methods
from lora_cost.analytic.methods.lora import LORA
from lora_cost.analytic.methods.serving import ServingCost
from lora_cost.analytic.serving import serving_estimate
from lora_cost.cli import main
from lora_cost.profiles import load_model
from lora_cost.report.jsonout import estimate_from_json, estimate_to_json
from lora_cost.report.terminal import render_serving
from lora_cost.spec import RunConfig

pytestmark = pytest.mark.fast

GPT2_C_ATTN = 768 + 2304  # d_in + d_out of GPT-2's fused q,k,v projection


def test_gpt2_lora_r8_c_attn_by_hand():
    s = estimate("gpt2", "lora", r=8, serving=True).serving
    # unmerged: 12 blocks x 2 x 8 x (768 + 2304) = 589,824 FLOPs per token; merged: W + s B A, nothing
    assert s.unmerged.extra_flops_per_token == 12 * 2 * 8 * GPT2_C_ATTN == 589_824
    assert s.merged.extra_flops_per_token == 0 and s.merged.extra_weight_bytes == 0
    # the fp32 factors: 12 x 8 x (768 + 2304) x 4 B = 1,179,648 B (the trainable bytes of the training step)
    assert s.unmerged.extra_weight_bytes == 12 * 8 * GPT2_C_ATTN * 4 == 1_179_648
    # bf16 base: x.to(fp32), lora_A, lora_B, * scaling, + result, .to(bf16) = 6 kernels; fp32: no casts, 4
    assert (s.unmerged.extra_sequential_ops_per_block, s.merged.extra_sequential_ops_per_block) == (6, 0)
    assert estimate("gpt2", "lora", r=8, precision="fp32", serving=True).serving.unmerged.extra_sequential_ops_per_block == 4
    assert s.mergeable and s.unmerged.flops_per_token == s.base_flops_per_token + 589_824


def test_gpt2_base_per_token():
    s = estimate("gpt2", "lora", r=8, seq=512, serving=True).serving
    # matmul weights: 12 x (768x2304 + 768x768 + 768x3072 + 3072x768) + the tied LM head 50257 x 768
    per_layer = 768 * 2304 + 768 * 768 + 768 * 3072 + 3072 * 768
    weights = 12 * per_layer + 50257 * 768
    # a second derivation: every parameter but the position table, the biases and the LayerNorms
    assert weights == 124_439_808 - 1024 * 768 - 12 * (2304 + 768 + 3072 + 768) - (12 * 2 + 1) * 2 * 768 == 123_532_032
    assert s.base_matmul_flops_per_token == 2 * weights == 247_064_064
    # 512 positions x 12 layers x 4 x 12 heads x 64 = 18,874,368 (q.k and probs.v, 2 FLOPs per multiply-add)
    assert s.context_positions == 512 and s.base_attention_flops_per_token == 512 * 12 * 4 * 768 == 18_874_368
    assert s.base_weight_bytes == 124_439_808 * 2  # bf16


def test_llama2_7b_base_per_token():
    s = estimate("llama-2-7b", "lora", seq=2048, serving=True).serving
    weights = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 32000 * 4096
    assert weights == 6_738_415_616 - 32000 * 4096 - (32 * 2 + 1) * 4096  # all but the embedding and the RMSNorms
    assert s.base_matmul_flops_per_token == 2 * weights == 13_214_154_752
    assert s.base_attention_flops_per_token == 32 * 4 * 32 * 128 * 2048 == 1_073_741_824


def test_mistral_attends_to_its_window():
    s = estimate("mistral-7b", "lora", seq=8192, serving=True).serving
    assert s.context_positions == 4096 and s.base_attention_flops_per_token == 32 * 4 * 4096 * 4096


def test_dora_weight_norm_per_call():
    s = estimate("llama-2-7b", "dora", r=8, precision="fp32", serving=True).serving
    # per call, per q/v module: eye(4096) through A (2 x 4096^2 x 8) and B (2 x 4096 x 8 x 4096); 64 modules
    assert s.unmerged.extra_flops_per_forward == 64 * (2 * 4096 * 4096 * 8 + 2 * 4096 * 8 * 4096) == 34_359_738_368
    assert s.unmerged.extra_flops_per_token == 64 * 2 * 8 * (4096 + 4096)
    # per module, no bias, fp32: 7 weight-norm kernels + 8 on the token path; 2 modules per block
    assert s.unmerged.extra_sequential_ops_per_block == 2 * (7 + 8)
    bf16 = estimate("llama-2-7b", "dora", r=8, serving=True).serving
    assert bf16.unmerged.extra_sequential_ops_per_block == 2 * (7 + 8 + 1 + 2)  # weight.to(fp32), x and result casts
    # A, B and the magnitude vector, fp32
    assert s.unmerged.extra_weight_bytes == 64 * (8 * 4096 * 2 + 4096) * 4
    assert s.merged.extra_flops_per_forward == 0 and s.merged.extra_weight_bytes == 0


def test_vera_shared_projections_counted_once():
    s = estimate("gpt2", "vera", r=256, serving=True).serving
    shared = 256 * 768 + 2304 * 256  # vera_A, vera_B sized to the one adapted shape
    assert s.unmerged.extra_weight_bytes == (shared + 12 * (2304 + 256)) * 4 == 3_268_608
    assert s.unmerged.extra_flops_per_token == 12 * 2 * 256 * GPT2_C_ATTN
    assert s.unmerged.extra_sequential_ops_per_block == 5 + 2  # 2 matmuls, 2 scalings, the add; 2 casts


def test_nola_serves_its_mixed_factors():
    nola = estimate("gpt2", "nola", r=8, serving=True).serving
    lora = estimate("gpt2", "lora", r=8, serving=True).serving
    assert (nola.unmerged, nola.merged) == (lora.unmerged, lora.merged)
    # mixing once: 12 x (2 x 1024 x 8 x 768 + 2 x 1024 x 2304 x 8) = 603,979,776 FLOPs, stated in the note
    assert f"{12 * 2 * 1024 * 8 * GPT2_C_ATTN:,} FLOPs" in nola.note


def test_qlora_merged_is_dequantised():
    s = estimate("llama-2-7b", "qlora", serving=True).serving
    # NF4 with double quantisation, per matrix: packed n/2 + n/64 uint8 absmax + 4 x ceil(n/64/256) + 1,028
    def nf4(n):
        return n // 2 + n // 64 + 4 * -(-(n // 64) // 256) + 1028
    square, mlp = 4096 * 4096, 4096 * 11008
    assert nf4(square) == 8_655_876 and nf4(mlp) == 23_260_932
    growth = 32 * (4 * (2 * square - nf4(square)) + 3 * (2 * mlp - nf4(mlp)))
    assert s.merged.extra_weight_bytes == growth == 9_611_009_152
    assert s.merged.extra_flops_per_token == 0 and s.mergeable
    lora = estimate("llama-2-7b", "lora", serving=True).serving
    assert s.unmerged.extra_flops_per_token == lora.unmerged.extra_flops_per_token
    assert s.unmerged.extra_sequential_ops_per_block == 2 * 6  # the branch runs in bf16 compute: casts
    assert "dequantised" in s.note


def test_full_adds_nothing():
    s = estimate("gpt2", "full", serving=True).serving
    assert s.merged == s.unmerged and s.unmerged.extra_weight_bytes == s.unmerged.extra_flops_per_token == 0
    assert s.unmerged.flops_per_token == s.base_flops_per_token


def _serving_of(method, model="gpt2", seq=512):
    spec = load_model(model)
    run, _, _, sites, head_sites = validated_run(spec, RunConfig(method="lora", seq=seq))
    return serving_estimate(get_architecture(spec.model_type), spec, method, sites, head_sites, run)


def test_undescribed_method_gets_a_note_not_a_number():
    s = _serving_of(replace(LORA, serving=None))
    assert s.merged is None and s.unmerged is None and s.mergeable is None and "no number" in s.note
    assert s.base_flops_per_token == 247_064_064 + 18_874_368  # the base model is still described
    console = Console(record=True, width=120)
    render_serving(console, s)
    assert "no number" in console.export_text()


def test_extra_positions_add_attention_and_cannot_merge():
    """A method with prompt/prefix positions states them; the block adds 4 x heads x head_dim per layer each."""
    cost = ServingCost(mergeable=False, extra_weight_bytes_unmerged=100, extra_weight_bytes_merged=100,
                       extra_flops_per_token_unmerged=0, extra_flops_per_token_merged=0,
                       extra_sequential_ops_per_block_unmerged=0, extra_sequential_ops_per_block_merged=0,
                       extra_positions=20)
    s = _serving_of(replace(LORA, serving=lambda spec, sites, head, run: cost))
    assert s.unmerged.extra_flops_per_token == s.merged.extra_flops_per_token == 12 * 4 * 768 * 20
    console = Console(record=True, width=120)
    render_serving(console, s)
    text = console.export_text()
    assert "cannot merge" in text and "20 extra positions" in text


@pytest.mark.parametrize("model", ["gpt2", "llama-3.2-1b", "roberta-base", "qwen2.5-0.5b"])
def test_every_method_describes_its_serving(model):
    for name, method in all_methods().items():
        try:
            e = estimate(model, name, precision="bf16" if name == "qlora" else "fp32", serving=True)
        except LoraCostError:  # a method may refuse a model (BitFit needs biases); GPT-2 takes every method
            assert model != "gpt2", name
            continue
        s = e.serving
        if method.serving is None:
            assert s.merged is None and s.note
            continue
        assert s.unmerged.extra_flops_per_token >= 0 and s.unmerged.flops_per_token >= s.base_flops_per_token
        if s.mergeable and name != "qlora":
            assert (s.merged.extra_weight_bytes, s.merged.extra_flops_per_token,
                    s.merged.extra_sequential_ops_per_block) == (0, 0, 0), name
        doc = estimate_to_json(e)
        assert estimate_to_json(estimate_from_json(json.loads(json.dumps(doc)))) == doc


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_json_block_only_when_asked():
    plain = json.loads(run("estimate", "--model", "gpt2", "--r", "8", "--json").output)
    assert "serving" not in plain
    out = run("estimate", "--model", "gpt2", "--r", "8", "--json", "--serving")
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert {k: v for k, v in doc.items() if k != "serving"} == plain  # every other name and number unchanged
    s = doc["serving"]
    assert s["context_positions"] == 512 and s["mergeable"] is True
    assert s["base"] == {"weight_bytes": 248_879_616, "flops_per_token": 265_938_432,
                         "matmul_flops_per_token": 247_064_064, "attention_flops_per_token": 18_874_368}
    assert s["merged"]["extra_flops_per_token"] == 0
    assert s["unmerged"] == {"extra_weight_bytes": 1_179_648, "extra_flops_per_token": 589_824,
                             "extra_flops_per_forward_call": 0, "extra_sequential_ops_per_block": 6,
                             "flops_per_token": 265_938_432 + 589_824}


def test_terminal_table():
    out = run("estimate", "--model", "gpt2", "--method", "dora", "--serving")
    assert out.exit_code == 0, out.output
    assert "What the method adds at inference" in out.output and "452,984,832" in out.output  # DoRA's weight norm per call


def test_serving_with_the_trace_engine_is_one_line_exit_2():
    out = run("estimate", "--model", "gpt2", "--serving", "--engine", "trace")
    assert out.exit_code == 2 and out.output.strip().count("\n") == 0 and "--serving" in out.output


def test_serving_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from lora_cost.cli import main\n"
        "for m in ('lora', 'dora', 'vera', 'nola', 'full', 'lora-fa'):\n"
        "    r = CliRunner().invoke(main, ['estimate', '--model', 'gpt2', '--method', m, '--serving', '--json'])\n"
        "    assert r.exit_code == 0, r.output\n"
        "r = CliRunner().invoke(main, ['estimate', '--model', 'llama-3.2-1b', '--method', 'qlora', '--serving'])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
