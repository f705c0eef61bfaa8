"""Every bundled description loads and validates; aliases resolve."""

import json

import pytest

from lora_cost.profiles import bundled_gpus, bundled_models, load_gpu, load_model, profiles_dir

pytestmark = pytest.mark.fast


def shapes_from_config(cfg: dict) -> tuple:
    """(layers, hidden, heads, kv_heads, head_dim, intermediate, vocab, tied) as transformers builds
    them from a config.json, written out here apart from lora_cost.profiles: GPT2Config names them
    n_layer/n_embd/n_head and takes n_inner None as 4 * n_embd; LlamaConfig (Mistral, Qwen2 alike)
    takes num_key_value_heads None as num_attention_heads and head_dim None as hidden // heads;
    tie_word_embeddings defaults to True (PretrainedConfig). T5Config names them d_model, num_heads,
    d_kv, d_ff and num_layers (+ num_decoder_layers, default num_layers: both stacks are blocks)."""
    if cfg["model_type"] in ("t5", "mt5"):
        layers = cfg["num_layers"] + cfg.get("num_decoder_layers", cfg["num_layers"])
        return (layers, cfg["d_model"], cfg["num_heads"], cfg["num_heads"], cfg["d_kv"], cfg["d_ff"], cfg["vocab_size"],
                cfg["model_type"] == "t5" and cfg.get("tie_word_embeddings", True))
    hidden = cfg.get("hidden_size", cfg.get("n_embd"))
    heads = cfg.get("num_attention_heads", cfg.get("n_head"))
    intermediate = cfg.get("intermediate_size", cfg.get("n_inner")) or 4 * hidden
    head_dim = cfg.get("head_dim") or cfg.get("attention_head_size") or hidden // heads  # DeBERTa-v2: attention_head_size
    return (cfg.get("num_hidden_layers", cfg.get("n_layer")), hidden, heads, cfg.get("num_key_value_heads") or heads,
            head_dim, intermediate, cfg["vocab_size"], cfg.get("tie_word_embeddings", True))


def test_all_model_profiles_load():
    files = sorted((profiles_dir() / "models").rglob("*.json"))
    # 17 + Qwen3 0.6B, 1.7B, 4B, 8B, 14B, 32B + Phi-3-mini 4k, 128k, Phi-4, BLOOM-560m, BLOOMZ-7b1
    # + Gemma-2 2B, 9B, 27B, Gemma-3 1B, 4B, 12B, 27B + t5-base, t5-large, flan-t5-xl, flan-t5-xxl, t0-3b,
    # mt0-large, mt0-xxl + Mixtral 8x7B, 8x22B, Qwen3-30B-A3B, Qwen3-235B-A22B
    # + DeBERTa-v3 base, large, DeBERTa-v2 xxlarge
    assert len(files) == 50 == len(bundled_models())
    for path in files:
        doc = json.loads(path.read_text())
        spec = load_model(doc["name"])
        got = (spec.layers, spec.hidden, spec.heads, spec.kv_heads, spec.head_dim, spec.intermediate, spec.vocab,
               spec.tie_embeddings)
        assert got == shapes_from_config(doc["config"]), doc["name"]


def test_published_shapes():
    # head_dim from the model cards: 4096 / 32 = 128 (Llama-2 7B), explicit 64 with 2048 / 32 (Llama-3.2 1B),
    # 896 / 14 = 64 (Qwen2.5 0.5B, 2 key/value heads), 768 / 12 = 64 and 4 * 768 = 3072 (GPT-2)
    assert (load_model("llama-2-7b").head_dim, load_model("llama-2-7b").kv_heads) == (128, 32)
    assert (load_model("llama-3.2-1b").head_dim, load_model("llama-3.2-1b").kv_heads) == (64, 8)
    assert (load_model("qwen2.5-0.5b").head_dim, load_model("qwen2.5-0.5b").kv_heads) == (64, 2)
    assert (load_model("gpt2").head_dim, load_model("gpt2").intermediate) == (64, 3072)
    # Qwen3: head_dim 128 is given explicitly and is not hidden / heads for 0.6B (1024 / 16 = 64) or 4B (2560 / 32 = 80)
    assert (load_model("Qwen/Qwen3-0.6B").head_dim, load_model("qwen3-4b").head_dim) == (128, 128)
    assert load_model("qwen3-8b").qk_norm and not load_model("qwen2.5-7b").qk_norm


@pytest.mark.parametrize("name,published", [
    # total parameters as the Qwen3 model cards and technical report (arXiv:2505.09388, Table 1) print them,
    # in billions to one decimal: the counts below are summed from the config shapes by the family module
    ("qwen3-0.6b", 0.6), ("qwen3-1.7b", 1.7), ("qwen3-4b", 4.0), ("qwen3-8b", 8.2), ("qwen3-14b", 14.8),
    ("qwen3-32b", 32.8),
])
def test_qwen3_totals_match_the_published_sizes(name, published):
    from lora_cost import estimate
    total = estimate(name, "full", seq=16).total_params
    assert round(total / 1e9, 1) == published


def test_all_gpu_profiles_load():
    files = sorted((profiles_dir() / "gpus").rglob("*.json"))
    assert len(files) == 11 == len(bundled_gpus())
    for path in files:
        gpu = load_gpu(json.loads(path.read_text())["name"])
        assert gpu.memory_bytes > 10**9 and gpu.bf16_tflops_dense > 0


def test_hub_ids_are_aliases():
    assert load_model("meta-llama/Llama-2-7b-hf") == load_model("llama-2-7b")
    assert load_model("openai-community/gpt2").hidden == 768
    assert load_model("mistralai/Mistral-7B-v0.1").sliding_window == 4096
