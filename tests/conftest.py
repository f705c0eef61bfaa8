import json
import re
import sys
from pathlib import Path

import pytest

CALIBRATION = Path(__file__).resolve().parent.parent.parent / "shared" / "calibration" / "h100-measured.jsonl"

# `pytest -m fast` is the torch-free subset to run while editing (seconds, one core). pytest imports
# every test module before it filters by marker, and the torch-backed modules import torch at the
# top (pytest.importorskip), which alone takes seconds: under `-m fast` only modules that carry the
# `fast` mark somewhere are collected, and the session fails if torch was imported anyway.
HEAVY = ("torch", "transformers", "peft")


def _fast_only(config) -> bool:
    return bool(re.search(r"(?<!not )\bfast\b", config.getoption("markexpr", "") or ""))


def pytest_ignore_collect(collection_path: Path, config):
    if _fast_only(config) and collection_path.is_file() and collection_path.name.startswith("test_") \
            and collection_path.suffix == ".py":
        return "pytest.mark.fast" not in collection_path.read_text()
    return None


def pytest_sessionfinish(session, exitstatus):
    heavy = [m for m in HEAVY if m in sys.modules]
    if _fast_only(session.config) and heavy:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"\n-m fast imported {', '.join(heavy)}: a test marked fast needs it (unmark it)", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def calibration_path():
    if not CALIBRATION.is_file():
        pytest.skip(f"calibration data not present at {CALIBRATION} (it ships in ../shared beside the repo)")
    return CALIBRATION


@pytest.fixture
def config_file(tmp_path):
    """Writes a tiny model's config.json under tmp_path and returns its path: `config_file(cfg)`."""
    def write(cfg: dict, name: str | None = None) -> str:
        path = tmp_path / (name or cfg["model_type"]) / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cfg))
        return str(path)
    return write
