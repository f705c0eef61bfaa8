"""peft's regex `target_modules`, resolved against the model's real module keys.

peft matches a string target_modules (other than "all-linear") with `re.fullmatch(target_modules, key)`
on each key of `model.named_modules()` (`peft/tuners/tuners_utils.py` check_target_module_exists).
The keys are transformers' own module paths ("model.layers.3.self_attn.q_proj"), so they are read from
the real model built on the meta device (`trace/build.py`: no memory, but torch and transformers are
imported, only when a regex is given).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from ..errors import LoraCostError, shown


@dataclass(frozen=True)
class TargetRegex:
    """A regex target_modules, resolved once the model is known (`resolve_regex`)."""

    pattern: str

    def __repr__(self) -> str:
        return f"regex {self.pattern!r}"


def resolve_regex(model: str, regex: TargetRegex, origin: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(target names as --targets takes them, warnings). The names are the matched modules' own names, or
    parent.name where the name alone is ambiguous (GPT-2's attn.c_proj and mlp.c_proj)."""
    try:
        re.compile(regex.pattern)
    except re.error as exc:
        raise LoraCostError(f"{origin}: not a valid regular expression ({exc})") from None
    from ..trace.deps import INSTALL_HINT, missing

    lacking = missing()
    if lacking:
        raise LoraCostError(f"{origin}: a regex target_modules is matched against the model's module names, which "
                            f"needs {lacking} (`{INSTALL_HINT}`); or give the module names as a list")
    return _resolve(model, regex.pattern, origin)


@lru_cache(maxsize=32)
def _resolve(model: str, pattern: str, origin: str):
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from ..spec import RunConfig
    from ..trace.build import build_model, hf_config, raw_config

    hf = build_model(model, hf_config(raw_config(model), RunConfig()), RunConfig())
    linears = {k: m for k, m in hf.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    hits = [k for k, m in hf.named_modules() if k and re.fullmatch(pattern, k)]
    if not hits:
        raise LoraCostError(f"{origin}: the regex {shown(pattern, 80)} matches no module of {model} (peft "
                            "re.fullmatch on keys such as " + ", ".join(list(linears)[:2]) + ")")
    others = [k for k in hits if k not in linears]
    if others:
        raise LoraCostError(f"{origin}: the regex matches {shown(others[0], 80)}, not a linear layer (lora-cost "
                            "models adapters on linear layers)")
    return names_of(hits, list(linears), origin)


def names_of(hits: list[str], linear_keys: list[str], origin: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The --targets names of the adapted module keys `hits` among the model's linear keys: each module's own
    name, or parent.name where the name alone is ambiguous (GPT-2's attn.c_proj and mlp.c_proj); a warning
    for each name adapted in only some layers (LoRA on a subset of layers is not modelled)."""
    parents: dict[str, set] = {}
    for key in linear_keys:
        parts = key.split(".")
        parents.setdefault(parts[-1], set()).add(parts[-2] if len(parts) > 1 else "")
    names, warnings = [], []
    for key in hits:
        parts = key.split(".")
        name = parts[-1] if len(parents.get(parts[-1], ())) <= 1 else ".".join(parts[-2:])
        if name not in names:
            names.append(name)
    for name in names:
        every = [k for k in linear_keys if k == name or k.endswith("." + name)]
        chosen = [k for k in hits if k == name or k.endswith("." + name)]
        if len(chosen) < len(every):
            warnings.append(f"{origin}: {len(chosen)} of the {len(every)} {name} modules are adapted (a subset "
                            "of layers), which is not modelled: the estimate adapts all of them (an upper bound)")
    return tuple(names), tuple(warnings)
