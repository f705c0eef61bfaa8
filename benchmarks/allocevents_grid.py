"""The analytic allocation replay (--reserved-model replay) against the trace engine's replay of its real
allocation sequence, on a grid of tiny and real-shaped configurations.

    python benchmarks/allocevents_grid.py [--quick] [--json]

Tiny models: tests/test_trace_grid.py's families, methods and run settings (decoder families and the
methods both replays cover); real shapes: GPT-2, Qwen2.5-0.5B and Llama-3.2-1B rows of the calibration kind.
Both engines see the same flags, both replay a first step and the measured one through the same allocator
model with the same cuBLAS workspaces. Prints per configuration the reserved peak of each and their
relative difference (analytic - trace) / trace, then median and worst |difference|.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_trace_grid import SETTINGS, config_path, kwargs_for  # noqa: E402

FAMILIES = ("llama", "qwen2", "gpt2", "mistral")
METHODS = ("full", "lora", "dora", "qlora")
REAL = [
    ("gpt2", "lora", dict(r=8, batch=4, seq=512, precision="fp32", model_dropout=0.0)),
    ("gpt2", "lora", dict(r=8, batch=4, seq=512, precision="fp32", model_dropout=0.0, grad_checkpointing=True)),
    ("gpt2", "full", dict(batch=4, seq=512, precision="fp32", model_dropout=0.0)),
    ("gpt2", "full", dict(batch=4, seq=512, precision="amp-bf16", model_dropout=0.0)),
    ("gpt2", "full", dict(batch=4, seq=512, precision="fp32", model_dropout=0.0, grad_checkpointing=True)),
    ("qwen2.5-0.5b", "lora", dict(r=16, targets="all-linear", batch=4, seq=512, precision="bf16")),
    ("qwen2.5-0.5b", "full", dict(batch=4, seq=512, precision="bf16")),
    ("llama-3.2-1b", "lora", dict(r=8, batch=2, seq=1024, precision="bf16")),
    ("llama-3.2-1b", "lora", dict(r=8, batch=2, seq=1024, precision="bf16", grad_checkpointing=True)),
    ("llama-3.2-1b", "qlora", dict(r=16, targets="all-linear", batch=2, seq=1024, precision="bf16")),
]


def configs(root: Path, quick: bool):
    settings = SETTINGS[:2] if quick else SETTINGS
    for family in FAMILIES:
        for method in METHODS:
            for setting in settings:
                if method == "qlora" and setting[0] not in ("bf16", "fp16"):
                    setting = ("bf16",) + setting[1:]
                name = f"tiny-{family}/{method}/{setting[0]}{'/ckpt' if setting[1] else ''}/{setting[3]}"
                yield name, config_path(root, family), method, kwargs_for(method, setting)
    for model, method, kw in (REAL[:3] if quick else REAL):
        yield f"{model}/{method}/{kw['precision']}{'/ckpt' if kw.get('grad_checkpointing') else ''}", model, method, kw


def main(argv: list[str]) -> int:
    from lora_cost import estimate
    from lora_cost.trace import trace

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, method, kw in configs(Path(tmp), "--quick" in argv):
            e = estimate(model, method, reserved_model="replay", **kw)
            t0 = time.perf_counter()
            t = trace(model, method, **kw)
            a, r = e.memory.device.reserved_bytes, t.reserved_peak_bytes
            rows.append({"name": name, "analytic": a, "trace": r, "diff": (a - r) / r,
                         "model": e.memory.device.reserved_model,
                         "alloc_diff": (e.memory.peak_bytes - t.peak_bytes) / t.peak_bytes,
                         "trace_s": round(time.perf_counter() - t0, 1)})
            x = rows[-1]
            if "--json" not in argv:
                print(f"{name:44s} {a / 2**20:10.1f} {r / 2**20:10.1f} MiB {100 * x['diff']:+7.2f}% "
                      f"(allocated peak {100 * x['alloc_diff']:+6.2f}%) {x['model']}", flush=True)
    if "--json" in argv:
        print(json.dumps(rows, indent=1))
        return 0
    for label, sel in (("tiny", lambda n: n.startswith("tiny")), ("real", lambda n: not n.startswith("tiny")),
                       ("all", lambda n: True)):
        d = sorted(abs(x["diff"]) for x in rows if sel(x["name"]) and x["model"] != "slack")
        if d:
            worst = max((x for x in rows if sel(x["name"])), key=lambda x: abs(x["diff"]))
            print(f"{label}: {len(d)} configurations, |analytic - trace| / trace reserved: median "
                  f"{100 * statistics.median(d):.2f}%, p90 {100 * d[min(len(d) - 1, round(0.9 * (len(d) - 1)))]:.2f}%, "
                  f"worst {100 * max(d):.2f}% ({worst['name']}), within 3%: {sum(v <= 0.03 for v in d)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
