"""The real caching allocator's segments, recorded on CUDA and compared per kind with the simulation.

`torch.cuda.memory_snapshot()` lists one dict per segment (c10/cuda/CUDACachingAllocator.cpp
`snapshot` -> torch/cuda/memory.py): `total_size`, `allocated_size`, `segment_type` ("small" for the
2 MiB small-pool segments, "large" otherwise), `is_expandable`, and its `blocks` (`size`, `state`:
"active_allocated", "active_pending_free" or "inactive"). A segment's *kind* is what the allocator
model decides from the same rules (`get_allocation_size`): a small-pool segment (2 MiB), a large-pool
buffer (20 MiB, packing 1-10 MiB requests), a segment sized to one large request (rounded to 2 MiB),
or an expandable segment's mapped range. `summarise` counts segments and bytes per kind for either
source (real dicts, or the model's `SegmentInfo`), and `compare` gives the simulated minus the real
figure per kind. `alloc_conf_from_env` reads PYTORCH_CUDA_ALLOC_CONF as the real run sees it.

torch is only used by `record_segments` (imported lazily), so the CPU tests exercise the rest with a
fake snapshot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..analytic.allocator import AllocatorConfig, parse_alloc_conf
from ..analytic.allocator.config import LARGE_BUFFER, SMALL_BUFFER

KINDS = ("small", "large-buffer", "large-sized", "expandable")


@dataclass(frozen=True)
class SegmentKind:
    kind: str
    segments: int
    total_bytes: int
    allocated_bytes: int


@dataclass(frozen=True)
class SegmentDifference:
    kind: str
    simulated_segments: int
    real_segments: int
    simulated_bytes: int
    real_bytes: int

    @property
    def bytes_difference(self) -> int:
        return self.simulated_bytes - self.real_bytes


def kind_of(pool: str, total: int, expandable: bool) -> str:
    """The segment kind by the allocator's sizing rule (see the module docstring)."""
    if expandable:
        return "expandable"
    if pool == "small" or total == SMALL_BUFFER and pool != "large":
        return "small"
    return "large-buffer" if total == LARGE_BUFFER else "large-sized"


def summarise(segments) -> tuple[SegmentKind, ...]:
    """Per kind: segments, reserved bytes, allocated bytes. `segments`: memory_snapshot() dicts or the
    model's SegmentInfo tuples (CachingAllocator.snapshot())."""
    acc = {k: [0, 0, 0] for k in KINDS}
    for s in segments:
        if isinstance(s, dict):
            kind = kind_of(s.get("segment_type", "large"), int(s["total_size"]), bool(s.get("is_expandable", False)))
            total, allocated = int(s["total_size"]), int(s.get("allocated_size", 0))
        else:
            kind = kind_of(s.pool, s.total_size, s.expandable)
            total, allocated = s.total_size, s.allocated_size
        a = acc[kind]
        a[0] += 1
        a[1] += total
        a[2] += allocated
    return tuple(SegmentKind(k, *acc[k]) for k in KINDS if acc[k][0])


def compare(simulated: tuple[SegmentKind, ...], real: tuple[SegmentKind, ...]) -> tuple[SegmentDifference, ...]:
    sim, rl = {s.kind: s for s in simulated}, {s.kind: s for s in real}
    out = []
    for k in KINDS:
        if k in sim or k in rl:
            a, b = sim.get(k), rl.get(k)
            out.append(SegmentDifference(k, a.segments if a else 0, b.segments if b else 0,
                                         a.total_bytes if a else 0, b.total_bytes if b else 0))
    return tuple(out)


def alloc_conf_from_env(environ=None) -> AllocatorConfig:
    """PYTORCH_CUDA_ALLOC_CONF (or PYTORCH_ALLOC_CONF, its newer spelling) as the real allocator reads it."""
    env = os.environ if environ is None else environ
    return parse_alloc_conf(env.get("PYTORCH_CUDA_ALLOC_CONF") or env.get("PYTORCH_ALLOC_CONF"))


def record_segments(device=None) -> tuple[SegmentKind, ...] | None:
    """The real allocator's segments per kind now (None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    snapshot = torch.cuda.memory_snapshot()
    index = torch.cuda.current_device() if device is None else torch.device(device).index or 0
    return summarise([s for s in snapshot if s.get("device", index) == index])
