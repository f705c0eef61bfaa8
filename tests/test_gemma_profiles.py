"""Gemma 2 / Gemma 3 without torch: published parameter totals, the block plan, bad input."""

import json

import pytest
from click.testing import CliRunner

from lora_cost import estimate
from lora_cost.analytic.architectures.base import get_architecture, stack_of
from lora_cost.cli import main
from lora_cost.profiles import load_model

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("name,published", [
    # the totals the Hugging Face Hub lists for the safetensors of google/gemma-2-2b, -9b, -27b and gemma-3-1b-pt
    ("gemma-2-2b", 2_614_341_888), ("gemma-2-9b", 9_241_705_984), ("gemma-2-27b", 27_227_128_320),
    ("gemma-3-1b", 999_885_952),
])
def test_published_totals(name, published):
    assert estimate(name, "full", seq=16).total_params == published


def test_gemma_2_2b_total_by_hand():
    # 256000 x 2304 tied embedding; per layer q 2304x2048, k, v 2304x1024, o 2048x2304, 3 x 2304x9216 MLP,
    # 4 norms of 2304; a final norm of 2304
    d, per_layer = 2304, 2304 * 2048 + 2 * 2304 * 1024 + 2048 * 2304 + 3 * 2304 * 9216 + 4 * 2304
    assert estimate("gemma-2-2b", "full", seq=16).total_params == 256000 * d + 26 * per_layer + d


def test_gemma2_ignores_a_pattern_field(tmp_path):
    """Gemma2Config alternates sliding and global layers whatever `sliding_window_pattern` says."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(load_model_config("gemma-2-2b"), sliding_window_pattern=6)))
    spec = load_model(str(path))
    assert spec.layer_kinds == ("sliding", "full") * 13


def test_block_plans():
    g2, g3 = load_model("google/gemma-2-9b"), load_model("gemma-3-27b")
    plan2 = stack_of(get_architecture("gemma2"), g2)
    assert [g.kind for g in plan2.groups[:3]] == ["sliding", "full", "sliding"] and plan2.layers == 42
    plan3 = stack_of(get_architecture("gemma3_text"), g3)  # 5 sliding layers, then a global one; 62 = 10 x 6 + 2
    assert plan3.repetitions == {"sliding0": 1, "sliding1": 51, "full0": 1, "full1": 9}
    assert g2.attn_softcap == 50.0 and g2.final_softcap == 30.0 and g3.attn_softcap is None and g3.qk_norm


def test_gemma2_runs_eager_and_says_so():
    sdpa = estimate("gemma-2-2b", "lora", r=8, seq=1024)
    eager = estimate("gemma-2-2b", "lora", r=8, seq=1024, attention="eager")
    assert sdpa.memory.saved_activation_bytes == eager.memory.saved_activation_bytes
    assert any("eager" in a and "gemma2" in a for a in sdpa.assumptions)


def test_logit_softcapping_saves_one_more_vocab_tensor(tmp_path):
    # Gemma-3 1B with final_logit_softcapping set: 512 tokens x 262144 vocab x 2 bytes (bf16 tanh output) more
    cfg = dict(load_model_config("gemma-3-1b"), final_logit_softcapping=30.0)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    capped = estimate(str(path), "lora", r=8, seq=512).memory.saved_activation_bytes
    plain = estimate("gemma-3-1b", "lora", r=8, seq=512).memory.saved_activation_bytes
    assert capped - plain == 512 * 262144 * 2


def load_model_config(name):
    from lora_cost.profiles import bundled_models

    return dict(bundled_models()[name].config)


@pytest.mark.parametrize("base", ["gemma-2-2b", "gemma-3-1b"])
@pytest.mark.parametrize("patch,needle", [
    ({"layer_types": ["sliding_attention"]}, "layer_types"),
    ({"layer_types": ["sliding_attention"] * 25 + ["global"], "num_hidden_layers": 26}, "layer_types"),
    ({"attn_logit_softcapping": -1, "model_type": "gemma2"}, "attn_logit_softcapping"),  # Gemma 3 never reads it
    ({"final_logit_softcapping": "30"}, "final_logit_softcapping"),
    ({"sliding_window_pattern": 0, "model_type": "gemma3_text"}, "sliding_window_pattern"),
    ({"hidden_activation": "relu"}, "hidden_activation"),
    ({"use_bidirectional_attention": True}, "bidirectional"),
    ({"head_dim": 256.0}, "head_dim"),
    ({"sliding_window": True}, "sliding_window"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, base, patch, needle):
    cfg = dict(load_model_config(base))
    cfg.pop("layer_types", None)
    cfg.update(patch)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    out = CliRunner().invoke(main, ["estimate", "--model", str(path)])
    lines = [ln for ln in out.output.splitlines() if ln.strip()]
    assert out.exit_code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in out.output
