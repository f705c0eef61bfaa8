"""`lora-cost estimate --engine trace|both`: called by cli/estimate.py (imports torch on request only)."""

from __future__ import annotations

import json

import click

from ..units import fmt_bytes, fmt_count, fmt_flops


def _gpu_fit(device: int, flops: int, precision: str, gpu: str | None):
    if gpu is None:
        return None
    from ..analytic.device import gpu_fit
    from ..profiles import load_gpu
    from ..report.jsonout import gpu_fit_json

    return gpu_fit_json(gpu_fit(load_gpu(gpu), device, flops, precision))


def run_trace_engine(model, method, *, gpu, both, as_json, explain, r, targets, batch, seq, precision, optimizer,
                     grad_checkpointing, attention, dropout, model_dropout, method_options) -> None:
    from . import trace
    from .compare import differences
    from .jsonout import trace_to_json

    kwargs = dict(r=r, targets=targets, batch=batch, seq=seq, precision=precision, optimizer=optimizer,
                  grad_checkpointing=grad_checkpointing, attention=attention, dropout=dropout,
                  model_dropout=model_dropout, method_options=method_options)
    if gpu is not None:  # a bad --gpu fails before the trace runs
        from ..profiles import load_gpu
        load_gpu(gpu)
    analytic = None
    if both:
        from ..analytic.estimator import estimate
        analytic = estimate(model, method, gpu=gpu, **kwargs)  # validates the flags before torch loads
    t = trace(model, method, **kwargs)
    fit = _gpu_fit(t.device_bytes, t.flops_forward + t.flops_backward, t.precision, gpu)
    if as_json:
        doc = trace_to_json(t, fit)
        if both:
            from ..report.jsonout import estimate_to_json
            doc = {"analytic": estimate_to_json(analytic), "trace": doc,
                   "differences": [{"term": d.term, "analytic": d.analytic, "trace": d.trace, "diff": d.diff,
                                    "rel": d.rel} for d in differences(analytic, t)]}
        click.echo(json.dumps(doc, indent=2))
        return
    if both:
        from rich.console import Console

        from ..report.terminal import render_estimate
        console = Console()
        console.rule("analytic engine")
        render_estimate(console, analytic, explain=explain)
        console.rule("trace engine")
    _render(t, fit, explain)
    if both:
        _render_differences(analytic, t)


def _render(t, fit, explain: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
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
    c.print(f"peak {fmt_bytes(t.peak_bytes)} ({t.peak_phase}); saved activations {fmt_bytes(t.saved_activation_bytes)}; "
            f"device estimate {fmt_bytes(t.device_bytes)}")
    c.print(f"FLOPs forward {fmt_flops(t.flops_forward)}, backward {fmt_flops(t.flops_backward)}"
            + (f" (incl. {fmt_flops(t.flops_forward_uncounted)} FlopCounterMode does not see)" if t.flops_forward_uncounted else ""))
    if fit:
        c.print(f"{fit['name']}: {'fits' if fit['fits'] else 'does NOT fit'} "
                f"(headroom {fmt_bytes(fit['headroom_bytes'])}), ~{fit['step_time_s']:.3f} s/step")
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


def _render_differences(analytic, t) -> None:
    from rich.console import Console
    from rich.table import Table

    from .compare import differences

    table = Table(title="analytic vs trace")
    for col in ("term", "analytic", "trace", "trace - analytic", "rel"):
        table.add_column(col)
    for d in differences(analytic, t):
        fmt = fmt_flops if d.term.startswith("flops") else (fmt_count if d.term == "trainable_params" else fmt_bytes)
        table.add_row(d.term, fmt(d.analytic), fmt(d.trace), fmt(d.diff), "-" if d.rel is None else f"{100 * d.rel:+.2f}%")
    Console().print(table)
