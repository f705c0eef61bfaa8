"""Trainable and total parameter counts against the real libraries (transformers + peft on the meta device)."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lora_cost import estimate  # noqa: E402
from lora_cost.profiles import bundled_models  # noqa: E402


def build(name):
    cfg = dict(bundled_models()[name].config)
    model_type = cfg.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    with torch.device("meta"):
        if model_type in ("roberta", "bert"):
            return transformers.AutoModelForMaskedLM.from_config(config)
        return transformers.AutoModelForCausalLM.from_config(config)


def peft_config(method, r, targets):
    targets = "all-linear" if targets == "all-linear" else targets.split(",")
    if method == "vera":
        return peft.VeraConfig(r=r, target_modules=targets)
    return peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, use_dora=method == "dora")


CASES = [
    ("gpt2", "lora", 8, "c_attn"),
    ("gpt2", "lora", 4, "all-linear"),
    ("gpt2", "dora", 8, "c_attn"),
    ("gpt2", "vera", 256, "c_attn"),
    ("gpt2", "lora-fa", 8, "c_attn,c_fc"),
    ("roberta-base", "lora", 8, "query,value"),
    ("roberta-base", "vera", 1024, "query,value"),
    ("llama-3.2-1b", "lora", 16, "all-linear"),
    ("llama-3.2-1b", "dora", 8, "q_proj,k_proj,v_proj,o_proj"),
    ("qwen2.5-0.5b", "lora", 16, "all-linear"),
    ("qwen2.5-0.5b", "vera", 256, "all-linear"),
    ("qwen3-0.6b", "lora", 16, "all-linear"), ("qwen3-8b", "dora", 8, "q_proj,v_proj"),
]


@pytest.mark.parametrize("name,method,r,targets", CASES)
def test_trainable_params_match_peft(name, method, r, targets):
    model = build(name)
    base_total = sum(p.numel() for p in model.parameters())
    wrapped = peft.get_peft_model(model, peft_config(method, r, targets))
    if method == "lora-fa":
        for pname, p in wrapped.named_parameters():
            if "lora_A" in pname:
                p.requires_grad_(False)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    e = estimate(name, method, r=r, targets=targets, seq=64)
    assert e.trainable_params == trainable
    assert e.total_params == base_total


@pytest.mark.parametrize("name", ["gpt2", "llama-3.2-1b", "qwen2.5-0.5b", "mistral-7b", "roberta-large", "qwen3-0.6b",
                                  "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b"])
def test_full_finetune_counts_every_parameter(name):
    model = build(name)
    assert estimate(name, "full", seq=64).trainable_params == sum(p.numel() for p in model.parameters())
