"""The QLoRA paper script's recast (artidoro/qlora qlora.py, get_accelerate_model; the loop is quoted in
lora_cost/analytic/qlora_recast.py), as `--qlora-recast`,
trained with Trainer(bf16=True): `--precision amp-bf16`. Without it lora-cost follows peft's
prepare_model_for_kbit_training (every non-quantised parameter fp32: embeddings, norms and the LM head at 4 bytes
each) and fp32 LoRA factors. The issue's claim (~1 GB too much at 65B, ~2 GB at Llama-3.1-8B) is the embeddings and
head at 4 instead of 2 bytes. Here the estimate with and without the recast is compared with what is derived from
the configurations alone: 2 bytes less per embedding and head element, 2 bytes less per LoRA factor element (and
per gradient element, 4 per AdamW state pair), and no autocast copy of the head's or the factors' weights.
"""

from __future__ import annotations

import json
import re

import pytest

from lora_cost import estimate
from lora_cost.errors import LoraCostError

pytestmark = pytest.mark.fast

LLAMA_65B = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 22016, "num_hidden_layers": 80,
             "num_attention_heads": 64, "num_key_value_heads": 64, "vocab_size": 32000, "max_position_embeddings": 2048,
             "tie_word_embeddings": False}  # huggyllama/llama-65b config.json
R = 8  # qlora's default rank; default targets q_proj and v_proj


def _component(e, name: str) -> int:
    return next(t.value for t in e.memory.components if t.name == name)


def _saved(e, kind: str) -> int:
    return next((t.value for t in e.memory.saved_by_kind if t.name == kind), 0)


@pytest.mark.parametrize("model, vocab, hidden, layers, kv_width, claim_gb", [
    ("llama-3.1-8b", 128256, 4096, 32, 8 * 128, 2.0), ("65b", 32000, 8192, 80, 8192, 1.0)])
def test_recast_saving_matches_the_issue(tmp_path, model, vocab, hidden, layers, kv_width, claim_gb):
    if model == "65b":
        (tmp_path / "config.json").write_text(json.dumps(LLAMA_65B))
        model = str(tmp_path / "config.json")
    kw = dict(precision="amp-bf16", batch=1, seq=512)
    peft_default = estimate(model, "qlora", **kw)
    script = estimate(model, "qlora", method_options={"qlora_recast": True}, **kw)

    embed_head = 2 * vocab * hidden  # untied input and output embeddings
    # q_proj: A [r, h] + B [h, r]; v_proj: A [r, h] + B [kv_width, r]; per layer
    factors = layers * R * (hidden + hidden + hidden + kv_width)
    assert peft_default.trainable_params == script.trainable_params == factors
    weights = _component(peft_default, "weights") - _component(script, "weights")
    assert weights == 2 * embed_head  # fp32 -> bf16
    assert abs(weights / 1e9 - claim_gb) <= 0.1 * claim_gb  # 2.10 GB and 1.05 GB: the issue's figures
    trainable = _component(peft_default, "trainable_weights") - _component(script, "trainable_weights")
    assert trainable == 2 * factors  # the script's LoraLayer cast: fp32 -> bf16 factors
    assert _component(peft_default, "optimizer_state") - _component(script, "optimizer_state") == 2 * 2 * factors

    # autocast's bf16 copies of fp32 weights, saved for the input gradient: the head's [vocab, hidden] and every
    # factor's except layer 0's lora_A (the embedding output needs no gradient there: nothing to save it for)
    first_a = 2 * R * hidden
    assert _saved(peft_default, "autocast weight copies") == 2 * (vocab * hidden + factors - first_a)
    assert _saved(script, "autocast weight copies") == 0  # the weights are bf16 already: used as they are


def test_recast_is_explained():
    """The base-weights term says which parameters the recast leaves in which dtype; the option is in the JSON."""
    e = estimate("llama-3.1-8b", "qlora", precision="amp-bf16", method_options={"qlora_recast": True})
    formula = next(t.formula for t in e.memory.terms if t.name == "base weights")
    assert "embeddings and LM head in bf16 (the QLoRA script's recast), norms and biases in fp32" in formula
    assert e.method_options["qlora_recast"] is True
    assert any(a.startswith("the QLoRA script's recast") for a in e.assumptions)


@pytest.mark.parametrize("kwargs, message", [
    (dict(precision="bf16"), "needs --precision amp-bf16"),
    (dict(precision="amp-bf16", adapter_dtype="fp32"), "contradicts"),
    (dict(precision="amp-bf16", method_options={"kbit_prepare": False}), "--no-kbit-prepare"),
    (dict(precision="amp-bf16", method_options={"quant_storage": "fp32"}), "--quant-storage"),
    (dict(precision="amp-bf16", loss="liger"), "--loss"),
    (dict(precision="amp-bf16", modules_to_save="lm_head"), "--modules-to-save"),
    (dict(precision="amp-bf16", model="gpt2"), "not gpt2"),
    (dict(precision="amp-bf16", model="qwen2.5-0.5b"), "with a bias"),
])
def test_recast_refusals(kwargs, message):
    kwargs = dict(kwargs)
    model = kwargs.pop("model", "llama-3.1-8b")
    options = {"qlora_recast": True, **kwargs.pop("method_options", {})}
    with pytest.raises(LoraCostError, match=re.escape(message)):
        estimate(model, "qlora", method_options=options, **kwargs)


def test_qlora_amp_fp16_still_refused():
    with pytest.raises(LoraCostError, match="qlora needs --precision"):
        estimate("llama-3.1-8b", "qlora", precision="amp-fp16")


def test_cli_flag_and_refusal():
    from click.testing import CliRunner

    from lora_cost.cli import main

    base = ["estimate", "--model", "llama-3.1-8b", "--method", "qlora", "--qlora-recast"]
    ok = CliRunner().invoke(main, base + ["--precision", "amp-bf16", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["inputs"]["method_options"]["qlora_recast"] is True
    bad = CliRunner().invoke(main, base + ["--precision", "bf16"])
    assert bad.exit_code == 2 and bad.output.strip().count("\n") == 0 and "amp-bf16" in bad.output


def test_axolotl_reader_names_the_option(tmp_path):
    """No axolotl key holds the recast: the reader never sets it and says which flag does."""
    from lora_cost.readers import read_files, settings_for

    path = tmp_path / "a.yml"
    path.write_text("base_model: llama-3.2-1b\nadapter: qlora\nload_in_4bit: true\nbf16: true\n")
    reading = read_files(axolotl=str(path))
    found = settings_for("llama-3.2-1b", reading)
    assert "qlora_recast" not in found.method_options
    assert any("--qlora-recast" in note for note in reading.notes)
