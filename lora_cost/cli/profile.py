"""`lora-cost profile`: run a training script, instrumented, and report what each step cost."""

from __future__ import annotations

import contextlib
import json
import os
import sys

import click

from . import main


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("script")
@click.option("--warmup", type=int, default=1, show_default=True, help="Optimizer steps to skip before measuring (at least 1).")
@click.option("--steps", type=int, default=3, show_default=True, help="Optimizer steps to measure.")
@click.option("--out", default="reports/profile.json", show_default=True, help="Where to write the JSON profile.")
@click.option("--no-flops", is_flag=True, help="Do not count FLOPs (FlopCounterMode) on the last warm-up step.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON profile instead of tables (the script's own output goes to stderr).")
@click.pass_context
def profile(ctx: click.Context, script, warmup, steps, out, no_flops, as_json):
    """Run SCRIPT as `python SCRIPT ARGS...` would (arguments after `--`), measure its training steps
    and compare them with the estimate for the same configuration."""
    from ..errors import LoraCostError
    if not os.path.exists(script):  # before torch is imported (seconds, and its warnings)
        raise LoraCostError(f"script not found: {script}")
    try:
        from ..profiler.runner import run_script
        from ..profiler.results import save_profile
    except ImportError as exc:
        raise LoraCostError(f"the profiler needs torch ({exc.name} is missing): pip install -e '.[profile]'") from None
    args = tuple(ctx.args)
    redirect = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    with redirect:
        result = run_script(script, args, warmup=warmup, steps=steps, flops=not no_flops)
    if result.status == "no-optimizer-step":
        raise LoraCostError(f"{script} never called an optimizer step (torch.optim.Optimizer.step): nothing to measure")
    path = save_profile(result, out)
    if result.steps_detected == 0 and result.exit_code:
        click.echo(f"lora-cost: {script} ended ({result.status}, exit code {result.exit_code}) before any optimizer "
                   f"step; profile written to {path}", err=True)
        ctx.exit(result.exit_code)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        from rich.console import Console
        from ..report.profile_terminal import render_profile
        console = Console(stderr=False)
        render_profile(console, result)
        console.print(f"profile written to {path}")
    if result.exit_code:
        ctx.exit(result.exit_code)
