"""Communication time of a distributed rank, as torch.profiler sees it.

torch's process groups record each collective's work as a profiler event named after the backend
and the collective (`gloo:all_reduce`, `nccl:all_reduce`, `gloo:broadcast`...: c10d's
`ProcessGroupGloo`/`ProcessGroupNCCL` wrap every work item in `RECORD_FUNCTION` with that name), next to
the dispatcher's `c10d::allreduce_` op that enqueues it. DDP's reducer and FSDP call the process group
directly, so these events are the one place all their collectives show. On the CPU with gloo the
event's time is the collective's run on gloo's work thread; with NCCL (CPU activity only) it is the
host-side launch, not the kernel: the note says so.
"""

from __future__ import annotations

import os

import torch

from .results import CollectiveTime, Communication

BACKENDS = ("gloo:", "nccl:", "mpi:", "ucc:")  # the event-name prefixes of torch's process groups


def distributed_rank() -> tuple[int, int] | None:
    """(rank, world size) from the launcher's environment (torchrun, accelerate launch, deepspeed all set
    RANK and WORLD_SIZE), or from an initialised default process group; None outside a distributed run."""
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is not None and world is not None:
        try:
            return int(rank), int(world)
        except ValueError:
            pass
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


class CommRecorder:
    """Runs torch.profiler (CPU activity, no shapes or stacks: the cheapest setting) while the profiler
    is installed, and sums the process groups' collective events."""

    def __init__(self, warnings: list[str]) -> None:
        self.warnings = warnings
        self.prof = None

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile
        try:
            self.prof = profile(activities=[ProfilerActivity.CPU])
            self.prof.__enter__()
        except Exception as exc:  # noqa: BLE001 - another profiler already running: no communication times
            self.prof = None
            self.warnings.append(f"communication not measured: torch.profiler did not start ({type(exc).__name__}: {exc})")

    def stop(self, steps: int) -> Communication | None:
        if self.prof is None:
            return None
        prof, self.prof = self.prof, None
        try:
            prof.__exit__(None, None, None)
            events = prof.events()
        except Exception as exc:  # noqa: BLE001
            self.warnings.append(f"communication not measured: {type(exc).__name__}: {exc}")
            return None
        return summarise(((e.name, e.cpu_time_total) for e in events), steps)


def summarise(events, steps: int) -> Communication:
    """Collective events (name, microseconds) -> Communication (seconds)."""
    calls: dict[str, list] = {}
    for name, us in events:
        if name.startswith(BACKENDS):
            entry = calls.setdefault(name, [0, 0.0])
            entry[0] += 1
            entry[1] += us / 1e6
    collectives = tuple(CollectiveTime(n, c, s) for n, (c, s) in sorted(calls.items()))
    prefixes = sorted({c.name.split(":", 1)[0] for c in collectives})
    total = sum(c.seconds for c in collectives)
    return Communication(
        backend_prefix=prefixes[0] if len(prefixes) == 1 else ("mixed" if prefixes else "none"),
        collectives=collectives, total_s=total, steps=steps, per_step_s=total / steps if steps else None,
        note="torch.profiler events of the process group over the whole profiled window (warm-up steps included), "
             "divided by the optimizer steps in it" + ("; NCCL: host-side time of the launch, not the kernel"
                                                        if "nccl" in prefixes else ""))
