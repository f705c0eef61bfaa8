"""--task seq-cls / token-cls for Phi-3, Gemma 2/3, BLOOM, Mixtral and Qwen3-MoE (heads.py): transformers'
GenericForSequenceClassification / GenericForTokenClassification (modeling_layers.py), BLOOM's own classes.

(1) a real CPU step of tiny transformers + peft classifiers (saved_tensors_hooks bytes and FlopCounterMode
FLOPs, exactly; the dense families: MoE routing on real data is data-dependent), (2) the trace engine on one
configuration per family, (3) what transformers lacks is refused in one line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grid_support import assert_engines_agree  # noqa: E402

from lora_cost import estimate  # noqa: E402
from lora_cost.cli import main  # noqa: E402

B, S = 2, 24
TINY = {
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2),
    "gemma2": dict(model_type="gemma2", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=64, sliding_window=16),
    "bloom": dict(model_type="bloom", hidden_size=64, n_layer=3, n_head=4, vocab_size=512),
}
QV = {"phi3": ("qkv_proj",), "gemma2": ("q_proj", "v_proj"), "bloom": ("query_key_value",)}
CASES = [("phi3", "seq-cls", "lora", False), ("phi3", "token-cls", "full", True), ("gemma2", "token-cls", "lora", True),
         ("bloom", "seq-cls", "lora", True), ("bloom", "token-cls", "lora", False)]


@pytest.mark.parametrize("family,task,method,ckpt", CASES, ids=[f"{f}-{t}-{m}{'-ckpt' if c else ''}" for f, t, m, c in CASES])
def test_saved_bytes_and_flops_equal_torch(tmp_path, family, task, method, ckpt):
    pytest.importorskip("peft")
    from peft_step import measure_task
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY[family]))
    kw = dict(batch=B, seq=S, precision="fp32", attention="eager", model_dropout=0.0, grad_checkpointing=ckpt,
              task=task, num_labels=3)
    targets = None if method == "full" else QV[family]
    if targets:
        kw.update(r=8, targets=",".join(targets))
    e = estimate(str(path), method, **kw)
    got = (e.memory.saved_activation_bytes, e.flops.forward, e.flops.backward)
    assert got == measure_task(TINY[family], method, targets, 8, ckpt, task, 3)


def _grid_configs():
    from test_grid_gemma import TINY as GEMMA
    from test_grid_moe import TINY as MOE
    from test_grid_phi_bloom import TINY as PHI_BLOOM
    return {"phi3": PHI_BLOOM["phi3"], "bloom": PHI_BLOOM["bloom"], "gemma2": GEMMA["gemma2"],
            "gemma3_text": GEMMA["gemma3_text"], "mixtral": MOE["mixtral"], "qwen3_moe": MOE["qwen3_moe"]}


GRID = [("phi3", "lora", "bf16", True, "seq-cls", 3), ("bloom", "full", "bf16", False, "token-cls", 5),
        ("gemma2", "vera", "fp32", False, "token-cls", 4), ("gemma3_text", "lora", "bf16", False, "seq-cls", 2),
        ("mixtral", "lora", "bf16", True, "seq-cls", 3), ("qwen3_moe", "full", "bf16", False, "token-cls", 5)]


@pytest.mark.parametrize("family,method,precision,ckpt,task,labels", GRID, ids=[f"{g[0]}-{g[1]}-{g[4]}" for g in GRID])
def test_engines_agree(tmp_path, family, method, precision, ckpt, task, labels):
    pytest.importorskip("peft")
    from lora_cost.trace import trace
    from lora_cost.trace.compare import differences
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_grid_configs()[family]))
    kw = dict(batch=2, seq=128, precision=precision, grad_checkpointing=ckpt, task=task, num_labels=labels)
    if method != "full":
        kw["r"] = 32 if method == "vera" else 8
    e, t = estimate(str(path), method, **kw), trace(str(path), method, **kw)
    assert_engines_agree({d.term: (d.analytic, d.trace) for d in differences(e, t)})


@pytest.mark.fast
def test_gemma3_text_has_no_token_classifier():
    out = CliRunner().invoke(main, ["estimate", "--model", "gemma-3-1b", "--task", "token-cls", "--seq", "64"])
    lines = [ln for ln in out.output.splitlines() if ln.strip()]
    assert out.exit_code == 2 and len(lines) == 1 and "no token classifier" in lines[0], out.output


@pytest.mark.fast
def test_classifier_counts():
    # Phi-4 (40 layers, d 5,120, qkv_proj 5,120 -> 7,680): LoRA r=8 on qkv_proj + the score copy 5,120 x 2 (no bias)
    e = estimate("phi-4", "lora", r=8, task="seq-cls", seq=64)
    assert e.trainable_params == 40 * 8 * (5120 + 7680) + 5120 * 2
    # BLOOM's token classifier is `classifier`, with a bias: 1,024 x 9 + 9 beside query_key_value's adapters
    e = estimate("bloom-560m", "lora", r=8, task="token-cls", num_labels=9, seq=64)
    assert e.trainable_params == 24 * 8 * (1024 + 3072) + 1024 * 9 + 9


@pytest.mark.fast
def test_plan_takes_the_task():
    """`plan --task seq-cls`: every point is the classifier's estimate; methods without a classifier model are
    skipped with their reason; a task the family lacks is one line, exit 2."""
    args = ["plan", "--model", "deberta-v3-large", "--gpu", "rtx-4090-24gb", "--seq", "512", "--json",
            "--methods", "lora,qlora", "--r", "8-8", "--batch", "1-4"]
    out = CliRunner().invoke(main, [*args, "--task", "seq-cls", "--num-labels", "3"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert any("qlora" in s and "seq-cls" in s for s in doc["skipped"])
    point = doc["methods"][0]["max_rank"]
    e = estimate("deberta-v3-large", "lora", r=point["r"], batch=point["batch"], seq=512,
                 grad_checkpointing=point["grad_checkpointing"], task="seq-cls", num_labels=3)
    assert (point["peak_bytes"], point["trainable_params"]) == (e.memory.peak_bytes, e.trainable_params)
    bad = CliRunner().invoke(main, [*args, "--task", "seq2seq"])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "does not apply" in bad.output
