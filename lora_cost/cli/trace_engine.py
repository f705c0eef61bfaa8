"""`lora-cost estimate --engine trace|both` (called by cli/estimate.py; torch loads only here)."""

from __future__ import annotations

import json

import click


def run_trace_engine(model, method, *, gpu, both, as_json, explain, note=None, **kwargs) -> None:
    from ..trace.run import run_engines
    run = run_engines(model, method, gpu=gpu, both=both, **kwargs)
    if note:  # --engine auto chose the trace engine
        click.echo(f"lora-cost: note: {note}", err=True)
    if as_json:
        from ..report.trace_json import engines_to_json
        click.echo(json.dumps(engines_to_json(run), indent=2, allow_nan=False))
        return
    from rich.console import Console
    from ..report.trace_terminal import render_engines
    render_engines(Console(), run, explain=explain)
