"""`lora-cost plan --gpus 1,2,4,8 --sharding ddp,fsdp,zero2,zero3`: the busiest rank of every GPU count x
strategy x method at one rank and batch, and the cheapest configuration that fits (fewest GPUs, then the
fastest step). torch-free; each point is one `estimate`."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import LoraCostError
from ...results import Estimate


@dataclass(frozen=True)
class ShardedPoint:
    gpus: int
    sharding: str  # "single" for one GPU
    method: str
    peak_bytes: int
    device_bytes: int
    host_bytes: int
    fits: bool | None
    step_time_s: float | None
    communication_bytes: int
    # task "sharding2": the largest batch of the --batch range whose busiest rank fits the GPU (None: no --gpu,
    # or none fits), found by bisection on the numbers-only path (analytic/fast.py)
    max_batch: int | None = None


@dataclass(frozen=True)
class ShardedPlan:
    model: str
    gpu: str | None
    memory_bytes: int | None
    points: tuple[ShardedPoint, ...]
    skipped: tuple[str, ...]  # combinations refused, with the reason

    @property
    def best(self) -> ShardedPoint | None:
        fitting = [p for p in self.points if p.fits]
        return min(fitting, key=lambda p: (p.gpus, p.step_time_s or 0.0)) if fitting else None


def parse_gpus(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise LoraCostError(f"--gpus must be comma separated GPU counts (1,2,4,8), got {text!r}") from None
    if not out or any(not 1 <= g <= 1 << 20 for g in out):
        raise LoraCostError(f"--gpus must be comma separated positive GPU counts, got {text!r}")
    return out


def plan_sharded(model: str, *, gpus: tuple[int, ...], strategies: tuple[str, ...], methods: tuple[str, ...],
                 gpu: str | None, rank_for: int | None = None, batch_max: int | None = None,
                 progress=None, **kwargs) -> ShardedPlan:
    """`rank_for`: the adapter rank of methods that take one (None: each method's default). `batch_max`: with a
    `gpu`, each point also gets the largest batch in [batch, batch_max] that fits. `progress(k)` (task "speed"):
    called after each method x GPU count x strategy, planned or skipped, with k = 1 (the CLI's bar, cli/plan.py
    LazyProgress)."""
    from ..estimator import estimate
    from .config import STRATEGIES

    for s in strategies:
        if s not in STRATEGIES:
            raise LoraCostError(f"unknown sharding {s!r}; choose one of {', '.join(STRATEGIES)}")
    points, skipped = [], []
    for method in methods:
        for n in gpus:
            for s in (("single",) if n == 1 else strategies):
                try:
                    from ..methods import get_method
                    m = get_method(method)
                    extra = dict(r=rank_for) if rank_for and m.takes_rank and not m.base_trainable else {}
                    if m.base_trainable:
                        extra["targets"] = None
                    e: Estimate = estimate(model, method, gpu=gpu, **({} if n == 1 else dict(gpus=n, sharding=s)),
                                           **{**kwargs, **extra})
                except LoraCostError as exc:
                    skipped.append(f"{method} x {n} GPUs x {s}: {exc}")
                    if progress is not None:
                        progress(1)
                    continue
                d = e.distributed
                largest = None
                if e.gpu is not None and e.gpu.fits:
                    args = dict(gpu=gpu, **({} if n == 1 else dict(gpus=n, sharding=s)), **{**kwargs, **extra})
                    largest = largest_batch(model, method, args, e.gpu.memory_bytes, batch_max or args["batch"])
                points.append(ShardedPoint(n, s, method, e.memory.peak_bytes, e.memory.device_bytes,
                                           e.memory.host_bytes or 0, e.gpu.fits if e.gpu else None,
                                           e.gpu.step_time_s if e.gpu else None,
                                           sum(d.communication_bytes.values()) if d else 0, largest))
                if progress is not None:
                    progress(1)
    from ...profiles import load_gpu
    mem = load_gpu(gpu).memory_bytes if gpu else None
    return ShardedPlan(model, gpu, mem, tuple(points), tuple(skipped))


def largest_batch(model: str, method: str, args: dict, memory_bytes: int, batch_max: int) -> int:
    """The largest batch in [args["batch"], batch_max] whose device bytes fit `memory_bytes` (the rule of
    device.py `gpu_fit`: device <= memory), given that args["batch"] fits: bisection on the numbers-only path
    (device memory grows with the batch)."""
    from ..estimator import estimate
    lo, hi = args["batch"], batch_max
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(model, method, numbers_only=True, **{**args, "batch": mid}).device_bytes <= memory_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo
