"""`lora-cost estimate`: memory and FLOPs of one training step."""

from __future__ import annotations

import json

import click

from . import main
from ..errors import LoraCostError
from .options import common_run_options, method_choice, method_options, parse_targets


@main.command()
@common_run_options
@click.option("--method", type=method_choice(), default="lora", show_default=True)
@click.option("--r", "rank", type=int, default=None, help="Adapter rank (VeRA: the shared rank, default 256; others 8).")
@click.option("--batch", "-b", type=int, default=1, show_default=True)
@click.option("--seq", "-s", type=int, default=512, show_default=True)
@click.option("--target-seq", type=int, default=None,
              help="Encoder-decoder models (T5): the decoder's length (default: --seq).")
@click.option("--grad-checkpointing/--no-grad-checkpointing", default=False, show_default=True)
@click.option("--explain", is_flag=True, help="Show every term with its formula and value.")
@click.option("--serving", is_flag=True, help="Also the inference cost per generated token at a context of --seq "
              "positions: base model, and the method's extra weights, FLOPs and sequential ops, merged and unmerged.")
@click.option("--moe-imbalance", type=float, default=None,
              help="Mixture of experts: the busiest expert receives F >= 1 times its balanced share n*k/E "
              "(default: balanced routing). transformers' grouped_mm experts path costs the same at any balance.")
@click.option("--engine", type=click.Choice(["analytic", "trace", "both"]), default="analytic", show_default=True,
              help="analytic: pure arithmetic; trace: run the real step on fake tensors (needs torch, transformers, peft).")
def estimate(model, targets, precision, optimizer, attention, dropout, model_dropout, gpu, as_json, method, rank, batch,
             seq, target_seq, grad_checkpointing, explain, serving, moe_imbalance, engine, **option_flags):
    """Estimate the memory and FLOPs of one fine-tuning step."""
    kwargs = dict(r=rank, targets=parse_targets(targets), batch=batch, seq=seq, precision=precision, optimizer=optimizer,
                  grad_checkpointing=grad_checkpointing, attention=attention, dropout=dropout,
                  model_dropout=model_dropout, method_options=method_options(option_flags))
    if target_seq is not None:
        kwargs["target_seq"] = target_seq
    if moe_imbalance is not None:
        kwargs["moe_imbalance"] = moe_imbalance
    if engine == "analytic":
        from ..analytic.estimator import estimate as run_estimate
        result = run_estimate(model, method, gpu=gpu, serving=serving, **kwargs)
        for warning in result.warnings:
            click.echo(f"lora-cost: warning: {warning}", err=True)
        if as_json:
            from ..report.jsonout import estimate_to_json
            click.echo(json.dumps(estimate_to_json(result), indent=2, allow_nan=False))
        else:
            from rich.console import Console
            from ..report.terminal import render_estimate
            render_estimate(Console(), result, explain=explain)
        return
    if serving:
        raise LoraCostError("--serving is an analytic estimate: use it with --engine analytic")
    from ..profiles import load_model
    load_model(model)  # a bad --model is refused before torch is imported
    from .trace_engine import run_trace_engine  # imports torch: only on request
    run_trace_engine(model, method, gpu=gpu, both=engine == "both", as_json=as_json, explain=explain, **kwargs)
