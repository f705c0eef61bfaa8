"""One report from every rank of a distributed run: per-rank peaks, their imbalance, step and
communication times, and which ranks failed (no torch needed to merge saved profiles).

JSON schema "lora-cost-distributed-profile/1" (`DistributedProfile.to_dict()`):
  schema, world_size, script, argv, status ("ok" | "failed"), exit_code (the launcher's, or null),
  ranks: [{rank, status, exit_code, peak_bytes, peak_reserved_bytes, step_wall_s, communication_s_per_step,
           steps_detected, memory (the categories at the last measured step's backward end) | null,
           profile (the rank's own profile file) | null, note}],
  busiest_rank, peak_bytes (the largest rank peak), mean_peak_bytes, imbalance ((largest - mean) / mean),
  slowest_step_s, failed_ranks: [rank], warnings: [str]
A rank with status "missing" left no profile (killed before it could write one, e.g. by the launcher
after another rank failed, or a hard crash of the interpreter).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import LoraCostError
from .results import Categories, ProfileResult, profile_from_dict

MERGED_SCHEMA = "lora-cost-distributed-profile/1"
RANK_FILE = "profile.rank{rank}.json"


@dataclass(frozen=True)
class RankSummary:
    rank: int
    status: str  # the rank's profile status, or "missing"
    exit_code: int | None
    peak_bytes: int | None  # the largest peak over its measured steps
    peak_reserved_bytes: int | None
    step_wall_s: float | None  # mean over its measured steps
    communication_s_per_step: float | None
    steps_detected: int | None
    memory: Categories | None  # at the last measured step's backward end (parameters, gradients, state...)
    profile: str | None
    note: str


@dataclass(frozen=True)
class DistributedProfile:
    schema: str
    world_size: int
    script: str | None
    argv: tuple[str, ...]
    status: str  # ok: every rank ended normally; failed otherwise
    exit_code: int | None
    ranks: tuple[RankSummary, ...]
    busiest_rank: int | None
    peak_bytes: int | None
    mean_peak_bytes: float | None
    imbalance: float | None  # (largest - mean) / mean of the rank peaks
    slowest_step_s: float | None
    failed_ranks: tuple[int, ...]
    warnings: tuple[str, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _summary(rank: int, p: ProfileResult | None, path: str | None, exit_code: int | None) -> RankSummary:
    if p is None:
        return RankSummary(rank, "missing", exit_code, None, None, None, None, None, None, path,
                           "no profile: the rank ended before it could write one")
    peaks = [s.peak_bytes for s in p.measured]
    reserved = [s.peak_reserved_bytes for s in p.measured if s.peak_reserved_bytes is not None]
    last = p.measured[-1] if p.measured else None
    memory = None
    if last is not None:
        ends = [b.memory for b in last.boundaries if b.name == "backward_end"]
        memory = ends[-1] if ends else None
    note = "" if p.status == "ok" else f"ended with {p.status} (exit code {p.exit_code})" + (f": {p.error}" if p.error else "")
    if p.status == "ok" and not p.measured:
        note = "no measured step"
    return RankSummary(rank, p.status, p.exit_code, max(peaks) if peaks else None, max(reserved) if reserved else None,
                       sum(s.wall_s for s in p.measured) / len(p.measured) if p.measured else None,
                       p.communication.per_step_s if p.communication is not None else None, p.steps_detected,
                       memory, path, note)


def merge_profiles(profiles: dict[int, ProfileResult | None], world_size: int, *, paths: dict[int, str] | None = None,
                   exit_code: int | None = None, warnings: tuple[str, ...] = ()) -> DistributedProfile:
    """Merge the ranks' profiles (None: the rank left none)."""
    paths = paths or {}
    ranks = tuple(_summary(r, profiles.get(r), paths.get(r), None) for r in range(world_size))
    known = [p for p in profiles.values() if p is not None]
    peaks = [(s.peak_bytes, -s.rank) for s in ranks if s.peak_bytes is not None]  # ties: the lowest rank
    mean = sum(b for b, _ in peaks) / len(peaks) if peaks else None
    top = (lambda b, neg: (b, -neg))(*max(peaks)) if peaks else None
    walls = [s.step_wall_s for s in ranks if s.step_wall_s is not None]
    failed = tuple(s.rank for s in ranks if s.status != "ok")
    return DistributedProfile(
        schema=MERGED_SCHEMA, world_size=world_size, script=known[0].script if known else None,
        argv=known[0].argv if known else (), status="failed" if failed or exit_code else "ok", exit_code=exit_code,
        ranks=ranks, busiest_rank=top[1] if top else None, peak_bytes=top[0] if top else None, mean_peak_bytes=mean,
        imbalance=(top[0] - mean) / mean if top and mean else None, slowest_step_s=max(walls) if walls else None,
        failed_ranks=failed, warnings=tuple(warnings))


def rank_path(directory: str | Path, rank: int) -> Path:
    return Path(directory) / RANK_FILE.format(rank=rank)


def merge_directory(directory: str | Path, world_size: int, exit_code: int | None = None) -> DistributedProfile:
    """Merge the rank files a launched run left in `directory` (rank_main.py writes them)."""
    profiles, paths, warnings = {}, {}, []
    for rank in range(world_size):
        path = rank_path(directory, rank)
        paths[rank] = str(path)
        if not path.exists():
            profiles[rank] = None
            continue
        try:
            profiles[rank] = profile_from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, LoraCostError) as exc:
            profiles[rank] = None
            warnings.append(f"rank {rank}: unreadable profile {path}: {exc}")
    return merge_profiles(profiles, world_size, paths=paths, exit_code=exit_code, warnings=tuple(warnings))


def gather_to_rank0(result: ProfileResult, warnings: list[str]) -> DistributedProfile | None:
    """In a script that calls `lora_cost.profile()` itself under torchrun: every rank sends its profile to
    rank 0 over the initialised default process group, which merges them (other ranks get None). Called
    only after a normal end of the profiled block: a rank that failed would leave the others waiting."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    gathered = [None] * world if rank == 0 else None
    try:
        dist.gather_object(result.to_json(), gathered, dst=0)  # JSON text: what load_profile reads
    except Exception as exc:  # noqa: BLE001 - the training is over; the rank's own profile stands
        warnings.append(f"profiles not gathered to rank 0: {type(exc).__name__}: {exc}")
        return None
    if rank != 0:
        return None
    profiles = {r: profile_from_dict(json.loads(text)) for r, text in enumerate(gathered)}
    return merge_profiles(profiles, world)
