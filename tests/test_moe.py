"""Mixture of experts (Mixtral, Qwen3-MoE): saved-activation bytes and FLOPs against PyTorch itself, on tiny
transformers + peft models on the CPU (eager attention, fp32), as tests/test_saved_vs_torch.py does for the
dense families. transformers runs the experts through grouped_mm on the CPU as on CUDA."""

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lora_cost import estimate  # noqa: E402
from test_saved_vs_torch import B, S, measure  # noqa: E402

CONFIGS = {
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=48, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=64,
                    num_local_experts=4, num_experts_per_tok=2),
    # two sparse blocks around a dense one (mlp_only_layers), normalised top-k weights
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      vocab_size=512, max_position_embeddings=64, num_experts=8, num_experts_per_tok=3,
                      norm_topk_prob=True, mlp_only_layers=[1], tie_word_embeddings=True),
    "qwen3_moe_plain": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                            vocab_size=512, max_position_embeddings=64, num_experts=4, num_experts_per_tok=1),
}
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
CASES = [(fam, method, targets, r, ckpt)
         for fam in CONFIGS
         for method, targets, r in (("full", None, 0), ("lora", ("q_proj", "v_proj"), 8), ("lora", ATTN, 4),
                                    ("dora", ("q_proj", "v_proj"), 4), ("lora-fa", ATTN, 4), ("vera", ("q_proj", "v_proj"), 16))
         for ckpt in (False, True)]


def _estimate(tmp_path, family, method, targets, r, ckpt, dtype="fp32"):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIGS[family]))
    kw = dict(batch=B, seq=S, precision=dtype, attention="eager", model_dropout=0.0, grad_checkpointing=ckpt)
    if method != "full":
        kw.update(r=r, targets=",".join(targets))
    return estimate(str(path), method, **kw)


@pytest.mark.parametrize("family,method,targets,r,ckpt", CASES)
def test_moe_saved_bytes_equal_torch(tmp_path, family, method, targets, r, ckpt):
    e = _estimate(tmp_path, family, method, targets, r, ckpt)
    got = measure(CONFIGS[family], method, targets, r, ckpt, keep_alive=method == "dora")
    if method == "dora":  # DoRA's orphaned eye(d_in) saves (test_saved_vs_torch.test_dora_transient_saves)
        assert got >= e.memory.saved_activation_bytes
    else:
        assert e.memory.saved_activation_bytes == got
