"""A classifier's backward peaks in the final norm's backward (peaks.py `_head_moment`): its logits are tiny,
so what decides the head is the norm's own gradient buffers (ops.rms_norm / ops.gemma_rms_norm: five fp32
[n, d] at the last allocation of PowBackward0; ops.layer_norm: native_layer_norm_backward's incoming
gradient and grad_input) on top of the saved activations, the classifier's and the loss's already freed.

(1) the moment's terms by hand, torch-free; (2) the trace engine (the real transformers RMSNorm backward on
fake tensors) peaks at the same moment with the same bytes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_cost import estimate  # noqa: E402

MOMENT = "backward through the final norm (classifier)"


def _moment(e):
    for phase in e.memory.phases:
        if phase.moment == MOMENT:
            return phase
    return None


def _terms(phase) -> dict:
    return {t.name: t.value for t in phase.terms}


@pytest.mark.fast
@pytest.mark.parametrize("norm,dtype,autocast,per_element", [
    ("rms", "bf16", None, 5 * 4),  # LlamaRMSNorm: five fp32 [n, d], whatever the input dtype
    ("rms", "fp32", None, 5 * 4),
    ("gemma", "bf16", None, 5 * 4),  # Gemma2RMSNorm / Gemma3RMSNorm: the same ops in fp32
    ("layer", "bf16", None, 2 * 2),  # native_layer_norm_backward: the incoming gradient and grad_input
    ("layer", "bf16", "bf16", 2 * 4),  # layer_norm is on autocast's fp32 list
])
def test_norm_backward_buffers_by_hand(norm, dtype, autocast, per_element):
    from lora_cost.analytic import ops
    from lora_cost.analytic.tape import Tape
    n, d = 512, 768
    tape = Tape(n, autocast=autocast)
    x = tape.new(n * d, dtype, True)
    if norm == "rms":
        ops.rms_norm(tape, x, d, w_trainable=False, w_dtype=dtype)
    elif norm == "gemma":
        ops.gemma_rms_norm(tape, x, d, w_trainable=False)
    else:
        ops.layer_norm(tape, x, d, w_trainable=False)
    assert tape.norm_backward["embeddings"] == [per_element * n * d]


# a Llama whose MLP is narrow next to its fp32 norm buffers (intermediate 688 x bf16 x 3 < 256 x fp32 x 5 per
# token: tests/test_trace_grid.py's tiny llama): the final norm's backward decides the classifier's peak
TINY_LLAMA = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 3072, "max_position_embeddings": 512,
              "tie_word_embeddings": False}


@pytest.mark.fast
@pytest.mark.parametrize("model,precision", [("tiny-llama", "bf16"), ("gemma-2-2b", "bf16")])
def test_final_norm_moment_decides_the_classifier(tmp_path, model, precision):
    from lora_cost.profiles import load_model
    if model == "tiny-llama":
        path = tmp_path / "config.json"
        path.write_text(json.dumps(TINY_LLAMA))
        model, hidden = str(path), TINY_LLAMA["hidden_size"]
    else:
        hidden = load_model(model).hidden
    batch, seq = 2, 256
    e = estimate(model, "lora", r=8, task="seq-cls", num_labels=2, batch=batch, seq=seq, precision=precision)
    backward = next(p for p in e.memory.phases if p.phase == "backward")
    terms = _terms(backward)
    assert backward.moment == MOMENT
    assert terms["activation_gradient_buffers"] == 5 * batch * seq * hidden * 4
    # the classifier's and the loss's saves are freed by then: less than every saved activation is alive
    assert terms["saved_activations"] < e.memory.saved_activation_bytes


@pytest.mark.fast
def test_an_encoder_has_no_final_norm_moment_buffers():
    # RoBERTa (as BERT) has no final norm (its blocks end in their own LayerNorm): the head moment holds no norm buffers
    e = estimate("roberta-base", "lora", r=8, task="seq-cls", num_labels=2, batch=2, seq=128)
    for phase in e.memory.phases:
        assert phase.moment != MOMENT or _terms(phase).get("activation_gradient_buffers", 0) == 0


@pytest.mark.parametrize("family,method,precision,task", [("llama", "lora", "bf16", "seq-cls"),
                                                          ("gemma2", "vera", "fp32", "token-cls")])
def test_trace_peaks_in_the_final_norm_backward(tmp_path, family, method, precision, task):
    pytest.importorskip("peft")
    from test_grid_gemma import TINY as GEMMA
    from test_trace_grid import config_path

    from lora_cost.trace import trace
    if family == "gemma2":
        path = tmp_path / "config.json"
        path.write_text(json.dumps(GEMMA["gemma2"]))
        model = str(path)
    else:
        model = config_path(tmp_path, family)
    kw = dict(batch=2, seq=128, precision=precision, task=task, num_labels=3, r=32 if method == "vera" else 8)
    e, t = estimate(model, method, **kw), trace(model, method, **kw)
    peak = max(t.phases, key=lambda p: p.peak_bytes)
    assert peak.phase == "backward" and peak.module == "backward: PowBackward0"  # inside the final RMSNorm's backward
    assert max(e.memory.phases, key=lambda p: p.peak_bytes).moment == MOMENT
    assert abs(e.memory.peak_bytes - t.peak_bytes) <= 0.005 * t.peak_bytes
