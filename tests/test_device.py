"""Device memory and GPU fit (analytic/device.py), checked by hand arithmetic."""

from __future__ import annotations

import pytest

from lora_cost.analytic.cuda_context import context_for
from lora_cost.analytic.device import device_bytes, device_memory, gpu_fit, verdict
from lora_cost.errors import LoraCostError
from lora_cost.profiles import load_gpu

pytestmark = pytest.mark.fast

LLAMA_H100 = 810_352_640  # 772.8125 MiB: device used - reserved on the H100 Llama rows (profiles/cuda_context.json),
# the largest H100 figure: the one used for every family (GPT-2's rows measured 750.8125 MiB)
SPREAD = 22 * (1 << 20)  # largest minus smallest H100 figure
GPT2_H100 = LLAMA_H100


def test_device_bytes_adds_slack_context_and_paged_state():
    # 10^9 x 1.10 = 1,100,000,000; + the Llama context on the H100, 810,352,640 = 1,910,352,640; + 4,096 paged
    assert device_bytes(10**9) == 1_910_352_640
    assert device_bytes(10**9, 4096) == 1_910_356_736


def test_context_per_gpu_and_family():
    assert (context_for(None, "gpt2").bytes, context_for("h100-80gb", "llama").bytes) == (GPT2_H100, LLAMA_H100)
    assert context_for("h100-80gb", "gpt2").measured and context_for("h100-80gb", "gpt2").spread_bytes == SPREAD
    unknown = context_for("h100-80gb", "t5")  # a family not measured: the same figure and spread
    assert (unknown.bytes, unknown.measured, unknown.spread_bytes) == (LLAMA_H100, True, SPREAD)
    other = context_for("t4-16gb", "gpt2")  # no T4 measurement: said so
    assert not other.measured and "no measurement" in other.source


def test_paged_state_is_resident_unless_evictable():
    resident = device_memory(10**9, peak_bytes=9 * 10**8, family="gpt2", paged_bytes=10**8)
    evictable = device_memory(10**9, peak_bytes=9 * 10**8, family="gpt2", paged_bytes=10**8, paged_evictable=True)
    assert resident.device_bytes == 10**9 + GPT2_H100 + 10**8
    assert evictable.device_bytes == 10**9 + GPT2_H100 and not evictable.paged_resident
    assert resident.fragmentation_bytes == 10**8  # reserved - allocated peak when the replay gives none


def test_verdict_is_tight_within_the_uncertainty():
    assert verdict(100, 80, 10) == "fits"
    assert verdict(100, 95, 10) == "tight" and verdict(100, 105, 10) == "tight"
    assert verdict(100, 120, 10) == "does not fit"


def test_paged_evictable_needs_a_paged_optimizer():
    from lora_cost import estimate
    with pytest.raises(LoraCostError, match="paged optimizers only"):
        estimate("gpt2", "lora", r=8, paged_evictable=True)
    e = estimate("gpt2", "lora", r=8, optimizer="paged-adamw-32bit", paged_evictable=True)
    assert e.memory.device.paged_bytes > 0 and not e.memory.device.paged_resident


def test_gpu_fit_on_h100():
    h100 = load_gpu("h100-80gb")  # 85,520,809,984 B; 989.4 dense bf16 TFLOP/s; 66.9 fp32
    fit = gpu_fit(h100, 80_000_000_000, 989_400_000_000_000, "bf16", 0.5)
    # 989.4e12 FLOPs at half of 989.4 TFLOP/s: 2 s
    assert fit.fits and fit.headroom_bytes == 5_520_809_984 and fit.step_time_s == pytest.approx(2.0)
    assert fit.verdict == "fits"
    fp32 = gpu_fit(h100, 90_000_000_000, 66_900_000_000_000, "fp32", 0.25)
    # 66.9e12 FLOPs at a quarter of 66.9 TFLOP/s: 4 s; 90 GB do not fit 85.5 GB
    assert not fp32.fits and fp32.headroom_bytes == -4_479_190_016 and fp32.step_time_s == pytest.approx(4.0)
    assert gpu_fit(h100, 85_000_000_000, 1, "bf16", 0.5, uncertainty=10**9).verdict == "tight"
