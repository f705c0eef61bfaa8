"""What a reader produces, and the one place its settings meet the estimator.

A reader (peft_config.py, training_args.py, axolotl.py) translates a file users already have into
`Setting`s: {target: value}, where a target is an `estimate()` keyword, a `RunConfig` field or a
method option (`MethodOption.name`), each remembering the file and key it came from. `resolve` checks
every target against what this lora-cost models *now* (`dataclasses.fields(RunConfig)`,
`inspect.signature(estimate)`, the method-option registry), so options added later (attention kernels,
--packing, --loss, --adapter-dtype, sharding, ...) are picked up without touching the readers, and a
target lora-cost does not model is a warning naming the file, the key and the field, never silently
dropped. A value that is wrong in itself is a LoraCostError naming the file and the key.
Some settings are in no file a reader reads and stay CLI/API options: `--qlora-recast` (the QLoRA paper
script's bf16 recast of LoRA layers, embeddings and head, analytic/qlora_recast.py; the axolotl reader says so
beside a QLoRA adapter).

Torch-free: YAML is read with PyYAML (imported only for a YAML file).
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import LoraCostError, shown


@dataclass(frozen=True)
class Setting:
    """One value a file gives: `target` is an estimate() keyword, a RunConfig field, a method option, or
    "keyword.entry" for one entry of a keyword that takes a mapping (sharding_options.cpu_offload)."""

    target: str
    value: object
    origin: str  # "FILE: key 'KEY'", the prefix of any message about it


@dataclass(frozen=True)
class Reading:
    """What the files say: settings in file order (a later file's setting wins), the model the files name
    (axolotl base_model, peft base_model_name_or_path) and the lines to show the user."""

    settings: tuple[Setting, ...] = ()
    model: Setting | None = None
    warnings: tuple[str, ...] = ()  # a field or value lora-cost does not model (the estimate ignores it)
    notes: tuple[str, ...] = ()  # read and understood, with no effect on one step's cost (said once)

    def __add__(self, other: "Reading") -> "Reading":
        return Reading(self.settings + other.settings, other.model or self.model,
                       self.warnings + other.warnings, self.notes + other.notes)


class Collector:
    """Builds one file's Reading; the typed getters raise a LoraCostError naming the file and key."""

    def __init__(self, path: str, data: dict, kind: str) -> None:
        self.path, self.data, self.kind = path, data, kind
        self.settings: list[Setting] = []
        self.warnings: list[str] = []
        self.notes: list[str] = []
        self.model: Setting | None = None
        self.used: set[str] = set()

    def origin(self, key: str) -> str:
        return f"{self.path}: key {key!r}"

    def error(self, key: str, what: str) -> LoraCostError:
        return LoraCostError(f"{self.origin(key)} {what}, got {shown(self.data.get(key))}")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str):
        self.used.add(key)
        return self.data.get(key)

    def integer(self, key: str, minimum: int = 1):
        value = self.raw(key)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.error(key, f"must be an integer of at least {minimum}")
        return value

    def number(self, key: str):
        value = self.raw(key)
        if value is None:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise self.error(key, "must be a finite number")
        return value

    def flag(self, key: str):
        value = self.raw(key)
        if value is None or isinstance(value, bool):
            return value
        raise self.error(key, "must be true or false")

    def text(self, key: str, choices: tuple[str, ...] | None = None):
        value = self.raw(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(key, "must be a string")
        if choices is not None and value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}")
        return value

    def names(self, key: str):
        """A list of module names, or one string (a regex or all-linear), as peft's target_modules."""
        value = self.raw(key)
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value):
            return tuple(v.strip() for v in value)
        raise self.error(key, "must be a list of module names or one string")

    def set(self, target: str, value, key: str) -> None:
        self.settings.append(Setting(target, value, self.origin(key)))

    def warn(self, key: str, what: str) -> None:
        self.warnings.append(f"{self.origin(key)}: {what}")

    def note(self, key: str, what: str) -> None:
        self.notes.append(f"{self.origin(key)}: {what}")

    def irrelevant(self, keys) -> None:
        """Keys that change nothing in one step's memory or FLOPs (learning rates, logging, ...): read, silent."""
        self.used.update(k for k in keys if k in self.data)

    def finish(self, describe_unknown: str) -> Reading:
        rest = [k for k in self.data if k not in self.used]
        if rest:
            self.warnings.append(f"{self.path}: {describe_unknown}: {', '.join(map(str, rest))}")
        return Reading(tuple(self.settings), self.model, tuple(self.warnings), tuple(self.notes))


def load_mapping(path: str, kind: str) -> dict:
    """A JSON or YAML file holding one mapping; YAML by suffix (.yml/.yaml), else JSON, else a one-line error."""
    from ..profiles import read_json

    p = Path(path)
    if p.suffix.lower() not in (".yml", ".yaml"):
        return read_json(p)
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML is a dependency
        raise LoraCostError(f"{path}: reading YAML needs PyYAML (pip install pyyaml)") from None
    try:
        text = p.read_bytes().decode("utf-8")
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise LoraCostError(f"cannot read {kind} {shown(path, 120)}: {reason}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise LoraCostError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}"[:300]) from None
    except RecursionError:
        raise LoraCostError(f"{path}: YAML nested too deep to read") from None
    if not isinstance(data, dict):
        raise LoraCostError(f"{path} must hold a mapping of keys to values ({kind})")
    return data


# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def estimate_keywords() -> frozenset[str]:
    """What the estimator takes today: estimate()'s keywords (each new RunConfig field comes with one)."""
    from ..analytic.estimator import estimate

    return frozenset(inspect.signature(estimate).parameters)


@lru_cache(maxsize=1)
def method_option_names() -> dict[str, object]:
    from ..analytic.methods.base import all_options

    return {opt.name: opt for opt in all_options()}


@dataclass(frozen=True)
class Resolved:
    """The files' settings sorted into estimate keywords and method options (each with its origin)."""

    kwargs: dict = field(default_factory=dict)
    method_options: dict = field(default_factory=dict)
    origins: dict = field(default_factory=dict)  # target -> origin of the value kept
    warnings: tuple[str, ...] = ()


def resolve(reading: Reading) -> Resolved:
    """Check every target exists in this lora-cost and every value is valid for it."""
    kwargs, options, origins, warnings = {}, {}, {}, list(reading.warnings)
    known = estimate_keywords()
    opts = method_option_names()
    for s in reading.settings:
        parent, _, sub = s.target.partition(".")
        if sub:  # "sharding_options.cpu_offload": one entry of a keyword that takes a mapping
            if parent in known:
                kwargs.setdefault(parent, {})[sub] = s.value
                origins[s.target] = s.origin
            else:
                warnings.append(f"{s.origin} sets {sub}={shown(s.value)} ({parent}), which this lora-cost does not "
                                "model (the estimate ignores it)")
        elif s.target in opts:
            try:
                options[s.target] = opts[s.target].check(s.value)
            except LoraCostError as exc:
                raise LoraCostError(f"{s.origin}: {exc}") from None
            origins[s.target] = s.origin
        elif s.target in known and s.target not in ("model", "method_options"):
            kwargs[s.target] = _checked(s)
            origins[s.target] = s.origin
        else:
            warnings.append(f"{s.origin} sets {s.target}={shown(s.value)}, which this lora-cost does not model "
                            "(the estimate ignores it)")
    return Resolved(kwargs, options, origins, tuple(warnings))


def _checked(s: Setting):
    """A value checked by the estimator's own validation (one definition of each rule)."""
    from dataclasses import fields as dc_fields

    from ..spec import RunConfig

    try:
        if s.target == "method":
            from ..analytic.methods import get_method
            get_method(s.value)
        elif s.target == "optimizer":
            from ..analytic.optimizers import get_optimizer
            get_optimizer(s.value)
        elif s.target in {f.name for f in dc_fields(RunConfig)} and s.target not in ("num_labels", "method_options"):
            RunConfig(**{s.target: s.value})
    except LoraCostError as exc:
        raise LoraCostError(f"{s.origin}: {exc}") from None
    return s.value


def accepted(target: str, value) -> bool:
    """Whether this lora-cost accepts `value` for `target` (a value the source library takes but lora-cost
    does not model yet, e.g. an attention kernel, is a warning, not an error)."""
    if target not in estimate_keywords():
        return True  # resolve() warns about the field itself
    try:
        _checked(Setting(target, value, ""))
    except LoraCostError:
        return False
    return True


def dump(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value
