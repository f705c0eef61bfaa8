"""Gemma 2 and Gemma 3 (text): the analytic engine against the trace engine on tiny configurations
(methods x bf16 / fp32 / AMP / checkpointing / QLoRA, sequences inside and beyond the sliding window).

Run as a test, or as a script for the per-configuration disagreement and its median and worst:
    python tests/test_grid_gemma.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from grid_support import assert_engines_agree, engines_terms, summarise  # noqa: E402

TINY = {
    # Gemma 2: alternating layers, soft-capped attention (eager) and logits, tied 4k vocabulary, head_dim 64
    "gemma2": {"model_type": "gemma2", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 4096,
               "max_position_embeddings": 512, "sliding_window": 64, "query_pre_attn_scalar": 64},
    # Gemma 3: 2 sliding layers per global one, q/k norms, two rotary table pairs, one key/value head
    "gemma3_text": {"model_type": "gemma3_text", "hidden_size": 256, "intermediate_size": 640,
                    "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 128,
                    "vocab_size": 4096, "max_position_embeddings": 512, "sliding_window": 96,
                    "sliding_window_pattern": 3, "query_pre_attn_scalar": 128},
    # Gemma 3 with grouped key/value heads (sdpa past the window: repeat_kv copies them) and explicit layer_types
    "gemma3_gqa": {"model_type": "gemma3_text", "hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 3072,
                   "max_position_embeddings": 512, "sliding_window": 100, "tie_word_embeddings": False,
                   "layer_types": ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]},
}
METHODS = ("full", "lora", "lora-fa", "dora", "vera", "qlora")
SETTINGS = (  # (precision, grad_checkpointing, targets, attention, batch, seq)
    ("bf16", False, None, "sdpa", 2, 128),
    ("fp32", False, "all-linear", "sdpa", 1, 200),
    ("bf16", True, "all-linear", "sdpa", 2, 128),
    ("amp-bf16", False, None, "eager", 1, 128),
)


def grid() -> list[tuple[str, str, tuple]]:
    out = []
    for family in TINY:
        for method in METHODS:
            for setting in SETTINGS:
                if method == "qlora" and setting[0] not in ("bf16", "fp16"):
                    setting = ("bf16",) + setting[1:]
                out.append((family, method, setting))
    return out


def kwargs_for(method: str, setting: tuple) -> dict:
    precision, ckpt, targets, attention, batch, seq = setting
    kw = dict(batch=batch, seq=seq, precision=precision, grad_checkpointing=ckpt, attention=attention,
              model_dropout=0.0)
    if method != "full":
        kw.update(r=32 if method == "vera" else 8, targets=targets)
    return kw


def compare(root: Path, family: str, method: str, setting: tuple) -> dict[str, tuple]:
    return engines_terms(root / f"tiny-{family}", TINY[family], method, kwargs_for(method, setting))


CASES = grid()
IDS = [f"{f}-{m}-{s[0]}{'-ckpt' if s[1] else ''}-{s[3]}-s{s[5]}" for f, m, s in CASES]


@pytest.mark.parametrize("family,method,setting", CASES, ids=IDS)
def test_engines_agree(tmp_path_factory, family, method, setting):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    terms = compare(tmp_path_factory.getbasetemp() / "gemma-grid", family, method, setting)
    assert_engines_agree(terms)


def summary() -> int:
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="lora-cost-gemma-grid-"))
    return summarise((name, lambda c=case: compare(root, *c)) for case, name in zip(CASES, IDS))


if __name__ == "__main__":
    raise SystemExit(summary())
