"""Score the analytic estimator against measured H100 training steps.

    python benchmarks/score_calibration.py [path/to/h100-measured.jsonl] [--json]

Each row of the calibration file (see its README) is translated into the estimator's flags and
compared: trainable parameters (exact), peak allocated memory, saved-activation bytes and the
FlopCounterMode forward/backward totals. QLoRA forward FLOPs are compared against the measured
count plus nothing: the measurement misses bitsandbytes' 4-bit forward gemm, so the estimate's
`forward - forward_uncounted` is what FlopCounterMode would have seen.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_cost import estimate  # noqa: E402

DEFAULT = Path(__file__).resolve().parent.parent.parent / "shared" / "calibration" / "h100-measured.jsonl"


def row_to_kwargs(row: dict) -> dict:
    method = row["method"].replace("_", "-")
    kwargs = dict(model=row["model"], method=method, batch=row["batch"], seq=row["seq"],
                  precision={"fp32": "fp32", "bf16": "bf16", "amp_bf16": "amp-bf16", "amp_fp16": "amp-fp16",
                             "fp16": "fp16"}[row["dtype"]],
                  optimizer={"adamw": "adamw", "sgd": "sgd", "adamw8bit": "adamw-8bit",
                             "paged_adamw_32bit": "paged-adamw-32bit"}[row.get("optimizer") or "adamw"],
                  grad_checkpointing=bool(row.get("ckpt")), attention=row.get("attn") or "sdpa",
                  dropout=row.get("dropout") or 0.0)
    if method != "full":
        kwargs["r"] = row["r"]
        kwargs["targets"] = "all-linear" if row["targets"] == "all" else None
    if row["model"].startswith("gpt2"):
        kwargs["model_dropout"] = 0.0  # the calibration README: GPT-2 dropouts set to 0
    return kwargs


def rel(est: float, meas: float | None) -> float | None:
    if not meas:
        return None
    return (est - meas) / meas


def calibration_rows(path: Path, only: str | None = None):
    """The measured rows of a calibration file (JSON lines), those whose name contains `only` if given."""
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if not only or only in row["name"]:
                yield row


def score(path: Path) -> list[dict]:
    out = []
    for row in calibration_rows(path):
        e = estimate(**row_to_kwargs(row))
        counted_fwd = e.flops.forward - e.flops.forward_uncounted
        out.append({
            "name": row["name"],
            "trainable_exact": e.trainable_params == row["trainable_params"],
            "trainable": (e.trainable_params, row["trainable_params"]),
            "peak": rel(e.memory.peak_bytes, row.get("peak_step")),
            "saved": rel(e.memory.saved_activation_bytes, row.get("saved_activation_bytes")),
            "flops_fwd": rel(e.flops.forward, row.get("flops_forward")),
            "flops_fwd_counted": rel(counted_fwd, row.get("flops_forward")),
            "flops_bwd": rel(e.flops.backward - e.flops.backward_uncounted, row.get("flops_backward")),
            "qlora": row["method"] == "qlora",
        })
    return out


def _pct(x: float | None) -> str:
    return "   n/a" if x is None else f"{100 * x:+6.2f}%"


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    path = Path(args[0]) if args else DEFAULT
    rows = score(path)
    if "--json" in argv:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'case':48s} {'params':>6s} {'peak':>8s} {'saved':>8s} {'fwd':>8s} {'bwd':>8s}")
    for r in rows:
        fwd = r["flops_fwd_counted"] if r["qlora"] else r["flops_fwd"]
        print(f"{r['name']:48s} {'exact' if r['trainable_exact'] else 'WRONG':>6s} {_pct(r['peak']):>8s} "
              f"{_pct(r['saved']):>8s} {_pct(fwd):>8s}{'*' if r['qlora'] and fwd is not None else ' '}{_pct(r['flops_bwd']):>8s}")
    peaks = [abs(r["peak"]) for r in rows if r["peak"] is not None]
    saved = [abs(r["saved"]) for r in rows if r["saved"] is not None]
    flops = [abs(r[k]) for r in rows for k in ("flops_fwd", "flops_bwd") if r[k] is not None and not (r["qlora"] and k == "flops_fwd")]
    print(f"\nrows: {len(rows)}; trainable exact: {sum(r['trainable_exact'] for r in rows)}/{len(rows)}")
    print(f"peak |error|: median {100 * statistics.median(peaks):.2f}%, max {100 * max(peaks):.2f}%")
    print(f"saved activations |error|: median {100 * statistics.median(saved):.2f}%, max {100 * max(saved):.2f}%")
    if flops:
        print(f"FLOPs |error| (non-QLoRA forward, all backward): median {100 * statistics.median(flops):.2f}%, max {100 * max(flops):.2f}%")
    print("* QLoRA forward compared as FlopCounterMode sees it (bitsandbytes' 4-bit gemm uncounted)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
