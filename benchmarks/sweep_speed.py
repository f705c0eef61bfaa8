"""Estimates per second through the Python API on a sweep (ranks 1..1024, all methods, several lengths).

    python benchmarks/sweep_speed.py

Not a timed test: the number depends on the machine. The issue asks for >= 10,000 per second on one core.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_cost import estimate  # noqa: E402
from lora_cost.analytic.methods import all_methods  # noqa: E402


def sweep(model: str = "llama-3.1-8b"):
    ranks = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    seqs = [512, 1024, 2048, 4096]
    for method in all_methods():
        for seq in seqs:
            if method == "full":
                yield dict(model=model, method=method, seq=seq)
                continue
            for targets in (None, "all-linear"):
                for r in ranks:
                    yield dict(model=model, method=method, r=r, seq=seq, targets=targets)


def main() -> None:
    configs = list(sweep())
    t0 = time.perf_counter()
    for kw in configs:
        estimate(**kw)
    dt = time.perf_counter() - t0
    print(f"cold: {len(configs)} estimates in {dt:.3f} s: {len(configs) / dt:,.0f} estimates per second (one core); "
          "each new model/method/targets/batch/seq simulates the forward twice, other ranks reuse it")
    t0 = time.perf_counter()
    for kw in configs:
        estimate(**kw)
    dt = time.perf_counter() - t0
    print(f"warm: {len(configs) / dt:,.0f} estimates per second (forward simulations cached)")


if __name__ == "__main__":
    main()
