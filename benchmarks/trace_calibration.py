"""Score the trace engine against measured H100 training steps.

    python benchmarks/trace_calibration.py [path/to/h100-measured.jsonl] [--json] [--only SUBSTRING] [--plain]

Each calibration row is mapped to flags exactly as benchmarks/score_calibration.py maps it, traced
on fake tensors (lora_cost.trace), and compared: trainable parameters, peak allocated memory (the
maximum over the phases, `peak_step`), each phase's peak where the row has it, saved-activation
bytes and the FlopCounterMode forward/backward totals (QLoRA forward as FlopCounterMode sees it:
without the 4-bit gemm). Targets: peak within 3% and saved within 2% on non-QLoRA rows, QLoRA 8%.

By default each row is traced as it was measured (`trace(..., calibration=True)`): the calibration
counted saved tensors with an identity `saved_tensors_hooks` pack hook, which makes every saved
output reference its own graph node, so graphs that backward never consumes (peft DoRA's detached
weight-norm branch) leak, two warm-up steps' worth before the measured step. `--plain` traces an
ordinary step instead (no hook leak).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from score_calibration import DEFAULT, calibration_rows, rel, row_to_kwargs  # noqa: E402

from lora_cost.trace import trace  # noqa: E402


@contextmanager
def kept_simulations():
    """`with kept_simulations() as sims:` every trace run inside appends its allocator simulation (the step's
    allocation and free sequence, trace/allocator.py) to `sims`, for the replay benchmarks."""
    import lora_cost.trace.engine as engine

    sims, summarise = [], engine.summarise

    def keep(spec, run, m, names, built, rec, *args, **kwargs):
        sims.append(rec.sim)
        return summarise(spec, run, m, names, built, rec, *args, **kwargs)

    engine.summarise = keep
    try:
        yield sims
    finally:
        engine.summarise = summarise


def traced_rows(path: Path, only: str | None = None, calibration: bool = True):
    """(row, trace result, seconds) for each calibration row whose name contains `only`, traced with
    the row's flags (as measured with `calibration`, else as an ordinary step)."""
    for row in calibration_rows(path, only):
        kwargs = row_to_kwargs(row)
        model, method = kwargs.pop("model"), kwargs.pop("method")
        t0 = time.perf_counter()
        t = trace(model, method, calibration=calibration, **kwargs)
        yield row, t, time.perf_counter() - t0


def score(path: Path, only: str | None = None, calibration: bool = True) -> list[dict]:
    out = []
    for row, t, seconds in traced_rows(path, only, calibration):
        phase = {p.phase: p.peak_bytes for p in t.phases}
        qlora = row["method"] == "qlora"
        out.append({
            "name": row["name"], "qlora": qlora, "seconds": seconds,
            "trainable_exact": t.trainable_params == row["trainable_params"],
            "peak": rel(t.peak_bytes, row.get("peak_step")),
            "peak_forward": rel(phase["forward"], row.get("peak_forward")),
            "peak_backward": rel(phase["backward"], row.get("peak_backward")),
            "peak_optimizer": rel(phase["optimizer"], row.get("peak_optimizer")),
            "saved": rel(t.saved_activation_bytes, row.get("saved_activation_bytes")),
            "flops_fwd": rel(t.flops_forward - (t.flops_forward_uncounted if qlora else 0), row.get("flops_forward")),
            "flops_bwd": rel(t.flops_backward - t.flops_backward_uncounted, row.get("flops_backward")),
            "kernel": t.attention_kernel,
        })
    return out


def _pct(x) -> str:
    return "    n/a" if x is None else f"{100 * x:+6.2f}%"


def parse_args(argv: list[str]) -> tuple[Path, str | None, list[str]]:
    """(calibration file, --only substring, the remaining --flags)."""
    only = None
    if "--only" in argv:
        i = argv.index("--only")
        only = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    args = [a for a in argv if not a.startswith("--")]
    return (Path(args[0]) if args else DEFAULT), only, [a for a in argv if a.startswith("--")]


def main(argv: list[str]) -> int:
    path, only, flags = parse_args(argv)
    calibration = "--plain" not in flags
    rows = score(path, only, calibration)
    print("trace setup: " + ("as the rows were measured (identity saved_tensors_hook, two warm-up steps); --plain for an "
                             "ordinary step" if calibration else "an ordinary step (no measuring hook, no warm-up)"))
    if "--json" in argv:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'case':46s} {'params':>6s} {'peak':>8s} {'fwd pk':>8s} {'bwd pk':>8s} {'opt pk':>8s} {'saved':>8s} "
          f"{'fwd':>8s} {'bwd':>8s} {'time':>6s}")
    for r in rows:
        print(f"{r['name']:46s} {'exact' if r['trainable_exact'] else 'WRONG':>6s} {_pct(r['peak']):>8s} "
              f"{_pct(r['peak_forward']):>8s} {_pct(r['peak_backward']):>8s} {_pct(r['peak_optimizer']):>8s} "
              f"{_pct(r['saved']):>8s} {_pct(r['flops_fwd']):>8s} {_pct(r['flops_bwd']):>8s} {r['seconds']:5.1f}s")
    for label, sel in (("non-QLoRA", lambda r: not r["qlora"]), ("QLoRA", lambda r: r["qlora"])):
        sub = [r for r in rows if sel(r)]
        if not sub:
            continue
        peaks = [abs(r["peak"]) for r in sub if r["peak"] is not None]
        saved = [abs(r["saved"]) for r in sub if r["saved"] is not None]
        print(f"\n{label} rows: {len(sub)}; trainable exact {sum(r['trainable_exact'] for r in sub)}/{len(sub)}")
        print(f"  peak |error|: median {100 * statistics.median(peaks):.2f}%, max {100 * max(peaks):.2f}%")
        if saved:
            print(f"  saved activations |error|: median {100 * statistics.median(saved):.2f}%, max {100 * max(saved):.2f}%")
    flops = [abs(r[k]) for r in rows for k in ("flops_fwd", "flops_bwd") if r[k] is not None]
    if flops:
        print(f"FLOPs |error| (rows with a measurement): median {100 * statistics.median(flops):.2f}%, max {100 * max(flops):.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
