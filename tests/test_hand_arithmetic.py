"""The estimator against sums done by hand from the ops' autograd rules, and against measurement."""

import pytest

from lora_cost import estimate

pytestmark = pytest.mark.fast

B, S, D, H, V, L, R = 4, 512, 768, 12, 50257, 12, 4
N = B * S
U = N * D * 4  # one fp32 [n, d] activation


def test_gpt2_lora_saved_activations_by_hand():
    # Per block >= 1 (fp32, LoRA on c_attn, no dropout): ln_1 input (U) + 2 fp32 stats, lora_A input
    # (ln_1 output, U), lora_B input (n*r*4), q/k/v (one fused storage, 3U), attention output (U),
    # memory-efficient log-sum-exp (b*h*ceil(s/32)*32*4), ln_2 input (U) + stats, gelu_new's four
    # tensors of [n, 4d] (16U). Frozen c_proj/c_fc/c_proj save nothing of their inputs.
    lse = B * H * S * 4
    block = 23 * U + 2 * 2 * N * 4 + N * R * 4 + lse
    # block 0: its input does not require grad, so ln_1 saves nothing
    block0 = block - U - 2 * N * 4
    head = U + 2 * N * 4  # ln_f input and stats; the frozen tied head saves nothing
    loss = N * V * 4 + N * 8 + 4  # log-softmax output, int64 targets, total weight
    expected = block0 + (L - 1) * block + head + loss
    e = estimate("gpt2", "lora", r=R, batch=B, seq=S, precision="fp32", model_dropout=0.0)
    assert e.memory.saved_activation_bytes == expected
    # and the H100 measurement of the same step (calibration row gpt2/lora-r4/qv/b4s512/fp32)
    assert expected == 2_150_129_668


def test_gpt2_lora_flops_by_hand():
    matmuls = 2 * N * D * 3 * D + 2 * N * D * D + 2 * (2 * N * D * 4 * D)  # c_attn, c_proj, c_fc, c_proj
    attention = 4 * B * H * S * S * (D // H)
    lora = 2 * N * D * R + 2 * N * R * 3 * D
    head = 2 * N * D * V
    fwd = L * (matmuls + attention + lora) + head
    # backward: frozen weights cost only input gradients (none in block 0's c_attn, whose input needs
    # none), attention 10*b*h*s^2*hd, LoRA: B weight+input grads, A weight grad (+ input grad above block 0)
    bwd = L * (matmuls + 2.5 * attention) - 2 * N * D * 3 * D + head \
        + L * (2 * 2 * N * R * 3 * D + 2 * N * D * R) + (L - 1) * 2 * N * D * R
    e = estimate("gpt2", "lora", r=R, batch=B, seq=S, precision="fp32", model_dropout=0.0)
    assert e.flops.forward == fwd == 545_245_888_512  # FlopCounterMode on the H100
    assert e.flops.backward == bwd == 596_571_586_560


def test_full_finetune_peak_at_loss_gradient():
    # Full fine-tuning, fp32, AdamW: the peak is at the start of backward, where weights (W), AdamW
    # moments (2W), everything saved, the logits and the two [n, V] fp32 loss gradients are alive.
    e = estimate("gpt2", "full", batch=B, seq=S, precision="fp32", model_dropout=0.0)
    w = 124_439_808 * 4
    logits = N * V * 4
    expected = w + 2 * w + e.memory.saved_activation_bytes + logits + 2 * N * V * 4
    assert e.memory.peak_phase == "backward"
    assert e.memory.peak_bytes == expected
    assert abs(expected - 5_337_965_568) / 5_337_965_568 < 0.02  # measured peak_step


def test_checkpointing_keeps_block_inputs_only():
    # LoRA + gradient checkpointing: each block keeps its input (U), the head keeps ln_f's input
    e = estimate("gpt2", "lora", r=8, batch=B, seq=S, precision="fp32", model_dropout=0.0, grad_checkpointing=True)
    assert e.memory.saved_activation_bytes == L * U + U + 2 * N * 4 + N * V * 4 + N * 8 + 4
