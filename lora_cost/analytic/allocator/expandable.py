"""An expandable segment (`expandable_segments:True`): one reserved virtual address range per pool
(one stream only), backed by physical pages mapped on demand.

c10/cuda/CUDACachingAllocator.cpp `struct ExpandableSegment`: pages are 2 MiB for the small pool and
20 MiB for the large pool (`segment_size`); `map` maps every page the requested range touches
(`segmentLeft`..`segmentRight`, so a mapping can exceed the request); `unmap` releases only the pages
lying entirely inside the range. The address space is 1 1/8 of the GPU's memory; here it is simply
larger than any capacity modelled.
"""

from __future__ import annotations

ADDRESS_SPACE = 1 << 46  # bytes of virtual address space per segment (more than any modelled GPU)


class ExpandableSegment:
    def __init__(self, base: int, page: int) -> None:
        self.base, self.page = base, page
        self.size = ADDRESS_SPACE
        self.mapped_pages: set[int] = set()

    def map_range(self, ptr: int, size: int) -> tuple[int, int]:
        """Pages [begin, end) covering [ptr, ptr + size), as (ptr, bytes); `ptr` is page-aligned."""
        begin = (ptr - self.base) // self.page
        end = -(-(ptr + size - self.base) // self.page)
        assert self.base + begin * self.page == ptr, "map must start on a page boundary"
        return self.base + begin * self.page, (end - begin) * self.page

    def commit(self, ptr: int, size: int) -> None:
        first = (ptr - self.base) // self.page
        for i in range(first, first + size // self.page):
            assert i not in self.mapped_pages
            self.mapped_pages.add(i)

    def unmap_range(self, ptr: int, size: int) -> tuple[int, int]:
        """The whole pages inside [ptr, ptr + size), as (ptr, bytes); bytes 0 when none."""
        begin = -(-(ptr - self.base) // self.page)
        end = (ptr + size - self.base) // self.page
        if begin >= end:
            return ptr, 0
        for i in range(begin, end):
            self.mapped_pages.discard(i)
        return self.base + begin * self.page, (end - begin) * self.page
