"""The CUDA caching allocator's smallest block, used by the optimizer budget (optimizers.py: a 0-dim tensor,
memory_allocated() of small tensors) and by the allocator model (allocator/config.py re-exports it).

Defined here rather than in allocator/config.py so that the estimate path, which needs the constant but not
the simulator, does not import the allocator package (issue 11's speed line: tests/test_import_budget.py).
"""

MIN_BLOCK_SIZE = 512  # kMinBlockSize, c10/cuda/CUDACachingAllocator.cpp: every size is rounded to at least 512 bytes


def allocated(nbytes: int) -> int:
    """What memory_allocated() counts for one tensor of `nbytes` (round_size: a multiple of 512; an empty tensor
    takes no block)."""
    return -(-nbytes // MIN_BLOCK_SIZE) * MIN_BLOCK_SIZE
