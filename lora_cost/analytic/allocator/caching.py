"""`CachingAllocator`: DeviceCachingAllocator of c10/cuda/CUDACachingAllocator.cpp, one device, one stream.

Each method names the C++ function it follows. A request is rounded (`round_size`), routed to the
small (<= 1 MiB) or large pool (`get_pool`), served by the best-fit cached block (`get_free_block`),
else by a new segment of `get_allocation_size` bytes (`alloc_block`); when the device has no room,
the oversize cached blocks are released (`release_available_cached_blocks`, only with
max_split_size set), then every unsplit cached segment (`release_cached_blocks`, counted as an
alloc retry), and the allocation is tried once more before `SimulatedOutOfMemory`. The found block
is split when `should_split` allows; a freed block merges with free neighbours (`free_block`,
`try_merge_blocks`). Segments are never returned otherwise.

Not modelled: several streams (and record_stream's events), CUDA graph private pools, IPC, the
cudaMallocAsync backend, free-memory callbacks.
"""

from __future__ import annotations

from bisect import bisect_left

from .blocks import Block, BlockPool
from .config import (LARGE_BUFFER, MIN_BLOCK_SIZE, MIN_LARGE_ALLOC, ROUND_LARGE, SMALL_BUFFER, SMALL_SIZE,
                     AllocatorConfig)
from .expandable import ExpandableSegment
from .stats import AllocatorStats, BlockInfo, SegmentInfo

SEGMENT_GAP = 1 << 30  # distance between two cudaMalloc segments' addresses (addresses only order ties)


class SimulatedOutOfMemory(Exception):
    """The modelled allocator could not serve a request even after emptying its cache."""

    def __init__(self, request_bytes: int, allocated_bytes: int, reserved_bytes: int, capacity_bytes: int) -> None:
        super().__init__(f"simulated CUDA out of memory: tried to allocate {request_bytes} B with {reserved_bytes} B "
                         f"reserved ({allocated_bytes} B allocated) of {capacity_bytes} B")
        self.request_bytes, self.allocated_bytes = request_bytes, allocated_bytes
        self.reserved_bytes, self.capacity_bytes = reserved_bytes, capacity_bytes


def round_size(size: int, divisions: int = 0) -> int:
    """`round_size`: at least 512 bytes, a multiple of 512; with roundup_power2_divisions, the next
    of `divisions` equal steps between two powers of two (`roundup_power2_next_division`)."""
    if size < MIN_BLOCK_SIZE:
        return MIN_BLOCK_SIZE
    if divisions > 1 and size > MIN_BLOCK_SIZE * divisions:
        if size & (size - 1) == 0:
            return size
        floor = 1 << (size.bit_length() - 1)
        step = floor >> (divisions.bit_length() - 1)
        if step == 0:
            return floor << 1
        rounded = size & ~(step - 1)
        return size if rounded == size else rounded + step
    return -(-size // MIN_BLOCK_SIZE) * MIN_BLOCK_SIZE


def allocation_size(size: int) -> int:
    """`get_allocation_size`: the segment a new request of `size` (rounded) bytes gets."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class CachingAllocator:
    """`capacity_bytes`: device memory the allocator may reserve (None: unlimited). `memory_fraction`:
    `torch.cuda.set_per_process_memory_fraction` (caps reserved memory at fraction x capacity and
    enables garbage_collection_threshold, as in the C++)."""

    def __init__(self, config: AllocatorConfig | None = None, capacity_bytes: int | None = None,
                 memory_fraction: float | None = None) -> None:
        self.config = config or AllocatorConfig()
        self.capacity = capacity_bytes
        self.allowed = None
        if memory_fraction is not None:
            if capacity_bytes is None:
                raise ValueError("a memory fraction needs a capacity")
            self.allowed = int(memory_fraction * capacity_bytes)
        # the (frozen) config's values read on every request, looked up once (speed: replays run ~10^4 requests)
        self._divisions = self.config.roundup_power2_divisions
        self._split_limit = self.config.split_limit
        self._expandable = self.config.expandable_segments
        self._gc = self.allowed is not None and self.config.garbage_collection_threshold > 0
        self.small = BlockPool(is_small=True)
        self.large = BlockPool(is_small=False)
        self.active: dict[int, Block] = {}  # ptr -> allocated block
        self.expandable: dict[bool, ExpandableSegment] = {}  # is_small -> its segment
        self.reserved = 0  # total_allocated_memory (== reserved_bytes: one pool set, no graphs)
        self.reserved_peak = 0
        self.allocated = 0
        self.allocated_peak = 0
        self.alloc_retries = self.ooms = self.device_allocs = self.device_frees = 0
        self._next_address = SEGMENT_GAP

    # -- public -------------------------------------------------------------------------------
    def malloc(self, nbytes: int) -> int:
        """`malloc`: returns the block's address (the handle to free it with)."""
        if self._divisions:
            size = round_size(nbytes, self._divisions)
        else:  # round_size without divisions, inline
            size = MIN_BLOCK_SIZE if nbytes < MIN_BLOCK_SIZE else -(-nbytes // MIN_BLOCK_SIZE) * MIN_BLOCK_SIZE
        pool = self.small if size <= SMALL_SIZE else self.large
        block = self._get_free_block(pool, size)
        if block is None:
            alloc_size = allocation_size(size)
            if self._gc:
                self._garbage_collect()
            block = self._alloc_block(pool, size, alloc_size, retry=False)
            if block is None and self._release_available_cached_blocks(pool, size):
                block = self._alloc_block(pool, size, alloc_size, retry=False)
            if block is None:
                self._release_cached_blocks()
                block = self._alloc_block(pool, size, alloc_size, retry=True)
            if block is None:
                self.ooms += 1
                raise SimulatedOutOfMemory(alloc_size, self.allocated, self.reserved,
                                           self.allowed if self.allowed is not None else self.capacity or 0)
        # `should_split` (inline: it runs on every request): small pool (or expandable segments) when >= 512
        # bytes remain; large pool when more than 1 MiB (kSmallSize) remains and the request is below max_split_size
        remaining = block.size - size
        if pool.is_small or self._expandable:
            split = remaining >= MIN_BLOCK_SIZE
        else:
            split = size < self._split_limit and remaining > SMALL_SIZE
        return self._alloc_found_block(block, size, nbytes, split).ptr

    def free(self, ptr: int) -> None:
        """`free` + `free_block`: the block returns to its pool, merged with free neighbours."""
        block = self.active.pop(ptr)
        block.allocated = False
        self.allocated -= block.size
        pool = block.pool
        prev, following = block.prev, block.next
        if prev is not None and not prev.allocated:
            self._try_merge_blocks(block, prev, pool)
        if following is not None and not following.allocated:
            self._try_merge_blocks(block, following, pool)
        pool.insert(block)

    def empty_cache(self) -> None:
        """`emptyCache`: torch.cuda.empty_cache()."""
        self._release_cached_blocks()

    def stats(self) -> AllocatorStats:
        return AllocatorStats(
            allocated_bytes=self.allocated, allocated_peak_bytes=self.allocated_peak, reserved_bytes=self.reserved,
            reserved_peak_bytes=self.reserved_peak, segments=self._segment_count(),
            largest_free_block_bytes=max(self.small.largest(), self.large.largest()),
            free_in_segments_bytes=self.reserved - self.allocated, alloc_retries=self.alloc_retries, ooms=self.ooms,
            device_allocs=self.device_allocs, device_frees=self.device_frees)

    def reset_peak_stats(self) -> None:
        """`resetPeakStats`: torch.cuda.reset_peak_memory_stats()."""
        self.reserved_peak, self.allocated_peak = self.reserved, self.allocated

    def _segment_count(self) -> int:
        """len(snapshot()) without building it: one segment per head block (every block listed is mapped)."""
        return sum(1 for b in self._all_blocks() if b.prev is None or not b.prev.mapped)

    def snapshot(self) -> tuple[SegmentInfo, ...]:
        """`snapshot`: one entry per cudaMalloc segment, or per contiguous mapped range of an
        expandable segment, in address order."""
        heads = [b for b in self._all_blocks() if b.prev is None or not b.prev.mapped]
        out = []
        for head in sorted(heads, key=lambda b: b.ptr):
            blocks, b = [], head
            while b is not None and b.mapped:
                blocks.append(BlockInfo(b.size, b.allocated))
                b = b.next
            out.append(SegmentInfo(head.ptr, sum(x.size for x in blocks), sum(x.size for x in blocks if x.allocated),
                                   "small" if head.pool.is_small else "large", head.segment is not None, tuple(blocks)))
        return tuple(out)

    # -- finding and splitting ----------------------------------------------------------------
    def _get_free_block(self, pool: BlockPool, size: int) -> Block | None:
        """`get_free_block`: best fit (smallest size, then lowest address), with the max_split_size
        rules: no oversize block for a normal request, and an oversize request takes an oversize block
        at most kLargeBuffer (20 MiB) larger."""
        if self._gc:
            pool.get_free_blocks_call_count += 1
        keys = pool.keys
        i = bisect_left(keys, (size, -1))  # pool.lower_bound, inline
        if i == len(keys):
            return None
        block = pool.at(i)
        if block.segment is not None:
            if self._expandable:
                # best fit by the size a block can grow to (its size plus the unmapped range after it)
                def grow(b: Block) -> int:
                    return b.size + (b.next.size if b.next is not None and not b.next.mapped else 0)
                j = i + 1
                while block.segment is not None and j < len(pool) and grow(pool.at(j)) < grow(block):
                    i, block = j, pool.at(j)
                    j += 1
            else:
                while i < len(pool) and pool.at(i).segment is not None:
                    i += 1
                if i == len(pool):
                    return None
                block = pool.at(i)
        limit = self._split_limit
        if size < limit and block.size >= limit:
            return None
        if size >= limit and block.size >= size + LARGE_BUFFER:
            return None
        pool.pop(i)
        return block

    def _alloc_found_block(self, block: Block, size: int, requested: int, split: bool) -> Block:
        """`alloc_found_block`: the request takes the front of the block; the rest stays cached."""
        if split:
            remaining = block
            block = Block(size, remaining.ptr, remaining.pool, remaining.segment)
            block.prev = remaining.prev
            if block.prev is not None:
                block.prev.next = block
            block.next = remaining
            remaining.prev = block
            remaining.ptr += size
            remaining.size -= size
            remaining.pool.insert(remaining)
        block.allocated = True
        block.requested = requested
        self.active[block.ptr] = block
        self.allocated += block.size
        if self.allocated > self.allocated_peak:
            self.allocated_peak = self.allocated
        return block

    @staticmethod
    def _try_merge_blocks(dst: Block, src: Block | None, pool: BlockPool) -> int:
        """`try_merge_blocks`: absorb a free neighbour in the same mapping state."""
        if src is None or src.allocated or dst.mapped != src.mapped:
            return 0
        pool.discard(src)
        if dst.prev is src:  # [src dst]
            dst.ptr = src.ptr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:  # [dst src]
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size
        return src.size

    # -- segments -----------------------------------------------------------------------------
    def _room(self, nbytes: int) -> bool:
        if self.allowed is not None:
            return self.reserved + nbytes <= self.allowed
        return self.capacity is None or self.reserved + nbytes <= self.capacity

    def _alloc_block(self, pool: BlockPool, size: int, alloc_size: int, retry: bool) -> Block | None:
        """`alloc_block`: a new cudaMalloc segment of `alloc_size` bytes (with a memory fraction, the
        cap is checked against alloc_size before anything else, as in the C++)."""
        if retry:
            self.alloc_retries += 1
        if self.allowed is not None and self.reserved + alloc_size > self.allowed:
            return None
        if self.config.expandable_segments:
            return self._try_allocate_expandable_block(pool, size)
        if not self._room(alloc_size):
            return None
        block = Block(alloc_size, self._next_address, pool)
        self._next_address += -(-alloc_size // SEGMENT_GAP) * SEGMENT_GAP + SEGMENT_GAP
        self._grow(alloc_size)
        return block

    def _grow(self, nbytes: int) -> None:
        self.reserved += nbytes
        self.reserved_peak = max(self.reserved_peak, self.reserved)
        self.device_allocs += 1

    def _release_block(self, block: Block) -> None:
        """`release_block`: cudaFree of an unsplit cached segment."""
        block.pool.remove(block)
        self.reserved -= block.size
        self.device_frees += 1

    def _release_available_cached_blocks(self, pool: BlockPool, size: int) -> bool:
        """`release_available_cached_blocks`: with max_split_size set, free the smallest oversize
        cached block that covers the request, else oversize blocks from the largest down."""
        if self.config.max_split_size is None:
            return False
        key = max(size, self.config.max_split_size)
        i = pool.lower_bound(key)
        if i < len(pool):
            if pool.at(i).segment is None:
                self._release_block(pool.at(i))
            return True
        released = 0
        for block in reversed(pool.blocks()):
            if released >= key or block.size < self.config.max_split_size:
                break
            if block.segment is None:
                released += block.size
                self._release_block(block)
        return released >= key

    def _release_cached_blocks(self) -> None:
        """`release_cached_blocks` / `release_blocks`: free every unsplit cached segment; in
        expandable segments, unmap every whole free page."""
        for pool in (self.large, self.small):
            to_unmap = []
            for block in pool.blocks():
                if block.segment is not None:
                    to_unmap.append(block)
                elif not block.is_split():
                    self._release_block(block)
            for block in to_unmap:
                self._unmap_block(block)

    def _garbage_collect(self) -> None:
        """`garbage_collect_cached_blocks`: above threshold x allowed, free unsplit large cached
        segments at least as old (in get_free_block calls) as the average, until enough is freed."""
        threshold = int(self.config.garbage_collection_threshold * self.allowed)
        if self.reserved <= threshold:
            return
        target = self.reserved - threshold
        freeable = [b for b in self.large.blocks() if not b.is_split() and b.segment is None]
        if not freeable:
            return
        total_age = sum(b.gc_count() for b in freeable)
        count = len(freeable)
        reclaimed, freed = 0, True
        while reclaimed < target and freed and count > 0:
            age = total_age / count
            freed = False
            for block in self.large.blocks():
                if not block.is_split() and block.segment is None and block.gc_count() >= age:
                    freed = True
                    reclaimed += block.size
                    total_age -= block.gc_count()
                    count -= 1
                    self._release_block(block)

    # -- expandable segments ------------------------------------------------------------------
    def _try_allocate_expandable_block(self, pool: BlockPool, size: int) -> Block | None:
        """`try_allocate_expandable_block`: map pages at the lowest address with room, merging with a
        free block just before them."""
        candidate = self._find_expandable_block(pool, size)
        if not candidate.mapped and not self._map_block(candidate, min(candidate.size, size)):
            return None
        while candidate.size < size:
            following = candidate.next
            if not self._map_block(following, min(size - candidate.size, following.size)):
                return None
            candidate = following
        pool.remove(candidate)
        return candidate

    def _find_expandable_block(self, pool: BlockPool, size: int) -> Block:
        """`find_expandable_block`: the lowest unmapped range (with a free block before it) offering
        `size` bytes of address space, else a new segment for the pool."""
        def allocatable(b: Block | None) -> bool:
            return b is not None and not b.allocated

        for c in pool.unmapped():
            if allocatable(c.prev):
                c = c.prev
            total, b = 0, c
            while total < size and allocatable(b):
                total += b.size
                b = b.next
            if total >= size:
                return c
        segment = ExpandableSegment(self._next_address, SMALL_BUFFER if pool.is_small else LARGE_BUFFER)
        self._next_address += segment.size + SEGMENT_GAP
        self.expandable[pool.is_small] = segment
        candidate = Block(segment.size, segment.base, pool, segment)
        candidate.mapped = False
        pool.insert_unmapped(candidate)
        return candidate

    def _map_block(self, block: Block, size: int) -> bool:
        """`map_block`: back the front of an unmapped range with whole pages (more than `size` when
        it is not a multiple of the page)."""
        ptr, nbytes = block.segment.map_range(block.ptr, size)
        if nbytes == 0 or not self._room(nbytes):
            return False
        block.segment.commit(ptr, nbytes)
        pool = block.pool
        pool.remove_unmapped(block)
        block.mapped = True
        if nbytes < block.size:
            rest = Block(block.size - nbytes, block.ptr + nbytes, pool, block.segment)
            rest.mapped = False
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            pool.insert_unmapped(rest)
            block.size = nbytes
        self._try_merge_blocks(block, block.prev, pool)
        self._try_merge_blocks(block, block.next, pool)
        pool.insert(block)
        self._grow(nbytes)
        return True

    def _unmap_block(self, block: Block) -> None:
        """`unmap_block` (+ `release_expandable_segment` when the whole segment is free)."""
        ptr, nbytes = block.segment.unmap_range(block.ptr, block.size)
        if nbytes == 0:
            return
        pool = block.pool
        pool.remove(block)
        before = ptr - block.ptr
        if before > 0:
            head = Block(before, block.ptr, pool, block.segment)
            head.prev, head.next = block.prev, block
            if block.prev is not None:
                block.prev.next = head
            block.prev = head
            pool.insert(head)
        after = block.size - before - nbytes
        if after > 0:
            tail = Block(after, ptr + nbytes, pool, block.segment)
            tail.prev, tail.next = block, block.next
            if block.next is not None:
                block.next.prev = tail
            block.next = tail
            pool.insert(tail)
        block.ptr, block.size, block.mapped = ptr, nbytes, False
        self._try_merge_blocks(block, block.prev, pool)
        self._try_merge_blocks(block, block.next, pool)
        pool.insert_unmapped(block)
        self.reserved -= nbytes
        self.device_frees += 1
        if block.prev is None and block.next is None:
            pool.remove_unmapped(block)
            self.expandable.pop(pool.is_small, None)

    def _all_blocks(self) -> list[Block]:
        return list(self.active.values()) + self.small.blocks() + self.large.blocks()
