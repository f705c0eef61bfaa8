"""`lora-cost models`, `gpus` and `methods`: what is bundled."""

from __future__ import annotations

import json

import click

from . import main


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(as_json):
    """List the bundled model profiles."""
    from ..analytic.catalogue import bundled_model_entries
    from ..report import catalogue
    entries = bundled_model_entries()
    if as_json:
        click.echo(json.dumps(catalogue.models_to_json(entries), indent=2))
        return
    from rich.console import Console
    catalogue.render_models(Console(), entries)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def gpus(as_json):
    """List the bundled GPU profiles."""
    from ..profiles import bundled_gpus
    from ..report import catalogue
    gpus = tuple(bundled_gpus().values())
    if as_json:
        click.echo(json.dumps(catalogue.gpus_to_json(gpus), indent=2))
        return
    from rich.console import Console
    catalogue.render_gpus(Console(), gpus)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def methods(as_json):
    """List the fine-tuning methods, their papers and the library recipe modelled."""
    from ..analytic.methods import all_methods
    from ..report import catalogue
    methods = tuple(all_methods().values())
    if as_json:
        click.echo(json.dumps(catalogue.methods_to_json(methods), indent=2))
        return
    from rich.console import Console
    catalogue.render_methods(Console(), methods)
