"""The analytic engine's numbers are stable: each configuration of tests/golden/estimates.jsonl must
give exactly the numbers recorded there (rewrite the file with tests/golden/make_golden.py only for a
deliberate, measured change, and say so in the commit)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "golden"))

from make_golden import GOLDEN, compute  # noqa: E402

pytestmark = pytest.mark.fast


def _rows():
    return [json.loads(line) for line in GOLDEN.read_text().splitlines() if line.strip()]


def test_golden_file_is_large_enough():
    assert len(_rows()) >= 29 + 168 + 100


def test_estimates_unchanged(tmp_path):
    changed = []
    for row in _rows():
        got = compute(row["case"], tmp_path)
        if got != row["numbers"]:
            changed.append(row["case"])
    assert not changed, f"{len(changed)} estimates changed, first: {changed[:3]}"
