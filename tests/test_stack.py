"""The block plan (analytic/stack.py): which blocks are simulated, what each stands for, and that
composing a stack from several kinds gives the numbers of the one-kind stack when the kinds are alike."""

from __future__ import annotations

import dataclasses

import pytest

from lora_cost.analytic.architectures.base import ARCHITECTURES
from lora_cost.analytic.record import affine_record
from lora_cost.analytic.stack import BlockGroup, Stack
from lora_cost.errors import LoraCostError

pytestmark = pytest.mark.fast


def test_uniform_stack_simulates_the_first_two_blocks():
    s = Stack.uniform(32)
    assert s.layers == 32
    assert s.simulated == ((0, "layer", "layer0"), (1, "layer", "layer1"))
    assert s.repetitions == {"layer0": 1, "layer1": 31}
    assert s.first_and_last == (("layer", 0, 31),)


def test_one_block():
    s = Stack.uniform(1)
    assert s.simulated == ((0, "layer", "layer0"),)
    assert s.repetitions == {"layer0": 1}


def test_alternating_kinds():
    # Gemma 2: sliding, global, sliding, global, ... (26 layers)
    s = Stack.of(["sliding", "global"] * 13)
    assert s.groups[:2] == (BlockGroup("sliding", 1), BlockGroup("global", 1)) and len(s.groups) == 26
    # each kind twice, in layer order: layers 0, 1 (first of each), 2, 3 (second of each)
    assert s.simulated == ((0, "sliding", "sliding0"), (1, "global", "global0"), (2, "sliding", "sliding1"),
                           (3, "global", "global1"))
    assert s.repetitions == {"sliding0": 1, "global0": 1, "sliding1": 12, "global1": 12}
    assert s.first_and_last == (("sliding", 0, 24), ("global", 1, 25))


def test_dense_then_sparse():
    # a mixture-of-experts model whose first block is dense: dense0 + moe0 + moe1 x 46
    s = Stack((BlockGroup("dense", 1), BlockGroup("moe", 47)))
    assert s.block_scopes == ("dense0", "moe0", "moe1")
    assert s.repetitions == {"dense0": 1, "moe0": 1, "moe1": 46}
    assert s.scopes[:3] == ("dense0", "moe0", "moe1") and s.scopes[-1] == "moe1"


def test_empty_group_rejected():
    with pytest.raises(LoraCostError):
        Stack((BlockGroup("layer", 0),))


@pytest.mark.parametrize("method,ckpt", [("lora", False), ("full", False), ("qlora", True), ("dora", True)])
def test_two_alike_kinds_compose_to_the_uniform_numbers(tmp_path, monkeypatch, method, ckpt):
    """A 6-layer Llama declared as alternating kinds 'a' and 'b' that run the same block: every
    simulated block of kind b (layer 1) and the second of kind a (layer 2) see exactly what layer 1
    sees in the one-kind plan, so all totals must be equal; only the names of the moments differ."""
    import json

    from lora_cost import estimate

    cfg = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 6,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 3072, "max_position_embeddings": 512}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    kw = dict(batch=2, seq=128, grad_checkpointing=ckpt)
    if method != "full":
        kw["targets"] = "all-linear"
    affine_record.cache_clear()
    uniform = estimate(str(path), method, **kw)
    llama = ARCHITECTURES.get("llama")
    mixed = dataclasses.replace(llama, stack=lambda spec: Stack.of(["a", "b"] * (spec.layers // 2)))
    monkeypatch.setitem(ARCHITECTURES._entries, "llama", mixed)
    affine_record.cache_clear()
    try:
        composed = estimate(str(path), method, **kw)
    finally:
        affine_record.cache_clear()
    assert composed.memory.saved_activation_bytes == uniform.memory.saved_activation_bytes
    assert composed.memory.peak_bytes == uniform.memory.peak_bytes
    assert (composed.flops.forward, composed.flops.backward) == (uniform.flops.forward, uniform.flops.backward)
    assert composed.trainable_params == uniform.trainable_params
