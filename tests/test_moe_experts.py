"""Adapters on the router and the fused expert parameters (peft lora.ParamWrapper, reached through all-linear and
the v4 expert names): saved bytes equal a real CPU saved_tensors_hooks count, FLOPs equal FlopCounterMode,
trainable parameters equal peft's, on the tiny models of tests/test_moe.py."""

import contextlib

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from test_moe import CONFIGS, _estimate, _flops  # noqa: E402
from test_saved_vs_torch import measure  # noqa: E402

EXPERTS = {"mixtral": ("w1", "w3", "w2"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
           "qwen3_moe_plain": ("gate_proj", "up_proj", "down_proj")}
# the v4 names peft maps (all-linear; the router alone; the down projection) and the parameters by their own names
# (peft target_parameters: gate_up_proj at rank r); checkpointing once per family (it keeps the block inputs only)
CASES = [(fam, method, targets, ckpt)
         for fam in ("mixtral", "qwen3_moe")
         for method, targets, ckpt in (("lora", "all-linear", False), ("lora", "all-linear", True),
                                       ("lora-fa", "all-linear", False), ("lora", ("gate",), False),
                                       ("lora", ("q_proj",) + EXPERTS[fam][2:], False),
                                       ("lora", ("experts.gate_up_proj", "experts.down_proj"), False))]


def _targets(targets):
    return targets if isinstance(targets, tuple) else (targets,)


@pytest.mark.parametrize("family,method,targets,ckpt", CASES)
def test_expert_adapters_saved_bytes_equal_torch(tmp_path, family, method, targets, ckpt):
    e = _estimate(tmp_path, family, method, _targets(targets), 4, ckpt)
    assert e.memory.saved_activation_bytes == _measure(family, method, targets, ckpt)


def _by_parameter(targets) -> bool:
    return targets != "all-linear" and any(t.startswith("experts.") for t in targets)


@contextlib.contextmanager
def _as_target_parameters(on: bool):
    """The helpers build LoraConfig(target_modules=...): hand the names to target_parameters instead."""
    real = peft.LoraConfig
    if on:
        peft.LoraConfig = lambda **kw: real(**dict(kw, target_modules=None, target_parameters=kw["target_modules"]))
    try:
        yield
    finally:
        peft.LoraConfig = real


def _measure(family, method, targets, ckpt):
    with _as_target_parameters(_by_parameter(targets)):
        return measure(CONFIGS[family], method, targets, 4, ckpt)


@pytest.mark.parametrize("family,method,targets,ckpt", [c for c in CASES if not c[3] and c[1] == "lora"
                                                        and c[2] != ("gate",)])
def test_expert_adapters_flops_equal_flop_counter(tmp_path, family, method, targets, ckpt):
    e = _estimate(tmp_path, family, method, _targets(targets), 4, ckpt)
    if targets == "all-linear":  # the names peft resolves all-linear to (its helper takes a list)
        targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate") + EXPERTS[family]
    with _as_target_parameters(_by_parameter(targets)):
        assert (e.flops.forward, e.flops.backward) == _flops(CONFIGS[family], method, targets, 4, ckpt)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_expert_adapters_trainable_equal_peft(tmp_path, family):
    """Mixtral tiny, all-linear, r = 4, E = 4, d = 64, I = 48, 3 layers: per layer q,k,v,o 4 (64+64) + 2 x 4 (64+32)
    + 4 (64+64) = 1,792; router 4 (64 + 4) = 272; gate_up_proj at rank 2r: 8 x 4 (64 + 96) = 5,120; down_proj
    4 x 4 (48 + 64) = 1,792: 3 x 8,976 = 26,928 (peft's count below)."""
    cfg = dict(CONFIGS[family])
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert _estimate(tmp_path, family, "lora", ("all-linear",), 4, False).trainable_params == real
    if family == "mixtral":
        assert real == 3 * (1792 + 272 + 5120 + 1792) == 26_928
