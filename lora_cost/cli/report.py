"""`lora-cost report`: render a saved profile JSON as a self-contained HTML page."""

from __future__ import annotations

from pathlib import Path

import click

from . import main


@main.command()
@click.argument("path")
@click.option("--html", "html_path", required=True, help="Where to write the HTML report.")
def report(path, html_path):
    """Render a profile JSON (lora-cost profile --out) as an HTML report with the estimate beside it."""
    from ..profiles import read_json
    from ..report.html import profile_to_html
    from .plan import _write
    doc = read_json(Path(path))
    written = _write(html_path, profile_to_html(doc, path))
    click.echo(f"wrote {written}", err=True)
