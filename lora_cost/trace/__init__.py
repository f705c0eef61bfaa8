"""The trace engine: run the real transformers + peft step on fake tensors and account for it.

`trace(...)` takes the same arguments as `lora_cost.estimate` and returns a `TraceResult`.
torch, transformers and peft are imported only when `trace` is called.
"""

from __future__ import annotations

from .results import TraceResult


def trace(model, method: str = "lora", **kwargs) -> TraceResult:
    from .engine import trace as _trace
    return _trace(model, method, **kwargs)


__all__ = ["trace", "TraceResult"]
