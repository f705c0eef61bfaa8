"""Tiny transformers models measured on the CPU (eager attention, no dropout): the bytes autograd
saves (`saved_tensors_hooks`, distinct storages, parameters and buffers excluded, as
tests/test_saved_vs_torch.py counts them) and the FLOPs `FlopCounterMode` counts, forward and backward.
Shared by the tests of BitFit, (IA)3 and LoRA+; `prepare(model)` applies the method's recipe."""

import json

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

B, S = 2, 24
CONFIGS = {
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=3, n_head=4, vocab_size=512, n_positions=64),
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=64),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=512, max_position_embeddings=64, tie_word_embeddings=True),
    "bert": dict(model_type="bert", hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 vocab_size=512, max_position_embeddings=64, type_vocab_size=2),
    "roberta": dict(model_type="roberta", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, vocab_size=512, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1),
}
DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob")


def config_file(tmp_path, family: str) -> str:
    path = tmp_path / f"{family}.json"
    path.write_text(json.dumps(CONFIGS[family]))
    return str(path)


def build(family: str, dtype: str = "fp32"):
    cfg = CONFIGS[family]
    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    kwargs.update({k: 0.0 for k in DROPOUT_KEYS})
    config = transformers.AutoConfig.for_model(cfg["model_type"], **kwargs)
    config.use_cache = False
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    cls = transformers.AutoModelForMaskedLM if family in ("roberta", "bert") else transformers.AutoModelForCausalLM
    return cls.from_config(config, attn_implementation="eager",
                           dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)


def measure(family: str, prepare, ckpt: bool = False, dtype: str = "fp32") -> tuple[int, int, int]:
    """(saved-activation bytes, forward FLOPs, backward FLOPs) of one training step."""
    model = prepare(build(family, dtype))
    if ckpt:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    model.train()
    from peft_step import SavedBytes

    saved = SavedBytes(model)

    ids = torch.randint(2, 512, (B, S))
    with saved:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    with FlopCounterMode(display=False) as fwd_counter:
        loss = model(input_ids=ids, labels=ids).loss
    fwd = fwd_counter.get_total_flops()
    with FlopCounterMode(display=False) as bwd_counter:
        loss.backward()
    return saved.bytes, fwd, bwd_counter.get_total_flops()
