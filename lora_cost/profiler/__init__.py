"""Runtime profiler: run an unmodified training loop, measure what each step really costs (memory
per phase and category, FLOPs), and put it next to the analytic estimate for the same run.

Importing this package does not import torch; the names below load on first use.
"""

from __future__ import annotations

_LAZY = {
    "profile": ("api", "profile"),
    "Profiler": ("api", "Profiler"),
    "ProfilerCallback": ("callback", "ProfilerCallback"),
    "run_script": ("runner", "run_script"),
    "load_profile": ("results", "load_profile"),
    "save_profile": ("results", "save_profile"),
    "profile_from_dict": ("results", "profile_from_dict"),
    "ProfileResult": ("results", "ProfileResult"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value
    return value
