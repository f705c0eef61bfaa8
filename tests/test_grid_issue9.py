"""Issue 9's accuracy line: analytic vs trace over attention kernels x optimizers x losses x adapter dtypes x
base storages (dense, 4-bit, 8-bit) together, on >= 200 configurations.

Measured (task "moments", torch 2.13, transformers 5.24, peft 0.21.2; all 220): peak |analytic - trace| / trace
median 1.24% -> 0.44%, worst 18.10% -> 4.20% (rows above 6%: 7 -> 0, above 1%: 119 -> 73). The worst rows were
full fine-tuning with --loss liger / chunked: block i's whole gradients counted at its in-block moment (only those
of the linears after its widest activation exist then), the untied embedding's gradient before its time, the fused
loss's freed saves, and the chunked head's gradient summed chunk by chunk (analytic/peaks.py). Worst now: QLoRA +
chunked + checkpointing, 4.2% low at the chunked loss's forward.
Task "ligeracc" (all 300 rows: these 220 and the 80 with Liger's kernels): median 0.64% -> 0.21%, worst 7.91% -> 2.45%
(the 80: 1.32% -> 0.24%, worst 7.91% -> 2.45%; the 220: 0.44% -> 0.20%, worst 4.39% -> 2.34%; rows above 1%: 119 -> 24).
The forward's moments were missing what only Python holds (a sublayer's outputs waiting for the next op, the final
hidden states at the loss, peft's cast input): the tape now counts, op by op, every storage alive by reference counting
(analytic/tape.py forward_live; under checkpointing the recomputation's too, recompute_live), and a LoRA layer's input
gradient is the sum of its two paths' (three buffers where Liger's SwiGLU output was counted with one).

Task "recast" adds a sample of its own (RECAST_CASES, 24 rows: QLoRA under amp-bf16 with peft's fp32 factors, bf16
factors, or --qlora-recast): peak median 1.06%, worst 5.68% (QLoRA + chunked:4 + checkpointing, the loss's forward, as
in bf16); FLOPs and saved activations exact on all 24. The median is the trace's 512-byte rounding of the 4-bit
stand-in's small quantisation-state tensors on these tiny models (weights +1.6% to +2.7%).

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


def _accepted(family, method, attention, optimizer, loss, setting, *liger) -> bool:
    from lora_cost import estimate
    from lora_cost.errors import LoraCostError
    try:
        estimate(_config(family), method, **kwargs_for(method, attention, optimizer, loss, setting, *liger))
    except LoraCostError:
        return False
    return True


# ligerkernels: the other families Liger's kernels are modelled for (Qwen3's q/k norms, Phi-3's fused projections,
# Gemma 3's GEGLU and offset norms)
LIGER_TINY = {
    "qwen3": {"model_type": "qwen3", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1024,
              "max_position_embeddings": 256},
    "phi3": {"model_type": "phi3", "hidden_size": 128, "intermediate_size": 320, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 256,
             "partial_rotary_factor": 0.5, "pad_token_id": 0, "sliding_window": None},
    "gemma3_text": {"model_type": "gemma3_text", "hidden_size": 128, "intermediate_size": 320, "num_hidden_layers": 3,
                    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 1024,
                    "max_position_embeddings": 256, "sliding_window": 32, "sliding_window_pattern": 3,
                    "query_pre_attn_scalar": 32},
}


def _config(family: str) -> str:
    import tempfile
    path = Path(tempfile.gettempdir()) / "lora-cost-grid-issue9" / f"tiny-{family}" / "config.json"
    cfg = json.dumps(TINY[family] if family in TINY else LIGER_TINY[family])
    if not path.exists() or path.read_text() != cfg:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(cfg)
    return str(path)


def _drawn_before_recast(case) -> bool:
    """Task "recast" made qlora + amp-bf16 valid; the samples below stay as they were drawn before (those rows are
    RECAST_CASES' own sample)."""
    return not (case[1] == "qlora" and case[5][0] == "amp-bf16")


def grid() -> list[tuple]:
    product = list(itertools.product(("llama", "qwen2"), METHODS, ATTENTION, OPTIMIZERS, LOSSES, SETTINGS))
    random.Random(9).shuffle(product)
    out = []
    for case in product:
        if _drawn_before_recast(case) and _accepted(*case):
            out.append(case)
        if len(out) == SIZE:
            break
    return out


def kwargs_for(method, attention, optimizer, loss, setting, liger_kernels=None) -> dict:
    precision, ckpt, dtype = setting
    kw = dict(batch=2, seq=64, precision=precision, grad_checkpointing=ckpt, loss=loss, attention=attention,
              optimizer=optimizer)
    if liger_kernels:  # ligerkernels: Liger's RMSNorm, RoPE, SwiGLU (with --loss liger: Trainer's use_liger_kernel)
        kw["liger_kernels"] = liger_kernels
    if method != "full":
        kw.update(r=8, targets="all-linear" if ckpt else None)
    if dtype == "recast":  # task "recast": the QLoRA script's recast (its factors bf16)
        kw["method_options"] = {"qlora_recast": True}
    elif dtype is not None:
        kw["adapter_dtype"] = dtype
    return kw


def compare(case) -> dict:
    from lora_cost import estimate
    from lora_cost.trace import trace
    from lora_cost.trace.compare import differences

    family, method, attention, optimizer, loss, setting, *liger = case
    kw = kwargs_for(method, attention, optimizer, loss, setting, *liger)
    e = estimate(_config(family), method, **kw)
    t = trace(_config(family), method, **kw)
    return {d.term: (d.analytic, d.trace) for d in differences(e, t)}


def name(case) -> str:
    family, method, attention, optimizer, loss, (precision, ckpt, dtype), *liger = case
    return (f"{family}-{method}-{attention}-{optimizer}-{loss}-{precision}{'-ckpt' if ckpt else ''}"
            f"{'-ad' + dtype if dtype else ''}{'-liger' if liger else ''}")


# ligerkernels: the same options with Liger's RMSNorm, RoPE and SwiGLU on every row (a sample of its own, so the
# rows above stay as they were); with --loss liger these rows are Trainer's use_liger_kernel=True
LIGER_BLOCK_KERNELS = "rms_norm,rope,swiglu"
LIGER_SIZE = 80


def liger_grid() -> list[tuple]:
    product = list(itertools.product(("llama", "qwen2") + tuple(LIGER_TINY), METHODS, ATTENTION, OPTIMIZERS, LOSSES,
                                     SETTINGS, (LIGER_BLOCK_KERNELS,)))
    random.Random(10).shuffle(product)
    out = []
    for case in product:
        if _drawn_before_recast(case) and _accepted(*case):
            out.append(case)
        if len(out) == LIGER_SIZE:
            break
    return out


# task "recast": QLoRA under amp-bf16 (Trainer bf16=True over peft's prepared fp32 model), with peft's fp32 factors,
# bf16 factors, or the QLoRA script's recast (bf16 factors, embeddings and head); a sample of its own
RECAST_SETTINGS = (("amp-bf16", False, None), ("amp-bf16", True, None), ("amp-bf16", False, "bf16"),
                   ("amp-bf16", False, "recast"), ("amp-bf16", True, "recast"))
RECAST_SIZE = 24
RECAST_STRIDE = 6


def recast_grid() -> list[tuple]:
    product = list(itertools.product(("llama", "qwen2"), ("qlora",), ATTENTION, OPTIMIZERS, LOSSES, RECAST_SETTINGS))
    random.Random(11).shuffle(product)
    out = []
    for case in product:
        if _accepted(*case):
            out.append(case)
        if len(out) == RECAST_SIZE:
            break
    return out


CASES = grid()
LIGER_CASES = liger_grid()
RECAST_CASES = recast_grid()
CI_CASES = CASES[::CI_STRIDE] + LIGER_CASES[::CI_STRIDE] + RECAST_CASES[::RECAST_STRIDE]


@pytest.mark.parametrize("case", CI_CASES, ids=[name(c) for c in CI_CASES])
def test_engines_agree(case):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    terms = compare(case)
    # task "moments" removed the exemption of full fine-tuning + --loss liger/chunked (up to 16% high): block i's
    # gradients at its in-block moment are only those formed by then, and the chunked loss's head-gradient sum
    # is a moment of its own (analytic/peaks.py); every configuration now within 4.2% (see the module docstring)
    # ligeracc: every configuration within 2.45% (see the module docstring)
    assert_engines_agree(terms, peak_tolerance=0.03)


def test_grid_is_large_enough():
    assert len(CASES) >= 200
    covered = {k: {c[i] for c in CASES} for i, k in enumerate(("family", "method", "attention", "optimizer", "loss"))}
    assert covered["attention"] == set(ATTENTION) and covered["optimizer"] == set(OPTIMIZERS)
    assert covered["loss"] == set(LOSSES) and covered["method"] == set(METHODS)
    liger_covered = {k: {c[i] for c in LIGER_CASES} for i, k in enumerate(("family", "method", "attention", "optimizer",
                                                                           "loss"))}
    assert len(LIGER_CASES) == LIGER_SIZE and liger_covered["loss"] == set(LOSSES)
    assert liger_covered["family"] == {"llama", "qwen2"} | set(LIGER_TINY)
    assert liger_covered["method"] == set(METHODS) and liger_covered["attention"] == set(ATTENTION)
    assert len(RECAST_CASES) == RECAST_SIZE and {c[5] for c in RECAST_CASES} == set(RECAST_SETTINGS)


def summary(cases=None) -> int:
    return summarise((name(case), lambda c=case: compare(c)) for case in (CASES + LIGER_CASES + RECAST_CASES
                                                                           if cases is None else cases))


if __name__ == "__main__":  # `python tests/test_grid_issue9.py [liger|recast]`: all rows, or the Liger / recast rows
    raise SystemExit(summary({"liger": LIGER_CASES, "recast": RECAST_CASES}.get(sys.argv[1] if sys.argv[1:] else "")))
