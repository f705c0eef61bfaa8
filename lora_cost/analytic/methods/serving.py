"""What a fine-tuning method costs once the model serves requests (the `serving` block of an estimate).

The LoRA paper's argument (Hu et al. 2021, arXiv:2106.09685, Sec. 4.1 "No additional inference
latency"): a low-rank update merges into the frozen weight (W' = W + s B A), so the served model is
the base model; adapters that sit in the forward path (bottleneck adapters, prompt and prefix
tokens, an unmerged LoRA branch) add weights, FLOPs per token and sequential operations per block.
Plain counts, no timing claims: per generated token, per block, at inference (no dropout, no
gradients).
"""

from __future__ import annotations

from dataclasses import dataclass


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


NONE = ServingCost(mergeable=True, extra_weight_bytes_unmerged=0, extra_weight_bytes_merged=0,
                   extra_flops_per_token_unmerged=0, extra_flops_per_token_merged=0,
                   extra_sequential_ops_per_block_unmerged=0, extra_sequential_ops_per_block_merged=0,
                   note="the served model is the fine-tuned model itself")
