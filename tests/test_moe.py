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


def _flops(cfg: dict, method: str, targets, r: int, ckpt: bool) -> tuple[int, int]:
    """Forward and backward FLOPs of one step under FlopCounterMode, with the trace engine's formula for
    aten._grouped_mm (which FlopCounterMode lacks: it would count the experts as 0)."""
    from torch.utils.flop_counter import FlopCounterMode
    from lora_cost.trace.flops import custom_mapping

    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    config = transformers.AutoConfig.for_model(cfg["model_type"], **kwargs)
    config.use_cache = False
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    from peft_step import adapt

    model = adapt(model, method, targets, r, ckpt)
    ids = torch.randint(2, 512, (B, S))
    with FlopCounterMode(display=False, custom_mapping=custom_mapping()) as fwd:
        loss = model(input_ids=ids, labels=ids).loss
    with FlopCounterMode(display=False, custom_mapping=custom_mapping()) as bwd:
        loss.backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


@pytest.mark.parametrize("family,method,targets,r,ckpt", [c for c in CASES if c[1] != "dora"])
def test_moe_flops_equal_flop_counter(tmp_path, family, method, targets, r, ckpt):
    e = _estimate(tmp_path, family, method, targets, r, ckpt)
    fwd, bwd = _flops(CONFIGS[family], method, targets, r, ckpt)
    assert (e.flops.forward, e.flops.backward) == (fwd, bwd)


def test_moe_flops_hand_arithmetic(tmp_path):
    """Router plus k experts per token. Mixtral tiny: n = 2 x 24 = 48 tokens, k = 2, E = 4, d = 64, I = 48,
    4 heads of 16, 2 key/value heads, vocab 512, 3 layers."""
    e = _estimate(tmp_path, "mixtral", "full", None, 0, False)
    n, k, E, d, I, L = 48, 2, 4, 64, 48, 3
    projections = 2 * n * (64 * 64 + 2 * 64 * 32 + 64 * 64)  # q, k, v, o: 96 x 12,288 = 1,179,648
    attention = 4 * 2 * 4 * 24 * 24 * 16  # 4 b h s^2 hd = 294,912
    router = 2 * n * d * E  # 24,576
    experts = 2 * n * k * (d * 2 * I + I * d)  # 2 x 96 x 9,216 = 1,769,472 (k experts per token, not E)
    head = 2 * n * d * 512  # 3,145,728
    assert e.flops.forward == L * (projections + attention + router + experts) + head == 12_951_552


MOE_PROFILES = ("mixtral-8x7b", "mixtral-8x22b", "qwen3-30b-a3b", "qwen3-235b-a22b")


@pytest.mark.parametrize("name", MOE_PROFILES)
def test_moe_profile_total_equals_transformers_on_meta(name):
    """Every expert's weights are resident: the total is transformers' own parameter count."""
    from lora_cost.profiles import bundled_models

    cfg = dict(bundled_models()[name].config)
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert estimate(name, "full", seq=16).total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,published,digits", [
    ("mixtral-8x7b", 46.7, 1),  # Mixtral of Experts (arXiv:2401.04088): 46.7B total, 12.9B active
    ("mixtral-8x22b", 141, 0),  # Mistral AI: 141B total, 39B active
    ("qwen3-30b-a3b", 30.5, 1),  # Qwen3 model card: 30.5B total, 3.3B activated
    ("qwen3-235b-a22b", 235, 0),  # Qwen3 model card: 235B total, 22B activated
])
def test_moe_totals_match_published_sizes(name, published, digits):
    assert round(estimate(name, "full", seq=16).total_params / 1e9, digits) == published


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("method,targets", [("lora", ("q_proj", "v_proj")), ("lora", ATTN), ("dora", ATTN),
                                            ("vera", ("q_proj", "v_proj"))])
def test_moe_trainable_equal_peft(tmp_path, family, method, targets):
    cfg = dict(CONFIGS[family])
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    r = 16 if method == "vera" else 4
    conf = peft.VeraConfig(r=r, target_modules=list(targets)) if method == "vera" else \
        peft.LoraConfig(r=r, target_modules=list(targets), use_dora=method == "dora")
    trainable, total = peft.get_peft_model(model, conf).get_nb_trainable_parameters()
    e = _estimate(tmp_path, family, method, targets, r, False)
    assert e.trainable_params == trainable
