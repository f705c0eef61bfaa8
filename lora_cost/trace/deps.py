"""Import torch, transformers and peft for the trace engine, or fail with one actionable line."""

from __future__ import annotations

from ..errors import LoraCostError

INSTALL_HINT = "pip install 'lora-cost[trace]'"


def require() -> None:
    """Raise LoraCostError naming the missing package when the trace extras are not installed."""
    for name in ("torch", "transformers", "peft"):
        try:
            __import__(name)
        except ImportError as exc:
            raise LoraCostError(f"the trace engine needs {name}, which is not installed ({exc.msg}); "
                                f"run `{INSTALL_HINT}`") from None


def missing() -> str | None:
    """The first trace extra that is not installed (looked up, not imported: torch stays unloaded)."""
    import importlib.util

    for name in ("torch", "transformers", "peft"):
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):
            return name
    return None
