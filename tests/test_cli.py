"""The CLI contract: JSON names, exit codes and one-line errors."""

import json

import pytest
from click.testing import CliRunner

from lora_cost.cli import main

pytestmark = pytest.mark.fast


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_estimate_json_contract():
    out = run("estimate", "--model", "gpt2", "--r", "8", "--json")
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["trainable_params"] == 294_912
    mem = doc["memory"]
    assert isinstance(mem["peak_bytes"], int) and isinstance(mem["device_bytes"], int)
    # the peak (start of backward, batch 1 x 512, bf16) by hand: bf16 base weights (124,439,808 x 2), fp32
    # adapters and their two AdamW moments (294,912 x 4, x 8), bf16 logits [512, 50257] and the two fp32
    # [512, 50257] log-softmax gradients, on top of everything saved for backward
    n, vocab, trainable = 512, 50257, 294_912
    by_hand = {"weights": 124_439_808 * 2, "trainable_weights": trainable * 4, "optimizer_state": 2 * trainable * 4,
               "saved_activations": mem["saved_activation_bytes"], "logits": n * vocab * 2,
               "loss_gradient_buffers": 2 * n * vocab * 4}
    assert mem["peak_phase"] == "backward" and mem["components"] == by_hand
    assert mem["peak_bytes"] == sum(by_hand.values())
    assert mem["device_bytes"] > mem["peak_bytes"]
    assert isinstance(doc["flops"]["forward"], int) and isinstance(doc["flops"]["backward"], int)
    assert doc["inputs"]["model"] == "gpt2" and doc["inputs"]["r"] == 8 and doc["inputs"]["targets"] == ["c_attn"]


def test_estimate_tables_and_explain():
    out = run("estimate", "--model", "llama-2-7b", "--method", "qlora", "--r", "64", "--targets", "all-linear",
              "--batch", "4", "--seq", "512", "--grad-checkpointing", "--gpu", "rtx-4090-24gb", "--explain")
    assert out.exit_code == 0, out.output
    assert "fits" in out.output and "saved activations" in out.output.lower()
    assert "NF4" in out.output


def test_config_json_path_and_directory(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 512}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for target in (str(tmp_path / "config.json"), str(tmp_path)):
        out = run("estimate", "--model", target, "--method", "dora", "--r", "16", "--json")
        assert out.exit_code == 0, out.output
        # 2 layers x (q: 16*(256+256) + 256, v: 16*(256+128) + 128) magnitude included
        assert json.loads(out.output)["trainable_params"] == 2 * (16 * 512 + 256 + 16 * 384 + 128)


@pytest.mark.parametrize("args,needle", [
    (["--model", "no-such-model"], "unknown model"),
    (["--model", "llama2-7b"], "did you mean"),
    (["--model", "gpt2", "--r", "0"], "--r must be a positive"),
    (["--model", "gpt2", "--r", "100000"], "larger than"),
    (["--model", "gpt2", "--batch", "0"], "--batch"),
    (["--model", "gpt2", "--seq", "-3"], "--seq"),
    (["--model", "gpt2", "--targets", "q_proj"], "matches nothing"),
    (["--model", "gpt2", "--nola-k", "4"], "does not apply"),
    (["--model", "gpt2", "--method", "full", "--r", "8"], "does not apply"),
    (["--model", "gpt2", "--method", "qlora", "--precision", "fp32"], "qlora"),
])
def test_bad_input_is_one_line_exit_2(args, needle):
    out = run("estimate", *args)
    assert out.exit_code == 2
    lines = [ln for ln in out.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in out.output


def test_malformed_and_unknown_config(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    out = run("estimate", "--model", str(bad))
    assert out.exit_code == 2 and "not valid JSON" in out.output
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"model_type": "xlnet", "d_model": 512}))  # (t5 is a family now)
    # (the default engine, auto, would hand a family the analytic engine lacks to the trace engine)
    out = run("estimate", "--model", str(unknown), "--engine", "analytic")
    assert out.exit_code == 2 and "supported model_type" in out.output and "llama" in out.output
    assert "--engine trace" in out.output
    missing = tmp_path / "llama.json"
    missing.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    out = run("estimate", "--model", str(missing))
    assert out.exit_code == 2 and "lacks" in out.output


def test_long_sequence_is_a_warning():
    out = CliRunner().invoke(main, ["estimate", "--model", "gpt2", "--seq", "4096", "--json"])
    assert out.exit_code == 0
    assert "exceeds the model's maximum" in out.output  # stderr is mixed into output by CliRunner


def test_models_and_gpus_listing():
    out = run("models", "--json")
    assert out.exit_code == 0
    names = {m["name"] for m in json.loads(out.output)}
    for required in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "roberta-base", "roberta-large", "qwen2.5-0.5b",
                     "qwen2.5-7b", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b", "llama-2-7b",
                     "llama-2-13b", "mistral-7b", "gpt3-175b"):
        assert required in names
    out = run("gpus", "--json")
    assert out.exit_code == 0 and any(g["name"] == "rtx-4090-24gb" for g in json.loads(out.output))
    out = run("methods", "--json")
    assert out.exit_code == 0
    # at least these (methods are one module each)
    assert {m["name"] for m in json.loads(out.output)} >= {"full", "lora", "lora-fa", "vera", "nola", "qlora", "dora",
                                                           "lora-plus", "bitfit", "ia3", "adapter-houlsby",
                                                           "adapter-pfeiffer", "adalora", "prompt-tuning", "p-tuning",
                                                           "prefix-tuning"}
