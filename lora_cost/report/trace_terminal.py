"""Rich terminal rendering of `estimate --engine trace|both`: reads an EngineRun (trace/run.py)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..units import fmt_bytes, fmt_count, fmt_flops
from .terminal import render_estimate


def render_engines(console: Console, run, explain: bool = False) -> None:
    """The trace alone, or with `both` the analytic estimate, the trace and the differences."""
    if run.analytic is not None:
        console.rule("analytic engine")
        render_estimate(console, run.analytic, explain=explain)
        console.rule("trace engine")
    if run.sharding is not None:
        console.print(f"[dim]rank 0 of {run.sharding.gpus} ({run.sharding.strategy}) traced under torch's fake "
                      "process group: the busiest rank's memory[/dim]")
    render_trace(console, run.trace, run.gpu, explain)
    if run.analytic is not None:
        render_differences(console, run.differences)


def render_trace(console: Console, t, fit, explain: bool = False) -> None:
    c = console
    c.print(f"[bold]{t.model}[/bold] {t.method}" + (f" r={t.r}" if t.r else "") +
            f", batch {t.batch} x seq {t.seq}, {t.precision}, {t.optimizer}" +
            (", gradient checkpointing" if t.grad_checkpointing else "") + "  [dim](trace engine)[/dim]")
    c.print(f"trainable {fmt_count(t.trainable_params)} of {fmt_count(t.total_params)} parameters, "
            f"{t.adapted_modules} adapted modules; attention kernel: {t.attention_kernel}")
    table = Table(title="Simulated allocated memory, peak per phase")
    for col in ("phase", "peak", "at op", "in module", "alive at the peak"):
        table.add_column(col)
    for p in t.phases:
        table.add_row(p.phase, fmt_bytes(p.peak_bytes), p.op, p.module or "-",
                      ", ".join(f"{cat.name} {fmt_bytes(cat.bytes)}" for cat in p.categories))
    c.print(table)
    if t.refresh_peak_bytes is not None:  # task "galore": the optimizer's refresh step, traced as a second step
        c.print(f"refresh step (GaLore's SVD): peak {fmt_bytes(t.refresh_peak_bytes)} ({t.refresh_peak_phase})")
    c.print(f"peak {fmt_bytes(t.peak_bytes)} ({t.peak_phase}); saved activations {fmt_bytes(t.saved_activation_bytes)}; "
            f"device estimate {fmt_bytes(t.device_bytes)}"
            + (f" (reserved {fmt_bytes(t.device.reserved_bytes)} + context {fmt_bytes(t.device.context_bytes)}"
               + (f" + paged state {fmt_bytes(t.device.paged_bytes)}" if t.device.paged_bytes and t.device.paged_resident else "")
               + ")" if t.device is not None else ""))
    c.print(f"FLOPs forward {fmt_flops(t.flops_forward)}, backward {fmt_flops(t.flops_backward)}"
            + (f" (incl. {fmt_flops(t.flops_forward_uncounted)} FlopCounterMode does not see)" if t.flops_forward_uncounted else ""))
    if fit is not None:
        word = fit.verdict or ("fits" if fit.fits else "does not fit")
        c.print(f"{fit.gpu}: {word} (headroom {fmt_bytes(fit.headroom_bytes)}, uncertainty "
                f"{fmt_bytes(fit.uncertainty_bytes)}), ~{fit.step_time_s:.3f} s/step")
    if explain:
        saved = Table(title="Saved activations by module")
        for col in ("module", "bytes", "tensors"):
            saved.add_column(col)
        for s in t.saved_by_module[:25]:
            saved.add_row(s.module, fmt_bytes(s.bytes), str(s.tensors))
        c.print(saved)
        c.print("FLOPs by op: " + ", ".join(f"{o.op} {o.phase} {fmt_flops(o.flops)}" for o in t.flops_by_op))
        c.print("ops counted as 0 FLOPs: " + ", ".join(t.zero_flop_ops))
        for note in t.notes:
            c.print(f"[dim]- {note}[/dim]")
    c.print(f"[dim]traced in {t.trace_seconds:.1f} s, max RSS {fmt_bytes(t.trace_max_rss_bytes)}[/dim]")
    for w in t.warnings:
        c.print(f"[yellow]warning:[/yellow] {w}")


def render_differences(console: Console, differences) -> None:
    table = Table(title="analytic vs trace")
    for col in ("term", "analytic", "trace", "trace - analytic", "rel"):
        table.add_column(col)
    for d in differences:
        fmt = fmt_flops if d.term.startswith("flops") else (fmt_count if d.term == "trainable_params" else fmt_bytes)
        table.add_row(d.term, fmt(d.analytic), fmt(d.trace), fmt(d.diff), "-" if d.rel is None else f"{100 * d.rel:+.2f}%")
    console.print(table)
