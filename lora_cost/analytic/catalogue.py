"""The bundled model catalogue behind `lora-cost models`: each profile's shape and parameter count."""

from __future__ import annotations

from dataclasses import dataclass

from ..profiles import bundled_models, load_model
from ..spec import ModelSpec
from .architectures import get_architecture


@dataclass(frozen=True)
class ModelEntry:
    name: str
    aliases: tuple[str, ...]
    source: str
    spec: ModelSpec
    params: int  # base-model parameters: the sum of the architecture's parameter groups


def bundled_model_entries() -> tuple[ModelEntry, ...]:
    entries = []
    for name, profile in bundled_models().items():
        spec = load_model(name)
        params = sum(g.total for g in get_architecture(spec.model_type).params(spec))
        entries.append(ModelEntry(name, tuple(profile.aliases), profile.source, spec, params))
    return tuple(entries)
