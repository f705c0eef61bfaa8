"""AdaLoRA: analytic engine vs trace engine (real peft AdaLoRA on fake tensors, its rank allocator
updated after the optimizer step) on tiny configurations of every family.

Run as a test, or as a script for the per-term summary: python tests/test_grid_adalora.py
Both engines must agree exactly on trainable parameters, within 2% on forward and 1% on backward
FLOPs; the peak within 6% (on this grid: median and worst in the module's last lines).
"""

from __future__ import annotations

import itertools
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_trace_grid import TINY, config_path  # noqa: E402
from grid_support import assert_engines_agree, summarise  # noqa: E402

SETTINGS = (  # (precision, checkpointing, targets, attention, dropout, init_r, target_r, batch, seq, optimizer)
    ("bf16", False, None, "sdpa", 0.0, None, None, 2, 128, "adamw"),  # peft's defaults: init_r 12, target_r 8
    ("fp32", False, "all-linear", "sdpa", 0.0, 8, 4, 1, 200, "adamw"),
    ("bf16", True, "all-linear", "sdpa", 0.0, 8, None, 2, 128, "adamw"),
    ("amp-bf16", False, None, "eager", 0.1, 8, 2, 1, 128, "adamw"),
    ("bf16", True, None, "sdpa", 0.0, 16, 2, 2, 128, "adamw"),
    ("fp32", True, None, "eager", 0.0, 4, 4, 1, 96, "sgd"),
)
CASES = list(itertools.product(TINY, SETTINGS))
IDS = [f"{f}-{s[0]}{'-ckpt' if s[1] else ''}-{s[2] or 'qv'}-{s[3]}-r{s[5]}-{s[9]}" for f, s in CASES]


def kwargs_for(setting: tuple) -> dict:
    precision, ckpt, targets, attention, dropout, init_r, target_r, batch, seq, optimizer = setting
    options = {"target_r": target_r} if target_r is not None else {}
    return dict(r=init_r, targets=targets, batch=batch, seq=seq, precision=precision, grad_checkpointing=ckpt,
                attention=attention, dropout=dropout, model_dropout=0.0, optimizer=optimizer, method_options=options)


def compare(root: Path, family: str, setting: tuple) -> dict[str, tuple[int, int]]:
    from lora_cost import estimate
    from lora_cost.trace import trace
    from lora_cost.trace.compare import differences

    model = config_path(root, family)
    kw = kwargs_for(setting)
    return {d.term: (d.analytic, d.trace) for d in differences(estimate(model, "adalora", **kw),
                                                              trace(model, "adalora", **kw))}


@pytest.mark.parametrize("family,setting", CASES, ids=IDS)
def test_engines_agree(tmp_path_factory, family, setting):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    terms = compare(tmp_path_factory.getbasetemp() / "grid-adalora", family, setting)
    assert_engines_agree(terms)


def summary() -> int:
    root = Path(tempfile.mkdtemp(prefix="lora-cost-adalora-"))
    return summarise((name, lambda c=case: compare(root, *c)) for case, name in zip(CASES, IDS))


if __name__ == "__main__":
    raise SystemExit(summary())
