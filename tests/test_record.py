"""The rank-affine cache of forward simulations gives exactly what a fresh simulation at that rank gives."""

from dataclasses import replace

import pytest

from lora_cost.analytic.architectures import get_architecture
from lora_cost.analytic.methods import get_method
from lora_cost.profiles import load_model
from lora_cost.analytic.record import affine_record, simulate
from lora_cost.spec import RunConfig

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("model,method,targets", [
    ("llama-3.2-1b", "lora", ("q_proj", "v_proj")), ("llama-3.2-1b", "dora", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    ("qwen2.5-0.5b", "qlora", ("q_proj", "v_proj")), ("gpt2", "nola", ("c_attn",)), ("gpt2", "vera", ("c_attn", "c_fc")),
    ("roberta-base", "lora-fa", ("query", "value")),
])
@pytest.mark.parametrize("r", [3, 16, 100])
@pytest.mark.parametrize("ckpt", [False, True])
def test_affine_record_equals_direct_simulation(model, method, targets, r, ckpt):
    spec = load_model(model)
    run = RunConfig(method=method, r=1, targets=targets, batch=2, seq=300, precision="bf16", grad_checkpointing=ckpt)
    cached = affine_record(spec, run, frozenset(targets)).at(r)
    scalars, lists = simulate(spec, replace(run, r=r), get_method(method), get_architecture(spec.model_type), frozenset(targets))
    assert cached.saved == {k[1]: v for k, v in scalars.items() if k[0] == "saved"}
    assert cached.flops == {k[1]: v for k, v in scalars.items() if k[0] == "flops"}
    assert cached.logits_bytes == scalars[("logits",)]
    for (name, scope), values in lists.items():
        field = "largest" if name == "created" else name
        assert getattr(cached, field)[scope] == max(values)
