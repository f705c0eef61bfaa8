"""Device memory and GPU fit (analytic/device.py), checked by hand arithmetic."""

from __future__ import annotations

import pytest

from lora_cost.analytic.device import device_bytes, gpu_fit
from lora_cost.profiles import load_gpu

pytestmark = pytest.mark.fast


def test_device_bytes_adds_slack_context_and_paged_state():
    # 10^9 x 1.10 = 1,100,000,000; + 0.75 GiB context (805,306,368) = 1,905,306,368; + 4,096 paged
    assert device_bytes(10**9) == 1_905_306_368
    assert device_bytes(10**9, 4096) == 1_905_310_464


def test_gpu_fit_on_h100():
    h100 = load_gpu("h100-80gb")  # 85,520,809,984 B; 989.4 dense bf16 TFLOP/s; 66.9 fp32
    fit = gpu_fit(h100, 80_000_000_000, 989_400_000_000_000, "bf16", 0.5)
    # 989.4e12 FLOPs at half of 989.4 TFLOP/s: 2 s
    assert fit.fits and fit.headroom_bytes == 5_520_809_984 and fit.step_time_s == pytest.approx(2.0)
    fp32 = gpu_fit(h100, 90_000_000_000, 66_900_000_000_000, "fp32", 0.25)
    # 66.9e12 FLOPs at a quarter of 66.9 TFLOP/s: 4 s; 90 GB do not fit 85.5 GB
    assert not fp32.fits and fp32.headroom_bytes == -4_479_190_016 and fp32.step_time_s == pytest.approx(4.0)
