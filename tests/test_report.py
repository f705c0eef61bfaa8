"""`lora-cost report`: a real profile (examples/train_tiny.py under the profiler) rendered as HTML."""

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_cost.cli import main

pytest.importorskip("torch")
pytest.importorskip("peft")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_tiny.py"


@pytest.fixture(scope="module")
def profile_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "run.json"
    r = CliRunner().invoke(main, ["profile", str(EXAMPLE), "--warmup", "1", "--steps", "2", "--out", str(out),
                                  "--", "--steps", "4"])
    assert r.exit_code == 0, r.output
    return out


def test_report_html_from_profile(profile_json, tmp_path):
    html_path = tmp_path / "run.html"
    r = CliRunner().invoke(main, ["report", str(profile_json), "--html", str(html_path)])
    assert r.exit_code == 0, r.output
    text = html_path.read_text()
    doc = json.loads(profile_json.read_text())
    # the measured-vs-estimated table carries every compared term with its numbers
    for c in doc["comparison"]:
        assert f"<td>{c['term']}</td>" in text and f"{c['measured']:,}" in text
    assert text.count("Plotly.newPlot") == 4  # memory terms, FLOPs, phase peaks, categories at boundaries
    assert not re.search(r"<script[^>]*\bsrc=", text)


def test_report_errors(tmp_path):
    missing = CliRunner().invoke(main, ["report", str(tmp_path / "nope.json"), "--html", str(tmp_path / "x.html")])
    assert missing.exit_code == 2 and "cannot read" in missing.output
    other = tmp_path / "other.json"
    other.write_text('{"a": 1}')
    r = CliRunner().invoke(main, ["report", str(other), "--html", str(tmp_path / "x.html")])
    assert r.exit_code == 2 and "not a lora-cost profile" in r.output
