"""`lora-cost plan`: monotone searches, the budget rule, nothing-fits answers, JSON, the number of estimates."""

import json

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
    # fresh estimates bracket each answer: the largest rank fits and the next candidate up does not
    # (on 24 GiB the boundary lies inside 1..1024, so the next candidate exists)
    r = ck.max_rank.r
    nxt = p.ranks[p.ranks.index(r) + 1]
    assert estimate("llama-3.1-8b", "lora", r=r, seq=2048, grad_checkpointing=True).memory.device_bytes <= budget
    assert estimate("llama-3.1-8b", "lora", r=nxt, seq=2048, grad_checkpointing=True).memory.device_bytes > budget
    # the largest batch fits and the batch one above it does not
    b = ck.max_batch.batch
    kw = dict(r=ck.reference_r, seq=2048, grad_checkpointing=True)
    assert estimate("llama-3.1-8b", "lora", batch=b, **kw).memory.device_bytes <= budget
    assert estimate("llama-3.1-8b", "lora", batch=b + 1, **kw).memory.device_bytes > budget


def test_margin_shrinks_the_usable_budget():
    p = plan("gpt2", budget_bytes=10**10, margin=0.25, methods=("lora",))
    assert p.usable_bytes == 7.5 * 10**9


def test_nothing_fits_gives_the_smallest_configuration():
    p = plan("llama-3.1-70b", budget_bytes=8 * 2**30, methods=("lora", "qlora"))
    assert all(mp.max_rank is None and mp.max_batch is None for mp in p.methods)
    assert p.smallest is not None and p.smallest.method == "qlora" and p.smallest.grad_checkpointing
    assert p.smallest.device_bytes > 8 * 2**30


def test_default_70b_plan_bisects_instead_of_sweeping():
    # Speed as a count of estimates, not a wall-clock time (that belongs in benchmarks/). Per method
    # and checkpointing setting the plan evaluates at most: the rank curve at batch 1 (the 11 powers
    # of two 1..1024, all <= the 1024 outputs of k_proj; full fine-tuning: 1), a bisection of the 64
    # batches at the reference rank (at most 7 probes, ceil(log2(65))), and one more for each of the
    # 8 ladder lengths 256..32768 within the 131,072 positions (2048 among them): 11 + 7 + 8*7 = 74
    # for each of 5 adapter methods, 1 + 7 + 56 = 64 for full, x2 settings: 2 * (5 * 74 + 64) = 868.
    # A sweep of the same space would be 6 methods x 2 x 11 ranks x 64 batches x 8 lengths = 67,584.
    p = plan("llama-3.1-70b", gpu="h100-80gb")
    assert p.estimates <= 2 * (5 * (11 + 7 + 8 * 7) + (1 + 7 + 8 * 7)) == 868
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
