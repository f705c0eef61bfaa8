"""Frozen results of the allocator model: counters (`torch.cuda.memory_stats`) and segments
(`torch.cuda.memory_snapshot`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AllocatorStats:
    allocated_bytes: int  # memory_allocated(): sum of the allocated blocks (rounded sizes)
    allocated_peak_bytes: int
    reserved_bytes: int  # memory_reserved(): sum of the segments (mapped pages for expandable segments)
    reserved_peak_bytes: int
    segments: int  # contiguous mapped ranges, as memory_snapshot() lists them
    largest_free_block_bytes: int  # the largest cached (free) block
    free_in_segments_bytes: int  # reserved - allocated: cached bytes no tensor uses (fragmentation)
    alloc_retries: int  # num_alloc_retries: allocations that succeeded or failed only after emptying the cache
    ooms: int  # num_ooms
    device_allocs: int  # num_device_alloc: cudaMalloc calls (or page mappings)
    device_frees: int  # num_device_free: cudaFree calls (or page unmappings)


@dataclass(frozen=True)
class BlockInfo:
    size: int
    allocated: bool


@dataclass(frozen=True)
class SegmentInfo:
    address: int
    total_size: int
    allocated_size: int
    pool: str  # small | large
    expandable: bool
    blocks: tuple[BlockInfo, ...]
