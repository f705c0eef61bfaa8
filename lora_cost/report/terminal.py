"""Rich terminal rendering of estimates."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..results import Estimate, MemoryCategory, ServingEstimate
from ..units import fmt_bytes, fmt_flops


def render_estimate(console: Console, e: Estimate, explain: bool = False) -> None:
    m, f = e.memory, e.flops
    rank = f" r={e.r}" if e.r is not None else ""
    targets = f" on {','.join(e.targets)}" if e.targets else ""
    console.print(f"[bold]{e.model}[/] · {e.method}{rank}{targets} · batch {e.batch} x seq {e.seq} · {e.precision} · "
                  f"{e.optimizer}{' · grad checkpointing' if e.grad_checkpointing else ''} · {e.attention}")
    pct = 100.0 * e.trainable_params / e.total_params if e.total_params else 0.0
    console.print(f"trainable parameters: [bold]{e.trainable_params:,}[/] of {e.total_params:,} ({pct:.4f}%)"
                  + (f" in {e.adapted_modules} adapted modules" if e.adapted_modules else ""))

    table = Table(title=f"Memory at the peak ({m.peak_phase}: {next(p.moment for p in m.phases if p.phase == m.peak_phase)})")
    table.add_column("term")
    table.add_column("bytes", justify="right")
    table.add_column("share", justify="right")
    if explain:
        table.add_column("formula")
    for t in m.components:
        row = [MemoryCategory.label_of(t.name), fmt_bytes(t.value), f"{100.0 * t.value / m.peak_bytes:.1f}%"]
        if explain:
            row.append(t.formula)
        table.add_row(*row)
    table.add_row("[bold]peak allocated[/]", f"[bold]{fmt_bytes(m.peak_bytes)}[/]", "100%", *([""] if explain else []))
    if m.device is not None:
        d = m.device
        table.add_row("reserved (caching allocator)", fmt_bytes(d.reserved_bytes), "", *([""] if explain else []))
        table.add_row("CUDA context + libraries", fmt_bytes(d.context_bytes), "", *([""] if explain else []))
        if d.paged_bytes:
            table.add_row("paged optimizer state" + ("" if d.paged_resident else " (evictable, not counted)"),
                          fmt_bytes(d.paged_bytes), "", *([""] if explain else []))
    table.add_row("device (reserved + context)", fmt_bytes(m.device_bytes), "", *([""] if explain else []))
    console.print(table)

    phases = Table(title="Peak per phase")
    phases.add_column("phase")
    phases.add_column("peak", justify="right")
    phases.add_column("when")
    for p in m.phases:
        phases.add_row(p.phase, fmt_bytes(p.peak_bytes), p.moment)
    if m.refresh is not None:  # task "galore": the optimizer's refresh step, a step of its own
        r = m.refresh
        phases.add_row(f"refresh step (first, every {r.every_steps})", fmt_bytes(r.peak_bytes),
                       f"{r.peak_phase}: {r.moment}; device {fmt_bytes(r.device_bytes)}")
    console.print(phases)

    console.print(f"FLOPs per step: forward {fmt_flops(f.forward)}, backward {fmt_flops(f.backward)}, "
                  f"total {fmt_flops(f.total)} (2 FLOPs per multiply-add)")
    if e.distributed is not None:
        render_distributed(console, e)
    if e.gpu is not None:
        g = e.gpu
        verdict = verdict_markup(g)
        console.print(f"{g.gpu}: {verdict} ({fmt_bytes(g.memory_bytes - g.headroom_bytes)} of {fmt_bytes(g.memory_bytes)}, headroom "
                      f"{fmt_bytes(g.headroom_bytes)}, uncertainty {fmt_bytes(g.uncertainty_bytes)}); about {g.step_time_s * 1e3:.0f} ms per step at "
                      f"{100 * g.utilisation:.0f}% of peak throughput")
    if e.serving is not None:
        render_serving(console, e.serving)
    if explain:
        _render_explain(console, e)


def verdict_markup(g) -> str:
    """fits / tight / does not fit, coloured (tight: the GPU's memory is within the stated uncertainty)."""
    word = g.verdict or ("fits" if g.fits else "does not fit")
    return {"fits": "[green]fits[/]", "tight": "[yellow]tight[/]"}.get(word, "[red]does not fit[/]")


def render_distributed(console: Console, e: Estimate) -> None:
    """--gpus: whose numbers these are, the host memory and each collective's bytes."""
    d = e.distributed
    comm = ", ".join(f"{name} {fmt_bytes(v)}" for name, v in d.communication_bytes.items())
    console.print(f"{d.sharding} over {d.gpus} GPUs ({d.nodes} node{'s' if d.nodes > 1 else ''}): the numbers above are "
                  f"the busiest rank's; host memory per node {fmt_bytes(e.memory.host_bytes or 0)}")
    console.print(f"communication per rank per step: {comm} ({fmt_bytes(d.wire_bytes)} sent over the ring)"
                  + (f"; {d.communication_time_s * 1e3:.0f} ms over {d.link}, {d.exposed_communication_time_s * 1e3:.0f} ms "
                     "not hidden by compute" if d.communication_time_s is not None else ""))
    console.print(f"[dim]assumed: {d.overlap}[/]")


def render_serving(console: Console, s: ServingEstimate) -> None:
    """The `serving` block: the base model per generated token, and what the method adds merged and unmerged."""
    console.print(f"Serving, per generated token attending to {s.context_positions:,} positions (--seq as the "
                  f"context; matmul FLOPs, 2 per multiply-add): base model {fmt_flops(s.base_flops_per_token)} "
                  f"({fmt_flops(s.base_matmul_flops_per_token)} matmuls + {fmt_flops(s.base_attention_flops_per_token)} "
                  f"attention), {fmt_bytes(s.base_weight_bytes)} of weights")
    if s.merged is None or s.unmerged is None:
        console.print(f"[dim]{s.note}[/]")
        return
    table = Table(title="What the method adds at inference (+: over the base model)")
    for col in ("served", "+weights", "+FLOPs/token", "+FLOPs/call", "+ops/block", "FLOPs/token"):
        table.add_column(col, justify="left" if col == "served" else "right")
    for label, v in (("merged", s.merged), ("unmerged", s.unmerged)):
        if label == "merged" and not s.mergeable:
            table.add_row(label, "cannot merge", "", "", "", "")
            continue
        table.add_row(label, fmt_bytes(v.extra_weight_bytes), f"{v.extra_flops_per_token:,}",
                      f"{v.extra_flops_per_forward:,}", str(v.extra_sequential_ops_per_block), fmt_flops(v.flops_per_token))
    console.print(table)
    if s.extra_positions:
        console.print(f"every request attends to {s.extra_positions:,} extra positions")
    if s.note:
        console.print(f"[dim]{s.note}[/]")


def _render_explain(console: Console, e: Estimate) -> None:
    m, f = e.memory, e.flops
    terms = Table(title="Every stored quantity")
    for col in ("term", "bytes", "formula", "what it is"):
        terms.add_column(col, justify="right" if col == "bytes" else "left")
    for t in m.terms:
        terms.add_row(t.name, fmt_bytes(t.value), t.formula, t.explanation)
    console.print(terms)
    kinds = Table(title=f"Saved activations by kind (total {fmt_bytes(m.saved_activation_bytes)})")
    kinds.add_column("kind")
    kinds.add_column("bytes", justify="right")
    for t in m.saved_by_kind:
        kinds.add_row(t.name, fmt_bytes(t.value))
    console.print(kinds)
    flops = Table(title="FLOPs by kind")
    for col in ("term", "FLOPs", "formula"):
        flops.add_column(col, justify="right" if col == "FLOPs" else "left")
    for t in f.terms:
        flops.add_row(t.name, fmt_flops(t.value), t.formula)
    console.print(flops)
    if f.forward_uncounted:
        console.print(f"of the forward, {fmt_flops(f.forward_uncounted)} are bitsandbytes 4-bit matmuls that "
                      "FlopCounterMode does not count")
    for a in e.assumptions:
        console.print(f"[dim]assumed: {a}[/]")

