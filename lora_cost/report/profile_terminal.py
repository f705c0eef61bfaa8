"""Rich terminal summary of a profile (`lora-cost profile`); reads only the result dataclasses."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..units import fmt_bytes, fmt_flops
from ..profiler.results import MEASURED, ProfileResult
from ..results import MemoryCategory


def _err(rel: float | None) -> str:
    if rel is None:
        return "-"
    color = "green" if abs(rel) <= 0.1 else "yellow" if abs(rel) <= 0.3 else "red"
    return f"[{color}]{100 * rel:+.1f}%[/]"


def render_profile(console: Console, r: ProfileResult) -> None:
    env = r.environment
    console.print(f"[bold]lora-cost profile[/] · {r.script or 'in-process'} · status [bold]{r.status}[/] "
                  f"(exit {r.exit_code}) · {env.device} · torch {env.torch}")
    if r.model is not None:
        m = r.model
        rank = f" r={m.r}" if m.r else ""
        console.print(f"model {m.class_name} ({m.model_type or 'unknown type'}) · {m.method or 'unknown method'}{rank}"
                      f"{' on ' + ','.join(m.targets) if m.targets else ''} · batch {m.batch} x seq {m.seq} · "
                      f"{m.precision} · {m.optimizer or 'unknown optimizer'}"
                      f"{' · grad checkpointing' if m.grad_checkpointing else ''} · attention {m.attention}")
        console.print(f"trainable parameters {m.trainable_params:,} of {m.total_params:,}")
    console.print(f"optimizer steps detected: {r.steps_detected} (warm-up {r.warmup}, measured {len(r.measured)} "
                  f"of {r.steps_requested}) · memory from the {r.memory_source}")

    if r.measured:
        t = Table(title="Measured steps (peak allocated per phase)")
        for col in ("step", "micro-batches", "wall", "forward", "backward", "optimizer", "step peak", "saved act."):
            t.add_column(col, justify="right")
        for s in r.measured:
            ph = {p.phase: p.peak_bytes for p in s.phases}
            t.add_row(str(s.index), str(s.micro_batches), f"{s.wall_s * 1e3:.1f} ms",
                      *(fmt_bytes(ph[p]) if p in ph else "-" for p in ("forward", "backward", "optimizer")),
                      fmt_bytes(s.peak_bytes), fmt_bytes(s.saved_activation_bytes))
        console.print(t)
        last = r.measured[-1]
        c = Table(title=f"Live memory at the phase boundaries (step {last.index})")
        c.add_column("category")
        names = [f"{b.name}[{b.micro_batch}]" if last.micro_batches > 1 else b.name for b in last.boundaries]
        for n in names:
            c.add_column(n, justify="right")
        for category, field in MEASURED.items():
            label = category.label + (" (residual)" if category is MemoryCategory.TEMPORARIES else "")
            c.add_row(label, *(fmt_bytes(getattr(b.memory, field)) for b in last.boundaries))
        c.add_row("[bold]live total[/]", *(f"[bold]{fmt_bytes(b.memory.live_total)}[/]" for b in last.boundaries))
        console.print(c)

    if r.flops is not None:
        f = r.flops
        line = (f"FLOPs (step {f.step_index}, {f.micro_batches} micro-batch{'es' if f.micro_batches != 1 else ''}): "
                f"forward {fmt_flops(f.forward)}, backward {fmt_flops(f.backward)}, total {fmt_flops(f.total)}")
        if f.fvcore_forward is not None:
            line += f" · fvcore forward x2 = {fmt_flops(2 * f.fvcore_forward)}"
        console.print(line)
        if f.fvcore_forward is None:
            console.print(f"  fvcore cross-check: {f.fvcore_note}")

    if r.comparison:
        t = Table(title="Measured vs estimated")
        t.add_column("term")
        t.add_column("measured", justify="right")
        t.add_column("estimated", justify="right")
        t.add_column("error", justify="right")
        for row in r.comparison:
            fmt = fmt_bytes if row.unit == "bytes" else fmt_flops
            t.add_row(row.term, fmt(row.measured), fmt(row.estimated), _err(row.rel_error))
        console.print(t)
        if r.device_type != "cuda":
            console.print("[dim]the estimate models a CUDA GPU; on CPU kernels and allocations differ[/]")
    elif r.model is not None and not r.model.estimable:
        console.print(f"[yellow]no estimate:[/] {r.model.note}")

    if r.oom is not None:
        o = r.oom
        console.print(f"[red]out of memory[/] in step {o.step_index} ({o.phase}): {o.message}")
        if o.memory is not None:
            alive = ", ".join(f"{c.label} {fmt_bytes(getattr(o.memory, f))}" for c, f in MEASURED.items()
                              if getattr(o.memory, f))
            console.print(f"  alive: {alive}")
    if r.overhead is not None:
        o = r.overhead
        console.print(f"instrumentation: {o.instrumentation_s_per_step * 1e3:.2f} ms per step "
                      f"({100 * o.fraction:.1f}% of {o.step_wall_s * 1e3:.1f} ms)")
    for w in r.warnings:
        console.print(f"[yellow]warning:[/] {w}")
