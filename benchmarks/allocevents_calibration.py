"""Score the analytic engine's reserved memory against the measured H100 rows: the slack (allocated peak x
1.10) and the analytic allocation replay (--reserved-model replay: lora_cost/analytic/reserved_events.py).

    python benchmarks/allocevents_calibration.py [path/to/h100-measured.jsonl] [--only SUBSTRING] [--json]

Measured: peak_reserved, and the device total peak_reserved + (device_used_after_step - reserved_after_step).
No trace is run (seconds). Nothing is fitted to the rows.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reserved_calibration import _device_measured  # noqa: E402
from score_calibration import calibration_rows, rel, row_to_kwargs  # noqa: E402
from trace_calibration import parse_args  # noqa: E402


def score(path: Path, only: str | None = None) -> list[dict]:
    from lora_cost import estimate
    out = []
    for row in calibration_rows(path, only):
        kwargs = row_to_kwargs(row)
        model, method = kwargs.pop("model"), kwargs.pop("method")
        slack = estimate(model, method, **kwargs).memory.device
        t0 = time.perf_counter()
        ev = estimate(model, method, reserved_model="replay", **kwargs)
        seconds = time.perf_counter() - t0
        device = _device_measured(row)
        rec = {"name": row["name"], "measured": row.get("peak_reserved"), "slack": slack.reserved_bytes,
               "replay": ev.memory.device.reserved_bytes, "model": ev.memory.device.reserved_model,
               "ms": round(1000 * seconds, 1)}
        for key, dev in (("slack", slack), ("replay", ev.memory.device)):
            rec[f"{key}_err"] = rel(dev.reserved_bytes, row.get("peak_reserved"))
            rec[f"{key}_device_err"] = rel(dev.reserved_bytes + dev.context_bytes, device) if device else None
        out.append(rec)
    return out


def summary(rows: list[dict], key: str) -> str:
    errs = sorted(abs(r[key]) for r in rows if r[key] is not None)
    p90 = errs[min(len(errs) - 1, round(0.9 * (len(errs) - 1)))]
    return (f"| {key} | {len(errs)} | {100 * statistics.median(errs):.2f}% | {100 * p90:.2f}% | {100 * max(errs):.2f}% "
            f"| {sum(e <= 0.03 for e in errs)} |")


def main(argv: list[str]) -> int:
    path, only, flags = parse_args(argv)
    rows = score(path, only)
    if "--json" in flags:
        print(json.dumps(rows, indent=1))
        return 0
    gib = 1 << 30
    print(f"{'case':46s} {'meas GiB':>8s} {'slack':>8s} {'replay':>8s} {'ms':>6s}")
    for r in rows:
        print(f"{r['name']:46s} {(r['measured'] or 0) / gib:8.3f} {100 * (r['slack_err'] or 0):+7.2f}% "
              f"{100 * (r['replay_err'] or 0):+7.2f}% {r['ms']:6.1f}  {r['model']}")
    print("| quantity | rows | median | p90 | worst | within 3% |\n| --- | --- | --- | --- | --- | --- |")
    for key in ("slack_err", "replay_err", "slack_device_err", "replay_device_err"):
        print(summary(rows, key))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
