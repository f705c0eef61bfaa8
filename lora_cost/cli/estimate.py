"""`lora-cost estimate`: memory and FLOPs of one training step."""

from __future__ import annotations

import json

import click

from . import main
from ..errors import LoraCostError
from ..spec import TASKS
from .options import (allocator_flags, allocator_kwargs, attention_options, common_run_options, liger_kwargs, liger_options,
                      loss_dtype_kwargs, loss_dtype_options, method_choice, method_options, optimizer_options, parse_targets,
                      reserved_model_flag, reserved_model_kwargs, sharding_flags, sharding_kwargs)


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
@click.option("--engine", type=click.Choice(["auto", "analytic", "trace", "both"]), default="auto", show_default=True,
              help="analytic: pure arithmetic; trace: run the real step on fake tensors (needs torch, transformers, "
              "peft; builds any model transformers can build); auto: analytic when it knows the family, else trace.")
@click.option("--task", type=click.Choice(list(TASKS)), default=None,
              help="The model's head and loss (default: the family's own, causal-lm or masked-lm). seq-cls/token-cls "
              "train the classification head too (peft modules_to_save).")
@click.option("--num-labels", type=int, default=None, help="Classes of --task seq-cls or token-cls (default 2).")
@loss_dtype_options
@liger_options
@attention_options
@allocator_flags
@reserved_model_flag
@sharding_flags
def estimate(model, targets, precision, optimizer, attention, dropout, model_dropout, gpu, as_json, method, rank, batch,
             seq, target_seq, grad_checkpointing, explain, serving, moe_imbalance, engine, task, num_labels, packing,
             gpus, nodes, sharding, offload, cpu_offload, deepspeed_config, reshard_after_forward, fsdp_param_dtype,
             fsdp_reduce_dtype, bucket_cap_mb, gradient_as_bucket_view,
             loss, adapter_dtype, modules_to_save, liger=False, liger_kernels=None, peft_config=None, training_args=None, axolotl=None, **option_flags):
    """Estimate the memory and FLOPs of one fine-tuning step."""
    optimizer_flags = optimizer_options(option_flags)
    kwargs = dict(r=rank, targets=parse_targets(targets), batch=batch, seq=seq, precision=precision, optimizer=optimizer,
                  grad_checkpointing=grad_checkpointing, attention=attention, dropout=dropout,
                  model_dropout=model_dropout, method_options=method_options(option_flags))
    kwargs.update(optimizer_flags)
    if target_seq is not None:
        kwargs["target_seq"] = target_seq
    if moe_imbalance is not None:
        kwargs["moe_imbalance"] = moe_imbalance
    if task is not None or num_labels is not None:  # absent flags leave the call (and its numbers) as they were
        kwargs.update(task=task, num_labels=num_labels)
    kwargs.update(loss_dtype_kwargs(loss, adapter_dtype, modules_to_save))
    kwargs.update(liger_kwargs(liger, liger_kernels))
    if packing:
        kwargs["packing"] = True
    kwargs.update(allocator_kwargs(option_flags))
    distributed = sharding_kwargs(gpus, nodes, sharding, offload, cpu_offload, deepspeed_config, reshard_after_forward,
                                  fsdp_param_dtype, fsdp_reduce_dtype, bucket_cap_mb, gradient_as_bucket_view)
    if distributed:
        kwargs.update(distributed)
    if peft_config or training_args or axolotl or model is None:  # the files' values under the explicit flags
        from .files import apply_to_estimate
        model, method, kwargs = apply_to_estimate(click.get_current_context(), model, method, kwargs, peft_config,
                                                  training_args, axolotl)
    reserved = reserved_model_kwargs(option_flags)  # allocevents: the analytic engine's reserved memory
    note = None
    if engine == "auto":
        engine, note = _auto_engine(model)
    if reserved and engine != "analytic":
        raise LoraCostError("--reserved-model chooses the analytic engine's reserved memory; the trace engine always "
                            "replays its own allocation sequence")
    if engine == "analytic":
        from ..analytic.estimator import estimate as run_estimate
        result = run_estimate(model, method, gpu=gpu, serving=serving, **kwargs, **reserved)
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
    from ..profiles import analytic_knows, find_config, load_model
    if engine == "both" or analytic_knows(find_config(model)[1]):
        load_model(model)  # a bad --model is refused before torch is imported
    from .trace_engine import run_trace_engine  # imports torch: only on request
    run_trace_engine(model, method, gpu=gpu, both=engine == "both", as_json=as_json, explain=explain, note=note, **kwargs)


def _auto_engine(model: str) -> tuple[str, str | None]:
    """--engine auto: (engine, note). The analytic engine when it has the config's family, else the trace
    engine (the note says so in one line on stderr once the trace has run: bad input stays one line), which
    needs the trace extras: without them, one line naming what to install."""
    from ..profiles import analytic_knows, find_config

    name, cfg, _ = find_config(model)
    if analytic_knows(cfg):
        return "analytic", None
    from ..trace.deps import INSTALL_HINT, missing
    from ..analytic.architectures.base import supported_model_types

    lacking = missing()
    if lacking:
        raise LoraCostError(f"{name}: the analytic engine has no family {cfg['model_type']!r} (it knows "
                            f"{', '.join(supported_model_types())}) and the trace engine needs {lacking}: run "
                            f"`{INSTALL_HINT}`")
    from ..trace.build import transformers_knows  # imports torch: the trace engine runs next anyway
    if not transformers_knows(cfg["model_type"]):
        raise LoraCostError(f"{name}: neither engine knows model_type {cfg['model_type']!r}: the analytic engine knows "
                            f"{', '.join(supported_model_types())}, and transformers cannot build it")
    return "trace", (f"the analytic engine has no family {cfg['model_type']!r}; using the trace engine (the real "
                     "transformers model on fake tensors)")
