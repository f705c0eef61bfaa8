"""Attention kernels (--attention flash-attention-2|flash-attention-3|flex, --packing).

1. The stand-ins' saving rule against the libraries' source: flash-attn's `save_for_backward` lines (quoted
   in tests/data/flash_attn_save_rules.txt with their commits: flash-attn only builds for CUDA), torch's
   FlexAttentionAutogradOp and transformers' integration code (installed here).
2. The stand-in run on real CPU tensors under saved_tensors_hooks: what it saves, in which dtype and shape.
3. Analytic vs trace on a grid of tiny models: kernels x families x precisions x checkpointing x methods.
4. The CLI: spellings, refusals in one line (exit 2), the assumption line.
5. A published long-context figure: Hugging Face + FA2, Llama-3.1-8B QLoRA r=32 all-linear, batch 1, fits
   28,000 tokens on an 80 GB A100 (unsloth.ai/blog/llama3-3, Dec 2024, "Hugging Face + FA2 can only do 28,000
   on a 80GB GPU"; its table: Llama-3.3-70B 6,916 tokens).
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grid_support import assert_engines_agree  # noqa: E402

from lora_cost import estimate  # noqa: E402
from lora_cost.attention_kernels import NO_FLASH_FAMILIES, NO_FLEX_FAMILIES, get_kernel  # noqa: E402
from lora_cost.errors import LoraCostError  # noqa: E402

RULES = (Path(__file__).parent / "data" / "flash_attn_save_rules.txt").read_text()


def _saved_names(section: str) -> list[str]:
    text = RULES.split(f"[{section}]")[1].split("\n[")[0]
    args = re.search(r"save_for_backward\(\s*(.*?)\s*\)", text, re.S).group(1)
    return [a.strip() for a in args.split(",") if a.strip()]


# ---- 1. the saving rules, from the sources
@pytest.mark.fast
def test_flash_save_rules_match_registry():
    fa2, fa3 = get_kernel("flash-attention-2"), get_kernel("flash-attention-3")
    assert _saved_names("fa2 FlashAttnFunc.forward") == ["q", "k", "v", "out_padded", "softmax_lse", "rng_state"]
    assert fa2.saves_rng_state and fa2.row_statistics == 1 and fa2.head_dim_multiple == 8
    assert _saved_names("fa2 FlashAttnVarlenFunc.forward")[-3:] == ["cu_seqlens_q", "cu_seqlens_k", "rng_state"]
    assert "(batch_size, num_heads, seqlen_q), dtype=torch.float32" in RULES  # lse [b, h, s] fp32, not rounded
    assert "(num_heads, total_q), dtype=torch.float32" in RULES  # varlen: the same elements
    assert "rng_state = torch.empty((2,), dtype=torch.int64" in RULES
    assert _saved_names("fa3 FlashAttnFunc.forward") == ["q", "k", "v", "out", "softmax_lse"]
    assert not fa3.saves_rng_state and fa3.row_statistics == 1 and fa3.head_dim_multiple == 1
    assert "8 - head_size_og % 8" in RULES.split("[fa2 FlashAttnFunc.forward padding]")[1]


def test_flex_save_rule_matches_torch():
    import importlib
    fx = importlib.import_module("torch._higher_order_ops.flex_attention")
    src = inspect.getsource(fx.FlexAttentionAutogradOp.forward)
    saved = re.search(r"save_values_for_backward\(\s*ctx,\s*\((.*?)\),\s*\)", src, re.S).group(1)
    names = [a.strip() for a in saved.split(",") if a.strip()]
    assert names[:6] == ["query", "key", "value", "out", "logsumexp", "max_scores"]  # row_statistics == 2
    assert all(n.startswith("*") for n in names[6:])  # block mask and buffers: not counted (stated)
    assert get_kernel("flex").row_statistics == 2


def test_transformers_integration_rules():
    """The casts, the padding-free copies and flex's repeat_kv as the stand-ins and the analytic rule assume."""
    import transformers.integrations.flash_attention as fa
    import transformers.integrations.flex_attention as flex
    import transformers.modeling_flash_attention_utils as fau
    assert "torch.get_autocast_dtype" in inspect.getsource(fa.get_target_dtype)
    assert "module.config.dtype" in inspect.getsource(fa.get_target_dtype)  # QLoRA: the 16-bit config dtype
    assert "q.to(target_dtype)" in inspect.getsource(fau.fa_peft_integration_check)
    assert "query.contiguous()" in inspect.getsource(fau._prepare_from_posids)  # packed: copies, saved
    assert "query.transpose(1, 2)" in inspect.getsource(fa.flash_attention_forward)  # a view for flash
    src = inspect.getsource(flex.flex_attention_forward)
    assert "(num_local_query_heads - 1)) != 0" in src and "repeat_kv" in src
    assert "transpose(1, 2).contiguous()" in src and '"dropout", 0.0) > 0' in src


def test_family_support_flags_match_transformers():
    import importlib
    for family, module in [("bloom", "bloom"), ("t5", "t5"), ("gpt2", "gpt2"), ("llama", "llama"), ("gemma2", "gemma2"),
                           ("bert", "bert"), ("phi3", "phi3"), ("qwen3_moe", "qwen3_moe")]:
        mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        base = next(c for n, c in vars(mod).items() if n.endswith("PreTrainedModel") and n != "PreTrainedModel")
        assert (family in NO_FLASH_FAMILIES) == (not getattr(base, "_supports_flash_attn", False)), family
        assert (family in NO_FLEX_FAMILIES) == (not getattr(base, "_supports_flex_attn", False)), family


# ---- 2. the stand-in on real CPU tensors
@pytest.mark.parametrize("kernel,layout,expect_rng", [("flash-attention-2", "bshd", True),
                                                       ("flash-attention-3", "bshd", False), ("flex", "bhsd", False)])
def test_stand_in_saves_what_the_library_saves(kernel, layout, expect_rng):
    import torch
    from lora_cost.trace.kernels import FusedAttention
    b, s, h, kvh, d = 2, 16, 4, 2, 8
    shape = (lambda heads: (b, s, heads, d)) if layout == "bshd" else (lambda heads: (b, heads, s, d))
    q, k, v = (torch.zeros(shape(n), dtype=torch.bfloat16, requires_grad=True) for n in (h, kvh, kvh))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
        out = FusedAttention.apply(q, k, v, get_kernel(kernel), layout, b, None)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    lse = ((b, h, s), torch.float32)
    want = [(tuple(q.shape), torch.bfloat16), (tuple(k.shape), torch.bfloat16), (tuple(v.shape), torch.bfloat16),
            (tuple(q.shape), torch.bfloat16), lse] + [lse] * (get_kernel(kernel).row_statistics - 1)
    if expect_rng:
        want.append(((2,), torch.int64))
    assert saved == want
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape
    if kernel != "flex":  # flash-attn refuses fp32
        with pytest.raises(RuntimeError, match="fp16 and bf16"):
            FusedAttention.apply(q.float(), k.float(), v.float(), get_kernel(kernel), layout, b, None)


# ---- 3. analytic vs trace
TINY = {
    "llama": {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 3072, "max_position_embeddings": 512,
              "tie_word_embeddings": False},
    "qwen2": {"model_type": "qwen2", "hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 2,
              "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 2560, "max_position_embeddings": 512,
              "tie_word_embeddings": True},  # 6 heads: flex repeats k and v (not a power of two)
    "mistral": {"model_type": "mistral", "hidden_size": 256, "intermediate_size": 640, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 2048, "max_position_embeddings": 512,
                "sliding_window": 64, "tie_word_embeddings": False},  # window inside the kernel
    "gemma2": {"model_type": "gemma2", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 2048,
               "max_position_embeddings": 512, "sliding_window": 64, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 64},  # soft-capping inside the kernel
    "gpt2": {"model_type": "gpt2", "n_embd": 256, "n_layer": 2, "n_head": 4, "vocab_size": 2400, "n_positions": 512},
    "roberta": {"model_type": "roberta", "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                "intermediate_size": 512, "vocab_size": 2048, "max_position_embeddings": 514, "type_vocab_size": 1},
}


def _grid():
    out = []
    for family in TINY:
        for kernel in ("flash-attention-2", "flash-attention-3", "flex"):
            if kernel == "flex" and family in NO_FLEX_FAMILIES:
                continue
            for method, precision, ckpt in (("lora", "bf16", False), ("qlora", "bf16", True), ("full", "bf16", True),
                                            ("lora", "amp-bf16", False), ("dora", "fp16", True)):
                if kernel == "flex" and precision.startswith("amp"):
                    continue  # refused (mixed dtypes under autocast)
                out.append((family, kernel, method, precision, ckpt, False))
        if family not in ("roberta",):
            for kernel in ("flash-attention-2", "flash-attention-3"):
                out.append((family, kernel, "lora", "bf16", False, True))  # --packing
                out.append((family, kernel, "qlora", "bf16", True, True))
    return out


GRID = _grid()
IDS = [f"{f}-{k}-{m}-{p}{'-ckpt' if c else ''}{'-packed' if pk else ''}" for f, k, m, p, c, pk in GRID]
CI_STRIDE = 5  # CI runs every 5th configuration (45 s budget); `python tests/test_attention_kernels.py` runs all


def compare(root: Path, family, kernel, method, precision, ckpt, packing) -> dict:
    from lora_cost.trace import trace
    from lora_cost.trace.compare import differences
    path = root / f"attn-{family}" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(TINY[family]))
    kw = dict(batch=2, seq=96, precision=precision, grad_checkpointing=ckpt, attention=kernel, packing=packing)
    if kernel == "flex":
        kw["model_dropout"] = 0.0  # flex has no attention dropout (RoBERTa's config has 0.1): refused otherwise
    if method != "full":
        kw.update(r=8, targets="all-linear")
    e, t = estimate(str(path), method, **kw), trace(str(path), method, **kw)
    return {d.term: (d.analytic, d.trace) for d in differences(e, t)}


@pytest.mark.parametrize("case", GRID[::CI_STRIDE], ids=IDS[::CI_STRIDE])
def test_engines_agree(tmp_path_factory, case):
    pytest.importorskip("peft")
    # the trace is the reference; peak within 6% (the full grid: see summary()), FLOPs as grid_support asserts
    assert_engines_agree(compare(tmp_path_factory.getbasetemp(), *case), peak_tolerance=0.06)


def test_grid_size():
    assert len(GRID) >= 60


# ---- 4. CLI and refusals
@pytest.mark.fast
@pytest.mark.parametrize("kw,match", [
    (dict(model="bloom-560m", attention="flash-attention-2"), "no flash-attention-2 for bloom"),
    (dict(model="gpt2", attention="flex"), "no flex attention for gpt2"),
    (dict(model="gpt2", attention="flash-attention-2", precision="fp32"), "fp16/bf16 only"),
    (dict(model="gpt2", attention="sdpa", packing=True), "varlen flash kernels only"),
    (dict(model="llama-3.2-1b", attention="flex", precision="amp-bf16"), "autocast"),
    (dict(model="llama-3.2-1b", attention="flex", model_dropout=0.1), "no attention dropout"),
    (dict(model="llama-3.2-1b", attention="flash-attention-2", method="prefix-tuning"), "not modelled"),
    (dict(model="llama-3.2-1b", attention="flash-attention-2", method="prompt-tuning", packing=True), "virtual tokens"),
    (dict(model="llama-3.2-1b", attention="flash_attention_4"), "unknown attention"),
])
def test_refusals(kw, match):
    kw = dict(kw)
    model, method = kw.pop("model"), kw.pop("method", "lora")
    with pytest.raises(LoraCostError, match=match):
        estimate(model, method, **kw)


@pytest.mark.fast
def test_cli_spellings_and_assumption(tmp_path):
    from click.testing import CliRunner
    from lora_cost.cli import main
    runner = CliRunner()
    res = runner.invoke(main, ["estimate", "--model", "llama-3.2-1b", "--attention", "flash_attention_2", "--packing",
                               "--batch", "4", "--seq", "1024", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["inputs"]["attention"] == "flash-attention-2" if "inputs" in out else True
    text = json.dumps(out)
    assert "flash-attn 2 (FlashAttnFunc)" in text and "--packing" in text
    bad = runner.invoke(main, ["estimate", "--model", "gpt2", "--attention", "sdpa", "--packing"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output and len(bad.output.strip().splitlines()) == 1


@pytest.mark.fast
def test_flash_removes_the_qlora_long_context_probabilities():
    """QLoRA computes in an fp32 stream: sdpa sees fp32 grouped-query inputs and takes the math path
    ([b, h, s, s] fp32 probabilities); flash casts q, k, v to bf16 and keeps no s x s tensor."""
    kw = dict(r=16, seq=4096, targets="all-linear")
    sdpa = estimate("llama-3.1-8b", "qlora", attention="sdpa", **kw)
    flash = estimate("llama-3.1-8b", "qlora", attention="flash-attention-2", **kw)
    probs = 32 * 32 * 4096 * 4096 * 4  # layers x heads x s x s x fp32: 64 GiB
    saved = sdpa.memory.saved_activation_bytes - flash.memory.saved_activation_bytes
    assert probs <= saved <= 1.1 * probs
    # the flash FLOPs are sdpa's (the fused-kernel convention): 4 b h s^2 d forward per layer
    assert flash.flops.forward == sdpa.flops.forward


@pytest.mark.fast
def test_hand_arithmetic_flash_vs_sdpa_full_finetuning():
    """Llama-3.2-1B full fine-tuning, bf16, 1 x 1024 (o_proj trains, so it saves its input). torch's sdpa
    flash backend, flash-attention 2/3 and flex all save q, k, v, out and an fp32 [b, h, s] log-sum-exp, and
    all hand o_proj their own output as a view (sdpa/flash: [b, s, h, d] in memory; flex: the query's stride
    order). They differ by flash-attention 2's int64 [2] rng state (16 bytes a layer) and flex's fp32
    [b, h, s] max_scores (1 x 32 x 1024 x 4 = 131,072 bytes a layer)."""
    kw = dict(batch=1, seq=1024, precision="bf16")
    sdpa, fa2, fa3, flex = (estimate("llama-3.2-1b", "full", attention=a, **kw).memory.saved_activation_bytes
                            for a in ("sdpa", "flash-attention-2", "flash-attention-3", "flex"))
    layers = 16
    assert fa2 - sdpa == layers * 16
    assert fa3 == sdpa
    assert flex - fa3 == layers * 32 * 1024 * 4


# ---- 5. published long-context figure
@pytest.mark.fast
@pytest.mark.parametrize("model,published", [("llama-3.1-8b", 28_000), ("llama-3.1-70b", 6_916)])
def test_published_max_context_hf_fa2_qlora(model, published):
    """unsloth.ai/blog/llama3-3: HF + FA2, QLoRA r=32 on all linear layers, batch 1, 80 GB A100: the longest
    sequence that fits. Gradient checkpointing on (as the benchmark's HF baseline). Within 15%."""
    def fits(seq):
        e = estimate(model, "qlora", r=32, targets="all-linear", seq=seq, attention="flash-attention-2",
                     grad_checkpointing=True, gpu="a100-80gb")
        return e.gpu.fits
    lo, hi = 256, 200_000
    while hi - lo > 64:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    assert abs(lo - published) <= 0.15 * published, lo


def summary() -> int:
    import tempfile
    from grid_support import summarise
    root = Path(tempfile.mkdtemp(prefix="lora-cost-attn-grid-"))
    return summarise((name, lambda c=case: compare(root, *c)) for case, name in zip(GRID, IDS))


if __name__ == "__main__":
    raise SystemExit(summary())
