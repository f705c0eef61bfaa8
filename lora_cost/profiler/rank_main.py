"""One rank of `lora-cost profile --nproc-per-node N`: torch.distributed.run starts this module once per
rank; it runs the script under the profiler, as `run_script` does for one process, and writes the rank's
profile to `<out-dir>/profile.rank<RANK>.json` however the script ends. The launcher (cli/profile.py)
merges the files (merge.py).

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m lora_cost.profiler.rank_main \
        --out-dir DIR [--warmup 1] [--steps 3] [--no-flops] SCRIPT [ARGS...]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def _terminated(signum, frame):  # noqa: ARG001
    # the launcher stops the other ranks with SIGTERM when one fails: end the script as Ctrl-C would,
    # so this rank's profile is written ("interrupted"); a rank blocked inside a collective's C++ wait
    # only gets here when the wait returns, and one killed first is marked "missing" by the merge
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lora_cost.profiler.rank_main")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-flops", action="store_true")
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    from ..errors import LoraCostError
    from .merge import rank_path
    from .results import save_profile
    from .runner import run_script
    rank = int(os.environ.get("RANK", "0"))
    try:
        result = run_script(ns.script, tuple(ns.args), warmup=ns.warmup, steps=ns.steps, flops=not ns.no_flops)
        save_profile(result, rank_path(ns.out_dir, rank))
    except LoraCostError as exc:
        print(f"lora-cost (rank {rank}): {exc}", file=sys.stderr)
        return 2
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
