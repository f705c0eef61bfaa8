"""`lora-cost profile --nproc-per-node N script.py`: start N ranks through torch.distributed.run (the
launcher torchrun is), each profiled by rank_main.py, then merge their profiles (merge.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ..errors import LoraCostError
from .merge import RANK_FILE, DistributedProfile, merge_directory

MAX_PROCS = 1024


def ranks_directory(out: str | Path) -> Path:
    """Where the ranks' own profiles go: reports/profile.json -> reports/profile.ranks/."""
    out = Path(out)
    return out.with_name(out.stem + ".ranks")


def check_nproc(nproc) -> None:
    if not isinstance(nproc, int) or isinstance(nproc, bool) or not 1 <= nproc <= MAX_PROCS:
        raise LoraCostError(f"--nproc-per-node must be an integer from 1 to {MAX_PROCS}, got {nproc!r}")


def launch(script: str, args: tuple[str, ...], nproc: int, *, warmup: int, steps: int, flops: bool, out: str | Path,
           script_stdout=None) -> DistributedProfile:
    """Run the script on `nproc` local ranks (torch.distributed.run --standalone: a rendezvous on a free
    local port) and merge what each rank recorded. `script_stdout`: where the ranks' output goes (None:
    this process's stdout)."""
    check_nproc(nproc)
    import importlib.util
    if importlib.util.find_spec("torch") is None:  # without it torchrun itself is missing
        raise LoraCostError("the profiler needs torch (torch is missing): pip install -e '.[profile]'")
    directory = ranks_directory(out)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(RANK_FILE.format(rank="*")):
            stale.unlink()
    except OSError as exc:
        raise LoraCostError(f"cannot prepare {directory}: {exc.strerror or exc}") from None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--module", "lora_cost.profiler.rank_main", "--out-dir", str(directory), "--warmup", str(warmup),
           "--steps", str(steps), *(() if flops else ("--no-flops",)), script, *args]
    code = subprocess.run(cmd, stdout=script_stdout).returncode
    return merge_directory(directory, nproc, exit_code=code)
