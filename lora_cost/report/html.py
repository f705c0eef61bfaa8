"""Self-contained HTML reports (plotly): one file, plotly's JavaScript embedded, no network needed.

Only reads result objects (a `Plan`, a profile document) and writes nothing itself: callers get the
HTML text. User-supplied strings (model names, paths) are escaped everywhere they appear.
"""

from __future__ import annotations

import html
from datetime import datetime, timezone

from ..analytic.planner import Plan
from ..profiler.results import MEASURED
from ..results import MemoryCategory
from ..units import GIB, fmt_bytes

_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
.meta { color: #555; font-size: 0.92em; }
.meta li { margin: 2px 0; }
table.summary { border-collapse: collapse; margin: 12px 0 20px; font-size: 0.92em; }
table.summary th, table.summary td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
table.summary th:first-child, table.summary td:first-child { text-align: left; }
.fig { margin: 18px 0 30px; }
"""

_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
            "#393b79", "#637939"]


def _plotly():
    try:
        import plotly.graph_objects as go
        import plotly.io as pio
        from plotly.offline import get_plotlyjs
    except ImportError:  # pragma: no cover - exercised only without the extra
        from ..errors import LoraCostError
        raise LoraCostError("HTML reports need plotly, a dependency of lora-cost: pip install plotly") from None
    return go, pio, get_plotlyjs


def _page(title: str, header_items: list[str], summary_html: str, figures: list) -> str:
    go, pio, get_plotlyjs = _plotly()
    divs = []
    for i, fig in enumerate(figures):
        fig.update_layout(template="plotly_white", height=460, margin=dict(l=70, r=30, t=60, b=60))
        divs.append(f'<div class="fig">{pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=f"fig{i}")}</div>')
    items = "".join(f"<li>{h}</li>" for h in header_items)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style><script type=\"text/javascript\">{get_plotlyjs()}</script></head><body>"
            f"<h1>{html.escape(title)}</h1><ul class=\"meta\">{items}<li>generated {stamp} by lora-cost</li></ul>"
            f"{summary_html}{''.join(divs)}</body></html>\n")


def _gib(n: int | float) -> float:
    return n / GIB


def _scale(values, kind: str) -> tuple[float, str]:
    """A readable unit for a set of values: GiB or MiB for bytes, TFLOP/GFLOP/MFLOP for FLOPs."""
    top = max([abs(v) for v in values if v] or [0])
    if kind == "bytes":
        return (GIB, "GiB") if top >= GIB else (2**20, "MiB")
    for scale, unit in ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP")):
        if top >= scale:
            return scale, unit
    return 1.0, "FLOP"


def plan_to_html(p: Plan) -> str:
    go, _, _ = _plotly()
    esc = html.escape
    header = [f"model <b>{esc(p.model)}</b>, sequence length {p.seq}, batch {p.batch_range[0]}-{p.batch_range[1]}, "
              f"ranks {p.ranks[0]}-{p.ranks[-1]}",
              f"budget {fmt_bytes(p.budget_bytes)}" + (f" ({esc(p.gpu)})" if p.gpu else "")
              + f", margin {100 * p.margin:.0f}% &rarr; usable {fmt_bytes(p.usable_bytes)}"]
    header += [esc(a) for a in p.assumptions]
    header += [f"skipped {esc(s)}" for s in p.skipped]
    colors = {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(dict.fromkeys(mp.method for mp in p.methods))}

    # 1. peak device memory against rank, per method, with the budget and the chosen points
    fig1 = go.Figure()
    for mp in p.methods:
        xs = [pt.r if pt.r is not None else p.ranks[0] for pt in mp.rank_curve]
        if len(xs) == 1:  # full fine-tuning has no rank: draw it across the swept ranks
            xs = [p.ranks[0], p.ranks[-1]]
            pts = [mp.rank_curve[0]] * 2
        else:
            pts = list(mp.rank_curve)
        name = f"{mp.method}{' + ckpt' if mp.grad_checkpointing else ''}"
        fig1.add_trace(go.Scatter(
            x=xs, y=[_gib(pt.device_bytes) for pt in pts], mode="lines+markers", name=name,
            line=dict(color=colors[mp.method], dash="dot" if mp.grad_checkpointing else "solid"),
            customdata=[[pt.device_bytes, pt.peak_bytes, pt.trainable_params] for pt in pts],
            hovertemplate=(f"<b>{esc(name)}</b><br>r=%{{x}}<br>device %{{y:.3f}} GiB (%{{customdata[0]:,}} B)"
                           "<br>peak allocated %{customdata[1]:,} B<br>trainable %{customdata[2]:,}<extra></extra>")))
        if mp.max_rank is not None and mp.max_rank.r is not None:
            fig1.add_trace(go.Scatter(
                x=[mp.max_rank.r], y=[_gib(mp.max_rank.device_bytes)], mode="markers", showlegend=False,
                marker=dict(symbol="star", size=15, color=colors[mp.method], line=dict(width=1, color="#000")),
                hovertemplate=f"<b>largest rank that fits: {esc(name)}</b><br>r=%{{x}}<br>%{{y:.3f}} GiB<extra></extra>"))
    fig1.add_hline(y=_gib(p.usable_bytes), line=dict(color="#c00", dash="dash"),
                   annotation_text=f"usable budget {_gib(p.usable_bytes):.1f} GiB", annotation_position="top left")
    fig1.update_layout(title=f"Peak device memory against rank (batch {p.batch_range[0]}, seq {p.seq}); stars: largest rank that fits",
                       xaxis=dict(title="rank r", type="log", tickvals=list(p.ranks), ticktext=[str(r) for r in p.ranks]),
                       yaxis=dict(title="device memory (GiB)"),
                       legend=dict(title="method"))

    # 2. stacked breakdown of the chosen configurations (largest batch, else largest rank)
    chosen = [(mp, mp.max_batch or mp.max_rank) for mp in p.methods if (mp.max_batch or mp.max_rank)]
    if p.smallest is not None:
        chosen = [(None, p.smallest)]
    labels = [f"{pt.method}{' + ckpt' if pt.grad_checkpointing else ''}<br>r={pt.r} b={pt.batch}" for _, pt in chosen]
    keys = list(dict.fromkeys(t.name for _, pt in chosen for t in pt.components))
    fig2 = go.Figure()
    for i, key in enumerate(keys):
        vals = [next((t.value for t in pt.components if t.name == key), 0) for _, pt in chosen]
        label = MemoryCategory.label_of(key)
        fig2.add_trace(go.Bar(name=label, x=labels, y=[_gib(v) for v in vals], marker_color=_PALETTE[i % len(_PALETTE)],
                              customdata=vals, hovertemplate=f"{esc(label)}: %{{y:.3f}} GiB (%{{customdata:,}} B)<extra>%{{x}}</extra>"))
    fig2.add_hline(y=_gib(p.usable_bytes), line=dict(color="#c00", dash="dash"), annotation_text="usable budget")
    fig2.update_layout(barmode="stack", title="Memory at the peak of the chosen configurations (largest batch that fits)"
                       if p.smallest is None else "Nothing fits: the smallest configuration and what it needs",
                       xaxis=dict(title="configuration"), yaxis=dict(title="peak allocated memory (GiB)"))

    # 3. largest batch against sequence length
    seqs = sorted({s for mp in p.methods for s, _ in mp.batch_by_seq})
    fig3 = go.Figure()
    for mp in p.methods:
        name = f"{mp.method}{' + ckpt' if mp.grad_checkpointing else ''}"
        fig3.add_trace(go.Scatter(
            x=[s for s, _ in mp.batch_by_seq], y=[b for _, b in mp.batch_by_seq], mode="lines+markers", name=name,
            line=dict(color=colors[mp.method], dash="dot" if mp.grad_checkpointing else "solid"),
            hovertemplate=f"<b>{esc(name)}</b><br>seq %{{x}}<br>largest batch %{{y}}<extra></extra>"))
    fig3.update_layout(title="Largest batch that fits against sequence length (r = each method's reference rank)",
                       xaxis=dict(title="sequence length (tokens)", type="log", tickvals=seqs, ticktext=[str(x) for x in seqs]),
                       yaxis=dict(title="largest batch (sequences)"))

    # 4. FLOPs per step of the chosen configurations
    fig4 = go.Figure()
    pts = [pt for _, pt in chosen]
    fig4.add_trace(go.Bar(x=labels, y=[pt.flops_per_step / 1e12 for pt in pts], marker_color="#4c78a8",
                          customdata=[[pt.flops_per_step, pt.step_time_s or 0.0, pt.tokens_per_s or 0.0] for pt in pts],
                          hovertemplate="%{x}<br>%{y:.2f} TFLOP per step (%{customdata[0]:,} FLOP)"
                                        + ("<br>about %{customdata[1]:.3f} s per step, %{customdata[2]:,.0f} tokens/s" if p.gpu else "")
                                        + "<extra></extra>"))
    fig4.update_layout(title="FLOPs per training step (forward + backward, 2 FLOPs per multiply-add)",
                       xaxis=dict(title="configuration"), yaxis=dict(title="TFLOP per step"))

    rows = []
    for mp in p.methods:
        best = mp.max_batch or mp.max_rank
        largest_r = "-" if mp.max_rank is not None and mp.max_rank.r is None else (mp.max_rank.r if mp.max_rank else "none")
        rows.append(f"<tr><td>{esc(mp.method)}</td><td>{'yes' if mp.grad_checkpointing else 'no'}</td><td>{largest_r}</td>"
                    f"<td>{mp.max_batch.batch if mp.max_batch else 'none'}</td>"
                    f"<td>{fmt_bytes(best.device_bytes) if best else '-'}</td><td>{f'{best.trainable_params:,}' if best else '-'}</td></tr>")
    rows = "".join(rows)
    summary = ("<table class=\"summary\"><tr><th>method</th><th>checkpointing</th><th>largest r (batch "
               f"{p.batch_range[0]})</th><th>largest batch</th><th>device memory</th><th>trainable</th></tr>{rows}</table>")
    if p.smallest is not None:
        s = p.smallest
        summary += (f"<p><b>Nothing fits {fmt_bytes(p.usable_bytes)}.</b> The smallest configuration ({esc(s.method)}, r={s.r}, "
                    f"batch {s.batch}, checkpointing) needs {fmt_bytes(s.device_bytes)}.</p>")
    return _page(f"lora-cost plan: {p.model}", header, summary, [fig1, fig2, fig3, fig4])


def profile_to_html(doc: dict, source: str) -> str:
    """A measured profile (`lora-cost profile --out`, schema lora-cost-profile/1) with the analytic
    estimate for the same configuration beside it."""
    go, _, _ = _plotly()
    esc = html.escape
    if not isinstance(doc.get("measured"), list):
        from ..errors import LoraCostError
        raise LoraCostError(f"{source}: not a lora-cost profile (no 'measured' steps; schema {doc.get('schema')!r})")
    model = doc.get("model") or {}
    env = doc.get("environment") or {}
    steps = doc["measured"]
    header = [f"profile of <b>{esc(str(doc.get('script', '?')))}</b> ({esc(str(source))}): status "
              f"{esc(str(doc.get('status')))}, exit code {esc(str(doc.get('exit_code')))}, {len(steps)} measured step(s) "
              f"after {esc(str(doc.get('warmup')))} warm-up, memory from {esc(str(doc.get('memory_source')))}"]
    if model:
        header.append("model " + esc(", ".join(f"{k} {v}" for k, v in model.items()
                                             if k in ("class_name", "model_type", "method", "r", "batch", "seq",
                                                      "precision", "optimizer", "grad_checkpointing", "attention")
                                             and v is not None)))
        if model.get("note"):
            header.append(esc(str(model["note"])))
    if env:
        header.append("environment: " + esc(", ".join(f"{k} {v}" for k, v in env.items() if v and k != "cuda_context_bytes")))
    oom = doc.get("oom")
    if oom:
        header.append(f"<b>out of memory</b> in step {esc(str(oom.get('step_index')))} ({esc(str(oom.get('phase')))}): "
                      f"{esc(str(oom.get('message', ''))[:300])}")
    header += [f"warning: {esc(str(w))}" for w in doc.get("warnings") or []]
    figures = []

    comparison = [c for c in doc.get("comparison") or [] if c.get("measured") is not None]
    for unit, title, label in (("bytes", "Measured against estimated memory, per term", "memory"),
                               ("flops", "Measured against estimated FLOPs", "FLOPs")):
        rows = [c for c in comparison if c.get("unit") == unit]
        if not rows:
            continue
        scale, unit_name = _scale([c["measured"] for c in rows] + [c.get("estimated") or 0 for c in rows], unit)
        axis = f"{label} ({unit_name})"
        names = [esc(str(c["term"])) for c in rows]
        fig = go.Figure()
        fig.add_trace(go.Bar(name="measured", x=names, y=[(c["measured"] or 0) / scale for c in rows],
                             customdata=[c["measured"] or 0 for c in rows], marker_color="#1f77b4",
                             hovertemplate="measured %{x}: %{customdata:,}<extra></extra>"))
        fig.add_trace(go.Bar(name="estimated", x=names, y=[(c.get("estimated") or 0) / scale for c in rows],
                             customdata=[[c.get("estimated") or 0, 100 * (c.get("rel_error") or 0)] for c in rows],
                             marker_color="#ff7f0e",
                             hovertemplate="estimated %{x}: %{customdata[0]:,} (%{customdata[1]:+.1f}%)<extra></extra>"))
        fig.update_layout(barmode="group", title=title, xaxis=dict(title="term"), yaxis=dict(title=axis))
        figures.append(fig)

    fig = go.Figure()
    peaks = [p.get("peak_bytes") or 0 for st in steps for p in st.get("phases", [])]
    scale, unit_name = _scale(peaks, "bytes")
    for phase, color in (("forward", "#2ca02c"), ("backward", "#d62728"), ("optimizer", "#9467bd")):
        ys = [next((p.get("peak_bytes") for p in st.get("phases", []) if p.get("phase") == phase), None) for st in steps]
        fig.add_trace(go.Bar(name=phase, x=[f"step {st.get('index')}" for st in steps], y=[(y or 0) / scale for y in ys],
                             customdata=[y or 0 for y in ys], marker_color=color,
                             hovertemplate=f"{phase} peak %{{y:.3f}} {unit_name} (%{{customdata:,}} B)<extra>%{{x}}</extra>"))
    fig.update_layout(barmode="group", title="Peak allocated memory per phase of each measured step",
                      xaxis=dict(title="measured optimizer step"), yaxis=dict(title=f"peak allocated ({unit_name})"))
    figures.append(fig)

    bounds = steps[0].get("boundaries", []) if steps else []
    if bounds:
        labels = [f"{b.get('name')} (micro-batch {b.get('micro_batch')})" for b in bounds]
        scale, unit_name = _scale([(b.get("memory") or {}).get("live_total", 0) for b in bounds], "bytes")
        fig = go.Figure()
        for i, (category, field) in enumerate(MEASURED.items()):
            vals = [(b.get("memory") or {}).get(field, 0) for b in bounds]
            fig.add_trace(go.Bar(name=category.label, x=labels, y=[v / scale for v in vals], customdata=vals,
                                 marker_color=_PALETTE[i % len(_PALETTE)],
                                 hovertemplate=f"{esc(category.label)}: %{{y:.3f}} {unit_name} (%{{customdata:,}} B)<extra>%{{x}}</extra>"))
        fig.update_layout(barmode="stack", title=f"Live memory by category at the phase boundaries of step {steps[0].get('index')}",
                          xaxis=dict(title="moment"), yaxis=dict(title=f"live memory ({unit_name})"))
        figures.append(fig)
    summary = ""
    if comparison:
        rows = "".join(f"<tr><td>{esc(str(c['term']))}</td><td>{esc(str(c.get('unit')))}</td><td>{c['measured']:,}</td>"
                       f"<td>{'-' if c.get('estimated') is None else format(c['estimated'], ',')}</td>"
                       f"<td>{'-' if c.get('rel_error') is None else format(100 * c['rel_error'], '+.1f') + '%'}</td></tr>"
                       for c in comparison)
        summary = ("<table class=\"summary\"><tr><th>term</th><th>unit</th><th>measured</th><th>estimated</th>"
                   f"<th>error</th></tr>{rows}</table>")
    return _page(f"lora-cost profile: {model.get('class_name') or doc.get('script') or source}", header, summary, figures)
