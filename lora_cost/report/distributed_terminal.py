"""Rich terminal summary of a merged distributed profile (`lora-cost profile --nproc-per-node N`)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..profiler.merge import DistributedProfile
from ..units import fmt_bytes


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def render_distributed(console: Console, d: DistributedProfile) -> None:
    console.print(f"[bold]lora-cost profile[/] · {d.script or 'script'} · {d.world_size} ranks · status "
                  f"[bold]{d.status}[/]" + (f" (launcher exit {d.exit_code})" if d.exit_code else ""))
    t = Table(title="Per rank (peak allocated over the measured steps)")
    reserved = any(r.peak_reserved_bytes is not None for r in d.ranks)  # CUDA only
    columns = ["rank", "status", "steps", "peak", *(["reserved"] if reserved else []), "step wall", "comm / step",
               "gradients", "optimizer"]
    for col in columns:
        t.add_column(col, justify="left" if col == "status" else "right")
    for r in d.ranks:
        style = "" if r.status == "ok" else "[red]"
        row = [str(r.rank), f"{style}{r.status}", "-" if r.steps_detected is None else str(r.steps_detected),
               "-" if r.peak_bytes is None else fmt_bytes(r.peak_bytes)]
        if reserved:
            row.append("-" if r.peak_reserved_bytes is None else fmt_bytes(r.peak_reserved_bytes))
        row += [_ms(r.step_wall_s), _ms(r.communication_s_per_step),
                "-" if r.memory is None else fmt_bytes(r.memory.gradients),
                "-" if r.memory is None else fmt_bytes(r.memory.optimizer_state)]
        t.add_row(*row)
    console.print(t)
    for r in d.ranks:
        if r.note:
            console.print(f"rank {r.rank}: {r.note}")
    if d.peak_bytes is not None:
        console.print(f"busiest rank {d.busiest_rank}: {fmt_bytes(d.peak_bytes)}; imbalance "
                      f"{100 * (d.imbalance or 0):.1f}% above the mean rank peak; slowest step {_ms(d.slowest_step_s)}")
    if d.failed_ranks:
        console.print(f"[red]ranks that did not end normally: {', '.join(map(str, d.failed_ranks))}[/]")
    for w in d.warnings:
        console.print(f"[yellow]warning:[/] {w}")
