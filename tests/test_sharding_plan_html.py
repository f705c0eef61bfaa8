"""`lora-cost plan --gpus ... --html` (task "sharding2"): one self-contained page with the busiest rank's memory
against the GPU count per strategy, the step time, and the cheapest configuration that fits (fewest GPUs, then
the fastest step), the same one `--json` names."""

import json
import re

import pytest
from click.testing import CliRunner

from lora_cost.cli import main

pytestmark = pytest.mark.fast

ARGS = ["plan", "--model", "llama-3.1-70b", "--gpu", "h100-80gb", "--gpus", "1,2,4,8,16", "--sharding",
        "ddp,fsdp,zero3", "--methods", "lora,full", "--seq", "512"]


def test_html_plan_over_gpu_counts(tmp_path):
    out = tmp_path / "plan.html"
    result = CliRunner().invoke(main, ARGS + ["--html", str(out), "--json"])
    assert result.exit_code == 0, result.output
    best = json.loads(result.output)["best"]
    text = out.read_text()
    assert not re.search(r"<script[^>]*\bsrc=", text)  # plotly.js embedded: nothing loads from elsewhere
    assert text.count("Plotly.newPlot") == 2  # memory against GPU count, step time against GPU count
    # every strategy x method has its line (the one-GPU point starts each), and the verdict names the best
    for name in ("lora / ddp", "lora / fsdp", "lora / zero3", "full / fsdp", "full / zero3"):
        assert name.replace("/", "\\u002f") in text  # plotly writes "/" in its JSON as \u002f
    assert best is not None
    assert (f"Cheapest configuration that fits</b> (fewest GPUs, then fastest step): {best['method']} on "
            f"{best['gpus']} GPU(s) with {best['sharding']}") in text


def test_html_plan_escapes_and_says_nothing_fits(tmp_path):
    out = tmp_path / "plan.html"
    args = ["plan", "--model", "llama-3.1-70b", "--gpu", "rtx-4090-24gb", "--gpus", "1,2", "--sharding", "fsdp",
            "--methods", "full", "--html", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "No configuration fits." in out.read_text()


def test_largest_batch_per_point_fits_and_one_more_does_not():
    from lora_cost import estimate
    result = CliRunner().invoke(main, ["plan", "--model", "llama-3.1-8b", "--gpu", "rtx-4090-24gb", "--gpus", "1,4",
                                       "--sharding", "fsdp,zero3", "--methods", "lora", "--seq", "1024", "--batch",
                                       "1-64", "--json"])
    assert result.exit_code == 0, result.output
    points = [p for p in json.loads(result.output)["points"] if p["max_batch"] is not None]
    assert points
    for p in points:
        extra = {} if p["gpus"] == 1 else dict(gpus=p["gpus"], sharding=p["sharding"])
        at = lambda b: estimate("llama-3.1-8b", "lora", seq=1024, batch=b, gpu="rtx-4090-24gb", **extra).gpu.fits  # noqa: E731
        assert at(p["max_batch"]) and (p["max_batch"] == 64 or not at(p["max_batch"] + 1)), p
