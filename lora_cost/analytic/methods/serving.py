"""What a fine-tuning method costs once the model serves requests (the `serving` block of an estimate).

The LoRA paper's argument (Hu et al. 2021, arXiv:2106.09685, Sec. 4.1 "No additional inference
latency"): a low-rank update merges into the frozen weight (W' = W + s B A), so the served model is
the base model; adapters that sit in the forward path (bottleneck adapters, prompt and prefix
tokens, an unmerged LoRA branch) add weights, FLOPs per token and sequential operations per block.
Plain counts, no timing claims: per generated token, per block, at inference (no dropout, no
gradients).

Conventions every method's `serving` follows (`analytic/serving.py` adds the base model to them):
  * FLOPs are matmul FLOPs as `torch.utils.flop_counter.FlopCounterMode` counts them, 2 per
    multiply-add; elementwise work (scalings, adds, norms) is not counted, as there.
  * `extra_flops_per_token_*` leave out attention over `extra_positions` (prompt or prefix tokens):
    `analytic/serving.py` adds 4 x heads x head_dim FLOPs per layer per extra position (q.k and
    attention-weights.v), so a method states the positions and does not count them itself.
  * `extra_flops_per_forward_unmerged` is work done once per forward call whatever the number of
    tokens in it (DoRA's weight norm, recomputed every call): per token it is that divided by the
    tokens of the call (the batch, when decoding one token per sequence).
  * Sequential operations are the kernels the library's eager forward launches one after another
    on the critical path of one block and the base model does not: each matmul, elementwise op and
    dtype cast counts one (views and no-op casts none); an adapter in a layer outside the blocks
    (RoBERTa's lm_head.dense) adds FLOPs and bytes but no per-block operation.
  * Extra weight bytes are the adapter tensors in the dtype they are served in (peft loads
    adapters in fp32: `autocast_adapter_dtype=True` in PeftModel.from_pretrained).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from ...units import DTYPE_BYTES

if TYPE_CHECKING:  # pragma: no cover
    from ...spec import LinearSite, ModelSpec, RunConfig
    from .base import Method, TensorGroup


@dataclass(frozen=True)
class ServingCost:
    """Extra inference cost of a method over the base model, unmerged (the adapter kept as trained)
    and merged (folded into the base weights where the method allows it)."""

    mergeable: bool  # the adapter folds into the base weights (LoRA, DoRA, (IA)3, BitFit, ...)
    extra_weight_bytes_unmerged: int  # adapter tensors kept beside the base weights
    extra_weight_bytes_merged: int  # what remains after merging (0 when mergeable)
    extra_flops_per_token_unmerged: int  # forward FLOPs per token added (2 per multiply-add)
    extra_flops_per_token_merged: int
    extra_sequential_ops_per_block_unmerged: int  # kernels added on the critical path of one block
    extra_sequential_ops_per_block_merged: int
    extra_positions: int = 0  # positions every request attends to besides its own (prompt/prefix tokens)
    note: str = ""
    extra_flops_per_forward_unmerged: int = 0  # once per forward call, whatever its tokens (DoRA's weight norm)


NONE = ServingCost(mergeable=True, extra_weight_bytes_unmerged=0, extra_weight_bytes_merged=0,
                   extra_flops_per_token_unmerged=0, extra_flops_per_token_merged=0,
                   extra_sequential_ops_per_block_unmerged=0, extra_sequential_ops_per_block_merged=0,
                   note="the served model is the fine-tuned model itself")


# ---- helpers for a method's `serving` ------------------------------------------------------------
def tensors_bytes(groups: Iterable["TensorGroup"]) -> int:
    return sum(g.total_numel * DTYPE_BYTES[g.dtype] for g in groups)


def per_adapted_site(spec: "ModelSpec", sites: list["LinearSite"], head_sites: list["LinearSite"],
                     value: Callable[["LinearSite"], int]) -> int:
    """`value` summed over every adapted module: each block site in every layer, each head site once."""
    return spec.layers * sum(value(s) for s in sites) + sum(value(s) for s in head_sites)


def adapter_bytes(method: "Method", spec: "ModelSpec", sites: list["LinearSite"], head_sites: list["LinearSite"],
                  run: "RunConfig") -> int:
    """Every tensor the method keeps beside the base weights, as it trained them: its trainable and
    frozen tensors per adapted module and the tensors shared by all of them (VeRA's projections)."""
    per_module = per_adapted_site(spec, sites, head_sites,
                                  lambda s: tensors_bytes(method.trainable(s, run) + method.frozen(s, run)))
    return per_module + tensors_bytes(method.shared_frozen(sites + head_sites, run))


def casts_around(adapter_dtype: str, activation_dtype: str) -> int:
    """peft casts the layer input to the adapter's dtype and the sum back (`_cast_input_dtype`,
    `result.to(torch_result_dtype)`): two kernels when the dtypes differ, none when they agree."""
    return 0 if adapter_dtype == activation_dtype else 2
