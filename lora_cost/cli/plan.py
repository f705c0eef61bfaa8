"""`lora-cost plan`: the best configuration that fits a VRAM budget."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ..attention_kernels import ATTENTION_SPELLINGS

from ..errors import LoraCostError, shown
from . import main
from ..analytic.methods import all_methods
from .options import file_options, method_option_flags, method_options, parse_targets
from ..spec import TASKS


def _write(path: str, text: str) -> Path:
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise LoraCostError(f"cannot write {shown(path, 120)}: {reason}") from None
    return out


class LazyProgress:
    """A rich progress bar (on stderr, when it is a terminal) that appears only when the sweep has run
    longer than `after` seconds: short plans print nothing extra, long ones show how far they are."""

    def __init__(self, total: int, after: float = 1.0) -> None:
        self.total, self.after, self.done = total, after, 0
        self.bar = self.task = None
        self.start = time.perf_counter()

    def __call__(self, k: int) -> None:
        self.done += k
        if self.bar is None:
            if time.perf_counter() - self.start < self.after:
                return
            from rich.console import Console
            from rich.progress import Progress
            console = Console(stderr=True)
            if not console.is_terminal:  # a pipe or a file gets no bar (not even the newline it leaves)
                self.after = float("inf")
                return
            self.bar = Progress(transient=True, console=console)
            self.bar.start()
            self.task = self.bar.add_task("sweeping configurations", total=max(self.total, self.done))
        self.bar.update(self.task, completed=self.done, total=max(self.total, self.done))

    def __enter__(self) -> "LazyProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


@main.command()
@click.option("--model", "-m", default=None, help="Bundled profile, Hub id alias, config.json or a directory holding one (or from --axolotl/--peft-config).")
@click.option("--gpu", default=None, help="A bundled GPU profile: its memory is the budget unless --budget is given.")
@click.option("--budget", default=None, help="Memory budget, e.g. 40GiB, 24GB or a byte count.")
@click.option("--margin", default="0", show_default=True, help="Keep this fraction (0.1) or percentage (10%) of the budget free.")
@click.option("--methods", default="lora,lora-fa,dora,vera,qlora,full", show_default=True,
              help=f"Comma separated, any of {', '.join(all_methods())} (lora-cost methods: each with its paper).")
@click.option("--r", "ranks", default="1-1024", show_default=True, help="Rank range; powers of two within it are tried.")
@click.option("--batch", "batches", default="1-64", show_default=True, help="Batch range.")
@click.option("--seq", "-s", type=int, default=2048, show_default=True)
@click.option("--targets", "-t", default=None, help="peft target_modules or all-linear (default: query and value projections).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16", "amp-bf16", "amp-fp16"]), default="bf16", show_default=True)
@click.option("--optimizer", default="adamw", show_default=True)
@click.option("--attention", type=click.Choice(ATTENTION_SPELLINGS), default="sdpa", show_default=True)
@click.option("--utilisation", type=float, default=0.4, show_default=True, help="Fraction of the GPU's peak throughput assumed for step times.")
@click.option("--task", type=click.Choice(list(TASKS)), default=None,
              help="The head and loss, as in estimate (default: the family's own).")
@click.option("--num-labels", type=int, default=None, help="Classes of --task seq-cls or token-cls (default 2).")
@method_option_flags
@file_options
@click.option("--html", "html_path", default=None, help="Also write a self-contained HTML report here.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--gpus", "gpu_counts", default=None, help="Several GPUs: comma separated counts (1,2,4,8); per-rank memory "
              "of each count x --sharding x method at the smallest --r and --batch of their ranges, and the largest "
              "--batch that fits --gpu.")
@click.option("--sharding", "strategies", default="ddp,fsdp,zero2,zero3", show_default=True,
              help="With --gpus: comma separated strategies.")
def plan(model, gpu, budget, margin, methods, ranks, batches, seq, targets, precision, optimizer, attention, utilisation,
         task, num_labels, html_path, as_json, peft_config=None, training_args=None, axolotl=None, gpu_counts=None,
         strategies="ddp,fsdp,zero2,zero3", **option_flags):
    """Find the largest rank and batch per method that fit a GPU or a memory budget."""
    if gpu_counts is not None:  # task "sharding": its own sweep (analytic/sharding/plan.py)
        from .plan_sharded import run_sharded_plan
        return run_sharded_plan(model, gpu, methods, ranks, batches, seq, targets, precision, optimizer, attention,
                                gpu_counts, strategies, html_path, as_json, option_flags)
    from ..analytic.planner import parse_range, plan as run_plan, rank_candidates, sweep_size
    from ..units import parse_bytes
    budget_bytes = None
    if budget is not None:
        try:
            budget_bytes = parse_bytes(budget)
        except ValueError as exc:
            raise LoraCostError(f"--budget: {exc}") from None
    try:
        margin_value = float(margin.rstrip("%")) / (100 if margin.endswith("%") else 1)
    except ValueError:
        raise LoraCostError(f"--margin must be a fraction or a percentage, got {margin!r}") from None
    method_list = tuple(m.strip() for m in methods.split(",") if m.strip())
    rank_range, batch_range = parse_range(ranks, "r"), parse_range(batches, "batch")
    kwargs = dict(budget_bytes=budget_bytes, gpu=gpu, margin=margin_value, methods=method_list, seq=seq,
                  batch_range=batch_range, rank_range=rank_range, precision=precision, optimizer=optimizer,
                  targets=parse_targets(targets), attention=attention, utilisation=utilisation,
                  method_options=method_options(option_flags))
    if peft_config or training_args or axolotl or model is None:  # the files' values under the explicit flags
        from .files import apply_to_plan
        model, kwargs = apply_to_plan(click.get_current_context(), model, kwargs, peft_config, training_args, axolotl)
        method_list = kwargs["methods"]
    if task is not None or num_labels is not None:
        kwargs.update(task=task, num_labels=num_labels)
    total = sweep_size(len(method_list), len(rank_candidates(*rank_range)), 8)
    with LazyProgress(total) as progress:  # a bar on stderr once the sweep has run for a second
        result = run_plan(model, progress=progress, **kwargs)
    if html_path:
        from ..report.html import plan_to_html
        written = _write(html_path, plan_to_html(result))
        if not as_json:
            click.echo(f"wrote {written}", err=True)
    if as_json:
        from ..report.plan_json import plan_to_json
        click.echo(json.dumps(plan_to_json(result), indent=2, allow_nan=False))
        return
    from rich.console import Console
    from ..report.plan_terminal import render_plan
    render_plan(Console(), result)
