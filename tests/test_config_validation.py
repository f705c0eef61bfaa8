"""Bad input is refused once, where it is read, with one line naming the file, the field and what
was expected (exit code 2 on the command line); odd but valid input still gets its answer."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_cost.analytic.planner import parse_range, plan
from lora_cost.cli import main
from lora_cost.errors import LoraCostError
from lora_cost.profiles import bundled_models, find_config, load_model
from lora_cost.spec import RunConfig

pytestmark = pytest.mark.fast


def config(name: str, **changes) -> dict:
    cfg = dict(bundled_models()[name].config)
    cfg.update(changes)
    return cfg


def write(tmp_path, cfg, name="config.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


def refused(path: str) -> str:
    load_model.cache_clear()
    with pytest.raises(LoraCostError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("model,field,value,expected", [
    ("gpt2", "n_inner", "3072", "must be an integer"),
    ("gpt2", "n_inner", math.nan, "must be an integer"),
    ("gpt2", "n_inner", 1e308, "must be an integer"),
    ("gpt2", "n_inner", 1.5, "must be an integer"),
    ("llama-3.2-1b", "head_dim", 16.0, "must be an integer"),  # a JSON float, even a whole one
    ("llama-3.2-1b", "num_key_value_heads", 0.5, "must be an integer"),
    ("llama-3.2-1b", "num_key_value_heads", 3, "not divisible by num_key_value_heads"),  # 32 heads
    ("llama-3.2-1b", "num_key_value_heads", 64, "from 1 to 32"),  # more kv heads than heads
    ("llama-3.2-1b", "hidden_size", True, "must be an integer"),
    ("llama-3.2-1b", "num_hidden_layers", 10**12, "from 1 to 100,000"),
    ("llama-3.2-1b", "vocab_size", [64], "must be an integer"),
    ("llama-3.2-1b", "tie_word_embeddings", "no", "must be true or false"),
    ("llama-3.2-1b", "attention_dropout", 1.0, "probability in [0, 1)"),
    ("llama-3.2-1b", "attention_dropout", math.nan, "probability in [0, 1)"),
    ("mistral-7b", "sliding_window", "64", "'sliding_window' must be an integer"),
    ("mistral-7b", "sliding_window", [64], "'sliding_window' must be an integer"),
    ("roberta-base", "type_vocab_size", [64], "'type_vocab_size' must be an integer"),
    ("roberta-base", "type_vocab_size", -math.inf, "'type_vocab_size' must be an integer"),
    ("roberta-base", "hidden_size", 770, "hidden_size 770 is not divisible by num_attention_heads 12"),
    ("gpt2", "n_embd", 770, "n_embd 770 is not divisible by n_head 12"),
    ("gpt2", "model_type", ["gpt2"], "'model_type' must be a string"),
    ("gpt2", "model_type", "xlnet", "unsupported architecture 'xlnet'"),
])
def test_config_fields_are_validated_where_read(tmp_path, model, field, value, expected):
    path = write(tmp_path, config(model, **{field: value}))
    message = refused(path)
    assert message.startswith(path) or path in message
    assert expected in message
    if "must be" in expected:
        assert repr(field) in message


def test_files_that_are_not_config_json(tmp_path):
    bad = {"latin1.json": b'{"model_type": "gpt2\xe9"}', "deep.json": b"[" * 100_000 + b"]" * 100_000,
           "digits.json": b'{"model_type": "gpt2", "n_embd": ' + b"7" * 5000 + b"}", "list.json": b"[1]"}
    expected = {"latin1.json": "not UTF-8", "deep.json": "nested too deep", "digits.json": "unreadable JSON value",
                "list.json": "must hold a JSON object"}
    for name, raw in bad.items():
        (tmp_path / name).write_bytes(raw)
        message = refused(str(tmp_path / name))
        assert str(tmp_path / name) in message and expected[name] in message
    (tmp_path / "empty").mkdir()
    assert refused(str(tmp_path / "empty")) == f"{tmp_path / 'empty'}: directory has no config.json"
    long_name = refused("x" * 5000)  # longer than a file name may be: no OSError, and the line stays short
    assert "unknown model" in long_name and len(long_name) < 400
    assert "unknown model" in refused("gpt2\x00")


def test_odd_but_valid_configs_are_answered(tmp_path):
    # Llama with head_dim given: hidden need not divide by heads (128 x 3 heads of 64 = 192 wide q)
    spec = load_model(write(tmp_path, config("llama-3.2-1b", hidden_size=128, num_attention_heads=3,
                                             num_key_value_heads=1, head_dim=64), "a.json"))
    assert (spec.heads, spec.kv_heads, spec.head_dim) == (3, 1, 64)
    spec = load_model(write(tmp_path, config("roberta-base", type_vocab_size=None), "b.json"))
    assert spec.type_vocab_size == 0
    spec = load_model(write(tmp_path, config("gpt2", n_inner=None), "c.json"))
    assert spec.intermediate == 4 * 768
    spec = load_model(write(tmp_path, config("qwen2.5-0.5b", use_sliding_window=False, sliding_window=None), "d.json"))
    assert spec.sliding_window is None


def test_find_config_is_the_one_lookup(tmp_path):
    name, cfg, source = find_config("meta-llama/Llama-3.2-1B")
    assert name == "llama-3.2-1b" and cfg["num_hidden_layers"] == 16
    (tmp_path / "config.json").write_text(json.dumps(config("gpt2")))
    assert find_config(str(tmp_path))[1]["n_layer"] == 12


@pytest.mark.parametrize("kwargs,needle", [
    (dict(batch=0), "--batch"), (dict(batch=2**31), "--batch"), (dict(batch=2.0), "--batch"),
    (dict(batch=True), "--batch"), (dict(seq=2**31), "--seq"), (dict(r=2**21), "--r"),
    (dict(dropout=math.nan), "--dropout"), (dict(dropout=math.inf), "--dropout"),
    (dict(model_dropout=-0.1), "--model-dropout"),
])
def test_run_settings_are_bounded(kwargs, needle):
    with pytest.raises(LoraCostError, match=needle):
        RunConfig(**kwargs)


def run(*args):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("args,needle", [
    (["--budget", "inf"], "--budget"), (["--budget", "nan"], "--budget"), (["--budget", "1e-9"], "at least one byte"),
    (["--budget", "-1"], "--budget"), (["--budget", "2e18"], "--budget must be"),
    (["--gpu", "h100-80gb", "--utilisation", "0"], "--utilisation"),
    (["--gpu", "h100-80gb", "--utilisation", "-0.4"], "--utilisation"),
    (["--gpu", "h100-80gb", "--utilisation", "nan"], "--utilisation"),
    (["--gpu", "h100-80gb", "--utilisation", "inf"], "--utilisation"),
    (["--gpu", "h100-80gb", "--utilisation", "5e-324"], "--utilisation"),
    (["--gpu", "h100-80gb", "--margin", "nan"], "--margin"),
    (["--gpu", "h100-80gb", "--batch", "1-" + "9" * 20], "--batch must be at most"),
    (["--gpu", "h100-80gb", "--r", "1-" + "9" * 5000], "--r must be an integer"),
])
def test_plan_numbers_are_checked(args, needle):
    out = run("plan", "--model", "gpt2", "--methods", "lora", "--json", *args)
    assert out.exit_code == 2, out.output
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]


def test_batch_range_is_bisected_not_listed():
    # peak memory grows with the batch, so the largest fitting batch of 1..10^9 is the one of 1..2^12
    # whenever that one is below 2^12; listing 10^9 batch sizes would take gigabytes
    kwargs = dict(gpu="a10g-24gb", methods=("lora",), seq=512, rank_range=(8, 8))
    wide = plan("gpt2", batch_range=(1, 10**9), **kwargs)
    narrow = plan("gpt2", batch_range=(1, 2**12), **kwargs)
    best = wide.methods[0].max_batch.batch
    assert 1 < best < 2**12 and best == narrow.methods[0].max_batch.batch
    assert wide.estimates < 200


def test_targets_with_full_fine_tuning_is_an_error():
    out = run("estimate", "--model", "gpt2", "--method", "full", "--targets", "c_attn")
    assert out.exit_code == 2 and "--targets does not apply to full fine-tuning" in out.stderr
    assert run("plan", "--model", "gpt2", "--methods", "full,lora", "--targets", "c_attn", "--gpu", "h100-80gb",
               "--json").exit_code == 0  # a plan applies the targets to the adapter methods only


def test_json_is_strict_and_byte_counts_are_integers():
    out = run("estimate", "--model", "gpt2", "--gpu", "t4-16gb", "--json")
    doc = json.loads(out.stdout, parse_constant=lambda c: pytest.fail(f"non-finite {c} in --json"))
    assert isinstance(doc["memory"]["peak_bytes"], int) and isinstance(doc["gpu"]["headroom_bytes"], int)


@pytest.mark.parametrize("args,needle", [(["profile", "missing.py"], "script not found"),
                                         (["estimate", "--model", "missing", "--engine", "trace"], "unknown model")])
def test_bad_input_is_refused_before_torch_is_imported(tmp_path, args, needle):
    code = ("import sys; from lora_cost.cli import main\n"
            "try: main(sys.argv[1:])\n"
            "except SystemExit as e: print('torch' in sys.modules, e.code)")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.split() == ["False", "2"] and needle in out.stderr and out.stderr.count("\n") == 1


def test_parse_range_bounds():
    assert parse_range("1-1000000000", "batch") == (1, 10**9)
    with pytest.raises(LoraCostError, match="at most"):
        parse_range("1-2000000000", "batch")
