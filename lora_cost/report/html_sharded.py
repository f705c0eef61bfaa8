"""The HTML page of `lora-cost plan --gpus ... --html` (task "sharding2"): the busiest rank's device memory
against the GPU count, one line per strategy and method, with the GPU's memory and the cheapest configuration
that fits (fewest GPUs, then the fastest step: analytic/sharding/plan.py `ShardedPlan.best`); the step time
against the GPU count; a table of every point. Self-contained as report/html.py's pages (plotly embedded)."""

from __future__ import annotations

import html

from ..analytic.sharding.plan import ShardedPlan
from ..units import fmt_bytes
from .html import _PALETTE, _gib, _page, _plotly


def _lines(p: ShardedPlan) -> dict[tuple[str, str], list]:
    """(method, strategy) -> its points by GPU count; the method's one-GPU point (no sharding) starts each of
    its strategies' lines (a method with no sharded point keeps a line of its own, "single")."""
    singles: dict[str, list] = {}
    lines: dict[tuple[str, str], list] = {}
    for pt in p.points:
        if pt.sharding == "single":
            singles.setdefault(pt.method, []).append(pt)
        else:
            lines.setdefault((pt.method, pt.sharding), []).append(pt)
    for method, pts in singles.items():
        keys = [k for k in lines if k[0] == method] or [(method, "single")]
        for key in keys:
            lines[key] = pts + lines.get(key, [])
    return {k: sorted(v, key=lambda q: q.gpus) for k, v in lines.items()}


def sharded_plan_to_html(p: ShardedPlan) -> str:
    go, _, _ = _plotly()
    esc = html.escape
    best = p.best
    gpus = sorted({pt.gpus for pt in p.points})
    header = [f"model <b>{esc(p.model)}</b>, GPU counts {', '.join(map(str, gpus)) or '-'}",
              f"GPU {esc(p.gpu)} ({fmt_bytes(p.memory_bytes)} per device)" if p.gpu else "no --gpu: fit and step time not judged",
              "memory is the busiest rank's (rank 0); 1 GPU: no data parallelism"]
    header += [f"skipped {esc(s)}" for s in p.skipped]
    lines = _lines(p)
    methods = list(dict.fromkeys(m for m, _ in lines))
    strategies = list(dict.fromkeys(s for _, s in lines))
    dashes = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot", "solid"]

    def style(method: str, strategy: str) -> dict:
        return dict(color=_PALETTE[strategies.index(strategy) % len(_PALETTE)],
                    dash=dashes[methods.index(method) % len(dashes)])

    fig1, fig2 = go.Figure(), go.Figure()
    for (method, strategy), pts in lines.items():
        name = f"{method} / {strategy}"
        custom = [[pt.sharding, pt.peak_bytes, pt.device_bytes, pt.host_bytes, pt.communication_bytes] for pt in pts]
        fig1.add_trace(go.Scatter(
            x=[pt.gpus for pt in pts], y=[_gib(pt.device_bytes) for pt in pts], mode="lines+markers", name=name,
            line=style(method, strategy), customdata=custom,
            hovertemplate=(f"<b>{esc(name)}</b><br>%{{x}} GPU(s), %{{customdata[0]}}<br>device %{{y:.2f}} GiB"
                           "<br>peak allocated %{customdata[1]:,} B<br>host per node %{customdata[3]:,} B"
                           "<br>communication %{customdata[4]:,} B per rank per step<extra></extra>")))
        timed = [pt for pt in pts if pt.step_time_s is not None]
        if timed:
            fig2.add_trace(go.Scatter(x=[pt.gpus for pt in timed], y=[pt.step_time_s * 1e3 for pt in timed],
                                      mode="lines+markers", name=name, line=style(method, strategy),
                                      hovertemplate=f"<b>{esc(name)}</b><br>%{{x}} GPU(s)<br>%{{y:.0f}} ms per step<extra></extra>"))
    if best is not None:
        star = dict(symbol="star", size=18, color="#ffd700", line=dict(width=1, color="#000"))
        label = f"cheapest that fits: {best.method} on {best.gpus} GPU(s), {best.sharding}"
        fig1.add_trace(go.Scatter(x=[best.gpus], y=[_gib(best.device_bytes)], mode="markers", name=label, marker=star,
                                  hovertemplate=f"<b>{esc(label)}</b><br>%{{y:.2f}} GiB<extra></extra>"))
        if best.step_time_s is not None:
            fig2.add_trace(go.Scatter(x=[best.gpus], y=[best.step_time_s * 1e3], mode="markers", name=label, marker=star,
                                      hovertemplate=f"<b>{esc(label)}</b><br>%{{y:.0f}} ms<extra></extra>"))
    if p.memory_bytes:
        fig1.add_hline(y=_gib(p.memory_bytes), line=dict(color="#c00", dash="dash"),
                       annotation_text=f"{esc(p.gpu or '')} {_gib(p.memory_bytes):.0f} GiB", annotation_position="top left")
    axis = dict(title="GPUs (data-parallel world size)", type="log", tickvals=gpus, ticktext=[str(g) for g in gpus])
    fig1.update_layout(title="Busiest rank's device memory against GPU count, per strategy (star: cheapest that fits)",
                       xaxis=axis, yaxis=dict(title="device memory per rank (GiB)"), legend=dict(title="method / strategy"))
    fig2.update_layout(title="Step time against GPU count (compute + communication not hidden by it)",
                       xaxis=axis, yaxis=dict(title="ms per step", type="log"), legend=dict(title="method / strategy"))

    rows = "".join(
        f"<tr><td>{esc(pt.method)}</td><td>{pt.gpus}</td><td>{esc(pt.sharding)}</td><td>{fmt_bytes(pt.peak_bytes)}</td>"
        f"<td>{fmt_bytes(pt.device_bytes)}</td><td>{fmt_bytes(pt.host_bytes)}</td><td>{fmt_bytes(pt.communication_bytes)}</td>"
        f"<td>{'-' if pt.fits is None else ('yes' if pt.fits else 'no')}</td>"
        f"<td>{'-' if pt.step_time_s is None else f'{pt.step_time_s * 1e3:.0f} ms'}</td>"
        f"<td>{'-' if pt.max_batch is None else pt.max_batch}</td></tr>" for pt in p.points)
    verdict = (f"<p><b>Cheapest configuration that fits</b> (fewest GPUs, then fastest step): {esc(best.method)} on "
               f"{best.gpus} GPU(s) with {esc(best.sharding)}, {fmt_bytes(best.device_bytes)} per rank"
               + (f", about {best.step_time_s * 1e3:.0f} ms per step" if best.step_time_s is not None else "") + ".</p>"
               if best is not None else
               ("<p><b>No configuration fits.</b></p>" if p.gpu else "<p>Give --gpu to judge the fit.</p>"))
    summary = verdict + ("<table class=\"summary\"><tr><th>method</th><th>GPUs</th><th>sharding</th><th>peak allocated</th>"
                         "<th>device</th><th>host per node</th><th>communication per rank</th><th>fits</th><th>step</th>"
                         "<th>largest batch</th>"
                         f"</tr>{rows}</table>")
    return _page(f"lora-cost plan: {p.model} over GPU counts", header, summary, [fig1, fig2])
