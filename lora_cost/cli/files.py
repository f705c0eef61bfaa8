"""--peft-config, --training-args, --axolotl: the run read from the files users already have
(lora_cost/readers), merged under the flags the user typed: an explicit flag always wins."""

from __future__ import annotations

import click
from click.core import ParameterSource

from ..readers import model_of, read_files, settings_for
from ..readers.common import DISTRIBUTED
from ..readers.qlora_dtypes import trainer_qlora_precision
from .options import OPTION_PARAM

# the CLI parameter of an estimate() keyword where their names differ
_PARAMS = {"r": "rank"}
_EXPLICIT = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT)


def _explicit(ctx: click.Context, param: str) -> bool:
    return param in ctx.params and ctx.get_parameter_source(param) in _EXPLICIT


def _origin(found, target: str) -> str:
    """The file and key a keyword's value came from (for a mapping keyword, its first entry's)."""
    return found.origins.get(target) or next((o for t, o in found.origins.items() if t.startswith(target + ".")), "")


def _say(lines, kind: str) -> None:
    for line in lines:
        click.echo(f"lora-cost: {kind}: {line}", err=True)


def apply_to_estimate(ctx: click.Context, model, method: str, kwargs: dict, peft_config, training_args, axolotl):
    """(model, method, kwargs) with the files' values filled in where no flag was given."""
    reading = read_files(peft_config, training_args, axolotl)
    model = model_of(reading, model)
    found = settings_for(model, reading)
    kwargs = dict(kwargs)
    for target, value in found.kwargs.items():
        if target in DISTRIBUTED and not kwargs.get("gpus"):
            _say([f"{_origin(found, target)}: a data-parallel setting; give --gpus N (the launcher's world size) "
                  "to estimate one rank of it (without --gpus: one GPU)"], "note")
        elif target == "sharding_options":  # one entry per file key; a flag given for the entry wins
            merged = dict(kwargs.get(target) or {})
            for sub, v in value.items():
                if not _explicit(ctx, sub):
                    merged[sub] = v
            kwargs[target] = merged
        elif target == "method":
            if not _explicit(ctx, "method"):
                method = value
        elif target == "targets" and _explicit(ctx, "targets"):
            continue
        elif not _explicit(ctx, _PARAMS.get(target, target)):
            kwargs[target] = value
    # task "axodtype": a TrainingArguments bf16 over QLoRA is autocast over prepare's fp32 model (amp-bf16)
    kwargs, notes, warnings = trainer_qlora_precision(method, kwargs, found.origins, training_args,
                                                      _explicit(ctx, "precision"))
    replaced = found.origins.get("precision", "") + ": " if notes else None  # precision_from's 16-bit note
    _say([n for n in reading.notes if not (replaced and n.startswith(replaced))] + notes, "note")
    options = dict(kwargs.get("method_options") or {})
    own = _options_of(method)
    for name, value in found.method_options.items():
        if own is not None and name not in own:  # a file's option for the method another file or flag replaced
            warnings.append(f"{found.origins.get(name, name)}: sets {name}, which method {method} does not take "
                            "(not used)")
        elif not _explicit(ctx, OPTION_PARAM + name):
            options.setdefault(name, value)
    _say(list(found.warnings) + warnings, "warning")
    kwargs["method_options"] = options
    return model, method, kwargs


def _options_of(method: str):
    """The option names `method` takes; None for a method this lora-cost does not know (the estimate says so)."""
    from ..analytic.methods import get_method
    from ..errors import LoraCostError
    try:
        return get_method(method).option_names
    except LoraCostError:
        return None


# what `plan` takes from the files (its other settings are searched: rank, batch, checkpointing)
_PLAN = ("seq", "targets", "precision", "optimizer", "attention")


def apply_to_plan(ctx: click.Context, model, kwargs: dict, peft_config, training_args, axolotl):
    reading = read_files(peft_config, training_args, axolotl)
    model = model_of(reading, model)
    found = settings_for(model, reading)
    _say(reading.notes, "note")
    _say(found.warnings, "warning")
    kwargs = dict(kwargs)
    for target, value in found.kwargs.items():
        origin = _origin(found, target)
        if target == "method":
            if not _explicit(ctx, "methods"):
                kwargs["methods"] = (value,)
        elif target in _PLAN:
            if not _explicit(ctx, target):
                kwargs[target] = value
        elif target in ("r", "batch", "grad_checkpointing"):
            _say([f"{origin}: plan searches {target} (the file's value is not used)"], "note")
        else:
            _say([f"{origin}: sets {target}, which plan does not take (not used)"], "warning")
    options = dict(kwargs.get("method_options") or {})
    for name, value in found.method_options.items():
        if not _explicit(ctx, OPTION_PARAM + name):
            options.setdefault(name, value)
    kwargs["method_options"] = options
    return model, kwargs
