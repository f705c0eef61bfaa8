"""`lora-cost models` and `lora-cost gpus`: what is bundled."""

from __future__ import annotations

import json

import click

from . import main


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(as_json):
    """List the bundled model profiles."""
    from ..analytic.architectures import get_architecture
    from ..profiles import bundled_models, load_model
    rows = []
    for name, profile in bundled_models().items():
        spec = load_model(name)
        params = sum(g.total for g in get_architecture(spec.model_type).params(spec))
        rows.append({"name": name, "aliases": list(profile.aliases), "model_type": spec.model_type, "params": params,
                     "layers": spec.layers, "hidden": spec.hidden, "heads": spec.heads, "kv_heads": spec.kv_heads,
                     "intermediate": spec.intermediate, "vocab": spec.vocab, "max_positions": spec.max_positions,
                     "source": profile.source})
    if as_json:
        click.echo(json.dumps(rows, indent=2, allow_nan=False))
        return
    from rich.console import Console
    from ..report.terminal import render_models
    render_models(Console(), rows)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def gpus(as_json):
    """List the bundled GPU profiles."""
    from ..profiles import bundled_gpus
    rows = [{"name": g.name, "description": g.description, "memory_bytes": g.memory_bytes,
             "bf16_tflops_dense": g.bf16_tflops_dense, "fp32_tflops": g.fp32_tflops, "source": g.source}
            for g in bundled_gpus().values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2, allow_nan=False))
        return
    from rich.console import Console
    from rich.table import Table
    from ..units import fmt_bytes
    table = Table(title="Bundled GPU profiles")
    for col in ("name", "description", "memory", "BF16 TFLOP/s", "FP32 TFLOP/s"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["description"], fmt_bytes(r["memory_bytes"]), f"{r['bf16_tflops_dense']:g}", f"{r['fp32_tflops']:g}")
    Console().print(table)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def methods(as_json):
    """List the fine-tuning methods, their papers and the library recipe modelled."""
    from ..analytic.methods import all_methods
    rows = [{"name": m.name, "title": m.title, "paper": m.paper, "recipe": m.recipe, "default_r": m.default_r,
             "options": list(m.options)} for m in all_methods().values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2, allow_nan=False))
        return
    from rich.console import Console
    from rich.table import Table
    table = Table(title="Fine-tuning methods")
    for col in ("name", "paper", "default r", "recipe modelled"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["paper"], str(r["default_r"] or "-"), r["recipe"])
    Console().print(table)
