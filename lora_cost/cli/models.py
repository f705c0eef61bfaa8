"""`lora-cost models`, `gpus`, `methods` and `optimizers`: what is bundled."""

from __future__ import annotations

import json

import click

from . import main


def _show(entries, kind: str, as_json: bool) -> None:
    """Print a catalogue listing (`kind`: models, gpus or methods) as JSON or as a rich table."""
    from ..report import catalogue
    if as_json:
        click.echo(json.dumps(getattr(catalogue, f"{kind}_to_json")(entries), indent=2, allow_nan=False))
        return
    from rich.console import Console
    getattr(catalogue, f"render_{kind}")(Console(), entries)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(as_json):
    """List the bundled model profiles."""
    from ..analytic.catalogue import bundled_model_entries
    _show(bundled_model_entries(), "models", as_json)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def gpus(as_json):
    """List the bundled GPU profiles."""
    from ..profiles import bundled_gpus
    _show(tuple(bundled_gpus().values()), "gpus", as_json)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def methods(as_json):
    """List the fine-tuning methods, their papers and the library recipe modelled."""
    from ..analytic.methods import all_methods
    _show(tuple(all_methods().values()), "methods", as_json)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def optimizers(as_json):
    """List the optimizers (--optimizer), their other spellings and what each keeps."""
    from ..analytic.optimizers import canonical_optimizers
    _show(tuple(canonical_optimizers().values()), "optimizers", as_json)
