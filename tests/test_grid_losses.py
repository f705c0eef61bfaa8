"""Analytic engine vs trace engine over losses x adapter dtypes x methods x precision x checkpointing, and
peft modules_to_save (embed_tokens, lm_head trained as copies).

Run as a test, or as a script for the per-term summary (`python tests/test_grid_losses.py`). The trace runs
the real step on fake tensors: Liger through its stand-in (lora_cost/trace/losses.py), torchtune's chunked
loss as torch ops, bf16 factors cast as peft leaves them with autocast_adapter_dtype=False.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grid_support import assert_engines_agree, summarise  # noqa: E402

# small enough to trace in a fraction of a second; vocab / hidden = 8 and 10, so Liger's chunks are 16 and 8 rows
TINY = {
    "llama": {"model_type": "llama", "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 256,
              "tie_word_embeddings": False},
    "qwen2": {"model_type": "qwen2", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 1, "vocab_size": 1280, "max_position_embeddings": 256,
              "tie_word_embeddings": True},
}
LOSSES = ("standard", "liger", "chunked:4")
METHODS = ("full", "lora", "lora-fa", "qlora")
SETTINGS = (  # (precision, grad_checkpointing, adapter dtype)
    ("bf16", False, None), ("bf16", True, None), ("fp32", False, None), ("bf16", False, "bf16"), ("bf16", True, "bf16"),
    ("fp16", False, "fp16"), ("amp-bf16", False, None),
)


# peft modules_to_save (untied llama): a trained head copy only with the standard loss (others are refused)
SAVED_MODULES = (("standard", "embed_tokens,lm_head"), ("liger", "embed_tokens"), ("chunked:4", "embed_tokens"))


def grid() -> list[tuple[str, str, str, tuple]]:
    out = []
    for method, (loss, modules), ckpt in itertools.product(("lora", "lora-fa", "dora"), SAVED_MODULES, (False, True)):
        out.append(("llama", method, loss, ("bf16", ckpt, None, modules)))
    for (i, method), loss, setting in itertools.product(enumerate(METHODS), LOSSES, SETTINGS):
        precision, ckpt, dtype = setting
        if dtype is not None and method == "full":
            continue
        if method == "qlora" and precision != "bf16":
            continue
        if loss == "liger" and precision.startswith("amp"):  # refused: Liger under autocast is not modelled
            continue
        family = ("llama", "qwen2")[(i + LOSSES.index(loss) + SETTINGS.index(setting)) % 2]
        out.append((family, method, loss, setting))
    return out


def kwargs_for(method: str, loss: str, setting: tuple) -> dict:
    precision, ckpt, dtype = setting[:3]
    kw = dict(batch=2, seq=64, precision=precision, grad_checkpointing=ckpt, loss=loss)
    if method != "full":
        kw.update(r=8, targets="all-linear" if ckpt else None)
    if dtype is not None:
        kw["adapter_dtype"] = dtype
    if len(setting) > 3:
        kw["modules_to_save"] = setting[3]
    return kw


def compare(root: Path, family: str, method: str, loss: str, setting: tuple) -> dict:
    from lora_cost import estimate
    from lora_cost.trace import trace
    from lora_cost.trace.compare import differences

    path = root / f"tiny-{family}" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(TINY[family]))
    kw = kwargs_for(method, loss, setting)
    e = estimate(str(path), method, **kw)
    t = trace(str(path), method, **kw)
    return {d.term: (d.analytic, d.trace) for d in differences(e, t)}


CASES = grid()
IDS = [f"{f}-{m}-{loss}-{s[0]}{'-ckpt' if s[1] else ''}{'-ad' + s[2] if s[2] else ''}"
       f"{'-save-' + s[3].replace(',', '+') if len(s) > 3 else ''}" for f, m, loss, s in CASES]
# CI's time budget: every sixth configuration in the test run; the script (`summary`) runs all of them
CI_CASES, CI_IDS = CASES[::6], IDS[::6]


@pytest.mark.parametrize("family,method,loss,setting", CI_CASES, ids=CI_IDS)
def test_engines_agree(tmp_path_factory, family, method, loss, setting):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    terms = compare(tmp_path_factory.getbasetemp() / "loss-grid", family, method, loss, setting)
    a, t = terms["saved_activation_bytes"]
    if method != "dora":  # DoRA's orphaned saves are counted apart (tests/test_trace_grid.py shows the same)
        assert abs(t - a) <= 64, f"saved: analytic {a} vs trace {t}"  # a few 8-byte scalars at most
    # the trace is the reference; on the 81 configurations the analytic peak is within 0.40% (median) and 4.5%
    # (worst: DoRA, checkpointing, a trained embedding copy) since task "moments" (before: 1.28% and 5.35%)
    assert_engines_agree(terms, peak_tolerance=0.06)


def test_grid_is_large_enough():
    assert len(CASES) >= 60


def summary() -> int:
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="lora-cost-loss-grid-"))
    return summarise((name, lambda c=case: compare(root, *c)) for case, name in zip(CASES, IDS))


if __name__ == "__main__":
    raise SystemExit(summary())
