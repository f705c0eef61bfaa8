"""The allocator's constants and its `PYTORCH_CUDA_ALLOC_CONF` options.

Constants: c10/cuda/CUDACachingAllocator.cpp (top of the file). Option parsing:
c10/cuda/CUDAAllocatorConfig.cpp `parseArgs` (`key:value` pairs separated by commas), with its
range checks (`max_split_size_mb` must exceed kLargeBuffer / 1 MiB = 20; the garbage-collection
threshold lies strictly between 0 and 1; `roundup_power2_divisions` a power of two).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import LoraCostError
from ..formulas.blocks import MIN_BLOCK_SIZE  # noqa: F401  (kMinBlockSize: every size is rounded to at least 512 bytes)

MIB = 1 << 20
SMALL_SIZE = 1 * MIB  # kSmallSize: the largest "small" request
SMALL_BUFFER = 2 * MIB  # kSmallBuffer: small requests are packed into 2 MiB segments
LARGE_BUFFER = 20 * MIB  # kLargeBuffer: requests of 1-10 MiB are packed into 20 MiB segments
MIN_LARGE_ALLOC = 10 * MIB  # kMinLargeAlloc: from here on a segment is the request rounded to 2 MiB
ROUND_LARGE = 2 * MIB  # kRoundLarge

# Options that change nothing about device memory as modelled here (host pinned memory, locking).
_IGNORED = ("release_lock_on_cudamalloc", "pinned_use_cuda_host_register", "pinned_num_register_threads",
            "pinned_use_background_threads", "pinned_reserve_segment_size_mb", "pinned_use_host_register")


@dataclass(frozen=True)
class AllocatorConfig:
    """Allocator settings; the defaults are PyTorch's (no option set)."""

    max_split_size: int | None = None  # bytes; None = SIZE_MAX (every block may be split)
    garbage_collection_threshold: float = 0.0  # active only with a per-process memory fraction set
    expandable_segments: bool = False
    roundup_power2_divisions: int = 0  # one value for every size (the per-interval list form is not modelled)

    def __post_init__(self) -> None:
        if self.max_split_size is not None and self.max_split_size <= LARGE_BUFFER:
            raise LoraCostError("max_split_size_mb must be > 20 (CUDAAllocatorConfig.cpp parseMaxSplitSize)")
        if not 0.0 <= self.garbage_collection_threshold < 1.0:
            raise LoraCostError("garbage_collection_threshold must be in (0.0, 1.0)")
        d = self.roundup_power2_divisions
        if d and (d < 0 or d & (d - 1)):
            raise LoraCostError("roundup_power2_divisions must be a power of 2")

    @property
    def split_limit(self) -> float:
        """max_split_size as a number comparable with sizes (SIZE_MAX when unset)."""
        return float("inf") if self.max_split_size is None else self.max_split_size


def parse_alloc_conf(text: str | None) -> AllocatorConfig:
    """`expandable_segments:True,max_split_size_mb:512` -> AllocatorConfig. Raises LoraCostError."""
    values: dict = {}
    for option in (text or "").split(","):
        option = option.strip()
        if not option:
            continue
        key, sep, value = option.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise LoraCostError(f"PYTORCH_CUDA_ALLOC_CONF: expected key:value, got {option!r}")
        try:
            if key == "max_split_size_mb":
                values["max_split_size"] = int(value) * MIB
            elif key == "garbage_collection_threshold":
                threshold = float(value)
                if not 0.0 < threshold < 1.0:
                    raise LoraCostError("garbage_collection_threshold must be in (0.0, 1.0)")
                values["garbage_collection_threshold"] = threshold
            elif key == "expandable_segments":
                if value not in ("True", "False"):
                    raise LoraCostError("expandable_segments expects True or False")
                values["expandable_segments"] = value == "True"
            elif key == "roundup_power2_divisions":
                if value.startswith("["):
                    raise LoraCostError("roundup_power2_divisions: the per-interval list form is not modelled")
                values["roundup_power2_divisions"] = int(value)
            elif key == "backend":
                if value != "native":
                    raise LoraCostError(f"allocator backend {value!r} is not modelled (only the native caching allocator)")
            elif key not in _IGNORED:
                raise LoraCostError(f"PYTORCH_CUDA_ALLOC_CONF: unrecognized key {key!r}")
        except ValueError as exc:
            if isinstance(exc, LoraCostError):
                raise
            raise LoraCostError(f"PYTORCH_CUDA_ALLOC_CONF: bad value for {key}: {value!r}") from None
    return AllocatorConfig(**values)
