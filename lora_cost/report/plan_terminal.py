"""Rich terminal summary of a plan."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..analytic.planner import Plan
from ..units import fmt_bytes, fmt_count, fmt_flops


def render_plan(console: Console, p: Plan) -> None:
    budget = f"{fmt_bytes(p.budget_bytes)}" + (f" ({p.gpu})" if p.gpu else "")
    console.print(f"[bold]{p.model}[/] · seq {p.seq} · budget {budget}, margin {100 * p.margin:.0f}% -> usable "
                  f"{fmt_bytes(p.usable_bytes)} · {p.precision} · {p.optimizer}")
    table = Table(title="Largest rank (at the smallest batch) and largest batch (at the reference rank) that fit")
    for col in ("method", "ckpt", "largest r", "largest batch", "at r", "device memory", "trainable", "FLOPs/step", "step time"):
        table.add_column(col, justify="left" if col in ("method", "ckpt") else "right")
    for mp in p.methods:
        best = mp.max_batch or mp.max_rank
        largest_r = "-" if mp.max_rank is not None and mp.max_rank.r is None else (str(mp.max_rank.r) if mp.max_rank else "[red]none[/]")
        table.add_row(mp.method, "yes" if mp.grad_checkpointing else "no", largest_r,
                      str(mp.max_batch.batch) if mp.max_batch else "[red]none[/]",
                      str(mp.reference_r) if mp.reference_r else "-",
                      (fmt_bytes(best.device_bytes) + (" [yellow](tight)[/]" if best.verdict == "tight" else ""))
                      if best else "-", fmt_count(best.trainable_params) if best else "-",
                      fmt_flops(best.flops_per_step) if best else "-",
                      f"{best.step_time_s * 1e3:.0f} ms" if best and best.step_time_s else "-")
    console.print(table)
    if p.smallest is not None:
        s = p.smallest
        console.print(f"[red]Nothing fits {fmt_bytes(p.usable_bytes)}.[/] The smallest configuration is {s.method} r={s.r} "
                      f"batch {s.batch} with gradient checkpointing; it needs {fmt_bytes(s.device_bytes)} "
                      f"({fmt_bytes(s.device_bytes - p.usable_bytes)} more).")
    if any((mp.max_batch or mp.max_rank) is not None and (mp.max_batch or mp.max_rank).verdict == "tight"
           for mp in p.methods):
        console.print("[yellow]tight[/]: the budget lies within the estimate's stated uncertainty (reserved-memory "
                      "model and CUDA context); leave margin or check with --engine trace / the profiler.")
    for s in p.skipped:
        console.print(f"[yellow]skipped[/] {s}")
    for a in p.assumptions:
        console.print(f"[dim]assumed: {a}[/]")
    console.print(f"[dim]{p.estimates} estimates in {p.seconds:.2f} s[/]")
