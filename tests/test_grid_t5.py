"""T5 / mT5: analytic engine vs trace engine (the real T5ForConditionalGeneration / MT5 model on fake
tensors, decoder labels of --target-seq) on tiny configurations.

Run as a test, or as a script for the per-term summary: python tests/test_grid_t5.py
Both engines must agree exactly on trainable parameters, within 2% on forward and 1% on backward
FLOPs, and within 6% on the peak. Measured on this grid (72 configurations: t5 v1.0, flan-style
gated with 3 + 2 blocks, mT5 x full, LoRA, LoRA-FA, DoRA, VeRA, QLoRA x bf16/fp32, checkpointing,
sdpa/eager, decoder lengths 48-200): trainable parameters, forward and backward FLOPs equal in every
configuration; peak median 0.91%, worst 4.4% (t5 VeRA, bf16, checkpointing, all-linear), the analytic
peak mostly below the trace's (the relative-bucket arithmetic of compute_bias and sdpa's mask copies
are not counted as transients).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from grid_support import assert_engines_agree, engines_terms, summarise  # noqa: E402

TINY = {
    # T5 v1.0: ReLU FFN, output scaled by d^-0.5; T5 v1.1 / flan: gated-GELU, 3 encoder and 2 decoder blocks
    "t5": {"model_type": "t5", "d_model": 256, "d_kv": 64, "d_ff": 512, "num_layers": 2, "num_heads": 4,
           "vocab_size": 2048, "feed_forward_proj": "relu", "decoder_start_token_id": 0},
    "flan-t5": {"model_type": "t5", "d_model": 256, "d_kv": 32, "d_ff": 640, "num_layers": 3, "num_decoder_layers": 2,
                "num_heads": 6, "vocab_size": 2560, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
                "decoder_start_token_id": 0},
    "mt5": {"model_type": "mt5", "d_model": 256, "d_kv": 64, "d_ff": 512, "num_layers": 2, "num_heads": 4,
            "vocab_size": 4096, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
            "decoder_start_token_id": 0},
}
METHODS = ("full", "lora", "lora-fa", "dora", "vera", "qlora")
SETTINGS = (  # (precision, grad_checkpointing, targets, attention, model_dropout, batch, seq, target_seq)
    ("bf16", False, None, "sdpa", 0.0, 2, 128, 64),
    ("fp32", False, "all-linear", "sdpa", 0.0, 1, 200, None),
    ("bf16", True, "all-linear", "sdpa", None, 2, 128, 96),
    ("fp32", True, None, "eager", 0.0, 1, 96, 48),
)


def grid() -> list[tuple[str, str, tuple]]:
    out = []
    for family, method, setting in itertools.product(TINY, METHODS, SETTINGS):
        if method == "qlora" and setting[0] == "fp32":  # QLoRA computes in 16-bit
            setting = ("bf16",) + setting[1:]
        out.append((family, method, setting))
    return out


def kwargs_for(method: str, setting: tuple) -> dict:
    precision, ckpt, targets, attention, model_dropout, batch, seq, target_seq = setting
    kw = dict(batch=batch, seq=seq, precision=precision, grad_checkpointing=ckpt, attention=attention,
              model_dropout=model_dropout, target_seq=target_seq)
    if method != "full":
        kw.update(r=32 if method == "vera" else 8, targets=targets)
    return kw


def compare(root: Path, family: str, method: str, setting: tuple) -> dict[str, tuple]:
    return engines_terms(root / f"tiny-{family}", TINY[family], method, kwargs_for(method, setting))


CASES = grid()
IDS = [f"{f}-{m}-{s[0]}{'-ckpt' if s[1] else ''}-{s[2] or 'qv'}-{s[3]}-t{s[7]}" for f, m, s in CASES]


@pytest.mark.parametrize("family,method,setting", CASES, ids=IDS)
def test_engines_agree(tmp_path_factory, family, method, setting):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    terms = compare(tmp_path_factory.getbasetemp() / "grid-t5", family, method, setting)
    assert_engines_agree(terms)


def summary() -> int:
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="lora-cost-grid-t5-"))
    return summarise((name, lambda c=case: compare(root, *c)) for case, name in zip(CASES, IDS))


if __name__ == "__main__":
    raise SystemExit(summary())
