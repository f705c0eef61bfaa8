"""BLOOM / BLOOMZ (model_type bloom): ALiBi eager attention, fused query_key_value, embedding LayerNorm.

Saved-activation bytes and FLOPs against a real CPU step of transformers + peft (tests/peft_step.py),
parameter counts against transformers on the meta device and the published totals, bad input."""

import json

import pytest
from click.testing import CliRunner

from lora_cost import estimate
from lora_cost.cli import main

TINY = dict(model_type="bloom", hidden_size=64, n_layer=3, n_head=4, vocab_size=512)
QKV = ("query_key_value",)

CASES = [
    ("full", None, 0, False), ("full", None, 0, True),
    ("lora", QKV, 8, False), ("lora", QKV, 8, True),
    ("lora", "all-linear", 4, False), ("lora", "all-linear", 4, True),
    ("lora", ("dense_4h_to_h",), 4, False),  # only after the attention: the first saves come late
    ("dora", QKV, 4, True), ("dora", "all-linear", 4, True),
    ("lora-fa", "all-linear", 4, False), ("lora-fa", QKV, 4, True),
    ("vera", "all-linear", 16, False), ("vera", QKV, 16, True),
]
IDS = [f"{m}-{'-'.join(t) if isinstance(t, tuple) else t}-{'ckpt' if k else 'plain'}" for m, t, _, k in CASES]


@pytest.mark.parametrize("method,targets,r,ckpt", CASES, ids=IDS)
def test_saved_bytes_and_flops_equal_torch(tmp_path, method, targets, r, ckpt):
    pytest.importorskip("peft")
    from peft_step import estimated, measure
    assert estimated(tmp_path, TINY, method, targets, r, ckpt) == measure(TINY, method, targets, r, ckpt)


def test_dora_transient_saves(tmp_path):
    """DoRA without checkpointing: the eye(d_in) products are orphaned saves (tests/test_saved_vs_torch.py);
    kept alive, the hook counts between one and all three modules' worth more than the estimate's saves."""
    pytest.importorskip("peft")
    from peft_step import estimated, measure
    r, d_in = 4, 64
    saved, fwd, bwd = estimated(tmp_path, TINY, "dora", QKV, r, False)
    m_saved, m_fwd, m_bwd = measure(TINY, "dora", QKV, r, False, keep_alive=True)
    assert (fwd, bwd) == (m_fwd, m_bwd)
    per_module = (d_in * d_in + d_in * r) * 4
    assert per_module <= m_saved - saved <= 3 * per_module


@pytest.mark.parametrize("ckpt", [False, True])
def test_ia3_default_targets_equal_peft(tmp_path, ckpt):
    """(IA)3 with peft's bloom defaults (TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING: query_key_value
    and mlp.dense_4h_to_h, the latter a feed-forward module scaling its input)."""
    pytest.importorskip("peft")
    from peft_step import estimated, measure
    peft_targets = (("query_key_value", "mlp.dense_4h_to_h"), ("mlp.dense_4h_to_h",))
    assert estimated(tmp_path, TINY, "ia3", None, 0, ckpt) == measure(TINY, "ia3", peft_targets, 0, ckpt)
    # 3 layers x (3 x 64 outputs of query_key_value + 4 x 64 inputs of dense_4h_to_h)
    assert estimate(str(tmp_path / "config.json"), "ia3", seq=24).trainable_params == 3 * (192 + 256)


@pytest.mark.parametrize("name", ["bloom-560m", "bloomz-7b1"])
def test_profile_totals_equal_transformers(name):
    pytest.importorskip("transformers")
    from peft_step import meta_model
    from lora_cost.profiles import bundled_models
    model = meta_model(bundled_models()[name].config)
    assert estimate(name, "full", seq=16).total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.fast
def test_published_totals():
    # keras-hub bloom_presets.py: bloom_560m_multi 559,214,592; by hand, tied head:
    # 250880 x 1024 + 2 x 1024 (embedding LayerNorm) + 24 x (12 x 1024^2 + 13 x 1024) + 2 x 1024 (ln_f)
    assert estimate("bloom-560m", "full", seq=16).total_params == 559_214_592
    # BLOOM paper (arXiv:2211.05100) Table 3: 7,069M for the 7.1B model (30 layers, 4096 wide)
    assert round(estimate("bigscience/bloomz-7b1", "full", seq=16).total_params / 1e6) == 7069


@pytest.mark.fast
def test_fused_query_key_value_is_the_default_target():
    # peft's default for bloom (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING): query_key_value,
    # one [4096, 3 x 4096] matrix per layer: r x (4096 + 12288) x 30 layers; r=8 gives 3,932,160
    e = estimate("bloomz-7b1", "lora", r=8, seq=64)
    assert e.trainable_params == 8 * (4096 + 3 * 4096) * 30 == 3_932_160


@pytest.mark.fast
def test_attention_flag_does_not_change_bloom():
    """transformers has no sdpa path for BLOOM: its own eager attention runs either way."""
    a = estimate("bloom-560m", "lora", r=8, seq=256, attention="sdpa")
    b = estimate("bloom-560m", "lora", r=8, seq=256, attention="eager")
    assert a.memory.peak_bytes == b.memory.peak_bytes and a.flops == b.flops


@pytest.mark.fast
@pytest.mark.parametrize("field,value,needle", [
    ("n_head", 5, "n_head"),
    ("slow_but_exact", True, "slow_but_exact"),
    ("apply_residual_connection_post_layernorm", True, "apply_residual_connection_post_layernorm"),
    ("hidden_dropout", -0.1, "hidden_dropout"),
    ("n_layer", 2.0, "n_layer"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, field, value, needle):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(TINY, **{field: value})))
    out = CliRunner().invoke(main, ["estimate", "--model", str(path)])
    lines = [ln for ln in out.output.splitlines() if ln.strip()]
    assert out.exit_code == 2 and len(lines) == 1 and needle in lines[0], out.output
