"""DeBERTa-v2 / v3 (model_type deberta-v2): disentangled attention with relative position buckets.

Saved-activation bytes and FLOPs against a real CPU step of transformers + peft (saved_tensors_hooks,
FlopCounterMode; eager, fp32, no dropout) for the masked-LM head and the classifiers, parameter counts
against transformers on the meta device and the published totals, the LoRA paper's DeBERTa XXL count,
bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lora_cost import estimate
from lora_cost.cli import main

fast = pytest.mark.fast
B, S = 2, 24
# DeBERTa-v3 as published (shared key projections, both c2p and p2c, log buckets, normalised table, no absolute
# positions), at tiny widths
V3 = dict(model_type="deberta-v2", hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
          vocab_size=512, max_position_embeddings=64, relative_attention=True, position_buckets=16,
          pos_att_type="p2c|c2p", norm_rel_ebd="layer_norm", share_att_key=True, type_vocab_size=0,
          position_biased_input=False, max_relative_positions=-1)
VARIANTS = {
    "v3": V3,
    # DeBERTa-v2 xxlarge: the convolution after the first layer, an explicit attention_head_size
    "xxl": dict(V3, conv_kernel_size=3, conv_act="gelu", attention_head_size=16),
    # the original DeBERTa-v2 options: own position projections, absolute positions and token types, no buckets
    # (the table spans max_relative_positions), no LayerNorm on it
    "v2": dict(V3, share_att_key=False, position_biased_input=True, type_vocab_size=2, norm_rel_ebd="none",
               position_buckets=-1, max_relative_positions=32),
}
QV = ("query_proj", "value_proj")
CLASSES = {"masked-lm": "AutoModelForMaskedLM", "seq-cls": "AutoModelForSequenceClassification",
           "token-cls": "AutoModelForTokenClassification"}  # as peft_step.TASK_CLASSES


def measure(cfg: dict, method: str, targets, r: int, ckpt: bool, task: str = "masked-lm", labels: int = 3):
    from peft_step import measure_task
    return measure_task(cfg, method, targets, r, ckpt, task, labels)


def estimated(tmp_path, cfg, method, targets, r, ckpt, task="masked-lm", labels=3):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    kw = dict(batch=B, seq=S, precision="fp32", attention="eager", model_dropout=0.0, grad_checkpointing=ckpt)
    if task != "masked-lm":
        kw.update(task=task, num_labels=labels)
    if method != "full":
        kw.update(r=r, targets=",".join(targets) if isinstance(targets, tuple) else targets)
    e = estimate(str(path), method, **kw)
    return e.memory.saved_activation_bytes, e.flops.forward, e.flops.backward


# every method on v3 (plain and checkpointed alternate); the other variants on the cases their options change
CASES = [("v3", "full", None, 0, False), ("v3", "full", None, 0, True), ("v3", "lora", QV, 8, False),
         ("v3", "lora", "all-linear", 4, True), ("v3", "lora-fa", "all-linear", 4, False), ("v3", "vera", QV, 16, True),
         ("v3", "dora", QV, 4, True),
         ("xxl", "lora", QV, 8, False), ("xxl", "lora", "all-linear", 4, True),
         ("v2", "lora", "all-linear", 4, False), ("v2", "full", None, 0, True)]
IDS = [f"{v}-{m}-{'-'.join(t) if isinstance(t, tuple) else t}-{'ckpt' if k else 'plain'}" for v, m, t, _, k in CASES]


@pytest.mark.parametrize("variant,method,targets,r,ckpt", CASES, ids=IDS)
def test_saved_bytes_and_flops_equal_torch(tmp_path, variant, method, targets, r, ckpt):
    pytest.importorskip("peft")
    cfg = VARIANTS[variant]
    assert estimated(tmp_path, cfg, method, targets, r, ckpt) == measure(cfg, method, targets, r, ckpt)


def test_dora_transient_saves(tmp_path):
    """DoRA without checkpointing: the eye(d_in) products are orphaned saves (tests/test_saved_vs_torch.py);
    the hook sees them, backward never reads them: the estimate is below the count by at most every
    adapted call's worth (query_proj and value_proj on the hidden states, query_proj on the position table)."""
    pytest.importorskip("peft")
    r, d = 4, 64
    saved, fwd, bwd = estimated(tmp_path, V3, "dora", QV, r, False)
    m_saved, m_fwd, m_bwd = measure(V3, "dora", QV, r, False)
    assert (fwd, bwd) == (m_fwd, m_bwd)
    per_call = (d * d + d * r) * 4
    assert 0 < m_saved - saved <= 3 * 3 * per_call


HEAD_CASES = [("seq-cls", "lora", False), ("seq-cls", "full", True), ("token-cls", "vera", True)]


@pytest.mark.parametrize("task,method,ckpt", HEAD_CASES, ids=[f"{t}-{m}-{'ckpt' if k else 'plain'}" for t, m, k in HEAD_CASES])
def test_classifiers_equal_torch(tmp_path, task, method, ckpt):
    pytest.importorskip("peft")
    r = {"full": 0, "lora": 8, "vera": 16}[method]
    targets = None if method == "full" else QV
    assert estimated(tmp_path, V3, method, targets, r, ckpt, task) == measure(V3, method, targets, r, ckpt, task)


@pytest.mark.parametrize("name", ["deberta-v3-base", "deberta-v3-large", "deberta-v2-xxlarge"])
@pytest.mark.parametrize("task", ["masked-lm", "seq-cls", "token-cls"])
def test_profile_totals_equal_transformers(name, task):
    pytest.importorskip("transformers")
    from peft_step import meta_model
    from lora_cost.profiles import bundled_models
    model = meta_model(bundled_models()[name].config, CLASSES[task])  # transformers' default: 2 labels
    kw = {} if task == "masked-lm" else dict(task=task, num_labels=2)
    assert estimate(name, "full", seq=16, **kw).total_params == sum(p.numel() for p in model.parameters())


@fast
def test_published_totals():
    # DeBERTa-v3 paper (arXiv:2111.09543) Sec. 5 / model cards: base 86M backbone + 98M embedding (128K x 768),
    # large 304M + 131M; DeBERTa paper (arXiv:2006.03654) Sec. 5.3: the v2 xxlarge has 1.5B parameters
    assert round(estimate("deberta-v3-base", "full", seq=16).total_params / 1e6) == 86 + 98 + 1
    assert round(estimate("microsoft/deberta-v3-large", "full", seq=16).total_params / 1e6) == 304 + 131
    assert round(estimate("deberta-v2-xxlarge", "full", seq=16).total_params / 1e8) == 16  # 1.57B
    # the embedding: 128,100 x 768 = 98,380,800
    assert 128_100 * 768 == 98_380_800


@fast
def test_lora_paper_deberta_xxl_count():
    # LoRA paper Table 2, DeBERTa XXL LoRA: 4.7M trainable. The authors' scripts use r=16 on W_q, W_v:
    # 48 layers x 2 x 16 x (1536 + 1536) = 4,718,592; peft also trains the GLUE classifier (modules_to_save):
    # 1536 x 2 + 2 = 3,074 (the ContextPooler's dense is not in modules_to_save: frozen)
    e = estimate("deberta-v2-xxlarge", "lora", r=16, targets="query_proj,value_proj", task="seq-cls", num_labels=2)
    assert e.trainable_params == 48 * 2 * 16 * (1536 + 1536) + 1536 * 2 + 2 == 4_721_666
    assert round(e.trainable_params / 1e5) == 47
    # r=8 gives half the adapters (the paper's configuration table says 8)
    assert estimate("deberta-v2-xxlarge", "lora", r=8, task="seq-cls", num_labels=2).trainable_params == 2_359_296 + 3_074


@fast
def test_default_targets_and_task():
    e = estimate("deberta-v3-base", "lora", r=8, seq=128)
    assert e.trainable_params == 12 * 2 * 8 * (768 + 768)  # query_proj, value_proj by default
    assert e.flops.forward > 0 and e.memory.peak_bytes > 0


@fast
def test_disentangled_flops_by_hand(tmp_path):
    """Attention FLOPs of one layer, full fine-tuning (every bmm operand needs a gradient):
    scores and context 2 x 2bhs^2hd, c2p and p2c 2 x 2bhs(2k)hd forward, twice that backward."""
    cfg = dict(V3, num_hidden_layers=1)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    e = estimate(str(path), "full", batch=2, seq=24, precision="fp32")
    b, h, s, hd, k2, d, i, v = 2, 4, 24, 16, 32, 64, 128, 512
    n = b * s
    attention = 2 * 2 * b * h * s * s * hd + 2 * 2 * b * h * s * k2 * hd  # 294,912 + 393,216
    # q, k, v, output dense, intermediate, output on n rows; query_proj and key_proj again on the 2k table rows;
    # the head's dense and decoder
    linears = 2 * n * (4 * d * d + 2 * d * i) + 2 * 2 * k2 * d * d + 2 * n * (d * d + d * v)
    assert e.flops.forward == attention + linears


@fast
@pytest.mark.parametrize("field,value,needle", [
    ("pos_att_type", "p2p|c2p", "pos_att_type"),
    ("pos_att_type", 3, "pos_att_type"),
    ("attention_head_size", 8, "attention_head_size"),
    ("legacy", False, "legacy"),
    ("embedding_size", 32, "embedding_size"),
    ("hidden_act", "relu", "hidden_act"),
    ("share_att_key", "yes", "share_att_key"),
    ("conv_act", "relu", "conv_act"),
    ("num_attention_heads", 5, "num_attention_heads"),
    ("norm_rel_ebd", 1, "norm_rel_ebd"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, field, value, needle):
    cfg = dict(V3, **{field: value})
    if field == "conv_act":
        cfg["conv_kernel_size"] = 3
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    out = CliRunner().invoke(main, ["estimate", "--model", str(path)])
    lines = [ln for ln in out.output.splitlines() if ln.strip()]
    assert out.exit_code == 2 and len(lines) == 1 and needle in lines[0], out.output


@fast
@pytest.mark.parametrize("method", ["prefix-tuning", "prompt-tuning", "adapter-houlsby", "adalora"])
def test_unmodelled_methods_are_refused(method):
    out = CliRunner().invoke(main, ["estimate", "--model", "deberta-v3-base", "--method", method, "--seq", "64"])
    lines = [ln for ln in out.output.splitlines() if ln.strip()]
    assert out.exit_code == 2 and len(lines) == 1 and "DeBERTa" in lines[0], out.output
