"""`lora-cost report`: render a saved profile JSON as a self-contained HTML page."""

from __future__ import annotations

import math
from pathlib import Path

import click

from ..errors import LoraCostError, shown
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
    check_profile(doc, path)
    written = _write(html_path, profile_to_html(doc, path))
    click.echo(f"wrote {written}", err=True)


# What the HTML report reads of a profile (schema lora-cost-profile/1, profiler/results.py), field by
# field: a saved file may have been edited or cut short, so each is checked once here, where it is read.
def check_profile(doc: dict, path: str) -> None:
    """A one-line LoraCostError naming the first field of `doc` the report cannot read."""
    from ..profiler.results import SCHEMA
    if doc.get("schema") != SCHEMA or not isinstance(doc.get("measured"), list):
        raise LoraCostError(f"{path}: not a lora-cost profile (expected schema {SCHEMA!r} with 'measured' steps)")

    def expect(ok: bool, where: str, expected: str, value: object) -> None:
        if not ok:
            raise LoraCostError(f"{path}: field {where} must be {expected}, got {shown(value)}")

    def records(parent: dict, key: str, where: str) -> list[dict]:
        """parent[key]: a list of objects (absent or, where the report allows it, null: none)."""
        value = parent.get(key, [])
        expect(isinstance(value, list) and all(isinstance(v, dict) for v in value), where, "a list of objects", value)
        return value

    def number(value: object, where: str, *, nullable: bool = True, minimum: float = -math.inf) -> None:
        ok = (value is None and nullable) or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                              and minimum <= value < math.inf)
        expect(ok, where, f"a finite number{' >= 0' if minimum == 0 else ''}{' or null' if nullable else ''}", value)

    for key in ("model", "environment", "oom"):
        expect(doc.get(key) is None or isinstance(doc[key], dict), key, "an object or null", doc.get(key))
    expect(doc.get("warnings") is None or isinstance(doc["warnings"], list), "warnings", "a list", doc.get("warnings"))
    for i, step in enumerate(records(doc, "measured", "measured")):
        for j, phase in enumerate(records(step, "phases", f"measured[{i}].phases")):
            number(phase.get("peak_bytes"), f"measured[{i}].phases[{j}].peak_bytes", minimum=0)
        for j, bound in enumerate(records(step, "boundaries", f"measured[{i}].boundaries")):
            memory = bound.get("memory")
            expect(memory is None or isinstance(memory, dict), f"measured[{i}].boundaries[{j}].memory", "an object",
                   memory)
            for key, value in (memory or {}).items():
                number(value, f"measured[{i}].boundaries[{j}].memory.{key}", nullable=False, minimum=0)
    comparison = doc.get("comparison") or []
    for i, row in enumerate(records({"comparison": comparison}, "comparison", "comparison")):
        expect("term" in row or row.get("measured") is None, f"comparison[{i}].term", "a term name", None)
        for key in ("measured", "estimated", "rel_error"):
            number(row.get(key), f"comparison[{i}].{key}")
