"""The shared attention FLOP formulas (analytic/formulas/attention.py): hand arithmetic, and torch's
own flop_counter formulas where torch is installed."""

from __future__ import annotations

import pytest

from lora_cost.analytic.formulas.attention import (matmul_attention_backward_flops, sdpa_backward_flops,
                                                    sdpa_backward_from_shapes, sdpa_forward_flops,
                                                    sdpa_forward_from_shapes)

B, H, SQ, SK, D, DV = 2, 4, 3, 5, 6, 7


@pytest.mark.fast
def test_sdpa_forward_by_hand():
    # q k^T: 2 * (2*4) * 3 * 6 * 5 = 1440; probs v: 2 * 8 * 3 * 5 * 7 = 1680
    assert sdpa_forward_flops(B, H, SQ, SK, D, DV) == 1440 + 1680
    # d == d_v: the 4*b*h*s_q*s_k*d of the literature: 4 * 8 * 3 * 5 * 6 = 2880
    assert sdpa_forward_flops(B, H, SQ, SK, D, D) == 2880


@pytest.mark.fast
def test_sdpa_backward_by_hand():
    # recompute q k^T 1440, d_probs 2*8*3*7*5 = 1680, d_v 1680, d_q 2*8*3*5*6 = 1440, d_k 1440
    assert sdpa_backward_flops(B, H, SQ, SK, D, DV) == 3 * 1440 + 2 * 1680
    assert sdpa_backward_flops(B, H, SQ, SK, D, D) == 10 * B * H * SQ * SK * D  # 10*b*h*s_q*s_k*d


@pytest.mark.fast
def test_matmul_attention_backward_counts_only_needed_gradients():
    assert matmul_attention_backward_flops(B, H, SQ, SK, D, DV, q=True, k=True, probs=True, v=True) == 2 * 1440 + 2 * 1680
    assert matmul_attention_backward_flops(B, H, SQ, SK, D, DV, q=True, k=False, probs=False, v=True) == 1440 + 1680
    assert matmul_attention_backward_flops(B, H, SQ, SK, D, DV, q=False, k=False, probs=False, v=False) == 0


@pytest.mark.fast
def test_grouped_query_heads_cost_as_many_as_query_heads():
    # 2 key/value heads broadcast to 4 query heads: the same FLOPs as 4 full heads
    q, kv, v = (B, H, SQ, D), (B, 2, SK, D), (B, 2, SK, DV)
    assert sdpa_forward_from_shapes(q, kv, v) == 1440 + 1680
    assert sdpa_backward_from_shapes((B, H, SQ, DV), q, kv, v, None, out_shape=None) == 3 * 1440 + 2 * 1680


def test_matches_torch_flop_counter():
    flop_counter = pytest.importorskip("torch.utils.flop_counter")
    q, k, v, out = (B, H, SQ, D), (B, H, SK, D), (B, H, SK, DV), (B, H, SQ, DV)
    assert sdpa_forward_from_shapes(q, k, v) == flop_counter.sdpa_flop_count(q, k, v)
    assert sdpa_backward_from_shapes(out, q, k, v) == flop_counter.sdpa_backward_flop_count(out, q, k, v)
