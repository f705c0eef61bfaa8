"""VeRA: W x + Lambda_b B Lambda_d A x with one shared, frozen random pair (A, B).

Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation", arXiv:2310.11454, Sec. 3:
only the scaling vectors train, d_out + r values per adapted matrix.
Modelled library behaviour: peft `tuners/vera/layer.py` Linear.forward and `vera/model.py`:
vera_A (r x max d_in) and vera_B (max d_out x r) are fp32 buffers shared by every adapted layer,
sized to the largest adapted dimensions and sliced per layer; the input is cast to fp32 and

    result + lambda_b * F.linear(lambda_d * F.linear(dropout(x), A), B)

saves the [n, r] product read by lambda_d's gradient and the [n, d_out] product read by
lambda_b's; the frozen A and B keep nothing else. peft's default rank is 256.
"""

from __future__ import annotations

from .. import ops
from .base import Method, TensorGroup, no_rank_limit, register_method
from .lora import ADAPTER_DTYPE, lora_branch_flops, merge_into_base
from .serving import ServingCost, adapter_bytes, casts_around, per_adapted_site


def vera_linear(ctx, x, site):
    tape = ctx.tape
    r = ctx.rank
    base_out = ctx.base_linear(x, site)
    xa = ops.cast(tape, x, ADAPTER_DTYPE) if not tape.autocast else x
    xa = ops.dropout(tape, xa, ctx.run.dropout)
    down = ops.linear(tape, xa, site.d_in, r, w_trainable=False, w_dtype=ADAPTER_DTYPE, kind="adapter")
    scaled_down = ops.scale_by_parameter(tape, down, "adapter extras")  # lambda_d
    up = ops.linear(tape, scaled_down, r, site.d_out, w_trainable=False, w_dtype=ADAPTER_DTYPE, kind="adapter")
    scaled_up = ops.scale_by_parameter(tape, up, "adapter extras")  # lambda_b
    return merge_into_base(ctx, base_out, scaled_up)


def vera_shared(sites, run):
    r = run.r
    max_in = max(s.d_in for s in sites)
    max_out = max(s.d_out for s in sites)
    return [TensorGroup("vera_A", r * max_in, 1, ADAPTER_DTYPE), TensorGroup("vera_B", max_out * r, 1, ADAPTER_DTYPE)]


def apply_vera(model, run, targets, notes):
    """Trace hook: peft VeraConfig(r, target_modules, vera_dropout)."""
    import peft

    from ...trace.adapters import count_adapted, enable_checkpointing, enable_input_grads, fan_in_fan_out, peft_model

    if run.grad_checkpointing:
        enable_checkpointing(model)
    cfg = peft.VeraConfig(r=run.r, target_modules=list(targets), vera_dropout=run.dropout,
                          fan_in_fan_out=fan_in_fan_out(model, targets))
    model = peft_model(model, cfg)
    if run.grad_checkpointing:
        enable_input_grads(model)
    return model, count_adapted(model, "vera_lambda_b")


# peft vera Linear.forward: `result + lambda_b * F.linear(lambda_d * F.linear(x, sliced_A), sliced_B)`: two
# matmuls, two scalings and the add (the slices are views)
VERA_BRANCH_OPS = 5


def vera_serving(spec, sites, head_sites, run) -> ServingCost:
    """Merged (peft VeraLayer.merge, get_delta_weight = (lambda_b B) (lambda_d A)): nothing extra. Unmerged:
    the shared A, B and each module's two scaling vectors; per token the two sliced matmuls."""
    casts = casts_around(ADAPTER_DTYPE, VERA.storage(run).linear_dtype)
    return ServingCost(
        mergeable=True,
        extra_weight_bytes_unmerged=adapter_bytes(VERA, spec, sites, head_sites, run),
        extra_weight_bytes_merged=0,
        extra_flops_per_token_unmerged=per_adapted_site(spec, sites, head_sites, lambda s: lora_branch_flops(s, run.r)),
        extra_flops_per_token_merged=0,
        extra_sequential_ops_per_block_unmerged=(VERA_BRANCH_OPS + casts) * len(sites),
        extra_sequential_ops_per_block_merged=0,
        note="merged: W + (lambda_b B)(lambda_d A) replaces W; unmerged: the shared A, B sliced per module, and "
             "the scaling vectors",
    )


VERA = register_method(Method(
    name="vera",
    title="VeRA",
    paper="Kopiczko et al. 2024, arXiv:2310.11454 (ICLR 2024)",
    recipe="peft VeraConfig(r, target_modules); shared fp32 projections sized to the largest adapted layer",
    default_r=256,
    trainable=lambda site, run: [TensorGroup(f"{site.name}.vera_lambda_b", site.d_out, 1, ADAPTER_DTYPE),
                                 TensorGroup(f"{site.name}.vera_lambda_d", run.r, 1, ADAPTER_DTYPE)],
    frozen=lambda site, run: [],
    shared_frozen=vera_shared,
    adapted_linear=vera_linear,
    serving=vera_serving,
    # the shared projections are sized to the largest adapted layer and sliced: any rank builds
    max_rank=no_rank_limit,
    apply_to_model=apply_vera,
    recognise=lambda model, peft_config: type(peft_config).__name__ == "VeraConfig",
))
