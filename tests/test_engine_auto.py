"""--engine auto (the default) and the trace engine's path for families the analytic engine lacks.

auto: the analytic engine when it has the config's family (byte-identical output to --engine analytic),
else the trace engine, said in one line on stderr; without the trace extras, one line naming them. The
trace engine builds any model transformers can build (trace/anymodel.py): its parameter counts are the
real model's, targets are checked against its module names; what neither engine can build is one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_cost.cli import main

ROOT = Path(__file__).resolve().parents[1]
# a GPT-NeoX (Pythia) model: no analytic family, a causal LM transformers builds
NEOX = {"model_type": "gpt_neox", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
        "intermediate_size": 256, "vocab_size": 512, "max_position_embeddings": 256,
        "architectures": ["GPTNeoXForCausalLM"]}
T5 = {"model_type": "t5", "d_model": 64, "d_kv": 16, "d_ff": 128, "num_heads": 4, "num_layers": 2, "vocab_size": 512,
      "feed_forward_proj": "gated-gelu", "decoder_start_token_id": 0, "architectures": ["T5ForConditionalGeneration"]}


def run(*args):
    return CliRunner().invoke(main, list(args))


def write(tmp_path, cfg, name="config.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.fast
@pytest.mark.parametrize("args", [["--model", "gpt2", "--json"], ["--model", "llama-3.1-8b", "--method", "qlora",
                                  "--targets", "all-linear", "--grad-checkpointing", "--gpu", "h100-80gb"],
                                  ["--model", "roberta-base", "--method", "dora", "--explain"]])
def test_auto_on_a_known_family_is_the_analytic_engine(args):
    auto, analytic = run("estimate", *args), run("estimate", *args, "--engine", "analytic")
    assert auto.exit_code == 0 and auto.output == analytic.output


@pytest.mark.fast
def test_analytic_engine_names_its_families_and_the_trace_engine(tmp_path):
    out = run("estimate", "--model", write(tmp_path, NEOX), "--engine", "analytic")
    assert out.exit_code == 2 and out.output.count("\n") == 1
    assert "unsupported architecture 'gpt_neox'" in out.output and "llama" in out.output and "--engine trace" in out.output


def _cli_in_subprocess(tmp_path, args, env_extra=None, block_torch=False):
    code = ("import sys\n"
            + ("import importlib.util as u; real = u.find_spec\n"
               "u.find_spec = lambda name, *a: None if name in ('torch', 'peft') else real(name, *a)\n" if block_torch else "")
            + "from lora_cost.cli import main\n"
              "try: main(sys.argv[1:])\n"
              "except SystemExit as e: print('torch' in sys.modules, e.code)")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})})


@pytest.mark.fast
def test_auto_without_the_trace_extras_is_one_line(tmp_path):
    out = _cli_in_subprocess(tmp_path, ["estimate", "--model", write(tmp_path, NEOX)], block_torch=True)
    assert out.stdout.split() == ["False", "2"], out
    assert out.stderr.count("\n") == 1 and "pip install 'lora-cost[trace]'" in out.stderr and "gpt_neox" in out.stderr


@pytest.mark.fast
def test_known_family_under_auto_imports_no_torch(tmp_path):
    out = _cli_in_subprocess(tmp_path, ["estimate", "--model", "qwen2.5-0.5b", "--json"])
    assert out.stdout.strip().splitlines()[-1] == "False 0"


def test_auto_traces_an_unknown_family(tmp_path):
    pytest.importorskip("peft")
    out = CliRunner().invoke(main, ["estimate", "--model", write(tmp_path, NEOX), "--seq", "32", "--json"])
    assert out.exit_code == 0, out.output
    note, body = out.output.split("\n", 1)
    assert note.startswith("lora-cost: note:") and "gpt_neox" in note and "trace engine" in note
    doc = json.loads(body)
    assert doc["engine"] == "trace" and doc["family"] == "gpt_neox"
    # peft's default targets for gpt_neox: query_key_value (64 -> 192); LoRA r=8 on 2 layers
    assert doc["inputs"]["targets"] == ["query_key_value"]
    assert doc["trainable_params"] == 2 * 8 * (64 + 192)


def test_unknown_family_parameters_are_the_real_models(tmp_path):
    pytest.importorskip("peft")
    import torch
    import transformers

    from lora_cost.trace import trace

    t = trace(write(tmp_path, T5), "lora", r=4, targets=("q", "v"), seq=16)
    cfg = transformers.T5Config(**{k: v for k, v in T5.items() if k != "model_type"})
    with torch.device("meta"):
        model = transformers.T5ForConditionalGeneration(cfg)
    assert t.total_params == sum(p.numel() for p in model.parameters()) + t.trainable_params
    # q and v (64 -> 64) in the encoder's 2 self-attentions, the decoder's 2 self- and 2 cross-attentions
    assert t.trainable_params == 6 * 2 * 4 * (64 + 64)
    assert t.flops_forward > 0 and t.flops_backward > 0 and t.saved_activation_bytes > 0


def test_trace_all_linear_and_classification_on_an_unknown_family(tmp_path):
    pytest.importorskip("peft")
    from lora_cost.trace import trace

    t = trace(write(tmp_path, NEOX), "lora", r=8, targets="all-linear", seq=32)
    # peft's all-linear: every nn.Linear but the output embedding (embed_out)
    assert set(t.targets) == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    c = trace(write(tmp_path, NEOX), "lora", r=8, seq=32, batch=2, task="seq-cls", num_labels=3)
    # + peft's trainable copy of the SEQ_CLS head: score 64 x 3, no bias
    assert c.trainable_params == 2 * 8 * (64 + 192) + 64 * 3


@pytest.mark.parametrize("cfg,args,needle", [
    ({"model_type": "nosuch", "hidden_size": 4}, [], "neither engine knows model_type 'nosuch'"),
    ({"model_type": "nosuch", "hidden_size": 4}, ["--engine", "trace"], "cannot build model_type 'nosuch'"),
    (NEOX, ["--targets", "nothing"], "target module 'nothing' matches nothing"),
    (NEOX, ["--task", "seq2seq"], "no seq2seq model for model_type 'gpt_neox'"),
    (NEOX, ["--num-labels", "3"], "--num-labels applies only"),
    (NEOX, ["--serving"], "--serving is an analytic estimate"),
    (dict(NEOX, hidden_size=66), [], "transformers"),  # 66 does not split over 4 heads
])
def test_bad_input_on_the_trace_path_is_one_line(tmp_path, cfg, args, needle):
    pytest.importorskip("peft")
    out = CliRunner().invoke(main, ["estimate", "--model", write(tmp_path, cfg), "--seq", "32", *args])
    assert out.exit_code == 2, out.output
    assert out.output.count("\n") == 1 and out.output.startswith("lora-cost: error") and needle in out.output, out.output
