"""Analytic engine vs trace engine for DeBERTa-v2/v3, on tiny configurations (as tests/test_trace_grid.py).

Run as a test, or as a script for the per-term median and worst disagreement:
    python tests/test_grid_deberta.py
Variants: DeBERTa-v3 (shared position projections, c2p and p2c, 32 buckets), DeBERTa-v2 xxlarge's options
(the convolution after the first layer, gelu), the original v2 options (own pos_key_proj/pos_query_proj,
absolute positions, no buckets). Methods: full, LoRA, LoRA-FA, DoRA, VeRA, QLoRA; settings: bf16,
fp32 all-linear, bf16 with checkpointing and all-linear, AMP with adapter and model dropout. transformers
has no sdpa path for DeBERTa: both engines run its own eager attention.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from grid_support import assert_engines_agree, engines_terms, summarise  # noqa: E402

V3 = {"model_type": "deberta-v2", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
      "num_attention_heads": 4, "vocab_size": 2048, "max_position_embeddings": 512, "relative_attention": True,
      "position_buckets": 32, "pos_att_type": "p2c|c2p", "norm_rel_ebd": "layer_norm", "share_att_key": True,
      "type_vocab_size": 0, "position_biased_input": False, "max_relative_positions": -1}
TINY = {
    "v3": V3,
    "xxl": dict(V3, conv_kernel_size=3, conv_act="gelu", attention_head_size=64),
    "v2": dict(V3, share_att_key=False, position_biased_input=True, type_vocab_size=2, norm_rel_ebd="none",
               position_buckets=-1, max_relative_positions=64),
}
METHODS = ("full", "lora", "lora-fa", "dora", "vera", "qlora")
SETTINGS = (  # (precision, grad_checkpointing, targets, dropout, model_dropout, batch, seq)
    ("bf16", False, None, 0.0, 0.0, 2, 128),
    ("fp32", False, "all-linear", 0.0, 0.0, 1, 200),
    ("bf16", True, "all-linear", 0.0, None, 2, 128),
    ("amp-bf16", False, None, 0.1, None, 1, 128),
)


def grid() -> list[tuple[str, str, tuple]]:
    out = []
    for family, method, setting in itertools.product(TINY, METHODS, SETTINGS):
        if method == "qlora" and setting[0] not in ("bf16", "fp16"):
            setting = ("bf16",) + setting[1:]
        out.append((family, method, setting))
    return out


def kwargs_for(method: str, setting: tuple) -> dict:
    precision, ckpt, targets, dropout, model_dropout, batch, seq = setting
    kw = dict(batch=batch, seq=seq, precision=precision, grad_checkpointing=ckpt, model_dropout=model_dropout)
    if method != "full":
        kw.update(r=8 if method != "vera" else 32, targets=targets, dropout=dropout)
    return kw


def compare(root: Path, family: str, method: str, setting: tuple) -> dict[str, tuple]:
    return engines_terms(root / f"tiny-deberta-{family}", TINY[family], method, kwargs_for(method, setting))


CASES = grid()
IDS = [f"{f}-{m}-{s[0]}{'-ckpt' if s[1] else ''}{'-all' if s[2] else ''}{'-drop' if s[3] else ''}" for f, m, s in CASES]
# the test runs a spread of the grid (every 5th: each method, setting and variant appears); the script runs all of it
TESTED = [c for i, c in enumerate(CASES) if i % 5 == 0]
TESTED_IDS = [n for i, n in enumerate(IDS) if i % 5 == 0]


@pytest.mark.parametrize("family,method,setting", TESTED, ids=TESTED_IDS)
def test_engines_agree(tmp_path_factory, family, method, setting):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    terms = compare(tmp_path_factory.getbasetemp() / "grid-deberta", family, method, setting)
    assert_engines_agree(terms)


def summary() -> int:
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="lora-cost-grid-deberta-"))
    return summarise((name, lambda c=case: compare(root, *c)) for case, name in zip(CASES, IDS))


if __name__ == "__main__":
    raise SystemExit(summary())
