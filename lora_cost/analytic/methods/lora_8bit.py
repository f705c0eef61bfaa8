"""LoRA on an 8-bit base (`BitsAndBytesConfig(load_in_8bit=True)`, LLM.int8(): Dettmers et al. 2022,
arXiv:2208.07339) - peft's int8 recipe: prepare_model_for_kbit_training, then LoRA (tuners/lora/bnb.py
Linear8bitLt wraps bitsandbytes' Linear8bitLt; fp32 adapters on fp32 inputs, so no cast).

A method of its own rather than a `--bits` option of qlora: none of QLoRA's options (quant type, double
quantisation, quant storage) exists for int8, and the storage, forward and saved tensors differ
(`storage.py` EightBitStorage; trace stand-in lora_cost/trace/int8.py).
"""

from __future__ import annotations

import sys

from .base import Method, register_method
from .lora import apply_lora, is_lora_config, lora_linear, lora_serving, lora_trainable
from .storage import EightBitStorage


def eight_bit_storage(run) -> EightBitStorage:
    return EightBitStorage()


def apply_lora_8bit(model, run, targets, notes):
    """Trace hook: the int8 stand-in for every linear (lora_cost/trace/int8.py), peft's own
    prepare_model_for_kbit_training, then LoRA."""
    import peft

    from ...trace.int8 import quantize_linears_8bit

    quantize_linears_8bit(model)
    model.is_loaded_in_8bit = True  # what transformers sets after a bitsandbytes 8-bit load
    peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=run.grad_checkpointing,
                                         gradient_checkpointing_kwargs={"use_reentrant": False})
    notes.append("LoRA on int8: bitsandbytes Linear8bitLt replaced by a stand-in with the same storage, kept "
                 "tensors and transients (lora_cost/trace/int8.py); outlier columns (threshold 6.0) depend on the "
                 "data and are not counted")
    return apply_lora(model, run, targets, notes, prepared=True)


def recognise_lora_8bit(model, peft_config) -> bool:
    """Profiler: a peft LoRA model with bitsandbytes Linear8bitLt layers."""
    bnb = sys.modules.get("bitsandbytes")
    linear8 = getattr(getattr(bnb, "nn", None), "Linear8bitLt", None) if bnb is not None else None
    return is_lora_config(peft_config) and linear8 is not None and any(isinstance(m, linear8) for m in model.modules())


LORA_8BIT = register_method(Method(
    forward_lifetimes=True,  # ligeracc: peft Linear.forward's references (lora.lora_linear)
    name="lora-8bit",
    title="LoRA on an 8-bit base (LLM.int8())",
    paper="Dettmers et al. 2022, arXiv:2208.07339",
    recipe="BitsAndBytesConfig(load_in_8bit) + prepare_model_for_kbit_training + peft LoRA",
    default_r=8,
    trainable=lora_trainable,
    frozen=lambda site, run: [],
    adapted_linear=lora_linear,
    storage=eight_bit_storage,
    serving=lambda spec, sites, head_sites, run: lora_serving(spec, sites, head_sites, run, method=LORA_8BIT),
    # the load dtype (torch_dtype); prepare_model_for_kbit_training makes every non-int8 parameter fp32. Autocast
    # (amp-*) is refused: bitsandbytes' int8 ops have no autocast rule and what the cast of the adapters' and
    # the head's inputs would then be is not modelled here
    precisions=("bf16", "fp16", "fp32"),
    apply_to_model=apply_lora_8bit,
    recognise=recognise_lora_8bit,
    recognise_priority=30,
))
