"""Shared steps of the methods' trace hooks (`Method.apply_to_model`): what a user's script does
around applying an adapter to a transformers model, on the meta device."""

from __future__ import annotations

import warnings

from ..errors import LoraCostError


def enable_checkpointing(model) -> None:
    """Non-reentrant gradient checkpointing, as the calibration runs used it."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def enable_input_grads(model) -> None:
    """transformers' enable_input_require_grads(): with checkpointing and a frozen embedding the
    block inputs must require grad, or the checkpointed blocks get no gradient."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.enable_input_require_grads()


def peft_model(model, cfg):
    """peft.get_peft_model, its warnings silenced and its ValueError turned into bad input."""
    import peft

    task_type = classification_task_type(model)
    if task_type is not None and getattr(cfg, "task_type", None) is None:
        cfg.task_type = task_type  # the head is trained too: modules_to_save=["classifier", "score"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return peft.get_peft_model(model, cfg)
        except (ValueError, TypeError) as exc:  # TypeError: a target that is also in modules_to_save
            raise LoraCostError(f"peft rejected the configuration: {str(exc).splitlines()[0] if str(exc) else exc!r}"
                                [:400]) from None


def split_parameter_targets(model, targets) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters): a name no module answers to but a parameter does (transformers 5's
    fused expert parameters `gate_up_proj`, Mixtral's `experts.down_proj`) is a peft `target_parameters` entry,
    adapted by lora.ParamWrapper at rank r; everything else stays a module name (peft itself maps the v4 expert
    and router names onto parameters, utils/transformers_weight_conversion.py `_convert_peft_config_moe`)."""
    modules = [name for name, _ in model.named_modules()]
    params = [name for name, _ in model.named_parameters()]
    found = lambda t, names: any(n == t or n.endswith("." + t) for n in names)  # noqa: E731
    by_param = [t for t in targets if not found(t, modules) and found(t, params)]
    return [t for t in targets if t not in by_param], by_param


def count_adapted(model, attr: str) -> int:
    """Modules holding a non-empty adapter dict `attr` (peft's lora_A, vera_lambda_b, ...)."""
    return sum(1 for m in model.modules() if hasattr(m, attr) and len(getattr(m, attr)) > 0)


def fan_in_fan_out(model, targets) -> bool:
    """Whether the targeted modules store their weight [d_in, d_out] (GPT-2's Conv1D), as peft's
    `fan_in_fan_out` must then say."""
    from transformers.pytorch_utils import Conv1D

    wanted = set(targets)
    return any(isinstance(m, Conv1D) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in wanted)


def classification_task_type(model) -> str | None:
    """peft's task_type for a transformers classifier (what a GLUE or NER script passes): with it,
    PeftModelForSequenceClassification / ...ForTokenClassification add the head ("classifier" or
    "score") to modules_to_save, whose ModulesToSaveWrapper trains a copy and keeps the original frozen."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return None
