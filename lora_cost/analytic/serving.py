"""Inference cost of a fine-tuned model: the base model's forward FLOPs per token at a context length,
and what the method adds to it merged and unmerged (the method's `serving`, methods/serving.py).

Per generated token, with a KV cache: every matmul weight is used once (2 FLOPs per multiply-add, as
`torch.utils.flop_counter.FlopCounterMode` counts: fvcore would report half), and the new token's
query attends to `context` positions in every layer: q.k^T and the weighted sum of v each cost
2 x heads x head_dim FLOPs per position: 2N + 4 L H Q T in all, the forward third of the PaLM paper's
6N + 12 L H Q T training FLOPs per token (Chowdhery et al. 2022, arXiv:2204.02311, Appendix B; N the
matmul weights, L layers, H heads of size Q, T attended positions). The context is the run's --seq; a sliding-window model
attends to at most its window. Norms, activations, softmax and adds are not counted. Pure arithmetic:
called by the estimator only when asked (estimate --serving), never on the estimate path otherwise.
"""

from __future__ import annotations

from .architectures.base import Architecture
from .budget import base_weight_bytes
from .methods.base import Method
from .methods.serving import ServingCost
from ..results import ServingEstimate, ServingVariant
from ..spec import LinearSite, ModelSpec, RunConfig


def matmul_weights(arch: Architecture, spec: ModelSpec) -> int:
    """Weights every token multiplies by: the block linears, the linears of the head (RoBERTa's
    lm_head.dense) and the output projection onto the vocabulary (tied or not)."""
    blocks = spec.layers * sum(s.d_in * s.d_out for s in arch.linear_sites(spec))
    head = sum(s.d_in * s.d_out for s in arch.head_sites(spec))
    return blocks + head + spec.vocab * spec.hidden


def attended_positions(spec: ModelSpec, context: int) -> int:
    return min(context, spec.sliding_window) if spec.sliding_window is not None else context


def attention_flops_per_token(spec: ModelSpec, positions: int) -> int:
    """q.k^T and probs @ v for one query over `positions` keys, in every layer: 2 x 2 x heads x head_dim each."""
    return spec.layers * 4 * spec.heads * spec.head_dim * positions


def serving_estimate(arch: Architecture, spec: ModelSpec, method: Method, sites: list[LinearSite],
                     head_sites: list[LinearSite], run: RunConfig) -> ServingEstimate:
    context = attended_positions(spec, run.seq)
    base = dict(context_positions=context,
                base_weight_bytes=base_weight_bytes(arch, spec, method.storage(run)),
                base_matmul_flops_per_token=2 * matmul_weights(arch, spec),
                base_attention_flops_per_token=attention_flops_per_token(spec, context))
    if method.serving is None:
        return ServingEstimate(**base, mergeable=None, extra_positions=0, merged=None, unmerged=None,
                               note=f"{method.name} does not describe its serving cost yet: no number is given")
    if any(s.experts for s in sites):  # moeexperts
        return ServingEstimate(**base, mergeable=True, extra_positions=0, merged=None, unmerged=None,
                               note="adapters on the MoE router or experts (peft lora.ParamWrapper) rebuild W + s B A "
                                    "for the whole expert stack on every forward call, not per token: their serving "
                                    "cost is not described yet, no number is given (merged: none beyond the base)")
    cost: ServingCost = method.serving(spec, sites, head_sites, run)
    base_flops = base["base_matmul_flops_per_token"] + base["base_attention_flops_per_token"]
    extra_attention = attention_flops_per_token(spec, cost.extra_positions)

    def variant(weight_bytes: int, flops: int, per_forward: int, ops: int) -> ServingVariant:
        return ServingVariant(extra_weight_bytes=weight_bytes, extra_flops_per_token=flops + extra_attention,
                              extra_flops_per_forward=per_forward, extra_sequential_ops_per_block=ops,
                              flops_per_token=base_flops + flops + extra_attention)

    return ServingEstimate(
        **base, mergeable=cost.mergeable, extra_positions=cost.extra_positions,
        merged=variant(cost.extra_weight_bytes_merged, cost.extra_flops_per_token_merged, 0,
                       cost.extra_sequential_ops_per_block_merged),
        unmerged=variant(cost.extra_weight_bytes_unmerged, cost.extra_flops_per_token_unmerged,
                         cost.extra_flops_per_forward_unmerged, cost.extra_sequential_ops_per_block_unmerged),
        note=cost.note)
