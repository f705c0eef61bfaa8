"""Tiny transformers models measured on the CPU (eager attention, no dropout): the bytes autograd
saves (`saved_tensors_hooks`, distinct storages, parameters and buffers excluded, as
tests/test_saved_vs_torch.py counts them) and the FLOPs `FlopCounterMode` counts, forward and backward.
Shared by the tests of BitFit, (IA)3 and LoRA+; `prepare(model)` applies the method's recipe."""

import json

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from tiny_configs import B, CONFIGS, DROPOUT_KEYS, S  # noqa: E402


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
