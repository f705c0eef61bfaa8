"""Method- and optimizer-level quantities against hand arithmetic."""

import pytest

from lora_cost import LoraCostError, estimate
from lora_cost.analytic.methods.base import TensorGroup
from lora_cost.analytic.formulas.storage import nf4_bits_per_weight, nf4_bytes
from lora_cost.analytic.optimizers import get_optimizer

pytestmark = pytest.mark.fast


def test_nf4_double_quant_bits():
    # 4 bits + 8 bits per 64 + 32 bits per 64*256 = 4.127 bits (QLoRA paper Sec. 3)
    assert nf4_bits_per_weight(True) == pytest.approx(4 + 0.125 + 32 / 16384)
    assert round(nf4_bits_per_weight(True), 3) == 4.127
    # one 4096 x 4096 matrix: 8 MiB packed + 262144 uint8 block constants + 1024 fp32 second-level
    # constants + the 256-entry fp32 code + one fp32 offset
    assert nf4_bytes(4096 * 4096) == 8 * 2**20 + 262_144 + 4 * 1024 + 1024 + 4
    assert nf4_bytes(4096 * 4096, double_quant=False) == 8 * 2**20 + 4 * 262_144


def test_qlora_weights_measured_on_h100():
    # calibration row llama-3.2-1b qlora: 1,561,814,016 bytes after prepare_model_for_kbit_training
    # (the 1.05 GB fp32 tied embedding dominates). The estimate counts what bitsandbytes stores.
    e = estimate("llama-3.2-1b", "qlora", r=16, targets="all-linear", batch=2, seq=1024)
    weights = next(t.value for t in e.memory.terms if t.name == "base weights")
    assert abs(weights - 1_561_814_016) / 1_561_814_016 < 0.01


def test_optimizer_states():
    g = TensorGroup("w", 8192, 3, "fp32")
    assert get_optimizer("adamw").state_bytes(g) == 2 * 3 * 8192 * 4
    assert get_optimizer("sgd").state_bytes(g) == 3 * 8192 * 4
    # 8-bit: uint8 state x2 + fp32 absmax per 256 elements x2
    assert get_optimizer("adamw-8bit").state_bytes(g) == 2 * 3 * (8192 + 4 * 32)
    # below bitsandbytes' min_8bit_size the states stay fp32
    assert get_optimizer("adamw-8bit").state_bytes(TensorGroup("b", 100, 1, "fp32")) == 800
    # foreach AdamW holds one state-sized temporary per dtype group
    assert get_optimizer("adamw").step_temporaries([g, TensorGroup("v", 10, 1, "bf16")]) == 3 * 8192 * 4


def test_lora_fa_saves_less_than_lora():
    # LoRA-FA drops lora_A's fp32 input: per adapted module and step n * d_in * 4 bytes
    kw = dict(r=16, targets="all-linear", batch=1, seq=1024)
    lora = estimate("llama-3.2-1b", "lora", **kw)
    fa = estimate("llama-3.2-1b", "lora-fa", **kw)
    n = 1024
    # per block the fp32 input casts: q,k,v share none (one cast each) -> 3 of d=2048, o_proj 2048, gate/up 2 of 2048,
    # down_proj 8192; block 0's attention inputs do not need grads but lora_A still trains and saves them
    per_block = n * 4 * (3 * 2048 + 2048 + 2 * 2048 + 8192)
    assert lora.memory.saved_activation_bytes - fa.memory.saved_activation_bytes == 16 * per_block
    assert fa.trainable_params < lora.trainable_params


def test_paged_optimizer_state_is_outside_the_allocator():
    kw = dict(r=64, targets="all-linear", seq=512)
    plain = estimate("llama-3.2-1b", "lora", optimizer="adamw", **kw)
    paged = estimate("llama-3.2-1b", "lora", optimizer="paged-adamw-32bit", **kw)
    state = 2 * plain.trainable_params * 4
    assert plain.memory.steady_bytes - paged.memory.steady_bytes == state
    assert paged.memory.device_bytes > paged.memory.peak_bytes + state  # still resident on the device


def test_dora_adds_magnitude_and_saved_products():
    lora = estimate("gpt2", "lora", r=8, batch=4, seq=512, precision="fp32", model_dropout=0.0)
    dora = estimate("gpt2", "dora", r=8, batch=4, seq=512, precision="fp32", model_dropout=0.0)
    assert dora.trainable_params - lora.trainable_params == 12 * 2304
    # per block: base result minus bias and the lora result, [n, 2304] fp32 each, and 3 vectors of 2304;
    # in block 0 the base result needs no grad, so (m/||.|| - 1) is not saved there. (eye(768), A @ eye,
    # W + sBA and its norm are saved for a graph that dies with the module: not kept for backward.)
    n = 4 * 512
    expected = 12 * (2 * n * 2304 * 4 + 3 * 2304 * 4) - 2304 * 4
    assert dora.memory.saved_activation_bytes - lora.memory.saved_activation_bytes == expected


def test_unknown_method_option_and_method():
    with pytest.raises(LoraCostError):
        estimate("gpt2", "no-such-method")
    with pytest.raises(LoraCostError):
        estimate("gpt2", "lora", method_options={"k": 3})
