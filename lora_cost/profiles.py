"""Model and GPU descriptions: bundled JSON files under profiles/, or a local config.json.

Nothing is fetched from a hub: a name is a bundled profile, one of its Hugging Face ids, or a
path to a config.json (or a directory holding one).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .analytic.architectures import get_architecture
from .errors import LoraCostError, shown
from .spec import ModelSpec


def profiles_dir() -> Path:
    """The bundled profiles: `profiles/` beside the package (a source checkout or editable
    install) or its copy inside the installed package (`lora_cost/data`)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "profiles", here / "data"):
        if (candidate / "models").is_dir():
            return candidate
    raise LoraCostError("bundled profiles not found (expected profiles/models beside the package)")


def read_json(path: Path) -> dict:
    """A JSON object from a file, or a one-line LoraCostError naming the file and what is wrong
    (unreadable, not UTF-8, not JSON, nested too deep, an integer too long, not an object)."""
    try:
        raw = path.read_bytes()
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise LoraCostError(f"cannot read {shown(str(path), 120)}: {reason}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LoraCostError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LoraCostError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except RecursionError:
        raise LoraCostError(f"{path}: JSON nested too deep to read") from None
    except ValueError as exc:  # an integer of more than sys.get_int_max_str_digits() digits
        raise LoraCostError(f"{path}: unreadable JSON value ({exc})") from None
    if not isinstance(data, dict):
        raise LoraCostError(f"{path} must hold a JSON object")
    return data


@dataclass(frozen=True)
class ModelProfile:
    name: str
    aliases: tuple[str, ...]
    source: str
    config: dict


@lru_cache(maxsize=1)
def bundled_models() -> dict[str, ModelProfile]:
    out = {}
    for path in sorted((profiles_dir() / "models").glob("*.json")):
        data = read_json(path)
        try:
            profile = ModelProfile(data["name"], tuple(data.get("aliases", ())), data.get("source", ""), data["config"])
        except KeyError as exc:
            raise LoraCostError(f"{path}: missing field {exc}") from None
        out[profile.name] = profile
    return out


@lru_cache(maxsize=1)
def _alias_index() -> dict[str, str]:
    index = {}
    for name, profile in bundled_models().items():
        for key in (name, *profile.aliases):
            index[key.lower()] = name
            index[key.lower().split("/")[-1]] = name
    return index


def spec_from_config(name: str, cfg: dict, source: str = "") -> ModelSpec:
    model_type = cfg.get("model_type")
    if model_type is None:
        raise LoraCostError(f"{name}: config has no model_type")
    if not isinstance(model_type, str):
        raise LoraCostError(f"{name}: config field 'model_type' must be a string, got {shown(model_type)}")
    try:
        arch = get_architecture(model_type)
    except LoraCostError as exc:
        raise LoraCostError(f"{name}: {exc}") from None
    return arch.from_config(name, cfg, source)


def find_config(name_or_path: str) -> tuple[str, dict, str]:
    """(name, config.json fields, source) of a bundled name, a Hub id alias, a config.json path or a
    directory holding one; the one lookup both engines use."""
    key = name_or_path.strip()
    hit = _alias_index().get(key.lower())
    if hit is not None:
        profile = bundled_models()[hit]
        return profile.name, profile.config, profile.source
    path = Path(key).expanduser()
    try:
        is_dir = path.is_dir()
        found = (path / "config.json").is_file() if is_dir else path.is_file()
    except (OSError, ValueError) as exc:  # a name longer than a file name may be, a NUL byte, ...
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise LoraCostError(f"unknown model {shown(name_or_path, 120)}: not a bundled profile, alias or readable path "
                            f"({reason})") from None
    if is_dir:
        if not found:
            raise LoraCostError(f"{name_or_path}: directory has no config.json")
        path = path / "config.json"
    if found:
        return str(name_or_path), read_json(path), f"local file {path}"
    import difflib  # only to suggest a name (speed: the estimate path does not import it)

    close = difflib.get_close_matches(key.lower(), list(_alias_index()), n=3, cutoff=0.5) if len(key) <= 200 else []
    hint = f"; did you mean {', '.join(sorted(set(close)))}?" if close else "; run `lora-cost models` to list them"
    raise LoraCostError(f"unknown model {shown(name_or_path, 120)}: not a bundled profile, alias or config.json path{hint}")


def analytic_knows(cfg: dict) -> bool:
    """Whether the analytic engine has the config's family. A missing or malformed model_type counts
    as known: the analytic reader then refuses it with its own one-line error."""
    from .analytic.architectures.base import ARCHITECTURES

    model_type = cfg.get("model_type")
    return not isinstance(model_type, str) or ARCHITECTURES.knows(model_type)


@lru_cache(maxsize=256)
def load_model(name_or_path: str) -> ModelSpec:
    """A ModelSpec from a bundled name, a Hub id alias, a config.json path or a directory."""
    return spec_from_config(*find_config(name_or_path))


@dataclass(frozen=True)
class GpuProfile:
    name: str
    description: str
    memory_bytes: int
    bf16_tflops_dense: float
    fp32_tflops: float
    source: str
    compute_capability: tuple[int, int] | None = None  # (major, minor): sizes the cuBLAS workspaces
    # per-GPU bandwidths in one direction, GB/s (1e9 B/s); None: the card has no such link
    nvlink_bandwidth_GB_per_s: float | None = None
    pcie_bandwidth_GB_per_s: float | None = None
    infiniband_bandwidth_GB_per_s: float | None = None
    interconnect_source: str = ""


def _capability(text) -> tuple[int, int] | None:
    if text is None:
        return None
    major, _, minor = str(text).partition(".")
    return int(major), int(minor)


@lru_cache(maxsize=1)
def bundled_gpus() -> dict[str, GpuProfile]:
    out = {}
    for path in sorted((profiles_dir() / "gpus").glob("*.json")):
        d = read_json(path)
        try:
            links = [None if d.get(k) is None else float(d[k]) for k in
                     ("nvlink_bandwidth_GB_per_s", "pcie_bandwidth_GB_per_s", "infiniband_bandwidth_GB_per_s")]
            gpu = GpuProfile(d["name"], d["description"], int(d["memory_bytes"]), float(d["bf16_tflops_dense"]),
                             float(d["fp32_tflops"]), d.get("source", ""),
                             _capability(d.get("compute_capability")), *links, d.get("interconnect_source", ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise LoraCostError(f"{path}: malformed GPU profile ({exc})") from None
        if not (gpu.memory_bytes > 0 and 0 < gpu.bf16_tflops_dense < math.inf and 0 < gpu.fp32_tflops < math.inf):
            raise LoraCostError(f"{path}: memory and throughput must be positive and finite")
        if any(b is not None and not 0 < b < math.inf for b in links):
            raise LoraCostError(f"{path}: interconnect bandwidths must be positive and finite (or null)")
        out[gpu.name] = gpu
    return out


def load_gpu(name: str) -> GpuProfile:
    gpus = bundled_gpus()
    key = name.strip().lower()
    if key in gpus:
        return gpus[key]
    import difflib  # only to suggest a name

    close = difflib.get_close_matches(key, list(gpus), n=3, cutoff=0.4) if len(key) <= 200 else []
    hint = f"; did you mean {', '.join(close)}?" if close else f"; bundled: {', '.join(gpus)}"
    raise LoraCostError(f"unknown GPU {shown(name, 120)}{hint}")
