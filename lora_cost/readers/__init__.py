"""Read the run from the files users already have: a peft adapter_config.json (`peft_config.py`), a
TrainingArguments / TRL SFTConfig (`training_args.py`), an axolotl YAML (`axolotl.py`); and from a live
or meta-device model (`live.py`, `lora_cost.estimate_from`). `base.py` checks every setting against
what this lora-cost models. Torch-free, except a regex target_modules (`regex.py`) and `live.py`.

Files are applied in the order axolotl, training args, peft config (a later file's value wins: the
adapter's own config is the most specific); explicit CLI flags and Python keywords override them all.
"""

from __future__ import annotations

from dataclasses import replace

from ..errors import LoraCostError
from .base import Reading, Resolved, Setting, resolve
from .regex import TargetRegex, resolve_regex


def read_files(peft_config: str | None = None, training_args: str | None = None,
               axolotl: str | None = None) -> Reading:
    reading = Reading()
    if axolotl:
        from .axolotl import read_axolotl
        reading = reading + read_axolotl(axolotl)
    if training_args:
        from .training_args import read_training_args
        reading = reading + read_training_args(training_args)
    if peft_config:
        from .peft_config import read_peft_config
        reading = reading + read_peft_config(peft_config)
    return reading


def model_of(reading: Reading, explicit: str | None) -> str:
    """The model: the explicit one, else the one the files name (checked here, with the file and key)."""
    if explicit is not None:
        return explicit
    if reading.model is None:
        raise LoraCostError("--model is required (or a file naming the model: axolotl base_model, peft "
                            "base_model_name_or_path, TRL model_name_or_path)")
    from ..profiles import find_config

    try:
        find_config(reading.model.value)
    except LoraCostError as exc:
        raise LoraCostError(f"{reading.model.origin}: {exc}") from None
    return reading.model.value


def with_model(reading: Reading, model: str) -> Reading:
    """Regex target_modules resolved against `model`'s module keys (peft's re.fullmatch)."""
    settings, warnings = [], list(reading.warnings)
    for s in reading.settings:
        if isinstance(s.value, TargetRegex):
            names, more = resolve_regex(model, s.value, s.origin)
            s = replace(s, value=names)
            warnings.extend(more)
        settings.append(s)
    return replace(reading, settings=tuple(settings), warnings=tuple(warnings))


def settings_for(model: str, reading: Reading) -> Resolved:
    """The files' settings for `model`, sorted into estimate() keywords and method options, checked."""
    return _axolotl_for_family(model, _liger_for_family(model, resolve(with_model(reading, model))))


def _axolotl_for_family(model: str, found: Resolved) -> Resolved:
    """axolotl QLoRA's bf16 embeddings, head and norms only where its loop reaches them all (qlora_dtypes.py)."""
    if found.method_options.get("kbit_prepare") is not False:
        return found
    from ..profiles import load_model
    from .qlora_dtypes import axolotl_family
    try:
        model_type = load_model(model).model_type
    except LoraCostError:
        model_type = None  # the estimate reports the model itself
    return axolotl_family(model_type, found)


def _liger_for_family(model: str, found: Resolved) -> Resolved:
    """use_liger_kernel read from a file names Liger's kernels whatever the model. Where Liger has none for the
    model's family, Trainer leaves the model as it is (liger_kernel MODEL_TYPE_TO_APPLY_LIGER_FN): no kernel and
    transformers' loss. Where this lora-cost does not model the block kernels for the family, the estimate keeps
    transformers' modules and the fused loss. Either way a warning says so, as for any key not modelled; a
    --liger-kernels or --loss liger flag typed for such a model is refused instead (analytic/liger.py, losses.py)."""
    if not found.kwargs.get("liger_kernels") and found.origins.get("loss", "").find("use_liger_kernel") < 0:
        return found
    from ..analytic.liger import MODELLED_TYPES
    from ..analytic.losses import LIGER_MODEL_TYPES
    from ..profiles import load_model
    try:
        model_type = load_model(model).model_type
    except LoraCostError:
        return found  # the estimate reports the model itself
    if model_type in MODELLED_TYPES:
        return found
    kwargs, warnings = dict(found.kwargs), list(found.warnings)
    if model_type not in LIGER_MODEL_TYPES:
        dropped = [k for k in ("liger_kernels", "loss") if k in kwargs and "use_liger_kernel" in found.origins.get(k, "")]
        for k in dropped:
            del kwargs[k]
        warnings.append(f"{found.origins.get(dropped[0], 'use_liger_kernel')}: Liger has no kernels for model type "
                        f"{model_type} (liger_kernel MODEL_TYPE_TO_APPLY_LIGER_FN): Trainer leaves the model as it is, "
                        "and so does the estimate")
    elif kwargs.pop("liger_kernels", None):
        warnings.append(f"{found.origins.get('liger_kernels', 'use_liger_kernel')}: Liger's block kernels for model "
                        f"type {model_type} are not modelled yet: the estimate keeps transformers' norms, RoPE and MLP "
                        "(their saved activations are over-counted) with Liger's fused loss")
    return Resolved(kwargs, found.method_options, found.origins, tuple(warnings))


__all__ = ["Reading", "Resolved", "Setting", "read_files", "model_of", "settings_for"]
