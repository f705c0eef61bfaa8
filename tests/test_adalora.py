"""AdaLoRA (lora_cost/analytic/methods/adalora.py) against peft itself.

Saved-activation bytes against a real CPU step counted with `saved_tensors_hooks` (distinct storages,
parameters and buffers excluded, as tests/test_saved_vs_torch.py counts), FLOPs against
FlopCounterMode, trainable parameters against peft on the meta device and hand arithmetic, and the
bad input the CLI refuses with one line and exit code 2.

peft 0.21 leaves `ranknum` trainable whenever it moves the adapter to the base layer's device or dtype
(on a GPU always; on the CPU for 16-bit models only). The CPU fp32 runs here set it trainable, which
is what the same run on a GPU gets (test_ranknum_trains_after_a_move checks the mechanism)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lora_cost import LoraCostError, estimate
from lora_cost.cli import main

B, S = 2, 24
CONFIGS = {
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=3, n_head=4, vocab_size=512, n_positions=64),
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=64),
    "roberta": dict(model_type="roberta", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, vocab_size=512, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1),
}
DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob")
MASKED_LM = ("roberta", "bert")


def build(family: str, init_r: int, target_r: int, targets, ckpt: bool = False, device=None):
    """The model as a user builds it: transformers from a config, peft AdaLoraConfig, the causal-LM task
    model (masked-LM families: the AdaLoraModel, whose forward is the same), ranknum trainable."""
    import peft
    import torch
    import transformers

    cfg = CONFIGS[family]
    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    kwargs.update({k: 0.0 for k in DROPOUT_KEYS})
    config = transformers.AutoConfig.for_model(cfg["model_type"], **kwargs)
    config.use_cache = False
    torch.manual_seed(0)
    cls = transformers.AutoModelForMaskedLM if family in MASKED_LM else transformers.AutoModelForCausalLM
    import contextlib
    with torch.device(device) if device else contextlib.nullcontext():
        model = cls.from_config(config, attn_implementation="eager", dtype=torch.float32)
        conf = peft.AdaLoraConfig(init_r=init_r, target_r=target_r, total_step=100, lora_dropout=0.0,
                                  target_modules="all-linear" if targets == "all-linear" else list(targets),
                                  task_type=None if family in MASKED_LM else "CAUSAL_LM")
        model = peft.get_peft_model(model, conf)
    for name, p in model.named_parameters():
        if ".ranknum." in name:
            p.requires_grad_(True)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model.base_model if family in MASKED_LM else model


def measure(family: str, r: int, targets, ckpt: bool) -> tuple[int, int, int]:
    """(saved-activation bytes, forward FLOPs, backward FLOPs) of one real CPU step."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = build(family, r, max(1, r // 2), targets, ckpt)
    model.train()
    excluded = {p.untyped_storage().data_ptr() for p in model.parameters()}
    excluded |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded and ptr not in seen:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(2, 512, (B, S))
    counter = FlopCounterMode(display=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with counter:
            loss = model(input_ids=ids, labels=ids).loss
        fwd = counter.get_total_flops()
        with counter:
            loss.backward()
        bwd = counter.get_total_flops()
    return sum(seen.values()), fwd, bwd


def analytic(tmp_path, family: str, r: int, targets, ckpt: bool):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIGS[family]))
    return estimate(str(path), "adalora", r=r, method_options={"target_r": max(1, r // 2)},
                    targets=targets if targets == "all-linear" else ",".join(targets), batch=B, seq=S,
                    precision="fp32", attention="eager", model_dropout=0.0, grad_checkpointing=ckpt)


CASES = [
    ("gpt2", 4, ("c_attn",), False), ("gpt2", 6, "all-linear", False), ("gpt2", 4, ("c_attn", "c_fc"), True),
    ("llama", 4, ("q_proj", "v_proj"), False), ("llama", 8, "all-linear", False), ("llama", 4, "all-linear", True),
    ("roberta", 4, ("query", "value"), False), ("roberta", 6, "all-linear", False), ("roberta", 4, ("query", "value"), True),
]


@pytest.mark.parametrize("family,r,targets,ckpt", CASES)
def test_saved_bytes_and_flops_equal_torch(tmp_path, family, r, targets, ckpt):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    e = analytic(tmp_path, family, r, targets, ckpt)
    saved, fwd, bwd = measure(family, r, targets, ckpt)
    assert e.memory.saved_activation_bytes == saved
    assert e.flops.forward == fwd
    assert e.flops.backward == bwd
