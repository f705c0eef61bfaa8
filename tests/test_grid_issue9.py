"""Issue 9's accuracy line: analytic vs trace over attention kernels x optimizers x losses x adapter dtypes x
base storages (dense, 4-bit, 8-bit) together, on >= 200 configurations.

Measured (task "moments", torch 2.13, transformers 5.24, peft 0.21.2; all 220): peak |analytic - trace| / trace
median 1.24% -> 0.44%, worst 18.10% -> 4.20% (rows above 6%: 7 -> 0, above 1%: 119 -> 73). The worst rows were
full fine-tuning with --loss liger / chunked: block i's whole gradients counted at its in-block moment (only those
of the linears after its widest activation exist then), the untied embedding's gradient before its time, the fused
loss's freed saves, and the chunked head's gradient summed chunk by chunk (analytic/peaks.py). Worst now: QLoRA +
chunked + checkpointing, 4.2% low at the chunked loss's forward.

Run as a test (CI: a bounded subset, every CI_STRIDE-th configuration) or as a script for the per-term table
(`python tests/test_grid_issue9.py`: all configurations). The grid is a fixed pseudo-random sample of the full
product (seeded, so the same every run) of the options, each kept only if the analytic engine accepts it (a
refused combination is refused by both engines, with its reason, elsewhere in the tests).
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grid_support import assert_engines_agree, summarise  # noqa: E402
from test_grid_losses import TINY  # noqa: E402

METHODS = ("lora", "lora-fa", "qlora", "lora-8bit", "full")
ATTENTION = ("eager", "sdpa", "flash-attention-2", "flex")
OPTIMIZERS = ("adamw-torch", "adamw-torch-fused", "adamw-bnb-8bit", "paged-adamw-32bit", "adafactor", "lion-8bit", "sgd",
              "adamw-torch-8bit")
LOSSES = ("standard", "liger", "chunked:4")
SETTINGS = (  # (precision, checkpointing, adapter dtype)
    ("bf16", False, None), ("bf16", True, None), ("bf16", False, "bf16"), ("bf16", True, "bf16"), ("fp32", False, None),
    ("amp-bf16", False, None),
)
SIZE = 220
CI_STRIDE = 15


def _accepted(family, method, attention, optimizer, loss, setting) -> bool:
    from lora_cost import estimate
    from lora_cost.errors import LoraCostError
    try:
        estimate(_config(family), method, **kwargs_for(method, attention, optimizer, loss, setting))
    except LoraCostError:
        return False
    return True


def _config(family: str) -> str:
    import tempfile
    path = Path(tempfile.gettempdir()) / "lora-cost-grid-issue9" / f"tiny-{family}" / "config.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(TINY[family]))
    return str(path)


def grid() -> list[tuple]:
    product = list(itertools.product(("llama", "qwen2"), METHODS, ATTENTION, OPTIMIZERS, LOSSES, SETTINGS))
    random.Random(9).shuffle(product)
    out = []
    for case in product:
        if _accepted(*case):
            out.append(case)
        if len(out) == SIZE:
            break
    return out


def kwargs_for(method, attention, optimizer, loss, setting) -> dict:
    precision, ckpt, dtype = setting
    kw = dict(batch=2, seq=64, precision=precision, grad_checkpointing=ckpt, loss=loss, attention=attention,
              optimizer=optimizer)
    if method != "full":
        kw.update(r=8, targets="all-linear" if ckpt else None)
    if dtype is not None:
        kw["adapter_dtype"] = dtype
    return kw


def compare(case) -> dict:
    from lora_cost import estimate
    from lora_cost.trace import trace
    from lora_cost.trace.compare import differences

    family, method, attention, optimizer, loss, setting = case
    kw = kwargs_for(method, attention, optimizer, loss, setting)
    e = estimate(_config(family), method, **kw)
    t = trace(_config(family), method, **kw)
    return {d.term: (d.analytic, d.trace) for d in differences(e, t)}


def name(case) -> str:
    family, method, attention, optimizer, loss, (precision, ckpt, dtype) = case
    return f"{family}-{method}-{attention}-{optimizer}-{loss}-{precision}{'-ckpt' if ckpt else ''}{'-ad' + dtype if dtype else ''}"


CASES = grid()
CI_CASES = CASES[::CI_STRIDE]


@pytest.mark.parametrize("case", CI_CASES, ids=[name(c) for c in CI_CASES])
def test_engines_agree(case):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    terms = compare(case)
    # task "moments" removed the exemption of full fine-tuning + --loss liger/chunked (up to 16% high): block i's
    # gradients at its in-block moment are only those formed by then, and the chunked loss's head-gradient sum
    # is a moment of its own (analytic/peaks.py); every configuration now within 4.2% (see the module docstring)
    assert_engines_agree(terms, peak_tolerance=0.06)


def test_grid_is_large_enough():
    assert len(CASES) >= 200
    covered = {k: {c[i] for c in CASES} for i, k in enumerate(("family", "method", "attention", "optimizer", "loss"))}
    assert covered["attention"] == set(ATTENTION) and covered["optimizer"] == set(OPTIMIZERS)
    assert covered["loss"] == set(LOSSES) and covered["method"] == set(METHODS)


def summary() -> int:
    return summarise((name(case), lambda c=case: compare(c)) for case in CASES)


if __name__ == "__main__":
    raise SystemExit(summary())
