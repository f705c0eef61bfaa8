"""What every analytic-vs-trace grid asserts and prints (tests/test_trace_grid.py and the per-method grids).

The trace engine is the reference: trainable parameters must be equal, forward FLOPs within 2% and
backward FLOPs within 1% (FlopCounterMode's count of the real step), the peak within `peak_tolerance`.
`engines_terms` runs both engines on one tiny configuration; `summarise` prints, per term, the median
and worst relative disagreement over a grid.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def assert_engines_agree(terms: dict, peak_tolerance: float = 0.06) -> None:
    """`terms` maps a term to (analytic, trace), as trace.compare.differences gives them."""
    a, t = terms["trainable_params"]
    assert a == t, f"trainable params: analytic {a} vs trace {t}"
    a, t = terms["flops.forward"]
    assert abs(t - a) <= 0.02 * a, f"forward FLOPs: analytic {a} vs trace {t}"
    a, t = terms["flops.backward"]
    assert abs(t - a) <= 0.01 * a, f"backward FLOPs: analytic {a} vs trace {t}"
    a, t = terms["peak_bytes"]
    assert abs(t - a) <= peak_tolerance * t, f"peak: analytic {a} vs trace {t}"


def engines_terms(folder: Path, config: dict, method: str, kwargs: dict) -> dict:
    """Both engines on the model `config` (written as folder/config.json, a local model directory):
    {term: (analytic, trace)} as trace.compare.differences gives them."""
    from lora_cost import estimate
    from lora_cost.trace import trace
    from lora_cost.trace.compare import differences

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    e = estimate(str(path), method, **kwargs)
    t = trace(str(path), method, **kwargs)
    return {d.term: (d.analytic, d.trace) for d in differences(e, t)}


def summarise(runs) -> int:
    """`runs`: (name, thunk returning the terms) pairs. Prints per term the median and worst |relative|
    disagreement (trace - analytic) / analytic and the worst case; an error is printed and skipped."""
    per_term: dict[str, list[tuple[float, str]]] = {}
    count = 0
    for name, run in runs:
        count += 1
        try:
            terms = run()
        except Exception as exc:  # report, keep going
            print(f"{name}: ERROR {type(exc).__name__}: {exc}")
            continue
        for term, (a, t) in terms.items():
            if a:
                per_term.setdefault(term, []).append((abs(t - a) / a, name))
    print(f"configurations: {count}")
    print(f"{'term':40s} {'n':>4s} {'median |rel|':>12s} {'max |rel|':>10s}  worst case")
    for term, values in sorted(per_term.items()):
        worst = max(values)
        print(f"{term:40s} {len(values):4d} {100 * statistics.median(v for v, _ in values):11.2f}% "
              f"{100 * worst[0]:9.2f}%  {worst[1]}")
    return 0
