"""--alloc-conf and --paged-evictable on the CLI: bad input is one line and exit 2; the JSON carries the
device total's parts and the verdict (analytic engine: no torch)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lora_cost.cli import main

pytestmark = pytest.mark.fast


def run(*args):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("conf", ["max_split_size_mb:abc", "max_split_size_mb:20", "expandable_segments:maybe",
                                  "garbage_collection_threshold:2", "nokey", "backend:cudaMallocAsync",
                                  "roundup_power2_divisions:3", "unknown_option:1"])
def test_bad_alloc_conf_is_one_line_and_exit_2(conf):
    out = run("estimate", "--model", "gpt2", "--alloc-conf", conf)
    assert out.exit_code == 2 and len(out.output.strip().splitlines()) == 1 and "Traceback" not in out.output


def test_paged_evictable_needs_a_paged_optimizer_on_the_cli():
    out = run("estimate", "--model", "gpt2", "--paged-evictable")
    assert out.exit_code == 2 and "paged optimizers only" in out.output


def test_json_has_the_device_parts_and_the_verdict():
    out = run("estimate", "--model", "llama-2-7b", "--method", "qlora", "--optimizer", "paged-adamw-32bit",
              "--gpu", "h100-80gb", "--json", "--alloc-conf", "expandable_segments:True")
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    m = doc["memory"]
    assert m["device_bytes"] == m["reserved_bytes"] + m["context_bytes"] + m["paged_optimizer_bytes"]
    assert m["paged_optimizer_resident"] and m["paged_optimizer_bytes"] > 0
    assert m["fragmentation_bytes"] == m["reserved_bytes"] - m["peak_bytes"]
    assert doc["gpu"]["verdict"] == "fits" and any("--alloc-conf" in a for a in doc["assumptions"])
    evictable = json.loads(run("estimate", "--model", "llama-2-7b", "--method", "qlora", "--optimizer",
                               "paged-adamw-32bit", "--json", "--paged-evictable").output)["memory"]
    assert evictable["device_bytes"] == m["device_bytes"] - m["paged_optimizer_bytes"]
