"""Blocks and the per-pool free sets of the caching allocator.

A `Block` is a contiguous range of a segment, linked to its neighbours (`prev`/`next`) while the
segment is split (c10/cuda/CUDACachingAllocator.cpp `struct Block`). A `BlockPool` keeps the free
(cached) blocks ordered as `BlockComparatorSize` does: by size, then address (one stream only, so
the stream key drops out); `lower_bound` is the best-fit search. Unmapped address ranges of
expandable segments are kept apart, ordered by address (`BlockComparatorAddress`).
"""

from __future__ import annotations

from bisect import bisect_left, insort


class Block:
    __slots__ = ("size", "ptr", "pool", "allocated", "prev", "next", "segment", "mapped", "gc_count_base",
                 "requested")

    def __init__(self, size: int, ptr: int, pool: BlockPool, segment=None) -> None:
        self.size, self.ptr, self.pool = size, ptr, pool
        self.allocated = False
        self.prev: Block | None = None
        self.next: Block | None = None
        self.segment = segment  # the ExpandableSegment this block lies in, None for a cudaMalloc segment
        self.mapped = True
        self.gc_count_base = 0
        self.requested = 0

    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None

    def gc_count(self) -> int:
        return self.pool.get_free_blocks_call_count - self.gc_count_base


class BlockPool:
    def __init__(self, is_small: bool) -> None:
        self.is_small = is_small
        self.keys: list[tuple[int, int]] = []  # sorted (size, ptr) of the free blocks (read by the best-fit search)
        self._blocks: dict[tuple[int, int], Block] = {}
        self._unmapped: list[int] = []  # sorted ptr of the unmapped ranges
        self._unmapped_blocks: dict[int, Block] = {}
        self.get_free_blocks_call_count = 0

    # -- free (mapped) blocks, by size then address --------------------------------------------
    def insert(self, block: Block) -> None:
        """`insert_into_blocks`: also stamps the block's garbage-collection age."""
        key = (block.size, block.ptr)
        assert key not in self._blocks, "block already cached"
        block.gc_count_base = self.get_free_blocks_call_count
        insort(self.keys, key)
        self._blocks[key] = block

    def remove(self, block: Block) -> None:
        key = (block.size, block.ptr)
        i = bisect_left(self.keys, key)
        assert i < len(self.keys) and self.keys[i] == key, "block not cached"
        del self.keys[i]
        del self._blocks[key]

    def pop(self, index: int) -> Block:
        """Remove the free block at `index` (of the size order) and return it."""
        key = self.keys.pop(index)
        return self._blocks.pop(key)

    def lower_bound(self, size: int) -> int:
        """Index of the first free block of at least `size` bytes (len(self) when none)."""
        return bisect_left(self.keys, (size, -1))

    def at(self, index: int) -> Block:
        return self._blocks[self.keys[index]]

    def __len__(self) -> int:
        return len(self.keys)

    def blocks(self) -> list[Block]:
        """The free blocks, smallest first (a copy: callers may release while iterating)."""
        return [self._blocks[k] for k in self.keys]

    def largest(self) -> int:
        return self.keys[-1][0] if self.keys else 0

    # -- unmapped ranges of expandable segments, by address -------------------------------------
    def insert_unmapped(self, block: Block) -> None:
        insort(self._unmapped, block.ptr)
        self._unmapped_blocks[block.ptr] = block

    def remove_unmapped(self, block: Block) -> None:
        i = bisect_left(self._unmapped, block.ptr)
        assert i < len(self._unmapped) and self._unmapped[i] == block.ptr, "range not unmapped"
        del self._unmapped[i]
        del self._unmapped_blocks[block.ptr]

    def unmapped(self) -> list[Block]:
        return [self._unmapped_blocks[p] for p in self._unmapped]

    def discard(self, block: Block) -> None:
        """Remove a block from whichever set holds it (try_merge_blocks' erase)."""
        if block.mapped:
            self.remove(block)
        else:
            self.remove_unmapped(block)
