"""FLOPs of attention, once for the analytic engine, the trace engine and the profiler (torch-free).

Convention: 2 FLOPs per multiply-add, as torch.utils.flop_counter.FlopCounterMode counts (fvcore
counts one per multiply-add: half of these). Causal masking is not discounted (FlopCounterMode
counts the full [s_q, s_k] products the kernels are called with).

Shapes: queries [b, h, s_q, d], keys [b, h_kv, s_k, d], values [b, h_kv, s_k, d_v]. Grouped-query
attention (h_kv divides h) costs what h full heads cost: the kernels broadcast each key/value head
to its h / h_kv query heads. (torch's `sdpa_flop_count` asserted h == h_kv before torch 2.13.)
"""

from __future__ import annotations


def _bmm(batch: int, m: int, k: int, n: int) -> int:
    """[batch, m, k] @ [batch, k, n] -> [batch, m, n]: 2*batch*m*k*n (torch's bmm_flop)."""
    return 2 * batch * m * k * n


def sdpa_forward_flops(b: int, h: int, s_q: int, s_k: int, d: int, d_v: int) -> int:
    """Fused sdpa forward (flash, memory-efficient, cuDNN, math): torch/utils/flop_counter.py
    sdpa_flop_count; with d == d_v, 4*b*h*s_q*s_k*d."""
    return (_bmm(b * h, s_q, d, s_k)  # q [b, h, s_q, d] @ k^T [b, h, d, s_k] -> scores [b, h, s_q, s_k]
            + _bmm(b * h, s_q, s_k, d_v))  # probs [b, h, s_q, s_k] @ v [b, h, s_k, d_v] -> out [b, h, s_q, d_v]


def sdpa_backward_flops(b: int, h: int, s_q: int, s_k: int, d: int, d_v: int) -> int:
    """Fused sdpa backward: torch/utils/flop_counter.py sdpa_backward_flop_count. The kernels keep
    no [s_q, s_k] matrix, so they recompute the scores, then form four gradients: five products;
    with d == d_v, 10*b*h*s_q*s_k*d."""
    return (_bmm(b * h, s_q, d, s_k)  # recompute scores: q @ k^T -> [b, h, s_q, s_k]
            + _bmm(b * h, s_q, d_v, s_k)  # d_probs = d_out [b, h, s_q, d_v] @ v^T [b, h, d_v, s_k]
            + _bmm(b * h, s_k, s_q, d_v)  # d_v = probs^T [b, h, s_k, s_q] @ d_out [b, h, s_q, d_v]
            + _bmm(b * h, s_q, s_k, d)  # d_q = d_scores [b, h, s_q, s_k] @ k [b, h, s_k, d]
            + _bmm(b * h, d, s_q, s_k))  # d_k^T = q^T [b, h, d, s_q] @ d_scores [b, h, s_q, s_k]


def matmul_attention_backward_flops(b: int, h: int, s_q: int, s_k: int, d: int, d_v: int, *, q: bool, k: bool,
                                    probs: bool, v: bool) -> int:
    """Backward of attention written as two batched matmuls (transformers' eager path, sdpa's math
    fallback): the softmax is kept, nothing is recomputed, and each matmul operand that needs a
    gradient costs one product the size of the forward one (aten::bmm's backward,
    torch/utils/flop_counter.py bmm_flop)."""
    scores = _bmm(b * h, s_q, d, s_k)  # d_q = d_scores @ k; d_k = d_scores^T @ q
    output = _bmm(b * h, s_q, s_k, d_v)  # d_probs = d_out @ v^T; d_v = probs^T @ d_out
    return scores * (int(q) + int(k)) + output * (int(probs) + int(v))


# ---- FlopCounterMode adapters: its custom_mapping calls a formula with the ops' argument shapes
# (flop_counter.shape_wrapper), in the op's argument order.
def _dims(query_shape, key_shape, value_shape) -> tuple[int, int, int, int, int, int]:
    b, h, s_q, d = query_shape
    return b, h, s_q, key_shape[-2], d, value_shape[-1]


def sdpa_forward_from_shapes(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """aten._scaled_dot_product_{flash,efficient,cudnn}_attention and the CPU flash kernel."""
    return sdpa_forward_flops(*_dims(query_shape, key_shape, value_shape))


def sdpa_backward_from_shapes(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                              **kwargs) -> int:
    """Their `_backward` ops (the incoming gradient comes first)."""
    return sdpa_backward_flops(*_dims(query_shape, key_shape, value_shape))
