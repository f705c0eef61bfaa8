"""Analytic engine vs trace engine on tiny mixture-of-experts models (Mixtral, Qwen3-MoE), as
tests/test_trace_grid.py does for the dense families. The trace runs transformers' real MoE forward
(grouped_mm experts path) on fake tensors; its shapes depend on n*k only, not on the routing, so the
fake tensors' arbitrary routing values cannot change what is measured. Adapters target the attention
projections (the analytic engine refuses expert targets, see analytic/architectures/moe.py).

    python tests/test_grid_moe.py      # per-term median and worst disagreement
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
    "mixtral": {"model_type": "mixtral", "hidden_size": 256, "intermediate_size": 384, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2048, "max_position_embeddings": 512,
                "num_local_experts": 4, "num_experts_per_tok": 2, "tie_word_embeddings": False},
    "qwen3_moe": {"model_type": "qwen3_moe", "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
                  "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 96,
                  "num_experts": 8, "num_experts_per_tok": 3, "norm_topk_prob": True, "mlp_only_layers": [1],
                  "vocab_size": 2560, "max_position_embeddings": 512, "tie_word_embeddings": True},
}
METHODS = ("full", "lora", "lora-fa", "dora", "vera", "qlora")
ATTN = "q_proj,k_proj,v_proj,o_proj"
SETTINGS = (  # (precision, grad_checkpointing, targets, attention, model_dropout, batch, seq)
    ("bf16", False, None, "sdpa", 0.0, 2, 128),
    ("fp32", False, ATTN, "sdpa", 0.0, 1, 200),
    ("bf16", True, ATTN, "sdpa", None, 2, 128),
    ("amp-bf16", False, None, "eager", None, 1, 128),
)


def grid() -> list[tuple[str, str, tuple]]:
    out = []
    for family, method, setting in itertools.product(TINY, METHODS, SETTINGS):
        if method == "qlora" and setting[0] not in ("bf16", "fp16"):
            setting = ("bf16",) + setting[1:]
        out.append((family, method, setting))
    return out


def kwargs_for(method: str, setting: tuple) -> dict:
    precision, ckpt, targets, attention, model_dropout, batch, seq = setting
    kw = dict(batch=batch, seq=seq, precision=precision, grad_checkpointing=ckpt, attention=attention,
              model_dropout=model_dropout)
    if method != "full":
        kw.update(r=32 if method == "vera" else 8, targets=targets)
    return kw


def compare(root: Path, family: str, method: str, setting: tuple) -> dict[str, tuple]:
    return engines_terms(root / f"tiny-{family}", TINY[family], method, kwargs_for(method, setting))


CASES = grid()
IDS = [f"{f}-{m}-{s[0]}{'-ckpt' if s[1] else ''}-{s[3]}" for f, m, s in CASES]
# Known disagreements (strict: they must keep failing until fixed), measured 2026-11-30. Fixed by task "recast": the
# trace's 4-bit stand-in kept its packed weight with save_for_backward, so checkpoint recomputation reran the dense
# block's last 4-bit down_proj gemm (backward FLOPs 2.5% over); it now keeps it on ctx as bitsandbytes does
KNOWN: dict[str, str] = {}
MARKS = [pytest.mark.xfail(reason=KNOWN[i], strict=True) if i in KNOWN else () for i in IDS]


@pytest.mark.parametrize("family,method,setting", [pytest.param(*c, marks=m) for c, m in zip(CASES, MARKS)], ids=IDS)
def test_moe_engines_agree(tmp_path_factory, family, method, setting):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    terms = compare(tmp_path_factory.getbasetemp() / "moe-grid", family, method, setting)
    assert_engines_agree(terms)


def summary() -> int:
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="lora-cost-moe-grid-"))
    return summarise((name, lambda c=case: compare(root, *c)) for case, name in zip(CASES, IDS))


if __name__ == "__main__":
    raise SystemExit(summary())
