from pathlib import Path

import pytest

CALIBRATION = Path(__file__).resolve().parent.parent.parent / "shared" / "calibration" / "h100-measured.jsonl"


@pytest.fixture
def calibration_path():
    if not CALIBRATION.is_file():
        pytest.skip(f"calibration data not present at {CALIBRATION} (it ships in ../shared beside the repo)")
    return CALIBRATION
