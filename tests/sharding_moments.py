"""Per-moment comparison of a sharded configuration (task "sharding2"): the analytic engine's candidate moments
(analytic/peaks.py `_moments`, with the rank's buffers) beside the trace's allocator timeline (every allocation
of backward whose total alive is within `--window` bytes of the trace's backward peak, by category). A script,
not a test:
    python tests/sharding_moments.py gpt2 fsdp 8 lora 1        # family strategy world method checkpointing
(families: tests/test_sharding_grid.py TINY; batch 2 x 128 as that grid)."""

from __future__ import annotations

import json
import sys
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def analytic_moments(path: str, method: str, strategy: str, world: int, kw: dict) -> None:
    from lora_cost.analytic import peaks
    from lora_cost.analytic.estimator import estimate
    original = peaks._moments

    def spy(*a, **k):
        steady, candidates = original(*a, **k)
        base = sum(int(v) for _, v in steady)
        for phase, options in candidates.items():
            for where, terms in options:
                print(f"  {phase:9s} {base + sum(int(v) for _, v in terms):>13,} {where}: "
                      + ", ".join(f"{c.value}={int(v):,}" for c, v in terms if v))
        return steady, candidates

    peaks._moments = spy
    try:
        print("analytic candidate moments (steady terms included):")
        estimate(path, method, gpus=world, sharding=strategy, **kw)
    finally:
        peaks._moments = original


def trace_timeline(path: str, method: str, strategy: str, world: int, kw: dict, window: int) -> None:
    import transformers
    from lora_cost.analytic.sharding import ShardingSpec
    from lora_cost.trace.build import build, raw_config
    from lora_cost.trace.engine import _category, plan
    from lora_cost.trace.step import run_step

    transformers.logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    spec, run, m, names = plan(path, method, sharding=ShardingSpec(strategy, world), **kw)
    built = build(spec, raw_config(path), run, m, names)
    rec, _ = run_step(built.model, run, run.optimizer, spec.vocab, loop=m.trace_loop)
    blocks = rec.sim.blocks
    events = sorted({b.alloc for b in blocks if b.phase == "backward"})
    rows = []
    for e in events:
        alive = [b for b in blocks if b.alloc <= e and (b.free is None or b.free > e)]
        cats = defaultdict(int)
        for b in alive:
            cats[_category(b, rec).value] += b.size
        new = next(b for b in blocks if b.alloc == e)
        rows.append((e, sum(cats.values()), new.op, new.module, new.size, cats))
    top = max(r[1] for r in rows)
    print(f"trace backward timeline within {window:,} B of its peak {top:,} (steady terms included):")
    for e, total, op, module, size, cats in rows:
        if total >= top - window:
            print(f"  {e:>6} {total:>13,} {op} in {module} (+{size:,}): "
                  + ", ".join(f"{k}={v:,}" for k, v in cats.items() if k not in ("weights", "trainable_weights",
                                                                                "optimizer_state")))


if __name__ == "__main__":
    from test_sharding_grid import BATCH, SEQ, TINY
    family, strategy, world, method, ckpt = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
    window = int(sys.argv[6]) if len(sys.argv) > 6 else 1_000_000
    path = Path(tempfile.mkdtemp()) / f"{family}.json"
    path.write_text(json.dumps(TINY[family]))
    kw = dict(batch=BATCH, seq=SEQ, grad_checkpointing=ckpt)
    if method not in ("full", "ia3"):
        kw["targets"] = "all-linear"
    analytic_moments(str(path), method, strategy, world, kw)
    trace_timeline(str(path), method, strategy, world, kw, window)
