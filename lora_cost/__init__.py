"""lora-cost: what fine-tuning a transformer will cost, before you pay for it.

`estimate(...)` is pure arithmetic and never imports torch. The runtime profiler and the trace
engine (which need torch) are imported only when asked for.
"""

from .errors import LoraCostError
from .analytic.estimator import estimate, estimate_run
from .results import Estimate

__all__ = ["estimate", "estimate_from", "estimate_run", "Estimate", "LoraCostError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """`lora_cost.profile` needs torch: imported on first use, never at import time (the trace engine
    is `lora_cost.trace.trace`, likewise imported only when asked for)."""
    if name == "estimate_from":  # reads a live model (lora_cost/readers/live.py): imported on first use
        from .readers.live import estimate_from
        return estimate_from
    if name == "profile":
        from .profiler import profile
        return profile
    raise AttributeError(f"module 'lora_cost' has no attribute {name!r}")
