"""Run-configuration flags shared by `estimate` and `plan`."""

from __future__ import annotations

import click

from ..errors import LoraCostError
from ..analytic.methods import all_methods
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
        click.option("--nola-k", type=int, default=None, help="NoLA: number of random bases for A (default 1024)."),
        click.option("--nola-l", type=int, default=None, help="NoLA: number of random bases for B (default 1024)."),
        click.option("--quant-type", type=click.Choice(["nf4", "fp4"]), default=None, help="QLoRA: 4-bit data type (default nf4)."),
        click.option("--double-quant/--no-double-quant", default=None, help="QLoRA: double quantisation of the block constants (default on)."),
        click.option("--gpu", default=None, help="A bundled GPU profile (lora-cost gpus): say whether it fits and how long a step takes."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables."),
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


def method_options(nola_k, nola_l, quant_type, double_quant) -> dict:
    options = {}
    if nola_k is not None:
        options["k"] = nola_k
    if nola_l is not None:
        options["l"] = nola_l
    if quant_type is not None:
        options["quant_type"] = quant_type
    if double_quant is not None:
        options["double_quant"] = double_quant
    return options


def parse_targets(targets: str | None):
    if targets is None:
        return None
    parts = tuple(t.strip() for t in targets.split(",") if t.strip())
    if not parts:
        raise LoraCostError("--targets is empty")
    return parts
