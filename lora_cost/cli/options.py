"""Run-configuration flags shared by `estimate` and `plan`."""

from __future__ import annotations

import click

from ..errors import LoraCostError
from ..analytic.methods import all_methods
from ..analytic.methods.base import all_options
from ..analytic.optimizers import all_optimizers
from ..spec import ATTENTIONS, PRECISIONS


def method_choice() -> click.Choice:
    return click.Choice(list(all_methods()), case_sensitive=False)


def common_run_options(f):
    """--model, precision, optimizer, attention and method-option flags."""
    decorators = [
        click.option("--model", "-m", required=True, help="Bundled profile, Hugging Face id alias, config.json or a directory holding one."),
        click.option("--targets", "-t", default=None, help="peft target_modules, comma separated (e.g. q_proj,v_proj), or all-linear. Default: query and value projections."),
        click.option("--precision", type=click.Choice(PRECISIONS), default="bf16", show_default=True),
        click.option("--optimizer", type=click.Choice(list(all_optimizers())), default="adamw", show_default=True),
        click.option("--attention", type=click.Choice(ATTENTIONS), default="sdpa", show_default=True, help="transformers attention implementation."),
        click.option("--dropout", type=float, default=0.0, show_default=True, help="Adapter dropout (peft lora_dropout)."),
        click.option("--model-dropout", type=float, default=None, help="Override the model's own dropout probabilities (default: its config's)."),
        method_option_flags,
        click.option("--gpu", default=None, help="A bundled GPU profile (lora-cost gpus): say whether it fits and how long a step takes."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables."),
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


# the Python name of a generated flag's parameter: prefix + the option's name
_OPTION_PARAM = "method_option_"


def method_option_flags(f):
    """One flag per method option, generated from each method's typed options (`MethodOption`).
    Unset flags stay None, so only the options a user gives reach the run (and its checks)."""
    flags = []
    for opt, owners in all_options().items():
        param = _OPTION_PARAM + opt.name
        text = f"{', '.join(owners)}: {opt.help} (default {opt.describe_default()})."
        if opt.type is bool:
            flags.append(click.option(f"{opt.flag}/--no-{opt.flag[2:]}", param, default=None, help=text))
        else:
            kind = click.Choice(list(opt.choices)) if opt.choices else opt.type
            flags.append(click.option(opt.flag, param, type=kind, default=None, help=text))
    for flag in reversed(flags):
        f = flag(f)
    return f


def method_options(params: dict) -> dict:
    """The method options among a command's parameters that were given ({option name: value})."""
    return {key[len(_OPTION_PARAM):]: value for key, value in params.items()
            if key.startswith(_OPTION_PARAM) and value is not None}


def parse_targets(targets: str | None):
    if targets is None:
        return None
    parts = tuple(t.strip() for t in targets.split(",") if t.strip())
    if not parts:
        raise LoraCostError("--targets is empty")
    return parts


# -- lossdtype: --loss and --adapter-dtype (issue 9), one block
def loss_dtype_options(f):
    """--loss standard|liger|chunked[:N], --adapter-dtype fp32|bf16|fp16, --modules-to-save (estimate)."""
    from ..spec import ADAPTER_DTYPES

    decorators = [
        click.option("--loss", "loss", default="standard", show_default=True,
                     help="Causal-LM loss: standard (transformers, full logits), liger (Liger fused linear "
                     "cross-entropy: no logits), chunked[:N] (torchtune CEWithChunkedOutputLoss, N=8 chunks)."),
        click.option("--adapter-dtype", "adapter_dtype", type=click.Choice(list(ADAPTER_DTYPES)), default=None,
                     help="LoRA factors' dtype (default fp32: peft autocast_adapter_dtype=True); bf16/fp16: the "
                     "model's dtype (autocast_adapter_dtype=False); qlora bf16: the QLoRA script's recast."),
        click.option("--modules-to-save", "modules_to_save", default=None,
                     help="peft modules_to_save on a causal LM: embed_tokens and/or lm_head (comma separated) trained in "
                     "full as copies (their gradients and optimizer state)."),
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


def loss_dtype_kwargs(loss: str, adapter_dtype, modules_to_save=None) -> dict:
    """The estimate()/trace() keyword arguments of these flags; absent flags leave the call as it was."""
    out = {}
    if modules_to_save is not None:
        out["modules_to_save"] = modules_to_save
    if loss != "standard":
        out["loss"] = loss
    if adapter_dtype is not None:
        out["adapter_dtype"] = adapter_dtype
    return out
