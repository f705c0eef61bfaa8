"""What is bundled (`lora-cost models`, `gpus`, `methods`): JSON documents and rich tables.

Reads the catalogue objects only (model entries, GPU profiles, method modules); computes nothing.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..units import fmt_bytes, fmt_count


def models_to_json(entries) -> list[dict]:
    """`lora-cost models --json`: one object per bundled model profile."""
    return [{"name": e.name, "aliases": list(e.aliases), "model_type": e.spec.model_type, "params": e.params,
             "layers": e.spec.layers, "hidden": e.spec.hidden, "heads": e.spec.heads, "kv_heads": e.spec.kv_heads,
             "intermediate": e.spec.intermediate, "vocab": e.spec.vocab, "max_positions": e.spec.max_positions,
             "source": e.source} for e in entries]


def render_models(console: Console, entries) -> None:
    table = Table(title="Bundled model profiles")
    for col in ("name", "family", "params", "layers", "hidden", "heads (kv)", "vocab", "max seq"):
        table.add_column(col, justify="right" if col in ("params", "layers", "hidden", "vocab", "max seq") else "left",
                         no_wrap=True)
    for e in entries:
        s = e.spec
        table.add_row(e.name, s.model_type, fmt_count(e.params), str(s.layers), str(s.hidden),
                      f"{s.heads} ({s.kv_heads})", f"{s.vocab:,}", f"{s.max_positions:,}")
    console.print(table)
    console.print("[dim]Hugging Face ids work as aliases (lora-cost models --json lists them).[/]")


def gpus_to_json(gpus) -> list[dict]:
    """`lora-cost gpus --json`: one object per bundled GPU profile."""
    return [{"name": g.name, "description": g.description, "memory_bytes": g.memory_bytes,
             "bf16_tflops_dense": g.bf16_tflops_dense, "fp32_tflops": g.fp32_tflops, "source": g.source}
            for g in gpus]


def render_gpus(console: Console, gpus) -> None:
    table = Table(title="Bundled GPU profiles")
    for col in ("name", "description", "memory", "BF16 TFLOP/s", "FP32 TFLOP/s"):
        table.add_column(col)
    for g in gpus:
        table.add_row(g.name, g.description, fmt_bytes(g.memory_bytes), f"{g.bf16_tflops_dense:g}", f"{g.fp32_tflops:g}")
    console.print(table)


def methods_to_json(methods) -> list[dict]:
    """`lora-cost methods --json`: one object per registered fine-tuning method."""
    return [{"name": m.name, "title": m.title, "paper": m.paper, "recipe": m.recipe, "default_r": m.default_r,
             "options": [o.name for o in m.options]} for m in methods]


def render_methods(console: Console, methods) -> None:
    table = Table(title="Fine-tuning methods")
    for col in ("name", "paper", "default r", "recipe modelled"):
        table.add_column(col)
    for m in methods:
        table.add_row(m.name, m.paper, str(m.default_r or "-"), m.recipe)
    console.print(table)


def optimizers_to_json(optimizers) -> list[dict]:
    """`lora-cost optimizers --json`: one object per registered optimizer."""
    return [{"name": o.name, "aliases": list(o.aliases), "description": o.description, "paged": o.paged}
            for o in optimizers]


def render_optimizers(console: Console, optimizers) -> None:
    table = Table(title="Optimizers (--optimizer; Trainer's underscore spellings work too)")
    for col in ("name", "also", "state and step modelled", "paged"):
        table.add_column(col)
    for o in optimizers:
        table.add_row(o.name, ", ".join(o.aliases) or "-", o.description, "yes" if o.paged else "-")
    console.print(table)
