"""A torch-free model of PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp).

`CachingAllocator` takes allocation and free requests (bytes, in order) and keeps the segments,
blocks and counters the real allocator would: what `torch.cuda.memory_reserved()`,
`memory_stats()` and `memory_snapshot()` report. `replay` drives it with an event sequence (the
trace engine's, later the analytic engine's). See docs/allocator.md for the source revision
modelled and what is left out.
"""

from .caching import CachingAllocator, SimulatedOutOfMemory
from .config import AllocatorConfig, parse_alloc_conf
from .replay import ReplayResult, alloc, free, replay
from .stats import AllocatorStats, BlockInfo, SegmentInfo

__all__ = ["AllocatorConfig", "AllocatorStats", "BlockInfo", "CachingAllocator", "ReplayResult", "SegmentInfo",
           "SimulatedOutOfMemory", "alloc", "free", "parse_alloc_conf", "replay"]
