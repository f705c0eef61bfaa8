"""`lora-cost plan --gpus ...`: the per-rank sweep over GPU counts and strategies (task "sharding")."""

from __future__ import annotations

import json
from dataclasses import asdict

import click

from .options import method_options, parse_targets


def run_sharded_plan(model, gpu, methods, ranks, batches, seq, targets, precision, optimizer, attention, gpu_counts,
                     strategies, html_path, as_json, option_flags) -> None:
    from ..analytic.planner import parse_range
    from ..analytic.sharding.plan import parse_gpus, plan_sharded
    from ..units import fmt_bytes

    r_lo, _ = parse_range(ranks, "r")
    b_lo, b_hi = parse_range(batches, "batch")
    from .plan import LazyProgress
    method_list = tuple(m.strip() for m in methods.split(",") if m.strip())
    counts, strategy_list = parse_gpus(gpu_counts), tuple(s.strip() for s in strategies.split(",") if s.strip())
    points = len(method_list) * sum(1 if n == 1 else len(strategy_list) for n in counts)
    with LazyProgress(points) as progress:  # task "speed": a bar on stderr once the sweep has run for a second
        result = plan_sharded(model, gpus=counts, strategies=strategy_list,
                              methods=method_list, gpu=gpu, seq=seq, batch=b_lo, targets=parse_targets(targets),
                              precision=precision, optimizer=optimizer, attention=attention,
                              method_options=method_options(option_flags), rank_for=r_lo, batch_max=b_hi,
                              progress=progress)
    if html_path:  # task "sharding2": per-rank memory against GPU count per strategy, and the cheapest that fits
        from ..report.html_sharded import sharded_plan_to_html
        from .plan import _write
        written = _write(html_path, sharded_plan_to_html(result))
        if not as_json:
            click.echo(f"wrote {written}", err=True)
    if as_json:
        doc = {"model": result.model, "gpu": result.gpu, "memory_bytes": result.memory_bytes,
               "points": [asdict(p) for p in result.points], "skipped": list(result.skipped),
               "best": asdict(result.best) if result.best else None}
        click.echo(json.dumps(doc, indent=2, allow_nan=False))
        return
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"{result.model}: busiest rank per GPU count and strategy")
    for col in ("method", "GPUs", "sharding", "peak", "device", "host/node", "fits", "step", "largest batch"):
        table.add_column(col)
    for p in result.points:
        table.add_row(p.method, str(p.gpus), p.sharding, fmt_bytes(p.peak_bytes), fmt_bytes(p.device_bytes),
                      fmt_bytes(p.host_bytes), "" if p.fits is None else ("yes" if p.fits else "no"),
                      "" if p.step_time_s is None else f"{p.step_time_s * 1e3:.0f} ms",
                      "" if p.max_batch is None else str(p.max_batch))
    console = Console()
    console.print(table)
    for s in result.skipped:
        console.print(f"[dim]skipped: {s}[/]")
    if result.best:
        b = result.best
        console.print(f"cheapest that fits: {b.method} on {b.gpus} GPU(s) with {b.sharding}")
