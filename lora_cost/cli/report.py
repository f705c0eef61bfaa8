"""`lora-cost report`: render a saved profile (or plan) JSON as a self-contained HTML page."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import LoraCostError
from . import main


@main.command()
@click.argument("path")
@click.option("--html", "html_path", required=True, help="Where to write the HTML report.")
def report(path, html_path):
    """Render a profile JSON (lora-cost profile --out) as an HTML report with the estimate beside it."""
    from ..report.html import profile_to_html
    from .plan import _write
    source = Path(path)
    try:
        doc = json.loads(source.read_text())
    except OSError as exc:
        raise LoraCostError(f"cannot read {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise LoraCostError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(doc, dict):
        raise LoraCostError(f"{path} must hold a JSON object")
    written = _write(html_path, profile_to_html(doc, path))
    click.echo(f"wrote {written}", err=True)
