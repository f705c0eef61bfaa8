"""report/ draws what the engines compute: `estimate --engine both` (trace/run.py -> report/trace_json.py,
report/trace_terminal.py) and the catalogue listings (report/catalogue.py), checked against numbers
worked out by hand or read straight from the data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_cost.cli import main

ROOT = Path(__file__).resolve().parent.parent
# GPT-2 shape, tiny: 2 blocks, hidden 64, c_attn 64 -> 192
GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 200, "n_positions": 256}


def run(*args):
    return CliRunner().invoke(main, list(args), env={"COLUMNS": "200"})  # rich tables: no truncated names


@pytest.fixture()
def tiny_gpt2(config_file) -> str:
    return config_file(GPT2, "gpt2")


def test_engine_both_json(tiny_gpt2):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    out = run("estimate", "--model", tiny_gpt2, "--engine", "both", "--gpu", "h100-80gb", "--json")
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    analytic, traced = doc["analytic"], doc["trace"]
    h100 = json.loads((ROOT / "profiles" / "gpus" / "h100-80gb.json").read_text())
    assert doc["analytic"]["inputs"]["precision"] == "bf16"
    # the trace's GPU fit, by hand from the data file: 989.4 dense BF16 TFLOP/s at 40% utilisation
    flops = traced["flops"]["forward"] + traced["flops"]["backward"]
    assert traced["gpu"] == {"name": "h100-80gb", "memory_bytes": h100["memory_bytes"], "fits": True,
                             "verdict": "fits", "uncertainty_bytes": traced["memory"]["device_uncertainty_bytes"],
                             "headroom_bytes": h100["memory_bytes"] - traced["memory"]["device_bytes"],
                             "step_time_s": pytest.approx(flops / (h100["bf16_tflops_dense"] * 1e12 * 0.4), rel=1e-12),
                             "utilisation": 0.4}
    rows = {d["term"]: d for d in doc["differences"]}
    # LoRA r=8 on c_attn (64 -> 192): 2 blocks x (8 x 64 + 192 x 8) = 4,096 trainable parameters in both engines
    assert rows["trainable_params"]["analytic"] == rows["trainable_params"]["trace"] == 4096
    assert rows["peak_bytes"]["analytic"] == analytic["memory"]["peak_bytes"]
    assert rows["peak_bytes"]["trace"] == traced["memory"]["peak_bytes"]
    assert rows["flops.forward"]["trace"] == traced["flops"]["forward"]
    for d in rows.values():
        assert d["diff"] == d["trace"] - d["analytic"]
        assert d["rel"] == (None if not d["analytic"] else pytest.approx(d["diff"] / d["analytic"]))


def test_engine_both_tables(tiny_gpt2):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    out = run("estimate", "--model", tiny_gpt2, "--engine", "both", "--gpu", "h100-80gb", "--explain")
    assert out.exit_code == 0, out.output
    text = out.output
    order = [text.index(s) for s in ("analytic engine", "trace engine", "Saved activations by module", "analytic vs trace")]
    assert order == sorted(order)
    assert "trainable 4.10K of" in text  # the trace's header: 4,096 trainable parameters (see above)
    assert "h100-80gb: fits (headroom" in text  # the trace's GPU line


@pytest.mark.fast
def test_catalogue_listings():
    model_files = sorted((ROOT / "profiles" / "models").glob("*.json"))
    models = json.loads(run("models", "--json").output)
    assert len(models) == len(model_files)
    gpt2 = next(m for m in models if m["name"] == "gpt2")
    # GPT-2 small: 124,439,808 parameters (the count Hugging Face's GPT2LMHeadModel reports, tied head)
    assert gpt2["params"] == 124_439_808 and (gpt2["layers"], gpt2["hidden"], gpt2["heads"]) == (12, 768, 12)
    table = run("models").output
    assert all(m["name"] in table for m in models)
    gpu_files = sorted((ROOT / "profiles" / "gpus").glob("*.json"))
    gpus = json.loads(run("gpus", "--json").output)
    assert gpus == [{k: json.loads(p.read_text())[k] for k in ("name", "description", "memory_bytes",
                                                               "bf16_tflops_dense", "fp32_tflops", "source")}
                    for p in gpu_files]
    table = run("methods").output
    assert all(m in table for m in ("full", "lora", "lora-fa", "dora", "qlora", "vera", "nola"))
