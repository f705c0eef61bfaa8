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
@click.option("--nproc-per-node", "nproc", type=int, default=None,
              help="Launch the script on N local ranks through torch.distributed.run (torchrun); each rank is "
                   "profiled and --out gets the merged report (the ranks' own profiles go next to it, in <out>.ranks/).")
@click.pass_context
def profile(ctx: click.Context, script, warmup, steps, out, no_flops, as_json, nproc):
    """Run SCRIPT as `python SCRIPT ARGS...` would (arguments after `--`), measure its training steps
    and compare them with the estimate for the same configuration."""
    from ..errors import LoraCostError
    if not os.path.exists(script):  # before torch is imported (seconds, and its warnings)
        raise LoraCostError(f"script not found: {script}")
    if nproc is not None:  # the ranks import torch, this process does not
        return _distributed(ctx, script, tuple(ctx.args), nproc, warmup, steps, out, no_flops, as_json)
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


def _distributed(ctx: click.Context, script, args, nproc, warmup, steps, out, no_flops, as_json) -> None:
    from ..errors import LoraCostError
    from ..profiler.launch import check_nproc, launch
    check_nproc(nproc)
    if warmup < 1 or steps < 1:  # checked here once, not by every rank
        raise LoraCostError(f"--warmup and --steps must be at least 1, got {warmup} and {steps}")
    merged = launch(script, args, nproc, warmup=warmup, steps=steps, flops=not no_flops, out=out,
                    script_stdout=sys.stderr if as_json else None)
    from .plan import _write
    path = _write(out, merged.to_json())
    if as_json:
        click.echo(merged.to_json())
    else:
        from rich.console import Console
        from ..report.distributed_terminal import render_distributed
        console = Console(stderr=False)
        render_distributed(console, merged)
        console.print(f"merged profile written to {path}")
    if merged.exit_code:
        ctx.exit(merged.exit_code)
