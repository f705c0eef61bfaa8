"""Analytic engine vs trace engine with adapters on the router and the fused expert parameters (peft
`target_parameters` through lora.ParamWrapper, which `all-linear` and the v4 expert names map to on transformers
5's Mixtral and Qwen3-MoE). Same tiny models as tests/test_grid_moe.py.

    python tests/test_grid_moe_experts.py      # per-term median and worst disagreement
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from grid_support import assert_engines_agree, engines_terms, summarise  # noqa: E402
from test_grid_moe import TINY, kwargs_for  # noqa: E402

EXPERTS = {"mixtral": "w1,w3,w2", "qwen3_moe": "gate_proj,up_proj,down_proj"}
METHODS = ("lora", "lora-fa", "qlora")
SETTINGS = (  # (precision, grad_checkpointing, targets, attention, model_dropout, batch, seq); targets "experts":
    ("bf16", False, "all-linear", "sdpa", 0.0, 2, 128),  # the family's expert names
    ("fp32", False, "experts", "sdpa", 0.0, 1, 200),
    ("bf16", True, "all-linear", "sdpa", 0.0, 2, 128),
    ("amp-bf16", False, "gate", "eager", 0.0, 1, 128),
    # the parameters by their own names (peft target_parameters: gate_up_proj at rank r)
    ("bf16", False, "q_proj,experts.gate_up_proj,experts.down_proj", "sdpa", 0.0, 2, 128),
)


def grid() -> list[tuple[str, str, tuple]]:
    out = []
    for family, method, setting in itertools.product(EXPERTS, METHODS, SETTINGS):
        if method == "qlora" and setting[0] not in ("bf16", "fp16"):
            setting = ("bf16",) + setting[1:]
        if setting[2] == "experts":
            setting = setting[:2] + (EXPERTS[family],) + setting[3:]
        out.append((family, method, setting))
    return out


def _compare(root: Path, family: str, method: str, setting: tuple) -> dict[str, tuple]:
    # Mixtral's router has 4 outputs: rank at most 4
    return engines_terms(root / f"tiny-{family}", TINY[family], method, dict(kwargs_for(method, setting), r=4))


CASES = grid()
IDS = [f"{f}-{m}-{s[0]}{'-ckpt' if s[1] else ''}-{s[2].replace(',', '+').replace('experts.', '')}" for f, m, s in CASES]


# Known disagreements (strict: they must keep failing until fixed), measured 2026-12-01. Fixed by task "recast":
# "qwen3_moe-qlora-bf16-ckpt-all-linear" (backward FLOPs 2.1% under the trace) was the 4-bit stand-in's
# save_for_backward of its packed weight changing checkpointing's early stop; it now keeps it on ctx as bitsandbytes does
KNOWN: dict[str, str] = {}
MARKS = [pytest.mark.xfail(reason=KNOWN[i], strict=True) if i in KNOWN else () for i in IDS]


@pytest.mark.parametrize("family,method,setting", [pytest.param(*c, marks=m) for c, m in zip(CASES, MARKS)], ids=IDS)
def test_expert_adapters_engines_agree(tmp_path_factory, family, method, setting):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    terms = _compare(tmp_path_factory.getbasetemp() / "moe-experts-grid", family, method, setting)
    assert_engines_agree(terms)


def summary() -> int:
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="lora-cost-moe-experts-grid-"))
    return summarise((name, lambda c=case: _compare(root, *c)) for case, name in zip(CASES, IDS))


if __name__ == "__main__":
    sys.exit(summary())
