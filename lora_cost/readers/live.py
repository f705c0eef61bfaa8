"""`lora_cost.estimate_from(model, batch=..., seq=...)`: the estimate of a live (or meta-device)
transformers model, peft-wrapped or not, read from the object itself.

What is read, and from where (the profiler's own readers, lora_cost/profiler/introspect.py, so both see
a run the same way):
- shapes: the Hugging Face config (`config.to_dict()`) -> ModelSpec, as for a config.json;
- method: peft's `PeftModel.peft_config` and the layers (each method's `recognise`: LoRA, DoRA, VeRA,
  AdaLoRA, (IA)3, prompt methods; QLoRA by bitsandbytes Linear4bit layers; full when every weight trains);
- targets: the modules peft adapted (`BaseTunerLayer` instances), or "all-linear" as the config says;
  r (AdaLoRA: init_r), the adapter dropout; the method's observed options (QLoRA's quant type, ...);
- precision: the frozen weights' dtype (QLoRA: the 4-bit layers' compute dtype);
- gradient checkpointing (`is_gradient_checkpointing`), attention (`config._attn_implementation`), the task
  (peft task_type, else the model class: ...ForSequenceClassification -> seq-cls).
Nothing runs: the model may live on the meta device. torch is imported only inside `estimate_from`.
"""

from __future__ import annotations

from dataclasses import replace

from ..errors import LoraCostError

# peft task_type -> --task
_TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "seq-cls", "TOKEN_CLS": "token-cls", "SEQ_2_SEQ_LM": "seq2seq"}


def estimate_from(model, batch: int = 1, seq: int = 512, *, optimizer: str = "adamw", gpu: str | None = None,
                  **overrides):
    """Estimate one training step of `model` (a transformers PreTrainedModel or a peft PeftModel, on any
    device, meta included) at `batch` x `seq`. Keywords of `lora_cost.estimate` in `overrides` replace what
    was read (e.g. precision="amp-bf16" when the step runs under autocast). What could not be read or is
    not modelled is listed in the Estimate's warnings."""
    from ..analytic.estimator import estimate
    from ..profiles import spec_from_config
    from ..profiler import introspect as seen
    from .common import ATTENTION_NAMES
    from .base import accepted

    peft_cfg, base = seen._peft_config(model)
    hf = seen._hf_model(base)
    if hf is None:
        raise LoraCostError(f"{type(model).__name__}: no Hugging Face config found on the model")
    cfg = hf.config
    warnings: list[str] = []
    name = getattr(cfg, "name_or_path", "") or type(hf).__name__
    spec = spec_from_config(name, cfg.to_dict(), "live model")
    method = overrides.pop("method", None)
    if method is None:
        method, why = seen._method(model, peft_cfg)
        if method is None:
            raise LoraCostError(f"{type(model).__name__}: {why}")
    from ..analytic.methods import get_method
    m = get_method(method)
    kwargs: dict = dict(batch=batch, seq=seq, optimizer=optimizer, grad_checkpointing=seen._checkpointing(hf))
    precision = seen._precision(model, method, None)
    if precision is not None:
        kwargs["precision"] = precision
    attention = getattr(cfg, "_attn_implementation", None)
    if attention is not None:
        mapped = ATTENTION_NAMES.get(attention, attention)
        if accepted("attention", mapped):
            kwargs["attention"] = mapped
        else:
            warnings.append(f"attention {attention!r} is not modelled by this lora-cost: estimated with sdpa")
    if peft_cfg is not None and not m.base_trainable:
        r = getattr(peft_cfg, "init_r", None) or getattr(peft_cfg, "r", None)
        if m.takes_rank and r is not None:
            kwargs["r"] = r
        dropout = getattr(peft_cfg, "lora_dropout", None) or getattr(peft_cfg, "vera_dropout", None)
        if dropout and m.adapts_linears:
            kwargs["dropout"] = float(dropout)
        if m.takes_targets:
            targets, more = _targets(model, base, peft_cfg)
            warnings.extend(more)
            if targets:
                kwargs["targets"] = targets
        if getattr(peft_cfg, "layers_to_transform", None) is not None:
            warnings.append("layers_to_transform: LoRA on a subset of layers is not modelled (every layer counted)")
        if getattr(peft_cfg, "rank_pattern", None):
            warnings.append("rank_pattern: per-module ranks are not modelled (r for every module)")
    options = m.observed_options(model)
    if options:
        kwargs["method_options"] = options
    task, labels = _task(hf, peft_cfg)
    if task is not None:
        kwargs["task"] = task
        if task in ("seq-cls", "token-cls"):
            kwargs["num_labels"] = labels
    kwargs.update(overrides)
    result = estimate(spec, method, gpu=gpu, **kwargs)
    return replace(result, warnings=result.warnings + tuple(warnings)) if warnings else result


def _targets(model, base, peft_cfg):
    """(targets, warnings): "all-linear" as peft's config says it, else the names of the modules peft adapted."""
    import torch

    configured = getattr(peft_cfg, "target_modules", None)
    if configured == "all-linear":
        return ("all-linear",), ()
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.pytorch_utils import Conv1D

    from .regex import names_of

    hits, linears = [], []
    for key, module in base.named_modules():
        if isinstance(module, BaseTunerLayer):
            hits.append(key)
            linears.append(key)
        elif isinstance(module, (torch.nn.Linear, Conv1D)) and not key.endswith(".base_layer") and ".lora_" not in key:
            linears.append(key)
    if not hits:
        return (tuple(sorted(configured)) if configured else None), ()
    return names_of(hits, linears, "peft target_modules")


def _task(hf, peft_cfg):
    """(task, num_labels): peft's task_type, else the model class's suffix; None for the family's own head."""
    task_type = getattr(peft_cfg, "task_type", None) if peft_cfg is not None else None
    task = _TASKS.get(str(getattr(task_type, "value", task_type))) if task_type is not None else None
    if task is None:
        cls = type(hf).__name__
        task = "seq-cls" if cls.endswith("ForSequenceClassification") else "token-cls" if cls.endswith(
            "ForTokenClassification") else None
    if task in ("causal-lm", "seq2seq"):
        task = None  # the family's own head (decoders, T5): the estimate as --task is absent
    return task, getattr(hf.config, "num_labels", 2)
