"""The estimator against every measured H100 step in ../shared/calibration (issue 2's accuracy bar)."""

import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from score_calibration import score  # noqa: E402

pytestmark = pytest.mark.fast


def test_calibration_accuracy(calibration_path):
    rows = score(calibration_path)
    assert len(rows) >= 29
    assert all(r["trainable_exact"] for r in rows), [r["name"] for r in rows if not r["trainable_exact"]]
    peaks = [abs(r["peak"]) for r in rows]
    assert max(peaks) <= 0.12, max(zip(peaks, [r["name"] for r in rows]))
    assert statistics.median(peaks) <= 0.05
    for r in rows:
        if r["flops_fwd"] is not None and not r["qlora"]:
            assert abs(r["flops_fwd"]) <= 0.03, r["name"]
        if r["flops_bwd"] is not None:
            assert abs(r["flops_bwd"]) <= 0.03, r["name"]


def test_cli_matches_api_on_calibration_rows(calibration_path):
    """The same numbers come out of `lora-cost estimate --json` (what users and checks run)."""
    import json

    from click.testing import CliRunner

    from lora_cost.cli import main
    from score_calibration import row_to_kwargs

    row = json.loads(calibration_path.read_text().splitlines()[1])
    kw = row_to_kwargs(row)
    args = ["estimate", "--model", kw["model"], "--method", kw["method"], "--batch", str(kw["batch"]), "--seq", str(kw["seq"]),
            "--precision", kw["precision"], "--optimizer", kw["optimizer"], "--attention", kw["attention"], "--json"]
    if kw["method"] != "full":
        args += ["--r", str(kw["r"])] + (["--targets", kw["targets"]] if kw.get("targets") else [])
    if "model_dropout" in kw:
        args += ["--model-dropout", str(kw["model_dropout"])]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["trainable_params"] == row["trainable_params"]
    assert abs(doc["memory"]["peak_bytes"] - row["peak_step"]) / row["peak_step"] < 0.12
