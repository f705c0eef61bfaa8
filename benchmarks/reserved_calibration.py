"""Score the trace engine's reserved memory (the caching-allocator replay) against measured H100 steps.

    python benchmarks/reserved_calibration.py [path/to/h100-measured.jsonl] [--only SUBSTRING] [--json]

Each row is traced as it was measured (`trace(..., calibration=True)`: two warm-up steps, then the
measured one; see benchmarks/trace_calibration.py) and its allocation sequence replayed through
lora_cost.analytic.allocator with PyTorch's default settings. Compared with the row's
`peak_reserved` and `reserved_after_step` (absolute counters: nothing is reserved before the model
is built), together with the allocated peak for context. Nothing is fitted to the rows.

The replay includes the cuBLAS workspaces (lora_cost/analytic/allocator/workspaces.py: one 32 MiB
workspace per thread's handle on sm90). Also scored: the device total (reserved + the measured CUDA
context of the row's family, profiles/cuda_context.json) against peak_reserved + (device_used_after_step
- reserved_after_step), and the analytic engine's reserved memory (its allocated peak x 1.10, and its own
allocation sequence replayed: --reserved-model replay, lora_cost/analytic/reserved_events.py).
Column 'place': the largest |replay - measured| of memory_allocated() at the measured step's start,
after its forward and after its backward (trace/replay.py allocated_at_marks): the replay counts a
block handed out whole at its full size, as the real counter does, so this checks where blocks land.
Known missing: for QLoRA the loading sequence (the bf16 weights quantized on the GPU, whose freed
blocks stay cached); the trace adopts the weights as they are after loading.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from score_calibration import rel  # noqa: E402
from trace_calibration import _pct, kept_simulations, parse_args, traced_rows  # noqa: E402


def _device_measured(row: dict) -> int | None:
    """Measured device total at the peak: peak_reserved + (device_used_after_step - reserved_after_step)."""
    if not row.get("device_used_after_step") or not row.get("reserved_after_step"):
        return None
    return row["peak_reserved"] + row["device_used_after_step"] - row["reserved_after_step"]


def _placement(sim, row: dict) -> float | None:
    """Largest |replay - measured| of memory_allocated() at the measured step's start, after its forward
    and after its backward (bytes). The replay's count takes blocks handed out whole at their full
    size, as the real counter does, so it checks where blocks land, not only the tensors' sizes.
    The workspaces placed before the step are taken off: the rows count from before the model."""
    from lora_cost.analytic.allocator.workspaces import CUBLAS_THREADS, cublas_workspace_bytes
    from lora_cost.trace.engine import WORKSPACE_MODE
    from lora_cost.trace.replay import allocated_at_marks

    ws = cublas_workspace_bytes((9, 0))
    at = allocated_at_marks(sim, workspace=ws, workspace_mode=WORKSPACE_MODE)
    before = CUBLAS_THREADS * ws if WORKSPACE_MODE == "before" else 0
    pairs = (("forward", "mem_steady_before_step"), ("backward", "mem_after_forward"),
             ("optimizer", "mem_after_backward"))
    diffs = [abs(at[label] - before - row[key]) for label, key in pairs if row.get(key) is not None and label in at]
    return max(diffs) if diffs else None


def score(path: Path, only: str | None = None) -> list[dict]:
    from score_calibration import row_to_kwargs

    from lora_cost import estimate
    out = []
    with kept_simulations() as sims:
        rows = list(traced_rows(path, only, calibration=True))
    for (row, t, seconds), sim in zip(rows, sims):
        kwargs = row_to_kwargs(row)
        model, method = kwargs.pop("model"), kwargs.pop("method")
        e = estimate(model, method, **kwargs)
        ev = estimate(model, method, reserved_model="replay", **kwargs).memory.device  # allocevents
        device = _device_measured(row)
        out.append({
            "name": row["name"], "seconds": round(seconds, 1),
            "reserved_peak": t.reserved_peak_bytes, "measured_peak_reserved": row.get("peak_reserved"),
            "reserved_after": t.reserved_after_step_bytes, "measured_reserved_after": row.get("reserved_after_step"),
            "peak_err": rel(t.reserved_peak_bytes, row.get("peak_reserved")),
            "after_err": rel(t.reserved_after_step_bytes, row.get("reserved_after_step")),
            "allocated_err": rel(t.peak_bytes, row.get("peak_step")),
            "ratio_measured": row["peak_reserved"] / row["peak_step"] if row.get("peak_reserved") else None,
            "ratio_simulated": t.reserved_peak_bytes / t.peak_bytes if t.peak_bytes else None,
            "retries": t.allocator_retries,
            "placement_bytes": _placement(sim, row),
            "device_err": rel(t.reserved_peak_bytes + t.device.context_bytes, device) if device else None,
            "analytic_peak_err": rel(e.memory.device.reserved_bytes, row.get("peak_reserved")),
            "analytic_after_err": rel(e.memory.device.reserved_bytes, row.get("reserved_after_step")),
            "analytic_device_err": rel(e.memory.device.reserved_bytes + e.memory.device.context_bytes, device)
            if device else None,
            # allocevents: the analytic engine's own allocation sequence replayed (--reserved-model replay)
            "analytic_replay_err": rel(ev.reserved_bytes, row.get("peak_reserved")),
            "analytic_replay_device_err": rel(ev.reserved_bytes + ev.context_bytes, device) if device else None,
            "analytic_replay_vs_trace": rel(ev.reserved_bytes, t.reserved_peak_bytes),
        })
    return out


def main(argv: list[str]) -> int:
    path, only, flags = parse_args(argv)
    rows = score(path, only)
    if "--json" in flags:
        print(json.dumps(rows, indent=1))
        return 0
    gib = 1 << 30
    print(f"{'case':46s} {'sim GiB':>8s} {'meas GiB':>8s} {'peak rsv':>8s} {'after':>8s} {'alloc':>8s} "
          f"{'r/a meas':>8s} {'r/a sim':>8s} {'place':>7s} {'time':>6s}")
    for r in rows:
        meas = r["measured_peak_reserved"]
        print(f"{r['name']:46s} {r['reserved_peak'] / gib:8.3f} {(meas or 0) / gib:8.3f} {_pct(r['peak_err']):>8s} "
              f"{_pct(r['after_err']):>8s} {_pct(r['allocated_err']):>8s} "
              f"{r['ratio_measured'] or 0:8.3f} {r['ratio_simulated'] or 0:8.3f} "
              f"{'n/a' if r['placement_bytes'] is None else format(r['placement_bytes'] / (1 << 20), '.1f'):>7s} "
              f"{r['seconds']:5.1f}s")
    for key, label in (("peak_err", "replay: peak reserved"), ("after_err", "replay: reserved after step"),
                       ("device_err", "replay: device total (reserved + context)"),
                       ("analytic_peak_err", "analytic: peak reserved"),
                       ("analytic_after_err", "analytic: reserved after step"),
                       ("analytic_device_err", "analytic: device total"),
                       ("analytic_replay_err", "analytic replay: peak reserved"),
                       ("analytic_replay_device_err", "analytic replay: device total"),
                       ("analytic_replay_vs_trace", "analytic replay vs trace replay: peak reserved")):
        errs = sorted(abs(r[key]) for r in rows if r[key] is not None)
        if errs:
            p90 = errs[min(len(errs) - 1, round(0.9 * (len(errs) - 1)))]
            print(f"{label} |error| over {len(errs)} rows: median {100 * statistics.median(errs):.2f}%, "
                  f"p90 {100 * p90:.2f}%, max {100 * max(errs):.2f}%, within 3%: {sum(e <= 0.03 for e in errs)}")
    placed = [r["placement_bytes"] for r in rows if r["placement_bytes"] is not None]
    if placed:
        print(f"replay: memory_allocated() at the measured step's start, after forward and after backward "
              f"(column 'place', MiB, the largest |difference|): within 1 MiB on {sum(p <= 1 << 20 for p in placed)} "
              f"of {len(placed)} rows, median {statistics.median(placed) / (1 << 20):.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
