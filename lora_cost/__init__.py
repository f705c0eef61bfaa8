"""lora-cost: what fine-tuning a transformer will cost, before you pay for it.

`estimate(...)` is pure arithmetic and never imports torch. The runtime profiler and the trace
engine (which need torch) are imported only when asked for.
"""

from .errors import LoraCostError
from .estimator import estimate, estimate_run
from .results import Estimate

__all__ = ["estimate", "estimate_run", "Estimate", "LoraCostError"]
__version__ = "0.1.0"
