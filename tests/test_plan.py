"""`lora-cost plan`: monotone searches, the budget rule, nothing-fits answers, JSON, speed."""

import json
import time

import pytest
from click.testing import CliRunner

from lora_cost import estimate
from lora_cost.cli import main
from lora_cost.analytic.planner import parse_range, plan, rank_candidates

pytestmark = pytest.mark.fast


def test_largest_rank_and_batch_are_the_boundary():
    budget = 24 * 2**30
    p = plan("llama-3.1-8b", budget_bytes=budget, methods=("lora",), seq=2048, batch_range=(1, 16))
    ck = next(mp for mp in p.methods if mp.grad_checkpointing)
    assert ck.max_rank is not None and ck.max_rank.fits
    # the next rank up does not fit
    nxt = [r for r in p.ranks if r > ck.max_rank.r]
    if nxt:
        e = estimate("llama-3.1-8b", "lora", r=nxt[0], seq=2048, grad_checkpointing=True)
        assert e.memory.device_bytes > budget
    # the batch one above the largest does not fit
    b = ck.max_batch.batch
    e = estimate("llama-3.1-8b", "lora", r=ck.reference_r, batch=b + 1, seq=2048, grad_checkpointing=True)
    assert e.memory.device_bytes > budget
    assert ck.max_batch.device_bytes <= budget


def test_margin_shrinks_the_usable_budget():
    p = plan("gpt2", budget_bytes=10**10, margin=0.25, methods=("lora",))
    assert p.usable_bytes == 7.5 * 10**9


def test_nothing_fits_gives_the_smallest_configuration():
    p = plan("llama-3.1-70b", budget_bytes=8 * 2**30, methods=("lora", "qlora"))
    assert all(mp.max_rank is None and mp.max_batch is None for mp in p.methods)
    assert p.smallest is not None and p.smallest.method == "qlora" and p.smallest.grad_checkpointing
    assert p.smallest.device_bytes > 8 * 2**30


def test_default_70b_plan_is_fast_and_torch_free():
    t0 = time.perf_counter()
    p = plan("llama-3.1-70b", gpu="h100-80gb")
    assert time.perf_counter() - t0 < 1.0, p.estimates
    assert any(mp.max_batch for mp in p.methods if mp.method == "qlora")


def test_ranges():
    assert parse_range("4-256", "r") == (4, 256)
    assert rank_candidates(4, 256) == (4, 8, 16, 32, 64, 128, 256)
    assert rank_candidates(3, 20) == (3, 4, 8, 16, 20)
    with pytest.raises(Exception):
        parse_range("10-2", "r")


def test_cli_json_and_errors(tmp_path):
    out = CliRunner().invoke(main, ["plan", "--model", "gpt2", "--budget", "4GiB", "--methods", "lora,full", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["budget_bytes"] == 4 * 2**30 and {m["method"] for m in doc["methods"]} == {"lora", "full"}
    bad = CliRunner().invoke(main, ["plan", "--model", "gpt2"])
    assert bad.exit_code == 2 and "--budget or a --gpu" in bad.output
    bad = CliRunner().invoke(main, ["plan", "--model", "gpt2", "--budget", "lots"])
    assert bad.exit_code == 2 and "memory size" in bad.output


def test_html_is_self_contained_and_escaped(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 4096}
    d = tmp_path / "<img src=x onerror=alert(1)>"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    out_path = tmp_path / "r.html"
    out = CliRunner().invoke(main, ["plan", "--model", str(d), "--budget", "1GiB", "--html", str(out_path)])
    assert out.exit_code == 0, out.output
    text = out_path.read_text()
    assert "<img src=x" not in text and "&lt;img src=x" in text
    # plotly.js is embedded: no tag loads anything from elsewhere
    import re
    assert not re.search(r"<script[^>]*\bsrc=", text) and not re.search(r"<link[^>]*\bhref=[\"']?https?:", text)
    assert "plotly.js v" in text or "Plotly" in text[:4_000_000]
    assert text.count("Plotly.newPlot") == 4
