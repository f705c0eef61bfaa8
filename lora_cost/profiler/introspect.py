"""Read the configuration of the live model, adapters and optimizer, and map it to the estimator.

Everything comes from the live objects: the Hugging Face `PretrainedConfig` (`config.to_dict()`,
`config._attn_implementation`), `PreTrainedModel.is_gradient_checkpointing`, peft's
`PeftModel.peft_config` (LoraConfig / VeraConfig), parameter dtypes and `requires_grad`, the
autocast state seen at the model's forward, the input_ids shape and the optimizer's class.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ..analytic.methods import get_method
from ..errors import LoraCostError
from .results import ModelInfo

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_OPTIMIZERS = {  # class name -> estimator optimizer
    "AdamW": "adamw", "Adam": "adamw", "AdamW8bit": "adamw-8bit", "Adam8bit": "adamw-8bit",
    "PagedAdamW": "paged-adamw-32bit", "PagedAdamW32bit": "paged-adamw-32bit", "PagedAdam32bit": "paged-adamw-32bit",
    "PagedAdamW8bit": "paged-adamw-8bit", "PagedAdam8bit": "paged-adamw-8bit", "SGD": "sgd",
    # task "optim": transformers' Adafactor, bitsandbytes' Lion (Lion: optim_bits=32 by default)
    "Adafactor": "adafactor", "Lion": "lion-32bit", "Lion32bit": "lion-32bit", "Lion8bit": "lion-8bit",
    "PagedLion": "paged-lion-32bit", "PagedLion32bit": "paged-lion-32bit", "PagedLion8bit": "paged-lion-8bit",
}
# classes named like others whose module tells them apart (torchao's AdamW8bit is not bitsandbytes')
_OPTIMIZERS_BY_MODULE = {("torchao", "AdamW8bit"): "adamw-torch-8bit", ("torchao", "AdamW4bit"): "adamw-torch-4bit",
                         ("galore_torch", "AdamW"): "galore-adamw"}


@dataclass(frozen=True)
class Observed:
    """What the profiler saw at the model's forward."""

    input_shape: tuple[int, ...] | None  # input_ids (or the first integer tensor) of one micro-batch
    autocast_dtype: torch.dtype | None


def pick_model(candidates, optimizers):
    """The module whose parameters the optimizer holds: of the modules called at top level, the
    one owning the most optimizer parameters (peft-wrapped or not)."""
    wanted = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}
    best, best_hits = None, 0
    for module in candidates:
        hits = sum(1 for p in module.parameters() if id(p) in wanted)
        if hits > best_hits:
            best, best_hits = module, hits
    return best


def _peft_config(model):
    peft = sys.modules.get("peft")
    if peft is None or not isinstance(model, peft.PeftModel):
        return None, model
    cfg = model.peft_config.get(getattr(model, "active_adapter", "default")) or next(iter(model.peft_config.values()))
    return cfg, model.get_base_model()


def _hf_model(model):
    """The innermost module carrying a Hugging Face config."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict") and hasattr(cfg, "model_type"):
            return m
    return None


def _method(model, peft_cfg, optimizer=None) -> tuple[str | None, str]:
    """The first method, in the registry's recognition order, that recognises the live model; methods
    told apart by their optimizer (LoRA+) are asked first."""
    from ..analytic.methods.base import optimizer_recognisers, recognisers

    if optimizer is not None:
        for method in optimizer_recognisers():
            if method.recognise_optimizer(model, peft_cfg, optimizer) is not None:
                return method.name, ""
    for method in recognisers():
        if method.recognise(model, peft_cfg):
            return method.name, ""
    if peft_cfg is None:
        return None, "no peft adapters but only part of the model trains (the estimator knows full fine-tuning and peft methods)"
    return None, f"peft {type(peft_cfg).__name__} is not a method the estimator knows"


def _precision(model, method: str | None, autocast_dtype) -> str | None:
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    m = get_method(method) if method is not None else None
    pool = frozen if frozen and not (m and m.base_trainable) else [p for p in model.parameters() if p.is_floating_point()]
    observed = m.observed_precision if m is not None else None
    if observed is not None:  # QLoRA: the 4-bit layers' compute dtype
        name = observed(model)  # task "recast": bf16 compute under bf16 autocast is Trainer(bf16=True)'s amp-bf16
        return "amp-bf16" if name == "bf16" and autocast_dtype == torch.bfloat16 else name
    if not pool:
        return None
    dtype = max(pool, key=lambda p: p.numel()).dtype
    name = _DTYPES.get(dtype)
    if name == "fp32" and autocast_dtype in (torch.bfloat16, torch.float16):
        return "amp-bf16" if autocast_dtype == torch.bfloat16 else "amp-fp16"
    return name


def _optimizer(opt) -> tuple[str | None, str]:
    name = type(opt).__name__
    package = type(opt).__module__.split(".")[0]
    mapped = _OPTIMIZERS_BY_MODULE.get((package, name), _OPTIMIZERS.get(name))
    if mapped == "adamw" and any(g.get("fused") for g in opt.param_groups):
        mapped = "adamw-torch-fused"
    if mapped is None:
        return None, f"optimizer {name} is not one the estimator knows"
    note = ""
    if name == "SGD" and not any(g.get("momentum", 0) for g in opt.param_groups):
        note = "SGD without momentum keeps no state; the estimate assumes a momentum buffer"
    if any(g.get("amsgrad") for g in opt.param_groups):
        note = "amsgrad keeps a third state; the estimate assumes two"
    return mapped, note


def _targets(model, peft_cfg) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(targets, notes): the config's list sorted, "all-linear", or for a regex the names of the modules
    peft adapted (lora_cost/readers/live.py, the reading `estimate_from` uses)."""
    t = getattr(peft_cfg, "target_modules", None)
    if t is None:
        return (), ()
    if isinstance(t, str):
        if t == "all-linear":
            return (t,), ()
        from ..readers.live import _targets as adapted
        _, base = _peft_config(model)
        names, notes = adapted(model, base, peft_cfg)
        return tuple(names or ()), tuple(notes)
    return tuple(sorted(t)), ()


def unwrap_parallel(model):
    """The module a data-parallel wrapper trains: DistributedDataParallel and DataParallel keep it as
    `.module` (torch/nn/parallel/distributed.py, data_parallel.py); FSDP2's fully_shard changes the
    module in place (nothing to unwrap)."""
    from torch.nn import DataParallel
    from torch.nn.parallel import DistributedDataParallel
    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def _attention(cfg) -> tuple[str | None, str]:
    """(the estimator's attention, a note): transformers' attn_implementation in lora-cost's spelling when
    this lora-cost models it, else sdpa with a note."""
    from ..readers.base import accepted
    from ..readers.common import ATTENTION_NAMES

    attention = getattr(cfg, "_attn_implementation", None) if cfg is not None else None
    mapped = ATTENTION_NAMES.get(attention, attention) if attention is not None else None
    if mapped is not None and accepted("attention", mapped):
        return mapped, ""
    return "sdpa", f"attention {attention!r} estimated as sdpa" if attention is not None else ""


def _from_training_args(training_args, observed: dict) -> tuple[dict, list[str]]:
    """What a Trainer's TrainingArguments add to the live reading (the Liger loss, packing, sharding, ...),
    through the --training-args reader: the live objects win where both tell (batch, precision, optimizer,
    checkpointing), and a field this lora-cost does not model is a note."""
    if training_args is None:
        return {}, []
    from dataclasses import fields

    from ..readers.base import resolve
    from ..readers.training_args import training_args_reading
    from ..spec import RunConfig

    data = training_args.to_dict() if hasattr(training_args, "to_dict") else dict(training_args)
    found = resolve(training_args_reading(data, "TrainingArguments"))
    run_fields = {f.name for f in fields(RunConfig)}
    extra = {k: v for k, v in found.kwargs.items() if k in run_fields and k not in observed}
    # the live optimizer object is what is estimated (its class, momentum and amsgrad read above), not `optim`
    notes = [w for w in found.warnings if "keys lora-cost does not read" not in w and "key 'optim'" not in w]
    return extra, notes


def describe(model, optimizer, observed: Observed, training_args=None):
    """(ModelInfo, ModelSpec | None, RunConfig | None): the estimator inputs for this run, or the
    reason it cannot be estimated in ModelInfo.note."""
    from ..profiles import spec_from_config
    from ..spec import RunConfig

    class_name = type(model).__name__
    model = unwrap_parallel(model)
    peft_cfg, base = _peft_config(model)
    hf = _hf_model(base)
    notes = []
    method, why = _method(model, peft_cfg, optimizer)
    if why:
        notes.append(why)
    opt_name, why = _optimizer(optimizer)
    if why:
        notes.append(why)
    precision = _precision(model, method, observed.autocast_dtype)
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    batch = seq = None
    if observed.input_shape is not None and len(observed.input_shape) == 2:
        batch, seq = observed.input_shape
    elif observed.input_shape is None:
        notes.append("no integer input_ids seen at the model's forward: batch and sequence length unknown")
    cfg = hf.config if hf is not None else None
    attention = getattr(cfg, "_attn_implementation", None) if cfg is not None else None
    est_attention, why = _attention(cfg)
    if why:
        notes.append(why)
    ckpt = _checkpointing(hf)
    # the rank the adapters carry: AdaLoRA's init_r (its config's `r` is LoraConfig's unused field), else r
    r = (getattr(peft_cfg, "init_r", None) or getattr(peft_cfg, "r", None)) if peft_cfg is not None else None
    dropout = float(getattr(peft_cfg, "lora_dropout", 0.0) or getattr(peft_cfg, "vera_dropout", 0.0) or 0.0) if peft_cfg is not None else 0.0
    targets, why = _targets(model, peft_cfg) if peft_cfg is not None else ((), ())
    notes.extend(why)
    inner = type(model).__name__
    info = dict(class_name=inner if inner == class_name else f"{inner} (in {class_name})", model_type=getattr(cfg, "model_type", None), method=method, r=r,
                targets=targets, batch=batch, seq=seq, precision=precision, optimizer=opt_name,
                grad_checkpointing=ckpt, attention=attention, dropout=dropout, trainable_params=int(trainable),
                total_params=int(total))
    spec = run = None
    if cfg is None:
        notes.append("no Hugging Face config found on the model")
    elif None in (method, opt_name, precision, batch, seq):
        pass
    else:
        try:
            spec = spec_from_config(type(hf).__name__ if not getattr(cfg, "name_or_path", "") else cfg.name_or_path,
                                    cfg.to_dict(), "live model")
            m = get_method(method)
            options = m.observed_options(model)
            if m.recognise_optimizer is not None:
                options = {**options, **(m.recognise_optimizer(model, peft_cfg, optimizer) or {})}
            observed_fields = ("method", "r", "targets", "batch", "seq", "precision", "optimizer",
                               "grad_checkpointing", "attention", "dropout", "method_options")
            extra, why = _from_training_args(training_args, observed_fields)
            notes.extend(why)
            run = RunConfig(**extra, method=method, r=None if m.base_trainable else r,
                            targets=targets or None, batch=batch, seq=seq, precision=precision, optimizer=opt_name,
                            grad_checkpointing=ckpt, attention=est_attention, dropout=0.0 if m.base_trainable else dropout,
                            method_options=tuple(sorted(options.items())))
        except LoraCostError as exc:
            notes.append(str(exc))
            spec = run = None
    estimable = spec is not None and run is not None
    if not estimable and not notes:
        notes.append("the estimator cannot describe this run")
    return ModelInfo(estimable=estimable, note="; ".join(notes), **info), spec, run


def _checkpointing(hf) -> bool:
    """`is_activation_checkpointing` (transformers >= 5) or `is_gradient_checkpointing` (older)."""
    if hf is None:
        return False
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if attr in dir(type(hf)):
            return bool(getattr(hf, attr))
    return False
