"""A seeded fuzz run of the CLI: bad and odd input never ends in a traceback or a wrong answer.

Inputs are drawn (fixed seed, fixed count) from the classes of bad input the CLI must answer cleanly:
config.json fields of the bundled profiles replaced by values of the wrong type or range (strings,
lists, booleans, floats for integer fields, NaN, infinities, 1e308, integers of 5,000 digits, 10^12
layers), whole files that are not UTF-8 or not JSON or nested 100,000 deep, names longer than a file
name may be, and flag values that are NaN, infinite, zero, negative, huge, non-numeric or ranges of
a billion. Every call goes in-process through click's CliRunner (no torch: the trace engine and the
profiler are not called). Each must end in exit code 0, with sane numbers and, under --json, valid
JSON (no NaN or Infinity) whose byte counts are non-negative integers, or in exit code 2 with one
line on stderr. Run `pytest -s -m fast tests/test_fuzz_cli.py` to see the counts.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_cost.cli import main
from lora_cost.analytic.methods import all_methods
from lora_cost.analytic.methods.base import all_options
from lora_cost.profiles import bundled_models

# torch-free but ~15 s: left out of the `-m fast` editing subset (it runs in the full suite and CI)

SEED = 20261130
CASES = {"estimate": 3000, "plan": 150, "report": 60, "listing": 12}

# values that replace a config.json field: wrong types, non-finite, out of range, and plain odd sizes
ODD_VALUES = ["3072", "64", "", "llama", [64], [], {"a": 1}, True, False, None, math.nan, math.inf, -math.inf,
              1e308, -1e308, 16.0, 1.5, 0.5, 0.0, -0.0, 0, -1, -4096, 10**12, 10**100, 2**63, 0.1, 0.99, 1.0]
PLAUSIBLE_VALUES = [None, 1, 2, 3, 4, 7, 8, 13, 64, 100, 128, 1000, 4096, 65536, 10**5, False, True, 0.0, 0.1]
EXTRA_FIELDS = ["n_inner", "type_vocab_size", "sliding_window", "use_sliding_window", "head_dim", "num_key_value_heads",
                "model_type", "tie_word_embeddings", "attention_bias", "mlp_bias", "attention_dropout"]
FLAG_NUMBERS = ["nan", "NaN", "inf", "-inf", "Infinity", "0", "-1", "-0.4", "5e-324", "1e-9", "1e308", "1e999",
                "0.5", "1", "2", "8", "16", "64", "3000", "999999999999", "1" * 5000, "abc", "", "1.5", "0x10"]
NAMES = ["gpt2", "llama-3.2-1b", "qwen2.5-0.5b", "roberta-base", "mistral-7b", "llama-2-7b", "gpt3-175b",
         "no-such-model", "x" * 300, "y" * 5000, "gpt2\x00", "/nonexistent/config.json", "~", "llama2-7b"]
METHODS = list(all_methods())  # every registered method, with its own options below
GPUS = ["h100-80gb", "rtx-4090-24gb", "t4-16gb", "no-such-gpu", "z" * 5000, "H100-80GB"]
TARGETS = ["all-linear", "q_proj,v_proj", "c_attn", "query,value", "dense", "q_proj", "nothing", ",", " ", "x" * 500]


def _config_file(rng: random.Random, tmp: Path, i: int) -> str:
    """A bundled config with one to three fields replaced, removed or added, or a broken file."""
    roll = rng.random()
    path = tmp / f"cfg{i}.json"
    if roll < 0.04:
        path.write_bytes(rng.choice([b"\xff\xfe{}", b"{\"model_type\": \"llama\xe9\"}", b"", b"[1, 2]", b"{not json",
                                     b"[" * 100_000 + b"]" * 100_000, b"{\"a\":" * 50_000 + b"1" + b"}" * 50_000]))
        return str(path)
    if roll < 0.06:  # an integer of 5,000 digits (json refuses more than 4,300)
        path.write_text('{"model_type": "gpt2", "n_embd": ' + "7" * 5000 + "}")
        return str(path)
    if roll < 0.08:
        (tmp / f"dir{i}").mkdir()
        return str(tmp / f"dir{i}")  # a directory without config.json
    cfg = dict(rng.choice(list(bundled_models().values())).config)
    for _ in range(rng.randint(1, 2)):
        key = rng.choice(list(cfg) + EXTRA_FIELDS)
        if rng.random() < 0.1:
            cfg.pop(key, None)
        else:
            cfg[key] = rng.choice(ODD_VALUES if rng.random() < 0.35 else PLAUSIBLE_VALUES)
    if rng.random() < 0.2:  # a directory holding the config
        (tmp / f"dir{i}").mkdir()
        path = tmp / f"dir{i}" / "config.json"
        path.write_text(json.dumps(cfg))
        return str(path.parent)
    path.write_text(json.dumps(cfg))  # NaN and Infinity are written as json.dumps writes them
    return str(path)


def _model(rng: random.Random, tmp: Path, i: int) -> str:
    roll = rng.random()
    return rng.choice(NAMES[:7]) if roll < 0.45 else rng.choice(NAMES[7:]) if roll < 0.5 else _config_file(rng, tmp, i)


def _maybe(rng: random.Random, p: float, *flag_values) -> list[str]:
    return list(flag_values) if rng.random() < p else []


def _estimate_args(rng: random.Random, tmp: Path, i: int) -> list[str]:
    num = lambda good: rng.choice(good) if rng.random() < 0.85 else rng.choice(FLAG_NUMBERS)  # noqa: E731
    method = rng.choice(METHODS) if rng.random() < 0.95 else rng.choice(["LoRA", "nope"])
    args = ["estimate", "--model", _model(rng, tmp, i), "--method", method, "--json"]
    args += _maybe(rng, 0.5 if method != "full" else 0.05, "--r", num(["1", "4", "8", "16", "64", "256", "4096"]))
    args += _maybe(rng, 0.5, "--batch", num(["1", "2", "4", "16"]))
    args += _maybe(rng, 0.5, "--seq", num(["1", "128", "512", "2048", "8192", "100000"]))
    args += _maybe(rng, 0.2 if method != "full" else 0.05, "--dropout", num(["0", "0.05", "0.1", "0.9"]))
    args += _maybe(rng, 0.2, "--model-dropout", num(["0", "0.1", "0.5"]))
    args += _maybe(rng, 0.2 if method != "full" else 0.05, "--targets", rng.choice(TARGETS))
    args += _maybe(rng, 0.3, "--gpu", rng.choice(GPUS))
    args += _maybe(rng, 0.2, "--precision", rng.choice(["fp32", "bf16", "fp16", "amp-bf16", "amp-fp16", "fp8"]))
    args += _maybe(rng, 0.15, "--optimizer", rng.choice(["adamw", "sgd", "adafactor", "paged-adamw-8bit", "nope"]))
    args += _maybe(rng, 0.1, "--attention", rng.choice(["sdpa", "eager", "flash"]))
    args += _maybe(rng, 0.3, "--grad-checkpointing")
    args += _method_options(rng, method, num)
    if rng.random() < 0.1:
        args.remove("--json")
    return args


OPTION_VALUES = ["1", "2", "8", "16", "20", "64", "1000", "1048576", "1048577", "1" + "0" * 200, "1e200", "0", "-3",
                 "nan", "inf", "0.5", "abc", ""]


def _method_options(rng: random.Random, method: str, num) -> list[str]:
    """The method's own option flags (from its typed options), and now and then another method's."""
    args = []
    for option, methods in all_options().items():
        own = method in methods
        if rng.random() < (0.35 if own else 0.03):
            if option.type is bool:
                args.append(rng.choice([option.flag, "--no-" + option.flag[2:]]))
            elif option.choices:
                args += [option.flag, rng.choice(list(option.choices) + ["nope"])]
            else:
                args += [option.flag, num(OPTION_VALUES)]
    return args


def _plan_args(rng: random.Random, tmp: Path, i: int) -> list[str]:
    model = rng.choice(["gpt2", "qwen2.5-0.5b", "roberta-base", "llama-3.2-1b"]) if rng.random() < 0.8 else \
        _model(rng, tmp, i)
    args = ["plan", "--model", model, "--json", "--methods", ",".join(rng.sample(METHODS, rng.randint(1, 2)))]
    if rng.random() < 0.1:
        args[-1] = rng.choice(["", "nope", "lora,,full"])
    odd = lambda p, good, bad: rng.choice(good) if rng.random() > p else rng.choice(bad)  # noqa: E731
    args += ["--gpu", odd(0.1, GPUS[:3], GPUS[3:])] if rng.random() < 0.5 else \
        ["--budget", odd(0.3, ["24GiB", "40GB", "80e9", "1", "1EiB", "2GiB"],
                         ["inf", "nan", "1e-9", "-1", "0", "1e999", "abc", "2EiB", "1e308TiB"])]
    args += _maybe(rng, 0.2, "--margin", odd(0.4, ["0.1", "10%", "0", "99%"], ["nan", "inf%", "1", "-0.1", "abc"]))
    args += _maybe(rng, 0.3, "--utilisation", odd(0.5, ["0.4", "1", "1e-6"], ["0", "-0.4", "nan", "inf", "5e-324", "2"]))
    args += ["--r", odd(0.2, ["8", "4-16", "1-1024", "8-8", "1-1048576"], ["0", "16-4", "a-b", "1-" + "9" * 30, "-"])]
    args += ["--batch", odd(0.2, ["1-4", "1", "1-1000000000", "2-64"], ["3-2", "0-4", "1-" + "9" * 30, "x"])]
    args += _maybe(rng, 0.3, "--seq", odd(0.3, ["256", "512", "1"], ["0", "-5", "99999999999"]))
    args += _maybe(rng, 0.2, "--targets", rng.choice(TARGETS[:6]))
    args += _maybe(rng, 0.1, "--optimizer", rng.choice(["sgd", "nope"]))
    return args


def _profile_doc() -> dict:
    """A small profile as `lora-cost profile` writes it (the fields the HTML report reads)."""
    cats = {"trainable_params": 10, "frozen_params": 100, "buffers": 0, "gradients": 10, "optimizer_state": 20,
            "saved_activations": 300, "temporaries": 5, "live_total": 445}
    return {"schema": "lora-cost-profile/1", "status": "ok", "exit_code": 0, "script": "train.py", "warmup": 1,
            "memory_source": "cuda-allocator", "model": {"class_name": "GPT2LMHeadModel", "method": "lora"},
            "environment": {"torch": "2.13"}, "oom": None, "warnings": ["w"],
            "measured": [{"index": 2, "phases": [{"phase": "forward", "peak_bytes": 900}, {"phase": "backward",
                                                                                          "peak_bytes": 1000}],
                          "boundaries": [{"name": "step_start", "micro_batch": 0, "memory": dict(cats)}]}],
            "comparison": [{"term": "peak", "unit": "bytes", "measured": 1000, "estimated": 1010, "rel_error": 0.01},
                           {"term": "total", "unit": "flops", "measured": 5e12, "estimated": None, "rel_error": None}]}


def _report_args(rng: random.Random, tmp: Path, i: int) -> list[str]:
    doc = _profile_doc()
    target = rng.choice([doc, doc["measured"][0], doc["measured"][0]["phases"][0],
                         doc["measured"][0]["boundaries"][0]["memory"], doc["comparison"][0]])
    if rng.random() < 0.7:
        key = rng.choice(list(target))
        target[key] = rng.choice(ODD_VALUES + PLAUSIBLE_VALUES + [[1], [None], "x"])
    path = tmp / f"profile{i}.json"
    if rng.random() < 0.1:
        path.write_bytes(rng.choice([b"\xff", b"[" * 100_000, b"{}", b"[]"]))
    else:
        path.write_text(json.dumps(doc))
    html = str(tmp / f"r{i}.html") if rng.random() < 0.9 else rng.choice([str(tmp), "h\x00.html", "h" * 5000,
                                                                          str(tmp / f"profile{i}.json" / "x.html")])
    return ["report", str(path) if rng.random() < 0.9 else rng.choice(NAMES[7:]), "--html", html]


def _listing_args(rng: random.Random) -> list[str]:
    return [rng.choice(["models", "gpus", "methods"])] + _maybe(rng, 0.7, "--json")


# ---- checks --------------------------------------------------------------------------------------
def _walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for k, v in enumerate(node):
            yield from _walk(v, f"{path}[{k}]")
    else:
        yield path, node


def _problems(args: list[str], result) -> list[str]:
    """What is wrong with one call's outcome (empty: nothing)."""
    out = []
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        out.append(f"raised {type(result.exception).__name__}: {result.exception}")
    if result.exit_code not in (0, 2):
        out.append(f"exit code {result.exit_code}: {result.stderr.strip()[:300]}")
    if "Traceback" in result.output or "Traceback" in result.stderr:
        out.append("printed a traceback")
    if result.exit_code == 2 and len(result.stderr.strip().splitlines()) != 1 \
            and "Usage:" not in result.stderr:  # click's own usage errors keep click's form
        out.append(f"error is not one line: {result.stderr.strip()[:300]}")
    if result.exit_code != 0 or "--json" not in args:
        return out
    try:
        doc = json.loads(result.stdout, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except ValueError as exc:
        return out + [f"--json printed invalid JSON ({exc})"]
    for path, value in _walk(doc):
        if isinstance(value, float) and not math.isfinite(value):
            out.append(f"{path} = {value}")
        name = path.rsplit(".", 1)[-1]
        if name.endswith("_bytes") or name == "bytes":
            signed = name == "headroom_bytes"  # memory less need: negative when it does not fit
            if not isinstance(value, int) or isinstance(value, bool) or (value < 0 and not signed):
                out.append(f"{path} = {value!r} is not a byte count")
    if args[0] == "estimate":
        mem, flops = doc["memory"], doc["flops"]
        if not mem["device_bytes"] >= mem["peak_bytes"] >= mem["steady_bytes"] > 0:
            out.append(f"memory not sane: device {mem['device_bytes']}, peak {mem['peak_bytes']}, steady {mem['steady_bytes']}")
        if not (flops["forward"] > 0 and flops["backward"] > 0 and flops["total"] == flops["forward"] + flops["backward"]):
            out.append(f"FLOPs not sane: {flops['forward']}, {flops['backward']}, {flops['total']}")
        if not (doc["trainable_params"] > 0 and doc["total_params"] > 0):  # adapters are not in total_params
            out.append(f"parameters not sane: {doc['trainable_params']} of {doc['total_params']}")
    if args[0] == "plan":
        for m in doc["methods"]:
            for p in (m["max_rank"], m["max_batch"], *m["rank_curve"]):
                if p and not (p["device_bytes"] >= p["peak_bytes"] > 0 and p["flops_per_step"] > 0):
                    out.append(f"plan point not sane: {p['method']} r={p['r']} b={p['batch']}")
                if p and p["fits"] and p["device_bytes"] > doc["usable_bytes"]:
                    out.append(f"a point that does not fit is marked as fitting: {p['method']} r={p['r']}")
    return out


@lru_cache(maxsize=1)
def _fuzz() -> tuple[Counter, tuple[tuple[str, str], ...], float]:
    """Run every case once: (outcome counts, problems as (command line, problem), seconds)."""
    import tempfile
    rng = random.Random(SEED)
    runner = CliRunner()
    counts: Counter = Counter()
    problems = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        calls = [("estimate", lambda i: _estimate_args(rng, tmp, i))] * CASES["estimate"] + \
                [("plan", lambda i: _plan_args(rng, tmp, i))] * CASES["plan"] + \
                [("report", lambda i: _report_args(rng, tmp, i))] * CASES["report"] + \
                [("listing", lambda i: _listing_args(rng))] * CASES["listing"]
        for i, (kind, make) in enumerate(calls):
            args = make(i)
            t = time.perf_counter()
            result = runner.invoke(main, args)
            counts[(kind, result.exit_code)] += 1
            counts[(kind, "seconds")] += time.perf_counter() - t
            for p in _problems(args, result):
                shown_args = " ".join(a if len(a) < 80 else a[:40] + f"...({len(a)} chars)" for a in args)
                problems.append((shown_args, p))
    return counts, tuple(problems), time.perf_counter() - t0


@pytest.mark.parametrize("kind", list(CASES))
def test_every_call_ends_cleanly(kind):
    _, problems, _ = _fuzz()
    mine = [f"lora-cost {args}\n    {p}" for args, p in problems if args.split()[0] == kind or
            (kind == "listing" and args.split()[0] in ("models", "gpus", "methods"))]
    assert not mine, f"{len(mine)} bad outcome(s):\n" + "\n".join(mine[:20])


def test_fuzz_summary():
    counts, problems, seconds = _fuzz()
    codes = {key: n for key, n in counts.items() if key[1] != "seconds"}
    total = sum(codes.values())
    print(f"\nfuzz (seed {SEED}): {total} CLI calls in {seconds:.1f} s; "
          f"exit 0: {sum(n for (k, c), n in codes.items() if c == 0)}, "
          f"exit 2: {sum(n for (k, c), n in codes.items() if c == 2)}, "
          f"other: {sum(n for (k, c), n in codes.items() if c not in (0, 2))}, problems: {len(problems)}")
    for kind in CASES:
        print(f"  {kind:9s} " + ", ".join(f"exit {c}: {n}" for (k, c), n in sorted(codes.items()) if k == kind)
              + f" ({counts[(kind, 'seconds')]:.1f} s)")
    assert total == sum(CASES.values())
    # both outcomes occur for the commands that take input, so the run exercises answers and refusals
    for kind in ("estimate", "plan", "report"):
        assert counts[(kind, 0)] > 0 and counts[(kind, 2)] > 0, (kind, counts)
