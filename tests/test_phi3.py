"""Phi-3 / Phi-4 (model_type phi3): fused qkv_proj and gate_up_proj, partial rotary, sliding window.

Saved-activation bytes and FLOPs against a real CPU step of transformers + peft (tests/peft_step.py),
parameter counts against transformers on the meta device and the published totals, bad input."""

import json

import pytest
from click.testing import CliRunner

from lora_cost import estimate
from lora_cost.cli import main

TINY = dict(model_type="phi3", hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
# all heads for keys and values, half of each head rotated (Phi3RotaryEmbedding's partial_rotary_factor)
PARTIAL = dict(TINY, num_key_value_heads=4, partial_rotary_factor=0.5)
# a window shorter than the sequence (24): transformers' sliding-window mask
WINDOW = dict(TINY, sliding_window=16)
QKV = ("qkv_proj",)

CASES = [
    (TINY, "full", None, 0, False), (TINY, "full", None, 0, True),
    (TINY, "lora", QKV, 8, False), (TINY, "lora", QKV, 8, True),
    (TINY, "lora", "all-linear", 4, False), (TINY, "lora", "all-linear", 4, True),
    (TINY, "lora", ("gate_up_proj", "down_proj"), 4, False),
    (TINY, "dora", QKV, 4, True), (TINY, "dora", "all-linear", 4, True),
    (TINY, "lora-fa", "all-linear", 4, False), (TINY, "lora-fa", QKV, 4, True),
    (TINY, "vera", "all-linear", 16, False), (TINY, "vera", QKV, 16, True),
    (PARTIAL, "full", None, 0, False), (PARTIAL, "lora", "all-linear", 4, False), (PARTIAL, "vera", QKV, 16, True),
    (WINDOW, "lora", "all-linear", 4, False), (WINDOW, "full", None, 0, True),
]
IDS = [f"{'partial' if c is PARTIAL else 'window' if c is WINDOW else 'tiny'}-{m}-"
       f"{'-'.join(t) if isinstance(t, tuple) else t}-{'ckpt' if k else 'plain'}" for c, m, t, _, k in CASES]


@pytest.mark.parametrize("cfg,method,targets,r,ckpt", CASES, ids=IDS)
def test_saved_bytes_and_flops_equal_torch(tmp_path, cfg, method, targets, r, ckpt):
    pytest.importorskip("peft")
    from peft_step import estimated, measure
    assert estimated(tmp_path, cfg, method, targets, r, ckpt) == measure(cfg, method, targets, r, ckpt)


def test_dora_transient_saves(tmp_path):
    """DoRA without checkpointing: as tests/test_saved_vs_torch.py test_dora_transient_saves, the eye(d_in)
    pushed through lora_A each forward is saved for a graph dropped before backward (orphaned saves, not
    saved activations); kept alive, the hook counts between one and all three modules' worth."""
    pytest.importorskip("peft")
    from peft_step import estimated, measure
    r, d_in = 4, 64
    saved, fwd, bwd = estimated(tmp_path, TINY, "dora", QKV, r, False)
    m_saved, m_fwd, m_bwd = measure(TINY, "dora", QKV, r, False, keep_alive=True)
    assert (fwd, bwd) == (m_fwd, m_bwd)
    per_module = (d_in * d_in + d_in * r) * 4
    assert per_module <= m_saved - saved <= 3 * per_module


@pytest.mark.parametrize("name", ["phi-3-mini-4k", "phi-3-mini-128k", "phi-3-medium-4k", "phi-4"])
def test_profile_totals_equal_transformers(name):
    pytest.importorskip("transformers")
    from peft_step import meta_model
    from lora_cost.profiles import bundled_models
    model = meta_model(bundled_models()[name].config)
    assert estimate(name, "full", seq=16).total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.fast
def test_published_totals():
    # keras-hub phi3_presets.py lists 3,821,079,552 for both Phi-3-mini presets; by hand: untied embeddings
    # 2 x 32064 x 3072 + 32 x (3072 x 9216 + 3072 x 3072 + 3072 x 16384 + 8192 x 3072 + 2 x 3072) + 3072
    assert estimate("phi-3-mini-4k", "full", seq=16).total_params == 3_821_079_552
    assert estimate("microsoft/Phi-3-mini-128k-instruct", "full", seq=16).total_params == 3_821_079_552
    # Phi-3-medium: grouped-query (40 query, 10 key/value heads of 128), by hand: 2 x 32064 x 5120
    # + 40 x (5120 x 7680 + 5120 x 5120 + 5120 x 35840 + 17920 x 5120 + 2 x 5120) + 5120; the model card's 14B
    assert estimate("phi-3-medium-4k", "full", seq=16).total_params == 13_960_238_080
    # Phi-4: "14B parameters" (model card); 14.7B on its Hub page
    assert round(estimate("phi-4", "full", seq=16).total_params / 1e9, 1) == 14.7


@pytest.mark.fast
def test_fused_targets_adapt_the_fused_matrices():
    # LoRA on qkv_proj: one pair per layer, r x (d_in + d_out) = 8 x (3072 + 3 x 3072) per layer, 32 layers
    e = estimate("phi-3-mini-4k", "lora", r=8, seq=64)  # the default target is qkv_proj
    assert e.trainable_params == 32 * 8 * (3072 + 9216)
    # all-linear: qkv_proj, o_proj, gate_up_proj ([3072, 16384]) and down_proj
    e = estimate("phi-3-mini-4k", "lora", r=8, targets="all-linear", seq=64)
    assert e.trainable_params == 32 * 8 * ((3072 + 9216) + (3072 + 3072) + (3072 + 16384) + (8192 + 3072))
    # Phi-4's grouped heads: qkv_proj is [5120, 5120 + 2 x 10 x 128]
    e = estimate("phi-4", "lora", r=16, seq=64)
    assert e.trainable_params == 40 * 16 * (5120 + 7680)


@pytest.mark.fast
@pytest.mark.parametrize("field,value,needle", [
    ("partial_rotary_factor", 1.5, "partial_rotary_factor"),
    ("partial_rotary_factor", "half", "partial_rotary_factor"),
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("sliding_window", 0, "sliding_window"),
    ("resid_pdrop", 1.0, "resid_pdrop"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, field, value, needle):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(TINY, **{field: value})))
    out = CliRunner().invoke(main, ["estimate", "--model", str(path)])
    lines = [ln for ln in out.output.splitlines() if ln.strip()]
    assert out.exit_code == 2 and len(lines) == 1 and needle in lines[0], out.output


@pytest.mark.fast
def test_unfused_target_names_match_nothing():
    out = CliRunner().invoke(main, ["estimate", "--model", "phi-3-mini-4k", "--targets", "q_proj,v_proj"])
    lines = [ln for ln in out.output.splitlines() if ln.strip()]
    assert out.exit_code == 2 and len(lines) == 1 and "matches nothing" in lines[0], out.output
