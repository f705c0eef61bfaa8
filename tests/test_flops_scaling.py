"""FLOPs against the scaling-law rule, derived apart from the estimator: a dense transformer's matmuls
cost 2 FLOPs per weight per token forward and twice that backward (training C = 6 N D).

Kaplan et al. 2020, "Scaling Laws for Neural Language Models" (arXiv:2001.08361), Sec. 2.1 and Table 1:
the forward pass costs 2N + 2 n_layer n_ctx d_attn FLOPs per token, N counting the weight matrices
(attention QKV and output projection, feed-forward); biases, norms and embedding lookups are no
matmuls, and the de-embedding (the LM head) adds 2 d_model n_vocab. The backward pass costs twice
the forward. Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (Chinchilla,
arXiv:2203.15556), App. F, writes the context-dependent part as the attention logits (Q K^T) and the
reduction (softmax V), 2 s^2 d_attn FLOPs each per sequence and layer, and also takes backward as
twice forward.

The convention is lora_cost's (2 FLOPs per multiply-add, as torch.utils.flop_counter). FlopCounterMode,
which the estimator reproduces, counts no softmax, norm, bias or elementwise op, so the rule holds
exactly, not approximately, with two exceptions, stated where they apply:
- the fused sdpa kernels (flash, memory-efficient) recompute Q K^T in their backward (Dao et al. 2022,
  FlashAttention, arXiv:2205.14135, Sec. 3.1 and Alg. 4): 5 products instead of 4, so their attention
  backward is 2.5x the forward, not 2x. With eager attention nothing is recomputed;
- a frozen weight needs no weight gradient and, where its input needs none either (the first block's
  projections, fed by a frozen embedding), no input gradient: LoRA's backward is worked out below.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from lora_cost import estimate

pytestmark = pytest.mark.fast


@dataclass(frozen=True)
class Shapes:
    """What the rule needs, read off the model's config.json by hand."""

    name: str
    layers: int
    heads: int
    head_dim: int
    n_matmul: int  # N: weights of the blocks' matmuls plus the LM head
    published_total: int  # the model's published parameter count (all parameters)
    not_matmul: int  # token and position embeddings, norms, biases (a tied head is the embedding: once)


GPT2 = Shapes(
    # d=768, 12 layers, 12 heads of 64, d_ff=3072, vocab 50257, 1024 positions, head tied to wte.
    # per block: c_attn 768x2304 + attn c_proj 768x768 + c_fc 768x3072 + mlp c_proj 3072x768
    #   = 768 * 9216 = 7,077,888 (= 12 d^2); x12 = 84,934,656; LM head 50257 x 768 = 38,597,376
    "gpt2", 12, 12, 64, n_matmul=12 * 768 * (2304 + 768 + 3072 + 3072) + 50257 * 768,
    published_total=124_439_808,
    # the tied head is wte itself: wpe 1024x768, per block biases 2304+768+3072+768 and two layer
    # norms 2x2x768, final norm 2x768
    not_matmul=1024 * 768 + 12 * (2304 + 768 + 3072 + 768 + 4 * 768) + 2 * 768)
LLAMA2_7B = Shapes(
    # d=4096, 32 layers, 32 heads of 128 (32 key/value heads), d_ff=11008, vocab 32000, untied head.
    # per block: q, k, v, o 4 x 4096^2 = 67,108,864 + gate, up, down 3 x 4096 x 11008 = 135,266,304
    #   = 202,375,168; x32 = 6,476,005,376; LM head 32000 x 4096 = 131,072,000
    "llama-2-7b", 32, 32, 128, n_matmul=32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 32000 * 4096,
    published_total=6_738_415_616,
    # token embedding 32000x4096, two RMSNorms per block and the final one
    not_matmul=32000 * 4096 + 32 * 2 * 4096 + 4096)
LLAMA31_8B = Shapes(
    # d=4096, 32 layers, 32 query heads of 128, 8 key/value heads (k, v: 4096 -> 1024), d_ff=14336,
    # vocab 128256, untied head. per block: q, o 2 x 4096^2 + k, v 2 x 4096 x 1024 + 3 x 4096 x 14336
    #   = 33,554,432 + 8,388,608 + 176,160,768 = 218,103,808; x32 = 6,979,321,856; head 525,336,576
    "llama-3.1-8b", 32, 32, 128,
    n_matmul=32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + 128256 * 4096,
    published_total=8_030_261_248,
    not_matmul=128256 * 4096 + 32 * 2 * 4096 + 4096)
MODELS = (GPT2, LLAMA2_7B, LLAMA31_8B)


def terms(e) -> dict[str, int]:
    return {t.name: t.value for t in e.flops.terms}


def attention_forward(m: Shapes, batch: int, seq: int) -> int:
    # Chinchilla App. F: logits 2 s^2 (key_size x heads) + reduction 2 s^2 (key_size x heads) per
    # sequence and layer; FlopCounterMode counts the full s x s products (no causal halving)
    return m.layers * batch * 2 * 2 * seq * seq * m.head_dim * m.heads


@pytest.mark.parametrize("m", MODELS, ids=[m.name for m in MODELS])
def test_hand_counted_n_accounts_for_every_parameter(m):
    # the N used below, plus what takes part in no matmul, is the published parameter count
    assert m.n_matmul + m.not_matmul == m.published_total


@pytest.mark.parametrize("m", MODELS, ids=[m.name for m in MODELS])
def test_full_finetuning_is_2n_forward_4n_backward(m):
    # full fine-tuning trains the embedding too, so every matmul computes its input gradient and its
    # weight gradient: exactly 2x its forward, with no first-block exception
    batch, seq = 2, 1024
    tokens = batch * seq
    e = estimate(m.name, "full", batch=batch, seq=seq)
    t = terms(e)
    assert e.flops.forward - t["attention fwd"] == 2 * m.n_matmul * tokens
    assert e.flops.backward - t["attention bwd"] == 4 * m.n_matmul * tokens
    # the attention term apart: Chinchilla's logits + reduction forward; the fused kernel's backward
    # recomputes Q K^T (FlashAttention Alg. 4): 5 products of the same size, 2.5x the forward
    assert t["attention fwd"] == attention_forward(m, batch, seq)
    assert 2 * t["attention bwd"] == 5 * t["attention fwd"]


@pytest.mark.parametrize("m", (GPT2, LLAMA2_7B), ids=["gpt2", "llama-2-7b"])
def test_eager_attention_backward_is_exactly_twice_forward(m):
    # eager attention recomputes nothing, so Kaplan's "backward = 2 x forward" holds for the whole
    # step, attention included: C = 6 N D + 3 x the context term
    batch, seq = 1, 512
    e = estimate(m.name, "full", batch=batch, seq=seq, attention="eager")
    assert e.flops.forward == 2 * m.n_matmul * batch * seq + attention_forward(m, batch, seq)
    assert e.flops.backward == 2 * e.flops.forward


def test_gpt3_175b_training_compute_as_published():
    # Brown et al. 2020 (arXiv:2005.14165), App. D, Table D.1: GPT-3 175B trained on 300B tokens for
    # 3.14E+23 FLOPs, counted as 6 x parameters x tokens, which leaves the attention operations out.
    # d=12288, 96 layers, d_ff=4d, vocab 50257, tied head: N = 96 x 12 x 12288^2 + 50257 x 12288
    #   = 173,946,175,488 + 617,558,016 = 174,563,733,504; 6 N x 300e9 = 3.142e23
    n = 96 * 12 * 12288 * 12288 + 50257 * 12288
    seq = 2048
    e = estimate("gpt3-175b", "full", batch=1, seq=seq)
    t = terms(e)
    per_token = (e.flops.total - t["attention fwd"] - t["attention bwd"]) // seq
    assert per_token == 6 * n
    assert round(per_token * 300e9, -21) == 3.14e23  # as printed, to three significant figures


def test_lora_backward_is_input_gradients_plus_adapters():
    # Llama-2 7B, LoRA r=16 on q_proj and v_proj (4096 -> 4096), batch 1 x 2048, frozen untied head.
    # forward: the same 2 N per token as full fine-tuning, plus per adapted module and token
    #   A: 2 x 4096 x r, B: 2 x r x 4096.
    # backward, frozen weights: input gradients only (1x their forward), except in the first block,
    #   whose q, k and v read the frozen embedding's output, which needs no gradient: 3 x 2 x 4096^2
    #   per token fewer. Adapters: weight gradients of A and B (1x their forward) and input gradients
    #   of B and A (1x again), except A's input gradient in the first block (2 modules x 2 x 4096 x r).
    m, r, d = LLAMA2_7B, 16, 4096
    tokens = 2048
    e = estimate(m.name, "lora", r=r, targets="q_proj,v_proj", batch=1, seq=tokens)
    t = terms(e)
    adapters = m.layers * 2 * (2 * d * r + 2 * r * d) * tokens  # 32 layers x {q, v}
    assert e.flops.forward - t["attention fwd"] == 2 * m.n_matmul * tokens + adapters
    frozen_input_grads = 2 * m.n_matmul * tokens - 3 * 2 * d * d * tokens
    adapter_grads = 2 * adapters - 2 * 2 * d * r * tokens
    assert e.flops.backward - t["attention bwd"] == frozen_input_grads + adapter_grads
