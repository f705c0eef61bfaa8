"""Estimates per second through the Python API on a sweep (ranks 1..1024, every method, several lengths,
two target sets), cold and warm, and the wall time of one `plan` on a 70B model.

    python benchmarks/sweep_speed.py [--model llama-3.1-8b] [--plan-model llama-3.1-70b] [--cli | --cli-only]

Not a timed test: the number depends on the machine. The issue asks for >= 50,000 estimates per second
on one core (warm) and a 70B `plan` under 1 s. "cold" starts from empty caches (every new
model/method/targets/length/batch simulates the forward); "warm" repeats the same sweep (the best
of three passes). Both the full estimate and the numbers-only path the planner bisects with
(`numbers_only=True`, analytic/fast.py) are timed, and the numbers-only path on a planner-like grid
(the same sweep at batches 1-64 and four optimizers, cold: `grid`), and on issue 10's plan grid of a 70B model
(methods x ranks x batches 1-64 x lengths x checkpointing x GPU counts x strategies, every configuration new:
`plan_grid`), per call and through `fast.batch_sweep`. Times are CPU times of this process.
The estimate loops run with Python's cyclic collector on, as a user's loop would; `plan` pauses it
(fast.without_cyclic_gc). `--cli` / `--cli-only`: issue 11's speed line, the commands (estimate with the
slack and with `--reserved-model replay`, `plan`) in CPU time of a child process against
`python -c "import torch"` (cli_ratio).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_cost import estimate  # noqa: E402
from lora_cost.analytic.methods import all_methods, get_method  # noqa: E402
from lora_cost.errors import LoraCostError  # noqa: E402
from lora_cost.profiles import load_model  # noqa: E402

RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SEQS = (512, 1024, 2048, 4096)
BATCHES = (1, 4)


def sweep(model: str):
    """Every configuration the estimator accepts: rank methods at every rank and both target sets,
    rankless methods once per length and batch (the planner's rule for which methods take targets)."""
    spec = load_model(model)
    for method in all_methods():
        m = get_method(method)
        no_targets = (not m.takes_targets or m.trains_biases
                      or (m.default_targets is not None and not m.default_targets(spec)))
        for seq in SEQS:
            for batch in BATCHES:
                for targets in ((None,) if no_targets else (None, "all-linear")):
                    for r in (RANKS if m.takes_rank else (None,)):
                        yield dict(model=model, method=method, r=r, seq=seq, batch=batch, targets=targets)


def accepted(model: str) -> list[dict]:
    """The sweep less what the estimator refuses up front (BitFit on a model without biases)."""
    from lora_cost.analytic.estimator import validated_run
    from lora_cost.spec import RunConfig
    spec, out = load_model(model), []
    for kw in sweep(model):
        targets = tuple(kw["targets"].split(",")) if kw["targets"] else None
        try:
            validated_run(spec, RunConfig(method=kw["method"], r=kw["r"], targets=targets, seq=kw["seq"], batch=kw["batch"]))
        except LoraCostError:
            continue
        out.append(kw)
    return out


GRID_BATCHES = (1, 2, 4, 8, 16, 32, 64)
GRID_OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw-8bit", "sgd")


def grid(model: str) -> list[dict]:
    """A planner's sweep: the accepted configurations above at every batch of GRID_BATCHES and every
    optimizer of GRID_OPTIMIZERS (each a new configuration: its parameter budget and peak are computed;
    the forward is shared by the optimizers and, past the third batch, interpolated in the batch)."""
    base = [kw for kw in accepted(model) if kw["batch"] == 1]
    return [dict(kw, batch=b, optimizer=o) for kw in base for b in GRID_BATCHES for o in GRID_OPTIMIZERS]


PLAN_METHODS = ("lora", "lora-fa", "dora", "vera", "qlora", "full")  # the planner's default methods
PLAN_RANKS = (1, 4, 16, 64, 256, 1024)
PLAN_BATCHES = tuple(range(1, 65))  # the planner's default --batch range, every batch
PLAN_SEQS = (2048, 8192)
PLAN_GPUS = (1, 2, 4, 8)
PLAN_STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")


def plan_grid(model: str) -> list[tuple[dict, tuple[int, ...]]]:
    """The grid of issue 10's plan (task "speed"): methods x ranks x seqs x checkpointing x GPU counts x
    strategies, each at every batch of PLAN_BATCHES, less what the estimator refuses (QLoRA across GPUs):
    (keywords without the batch, batches)."""
    out = []
    for method in PLAN_METHODS:
        m = get_method(method)
        for r in (PLAN_RANKS if m.takes_rank else (None,)):
            for seq in PLAN_SEQS:
                for ckpt in (False, True):
                    for n in PLAN_GPUS:
                        for strategy in ((None,) if n == 1 else PLAN_STRATEGIES):
                            kw = dict(model=model, method=method, r=r, seq=seq, grad_checkpointing=ckpt, gpu="h100-80gb",
                                      **({} if n == 1 else dict(gpus=n, sharding=strategy)))
                            try:
                                estimate(**kw, batch=1, numbers_only=True)
                            except LoraCostError:
                                continue
                            out.append((kw, PLAN_BATCHES))
    return out


def plan_grid_timing(model: str) -> None:
    """The plan grid cold (empty caches), through `estimate(..., numbers_only=True)` one configuration at a
    time and through `fast.batch_sweep` (one call per configuration less its batch), then warm; with what
    was computed anew (forward simulations, lines) against the configurations answered."""
    from lora_cost.analytic import batchlines, fast, record
    from lora_cost.analytic.estimator import sharding_spec
    from lora_cost.profiles import load_model
    from lora_cost.spec import RunConfig
    groups = plan_grid(model)
    configs = [dict(kw, batch=b) for kw, batches in groups for b in batches]
    clear_caches()
    cold = throughput(configs, numbers_only=True)
    sims, lines = record.affine_record.cache_info().misses, batchlines.numbers_line.cache_info().currsize
    segs = batchlines._lin_activations.cache_info().misses
    batch_one = sum(1 for kw, batches in groups if 1 in batches)
    warm = max(throughput(configs, numbers_only=True) for _ in range(2))
    print(f"plan grid of {model} ({len(PLAN_METHODS)} methods x ranks {PLAN_RANKS} x batches 1-{PLAN_BATCHES[-1]} x "
          f"seqs {PLAN_SEQS} x checkpointing x GPUs {PLAN_GPUS} x {','.join(PLAN_STRATEGIES)}): {len(configs)} "
          f"configurations, every one new; computed anew: {sims} forward records, {lines} runs' lines in the batch "
          f"({segs} symbolic records), {batch_one} configurations at batch 1 and those sampling a forward's batch "
          "line directly; the rest read from the lines")
    print(f"  estimate(numbers_only=True) per configuration: cold {cold:,.0f}/s, warm {warm:,.0f}/s")
    spec = load_model(model)
    runs = []
    for kw, batches in groups:
        runs.append((RunConfig(method=kw["method"], r=kw["r"], seq=kw["seq"],
                               grad_checkpointing=kw["grad_checkpointing"],
                               sharding=sharding_spec(kw.get("gpus"), 1, kw.get("sharding"))), batches))
    clear_caches()
    t0 = clock()
    n = sum(len(fast.batch_sweep(spec, run, batches, gpu="h100-80gb")) for run, batches in runs)
    seconds = clock() - t0
    print(f"  fast.batch_sweep per configuration less its batch ({len(runs)} calls): cold {n / seconds:,.0f}/s "
          f"({n} estimates in {seconds:.2f} s)")


def clear_caches() -> None:
    """Empty every estimator cache, so the next pass is cold."""
    import functools
    import gc
    from lora_cost.analytic import budget
    for obj in gc.get_objects():
        if isinstance(obj, functools._lru_cache_wrapper) and getattr(obj, "__module__", "").startswith("lora_cost"):
            obj.cache_clear()
    budget._BUDGETS.clear()


# CPU time of this process, not wall time: the machines this runs on are shared, and wall time
# measures the neighbours as much as the estimator.
clock = time.process_time


def throughput(configs: list[dict], **options) -> float:
    t0 = clock()
    for kw in configs:
        estimate(**kw, **options)
    return len(configs) / (clock() - t0)


def plan_timing(model: str) -> tuple[int, float]:
    from lora_cost.analytic.planner import plan
    clear_caches()
    t0 = clock()
    result = plan(model, gpu="h100-80gb")
    return result.estimates, clock() - t0


CLI_COMMANDS = (  # (label, arguments of `lora-cost`)
    ("estimate gpt2", ["estimate", "--model", "gpt2", "--r", "8"]),
    ("estimate llama-3.1-70b", ["estimate", "--model", "llama-3.1-70b", "--r", "8"]),
    ("estimate qwen3-235b-a22b", ["estimate", "--model", "qwen3-235b-a22b", "--r", "8"]),
    ("estimate llama-3.1-70b --reserved-model replay",
     ["estimate", "--model", "llama-3.1-70b", "--r", "8", "--reserved-model", "replay"]),
    ("estimate llama-3.1-70b --json", ["estimate", "--model", "llama-3.1-70b", "--r", "8", "--json"]),
    ("plan llama-3.1-70b --gpu h100-80gb", ["plan", "--model", "llama-3.1-70b", "--gpu", "h100-80gb"]),
)


def cli_ratio(repeats: int = 7) -> None:
    """`lora-cost` commands against `python -c "import torch"`, in CPU time of the child process (on a shared
    machine wall time measures the neighbours): the median of `repeats` runs, each round timing torch and then
    every command, so a change of load reaches both sides of the ratio. lora_cost's bytecode is compiled first
    (as an installed package's is): with PYTHONDONTWRITEBYTECODE set and no __pycache__, every run would
    compile the sources again (about 0.06 s more per estimate), while torch's wheel ships compiled."""
    import compileall
    import os
    import resource
    import statistics
    import subprocess

    import lora_cost
    package = os.path.dirname(lora_cost.__file__)
    compileall.compile_dir(package, quiet=1)
    root = os.path.dirname(package)  # the children import this lora_cost, the one compiled
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))

    def cpu(cmd: list[str]) -> float:
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, cwd=root, env=env)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime

    torch_runs: list[float] = []
    runs: dict[str, list[float]] = {label: [] for label, _ in CLI_COMMANDS}
    for _ in range(repeats):
        torch_runs.append(cpu([sys.executable, "-c", "import torch"]))
        for label, args in CLI_COMMANDS:
            runs[label].append(cpu([sys.executable, "-c", "from lora_cost.cli import main; main()", *args]))
    torch_s = statistics.median(torch_runs)
    print(f"python -c 'import torch': {torch_s:.3f} s CPU (median of {repeats}; best {min(torch_runs):.3f})")
    for label, times in runs.items():
        s = statistics.median(times)
        print(f"lora-cost {label}: {s:.3f} s CPU, {s / torch_s:.3f} of importing torch (best {min(times):.3f} s)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--plan-model", default="llama-3.1-70b")
    parser.add_argument("--cli", action="store_true", help="also time `lora-cost estimate` against importing torch")
    parser.add_argument("--cli-only", action="store_true", help="only time the commands against importing torch")
    args = parser.parse_args()
    if args.cli_only:
        cli_ratio()
        return
    configs = accepted(args.model)
    for label, options in (("estimate()", {}), ("estimate(numbers_only=True)", {"numbers_only": True})):
        clear_caches()
        cold = throughput(configs, **options)
        warm = max(throughput(configs, **options) for _ in range(3))
        print(f"{label}: {len(configs)} estimates of {args.model} (one core, CPU time): cold {cold:,.0f}/s, "
              f"warm {warm:,.0f}/s")
    configs = grid(args.model)
    clear_caches()
    cold = throughput(configs, numbers_only=True)
    print(f"estimate(numbers_only=True) on the batch x optimizer grid: {len(configs)} estimates of {args.model}: "
          f"cold {cold:,.0f}/s")
    plan_grid_timing(args.plan_model)
    count, seconds = plan_timing(args.plan_model)
    print(f"plan {args.plan_model} on h100-80gb (cold caches, CPU time): {count} estimator calls in {seconds:.3f} s "
          f"({count / seconds:,.0f}/s)")
    if args.cli:
        cli_ratio()


if __name__ == "__main__":
    main()
