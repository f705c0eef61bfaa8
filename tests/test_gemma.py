"""Gemma 2 and Gemma 3 (text) against PyTorch itself: tiny transformers + peft models on the CPU, eager
attention, fp32. Saved-activation bytes are what `saved_tensors_hooks` sees (distinct storages,
parameters and buffers excluded, as tests/test_saved_vs_torch.py counts them); FLOPs are
FlopCounterMode's, forward and backward. The tiny configs have 4 layers with a window of 16 < seq 24,
so both layer kinds, both rotary table pairs (Gemma 3) and both masks are exercised; Gemma 2 soft-caps
its attention scores (eager: one more saved [b, h, s, s] tanh output) and its logits."""

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lora_cost import estimate  # noqa: E402

B, S = 2, 24
CONFIGS = {
    "gemma2": dict(model_type="gemma2", hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512,
                   max_position_embeddings=64, sliding_window=16),
    # Gemma 3: pattern 2 (sliding, full, sliding, full) to see both kinds twice in 4 layers; one kv head
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=32, vocab_size=512,
                        max_position_embeddings=64, sliding_window=16, sliding_window_pattern=2),
    # Gemma 3 with the logit soft-capping set and explicit layer_types
    "gemma3_capped": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                          max_position_embeddings=64, sliding_window=16, final_logit_softcapping=30.0,
                          layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}


def build(cfg: dict, dtype: str = "fp32"):
    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    config = transformers.AutoConfig.for_model(cfg["model_type"], attention_dropout=0.0, **kwargs)
    config.use_cache = False
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)


def prepare(model, method: str, targets, r: int):
    if method == "full":
        return model
    tg = "all-linear" if targets == "all-linear" else list(targets)
    conf = peft.VeraConfig(r=r, target_modules=tg) if method == "vera" else \
        peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=tg, use_dora=method == "dora")
    model = peft.get_peft_model(model, conf)
    if method == "lora-fa":
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    return model


def measure(cfg: dict, method: str, targets, r: int, ckpt: bool, dtype: str = "fp32",
            keep_alive: bool = False) -> tuple[int, int, int]:
    """(saved-activation bytes, forward FLOPs, backward FLOPs) of one training step."""
    model = prepare(build(cfg, dtype), method, targets, r)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method != "full":
            model.enable_input_require_grads()
    model.train()
    from peft_step import SavedBytes

    saved = SavedBytes(model, keep_alive=keep_alive)

    ids = torch.randint(2, 512, (B, S))
    with saved:
        model(input_ids=ids, labels=ids).loss.backward()
    with FlopCounterMode(display=False) as fwd_counter:
        loss = model(input_ids=ids, labels=ids).loss
    with FlopCounterMode(display=False) as bwd_counter:
        loss.backward()
    return saved.bytes, fwd_counter.get_total_flops(), bwd_counter.get_total_flops()


def analytic(tmp_path, family, method, targets, r, ckpt, dtype="fp32"):
    path = tmp_path / f"{family}.json"
    path.write_text(json.dumps(CONFIGS[family]))
    kw = dict(batch=B, seq=S, precision=dtype, attention="eager", model_dropout=0.0, grad_checkpointing=ckpt)
    if method != "full":
        kw.update(r=r, targets=",".join(targets) if isinstance(targets, tuple) else targets)
    return estimate(str(path), method, **kw)


QV = ("q_proj", "v_proj")
METHODS = [("full", None, 0), ("lora", QV, 8), ("lora", "all-linear", 4), ("lora-fa", "all-linear", 4),
           ("vera", "all-linear", 16), ("vera", QV, 8)]
CASES = [(f, m, t, r, ckpt) for f in CONFIGS for m, t, r in METHODS for ckpt in (False, True)]


@pytest.mark.parametrize("family,method,targets,r,ckpt", CASES)
def test_saved_bytes_and_flops_equal_torch(tmp_path, family, method, targets, r, ckpt):
    e = analytic(tmp_path, family, method, targets, r, ckpt)
    saved, fwd, bwd = measure(CONFIGS[family], method, targets, r, ckpt)
    assert (e.memory.saved_activation_bytes, e.flops.forward, e.flops.backward) == (saved, fwd, bwd)


@pytest.mark.parametrize("family,method,targets,r,ckpt", [
    ("gemma2", "full", None, 0, False), ("gemma2", "lora", "all-linear", 4, False),
    ("gemma3_text", "lora", QV, 8, True), ("gemma3_text", "full", None, 0, False)])
def test_saved_bytes_equal_torch_bf16(tmp_path, family, method, targets, r, ckpt):
    """bf16: the fp32 upcasts of the (1 + w) RMSNorm, peft's fp32 adapters, the bf16 tanh outputs."""
    e = analytic(tmp_path, family, method, targets, r, ckpt, "bf16")
    assert e.memory.saved_activation_bytes == measure(CONFIGS[family], method, targets, r, ckpt, "bf16")[0]


@pytest.mark.parametrize("family,targets,d_ins", [
    ("gemma2", QV, (64, 64)), ("gemma3_text", ("q_proj", "o_proj"), (64, 128)),
    ("gemma2", ("down_proj",), (96,))])
@pytest.mark.parametrize("ckpt", (False, True))
def test_dora(tmp_path, family, targets, d_ins, ckpt):
    """DoRA pushes eye(d_in) through lora_A and lora_B each forward; autograd saves eye and A @ eye, whose
    graph is dropped with the detached weight norm before backward (the estimator counts them as orphaned,
    not as saved activations). Kept alive, the hook counts them all: (d_in^2 + d_in r) fp32 per module
    per layer. Under non-reentrant checkpointing the checkpoint's own saved-tensor hooks take over inside
    each block, so the outer hook sees none of them (nor the block's other saves)."""
    r, layers = 4, CONFIGS[family]["num_hidden_layers"]
    e = analytic(tmp_path, family, "dora", targets, r, ckpt)
    saved, fwd, bwd = measure(CONFIGS[family], "dora", targets, r, ckpt, keep_alive=True)
    orphans = 0 if ckpt else layers * sum((d * d + d * r) * 4 for d in d_ins)
    assert saved - orphans == e.memory.saved_activation_bytes
    assert (e.flops.forward, e.flops.backward) == (fwd, bwd)


def test_gemma2_soft_capping_saves_tanh_outputs(tmp_path):
    """Hand arithmetic: without either soft-capping the step saves exactly the attention scores' tanh
    outputs (4 layers x [2, 4, 24, 24] fp32) and the logits' tanh output ([48, 512] fp32) fewer bytes."""
    capped = analytic(tmp_path, "gemma2", "lora", QV, 8, False).memory.saved_activation_bytes
    cfg = dict(CONFIGS["gemma2"], attn_logit_softcapping=None, final_logit_softcapping=None)
    path = tmp_path / "uncapped.json"
    path.write_text(json.dumps(cfg))
    plain = estimate(str(path), "lora", r=8, targets="q_proj,v_proj", batch=B, seq=S, precision="fp32",
                     attention="eager", model_dropout=0.0).memory.saved_activation_bytes
    assert capped - plain == 4 * (2 * 4 * 24 * 24) * 4 + 48 * 512 * 4


GEMMA_PROFILES = ("gemma-2-2b", "gemma-2-9b", "gemma-2-27b", "gemma-3-1b", "gemma-3-4b", "gemma-3-12b", "gemma-3-27b")


@pytest.mark.parametrize("name", GEMMA_PROFILES)
def test_profile_totals_match_transformers_on_meta(name):
    """Every bundled Gemma profile: total parameters as transformers builds the model (tied embeddings counted
    once), and LoRA r=16 on all-linear as peft resolves it."""
    from lora_cost.profiles import bundled_models

    cfg = dict(bundled_models()[name].config)
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, target_modules="all-linear"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    e = estimate(name, "lora", r=16, targets="all-linear", seq=64)
    assert (e.total_params, e.trainable_params) == (total, trainable)
