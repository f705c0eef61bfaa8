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
        click.option("--optimizer", type=OptimizerChoice(list(all_optimizers())), default="adamw", show_default=True,
                     help="Trainer's `optim` names, dashed or with underscores (adamw_torch_fused); adamw = adamw-torch."),
        click.option("--attention", type=click.Choice(ATTENTIONS), default="sdpa", show_default=True, help="transformers attention implementation."),
        click.option("--dropout", type=float, default=0.0, show_default=True, help="Adapter dropout (peft lora_dropout)."),
        click.option("--model-dropout", type=float, default=None, help="Override the model's own dropout probabilities (default: its config's)."),
        method_option_flags,
        optimizer_option_flags,
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


# --- task "optim" (issue 9, Optimizers): optimizer flags --------------------------------------------
class OptimizerChoice(click.Choice):
    """The registered optimizer names; Trainer's underscore spelling (`adamw_torch_fused`) is accepted."""

    def convert(self, value, param, ctx):
        from ..registry import dashed
        return super().convert(dashed(value) if isinstance(value, str) else value, param, ctx)


def optimizer_option_flags(f):
    """--master-weights and --optimizer-in-backward (lora_cost/analytic/optimizer_budget.py)."""
    f = click.option("--optimizer-in-backward", "optimizer_in_backward", is_flag=True, default=False,
                     help="Step each tensor from its gradient hook inside backward, freeing its gradient "
                     "(torchtune optimizer_in_bwd).")(f)
    return click.option("--master-weights", "master_weights", type=click.Choice(["fp32"]), default=None,
                        help="Keep fp32 master copies of 16-bit trainable weights and fp32 optimizer states "
                        "(Megatron-LM / DeepSpeed mixed precision).")(f)


def optimizer_options(params: dict) -> dict:
    """The optimizer flags among a command's parameters that were given (absent ones leave a call as it was)."""
    out = {}
    if params.pop("master_weights", None) is not None:
        out["master_weights"] = "fp32"
    if params.pop("optimizer_in_backward", False):
        out["optimizer_in_backward"] = True
    return out
