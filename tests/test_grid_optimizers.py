"""Analytic engine vs trace engine over optimizers x methods x precision x master weights x stepping in
backward (issue 9). The trace runs the real torch / transformers optimizers (the documented stand-ins
for bitsandbytes, torchao and GaLore) and the wrappers of trace/optimizers.py.

    python tests/test_grid_optimizers.py     # the per-term summary table
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grid_support import assert_engines_agree, summarise  # noqa: E402
from test_trace_grid import TINY  # noqa: E402


def config_path(root: Path, family: str) -> str:
    """test_trace_grid's tiny model of the family with one block (the optimizer does not care how many;
    a trace's cost is its op count)."""
    import json

    cfg = dict(TINY[family])
    cfg["n_layer" if family == "gpt2" else "num_hidden_layers"] = 1
    path = root / f"tiny1-{family}" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    return str(path)

ALL = ("adamw-torch", "adamw-torch-fused", "sgd", "adafactor", "adamw-bnb-8bit", "paged-adamw-8bit", "paged-adamw-32bit",
       "lion-8bit", "lion-32bit", "paged-lion-8bit", "paged-lion-32bit", "adamw-torch-8bit", "adamw-torch-4bit")
SOME = ("adamw-torch", "adamw-torch-fused", "adafactor", "sgd", "lion-32bit", "adamw-bnb-8bit")
# (family, method, precision, master weights, in backward)
SETTINGS_ALL = (("llama", "lora", "bf16", None, False), ("gpt2", "full", "bf16", None, False))
SETTINGS_SOME = (
    ("qwen2", "full", "fp16", None, False),
    ("qwen2", "full", "bf16", "fp32", False),
    ("llama", "full", "bf16", None, True),
    ("llama", "dora", "bf16", None, True),
    ("llama", "full", "bf16", "fp32", True),
    ("roberta", "full", "amp-bf16", None, True),
)
# paged variants differ from their unpaged ones only in where the state lives: once each (on LoRA) is enough
CASES = [(opt, *s) for s in SETTINGS_ALL for opt in ALL if s[1] == "lora" or not opt.startswith("paged")] + [(opt, *s) for s in SETTINGS_SOME for opt in SOME] + [
    ("adamw-torch-fused", "llama", "qlora", "bf16", None, True), ("adafactor", "mistral", "lora", "fp32", None, True),
    # GaLore (full fine-tuning only): projected linears, an untied LM head among them, master weights, in backward
    ("galore-adamw", "llama", "full", "bf16", None, False), ("galore-adamw", "qwen2", "full", "fp16", None, False),
    ("galore-adamw", "llama", "full", "bf16", "fp32", True)]
IDS = [f"{o}-{f}-{m}-{p}{'-master' if mw else ''}{'-inbwd' if ib else ''}" for o, f, m, p, mw, ib in CASES]


def compare(root: Path, opt: str, family: str, method: str, precision: str, master, in_backward: bool) -> dict:
    from lora_cost import estimate
    from lora_cost.trace import trace
    from lora_cost.trace.compare import differences

    kw = dict(optimizer=opt, precision=precision, batch=2, seq=64, master_weights=master,
              optimizer_in_backward=in_backward)
    if method != "full":
        kw.update(r=8, targets="all-linear")
    model = config_path(root, family)
    e, t = estimate(model, method, **kw), trace(model, method, **kw)
    return {d.term: (d.analytic, d.trace) for d in differences(e, t)}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_engines_agree(tmp_path_factory, case):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    terms = compare(tmp_path_factory.getbasetemp() / "optim-grid", *case)
    # (Full fine-tuning in fp32 is left out: there the step's optimizer adds nothing after backward for most
    # optimizers, and the backward peak is one of two moments of peaks.py (older than this grid) that the
    # trace shows differently: an untied input embedding's gradient counted from the first block on (analytic
    # 7-12% high on llama), a tied one's accumulation at the end (two vocab x d buffers) not counted (5-7% low
    # on qwen2). test_trace_grid.py covers those with its 8% tolerance.)
    assert_engines_agree(terms, peak_tolerance=0.02)
    a, t = terms["steady_bytes"]  # weights, master copies and optimizer state between steps
    assert abs(t - a) <= 0.002 * t + 16 * 512, f"steady: analytic {a} vs trace {t}"
    a, t = terms["optimizer.peak_bytes"]
    assert abs(t - a) <= 0.03 * t, f"optimizer phase: analytic {a} vs trace {t}"
    if "refresh.peak_bytes" in terms:  # task "galore": GaLore's projector refresh step
        a, t = terms["refresh.peak_bytes"]
        assert abs(t - a) <= 0.02 * t, f"refresh step: analytic {a} vs trace {t}"


def test_grid_is_large_enough():
    assert len(CASES) >= 60


def summary() -> int:
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="lora-cost-optim-grid-"))
    return summarise((name, lambda c=case: compare(root, *c)) for case, name in zip(CASES, IDS))


if __name__ == "__main__":
    raise SystemExit(summary())
