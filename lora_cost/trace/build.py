"""Build the real model and apply the method as a user would, on the meta device (no memory).

transformers builds the model from its config (`AutoModelForCausalLM.from_config`, the masked-LM
class for BERT/RoBERTa) under `torch.device("meta")`; peft applies LoRA, LoRA-FA, DoRA and VeRA
(`get_peft_model`); NoLA uses the project's reference layer (nola.py); QLoRA swaps in the 4-bit
stand-in (qlora.py) and then runs peft's own `prepare_model_for_kbit_training`. `fake.py` later
turns every meta tensor into a fake tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LoraCostError
from ..profiles import find_config
from .nola import NolaLinear
from .qlora import quantize_linears

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MASKED_LM = ("bert", "roberta")


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
    p = run.model_dropout
    if p is not None:
        for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob",
                    "attention_dropout", "hidden_dropout"):
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
    cls = transformers.AutoModelForMaskedLM if spec.model_type in MASKED_LM else transformers.AutoModelForCausalLM
    notes: list[str] = []
    with torch.device("meta"):
        try:
            model = cls.from_config(config, dtype=weight_dtype, attn_implementation=run.attention)
        except (ValueError, KeyError) as exc:
            raise LoraCostError(f"transformers cannot build {spec.name}: {exc}") from None
        model.config.use_cache = False
        model.train()
        model, adapted = _apply_method(model, run, method, target_names, notes)
    return Built(model=model, adapted=adapted, notes=notes)


def _ckpt(model) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _apply_method(model, run, method, targets, notes) -> int:
    import peft

    name = method.name
    if name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        if run.grad_checkpointing:
            _ckpt(model)
        return model, 0
    r = run.r
    if name == "qlora":
        compute = torch.float16 if run.precision == "fp16" else torch.bfloat16
        quantize_linears(model, compute, bool(method.option(run, "double_quant")))
        model.is_loaded_in_4bit = True  # what transformers sets after a bitsandbytes 4-bit load
        peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=run.grad_checkpointing,
                                             gradient_checkpointing_kwargs={"use_reentrant": False})
        notes.append("QLoRA: bitsandbytes Linear4bit replaced by a stand-in with the same storage, saved tensors "
                     "and dequantised transients (lora_cost/trace/qlora.py)")
    elif run.grad_checkpointing:
        _ckpt(model)
    fan_in_fan_out = model.config.model_type == "gpt2" and name != "qlora"
    if name == "nola":
        for p in model.parameters():
            p.requires_grad_(False)
        adapted = _apply_nola(model, run, method, targets)
    elif name == "vera":
        cfg = peft.VeraConfig(r=r, target_modules=list(targets), vera_dropout=run.dropout, fan_in_fan_out=fan_in_fan_out)
        model = _peft(model, cfg)
        adapted = _count(model, "vera_lambda_b")
    else:
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=run.dropout, target_modules=list(targets),
                              use_dora=name == "dora", fan_in_fan_out=fan_in_fan_out)
        model = _peft(model, cfg)
        if name == "lora-fa":
            for n, p in model.named_parameters():
                if ".lora_A." in n:
                    p.requires_grad_(False)
        adapted = _count(model, "lora_A")
    if run.grad_checkpointing and name != "qlora":  # prepare_model_for_kbit_training already did it
        _base(model).enable_input_require_grads()
    return model, adapted


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _peft(model, cfg):
    import peft
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return peft.get_peft_model(model, cfg)
        except ValueError as exc:
            raise LoraCostError(f"peft rejected the configuration: {exc}") from None


def _count(model, attr: str) -> int:
    return sum(1 for m in model.modules() if hasattr(m, attr) and len(getattr(m, attr)) > 0)


def _apply_nola(model, run, method, targets) -> int:
    from transformers.pytorch_utils import Conv1D

    k, l_ = method.option(run, "k"), method.option(run, "l")
    wanted = set(targets)
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name not in wanted or not isinstance(child, (nn.Linear, Conv1D)) or child is model.get_output_embeddings():
                continue
            d_in, d_out = (child.in_features, child.out_features) if isinstance(child, nn.Linear) else tuple(child.weight.shape)
            setattr(parent, name, NolaLinear(child, d_in, d_out, run.r, k, l_, run.dropout, seed=count))
            count += 1
    return count
