"""Build the real model and apply the method as a user would, on the meta device (no memory).

transformers builds the model from its config (`AutoModelForCausalLM.from_config`, the masked-LM
class for BERT/RoBERTa) under `torch.device("meta")`; each method applies itself through its trace
hook (`Method.apply_to_model` in lora_cost/analytic/methods/: peft's `get_peft_model` for LoRA,
LoRA-FA, DoRA and VeRA, the reference layers nola.py for NoLA and bottleneck.py for the `adapters` library's
bottleneck adapters, the 4-bit stand-in qlora.py and peft's
`prepare_model_for_kbit_training` for QLoRA). `fake.py` later turns every meta tensor into a fake tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LoraCostError
from ..profiles import find_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MASKED_LM = ("bert", "roberta")
SEQ2SEQ = ("t5", "mt5")


def raw_config(name_or_path: str) -> dict:
    """The config.json fields of a bundled profile or of a local file (the analytic lookup's sources)."""
    return dict(find_config(name_or_path)[1])


def hf_config(cfg: dict, run):
    """A transformers config from the dict, with the run's attention implementation and dropout."""
    import transformers

    cfg = dict(cfg)
    model_type = cfg.pop("model_type")
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype", "auto_map", "quantization_config"):
        cfg.pop(key, None)
    try:
        config = transformers.AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError):
        raise LoraCostError(f"transformers {transformers.__version__} has no model class for model_type "
                            f"{model_type!r}, so the trace engine cannot build it; use --engine analytic") from None
    config.use_cache = False
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = config.pad_token_id if config.pad_token_id is not None else 0  # T5's convention
    p = run.model_dropout
    if p is not None:
        for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob",
                    "attention_dropout", "hidden_dropout", "dropout_rate"):
            if hasattr(config, key):
                setattr(config, key, p)
    return config


@dataclass
class Built:
    model: nn.Module
    adapted: int  # adapted modules
    notes: list


def build(spec, cfg: dict, run, method, target_names: tuple[str, ...]) -> Built:
    import transformers

    config = hf_config(cfg, run)
    weight_dtype = DTYPES[run.weight_dtype]
    if spec.model_type in MASKED_LM:
        cls = transformers.AutoModelForMaskedLM
    elif spec.model_type in SEQ2SEQ or getattr(config, "is_encoder_decoder", False):
        cls = transformers.AutoModelForSeq2SeqLM
    else:
        cls = transformers.AutoModelForCausalLM
    notes: list[str] = []
    with torch.device("meta"):
        try:
            model = cls.from_config(config, dtype=weight_dtype, attn_implementation=_attention(cls, config, run, notes))
        except (ValueError, KeyError) as exc:
            raise LoraCostError(f"transformers cannot build {spec.name}: {exc}") from None
        model.config.use_cache = False
        model.train()
        model, adapted = _apply_method(model, run, method, target_names, notes)
    return Built(model=model, adapted=adapted, notes=notes)


def _attention(cls, config, run, notes: list) -> str | None:
    """The run's attention implementation; for `sdpa` (the default) on a model class that cannot run it
    (Gemma 2: `_supports_sdpa = False`, soft-capping), None: transformers' own default, which falls
    back to eager as a user who asks for nothing gets."""
    if run.attention != "sdpa":
        return run.attention
    model_class = cls._model_mapping.get(type(config), None) if hasattr(cls, "_model_mapping") else None
    if model_class is not None and not getattr(model_class, "_supports_sdpa", True):
        notes.append(f"{model_class.__name__} cannot run sdpa; transformers runs eager attention")
        return None
    return run.attention


def _apply_method(model, run, method, targets, notes):
    """The method's own trace hook (`Method.apply_to_model`): (model, adapted modules)."""
    if method.apply_to_model is None:
        raise LoraCostError(f"the trace engine cannot apply {method.name}; use --engine analytic")
    return method.apply_to_model(model, run, tuple(targets), notes)
