"""DoRA: weight-decomposed LoRA, W' = m * (W + s B A) / ||W + s B A||_c.

Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353, Sec. 4.3: the
column norm is treated as a constant in backward (detached), which is what makes it affordable.
DoRA is LoRA plus a trainable magnitude vector m of size d_out per adapted matrix.

Modelled library behaviour: peft `tuners/lora/dora.py` DoraLinearLayer.forward. Per module and step:
  * the product B A is materialised by pushing an identity matrix eye(d_in) through lora_A and
    lora_B (2 d_in^2 r + 2 d_in r d_out FLOPs, counted by FlopCounterMode, no backward), then
    W + s B A and its row norms are formed: buffers of d_in^2 + 3 d_out d_in floats that live only
    during the module's forward (the "weight-norm materialisation" transient);
  * the output is (m/||.|| - 1) * base_result + (m/||.||) * s * lora_result: the two products save
    base_result (the base layer's output, minus its bias when it has one) and lora_result (fp32).
  * with lora_dropout > 0 peft cannot reuse the base output and runs F.linear(x, W) again;
  * autograd saves eye(d_in) and A @ eye(d_in) for the graph of B A, which the detached norm drops
    when the module returns; on fan_in_fan_out layers (GPT-2's Conv1D) peft's `transpose()` wraps W.T
    in a new nn.Parameter, which requires grad, so W + s B A and its norm are saved too. In a plain
    step all of these die with the module ("orphaned" saves); under non-reentrant checkpointing their
    recomputed copies are stashed until the block's backward ends. (A saved_tensors_hooks pack
    function that returns the tensor itself, as the H100 calibration's measuring hook does, keeps
    such graphs alive: its GPT-2 DoRA row shows them at the peak and even between steps.)
  * on fan_in_fan_out layers with lora_dropout > 0, F.linear(x, that Parameter) also computes a
    throwaway weight gradient in backward (2 n d_in d_out FLOPs and a [d_in, d_out] buffer).
"""

from __future__ import annotations

from .. import ops
from ...spec import LinearSite
from ...units import DTYPE_BYTES
from .base import Method, TensorGroup, register_method
from .lora import (ADAPTER_DTYPE, apply_lora, is_lora_config, lora_branch, lora_branch_flops, lora_trainable,
                   merge_into_base)
from .serving import ServingCost, adapter_bytes, casts_around, per_adapted_site


def dora_linear(ctx, x, site: LinearSite):
    tape = ctx.tape
    r = ctx.rank
    base_out = ctx.base_linear(x, site)
    xa, _, lora_out = lora_branch(ctx, x, site)
    # weight-norm materialisation (forward only; its graph is dropped with the detached norm)
    tape.matmul("adapter", site.d_in, site.d_in, r, grad_a=False, grad_b=False)
    tape.matmul("adapter", site.d_in, r, site.d_out, grad_a=False, grad_b=False)
    dense = site.d_in * site.d_out
    base_is_fp32 = ctx.weight_dtype == "fp32"
    tape.transient(4 * (site.d_in * site.d_in + 3 * dense) + (0 if base_is_fp32 else 4 * dense))
    orphaned = 4 * (site.d_in * site.d_in + site.d_in * r)
    if site.fan_in_fan_out:
        orphaned += 4 * (dense + site.d_out)
    tape.orphaned_save(orphaned)
    tape.save(tape.new(site.d_out, ADAPTER_DTYPE, False), "adapter extras")  # weight norm, saved by m / ||.||
    if ctx.run.dropout > 0:
        # F.linear(dropout(x), W): W is the grad-requiring Parameter on fan_in_fan_out layers
        base_result = ops.linear(tape, xa, site.d_in, site.d_out, w_trainable=site.fan_in_fan_out,
                                 w_dtype=ADAPTER_DTYPE, kind="adapter")
        tape.transient(DTYPE_BYTES[ADAPTER_DTYPE] * dense)  # weight.to(x.dtype)
        if site.fan_in_fan_out:
            tape.transient(DTYPE_BYTES[ADAPTER_DTYPE] * dense, backward=True)  # its throwaway gradient
    elif site.bias:
        base_result = tape.new(base_out.numel, base_out.dtype, base_out.rg)  # result - bias
    else:
        base_result = base_out
    # (m/||.|| - 1) * base_result: m trains, so base_result is saved; the scale only if base_result needs a grad
    tape.save(base_result, "adapter extras")
    if base_result.rg:
        tape.save(tape.new(site.d_out, ADAPTER_DTYPE, False), "adapter extras")
    # (m/||.||) * lora_result: both need grads, both saved
    tape.save(lora_out, "adapter extras")
    tape.save(tape.new(site.d_out, ADAPTER_DTYPE, False), "adapter extras")
    dora_out = tape.new(base_out.numel, ADAPTER_DTYPE, True)
    return merge_into_base(ctx, base_out, dora_out)


def dora_trainable(site, run):
    return lora_trainable(site, run) + [TensorGroup(f"{site.name}.lora_magnitude_vector", site.d_out, 1, ADAPTER_DTYPE,
                                                          shape=(site.d_out,))]


def weight_norm_flops(site: LinearSite, r: int) -> int:
    """get_lora_weight: eye(d_in) through lora_A then lora_B, 2 d_in^2 r + 2 d_in r d_out matmul FLOPs."""
    return 2 * site.d_in * site.d_in * r + 2 * site.d_in * r * site.d_out


# DoraLinearLayer.forward, kernels that depend on the weights only (peft recomputes them every call
# unless dora.ENABLE_DORA_CACHING): eye, lora_A(eye), lora_B(.), scaling * lora_weight, weight + .,
# linalg.norm, magnitude / weight_norm
WEIGHT_NORM_OPS = 7
# ... and those on the token path: lora_A(x), lora_B(.), mag_norm_scale - 1, * base_result,
# mag_norm_scale * lora_result, * scaling, the sum of the two, then LoraLayer's `result + dora`
TOKEN_OPS = 8


def dora_serving(spec, sites, head_sites, run) -> ServingCost:
    """Merged (peft DoraLinearVariant.merge_safe): W' = m (W + s B A) / ||W + s B A||_c replaces W, nothing
    extra. Unmerged: LoRA's factors and the magnitude vector; per token LoRA's two matmuls, per call the
    weight norm of every adapted module (peft `tuners/lora/dora.py` DoraLinearLayer.forward)."""
    activations = DORA.storage(run).linear_dtype
    casts = casts_around(ADAPTER_DTYPE, activations)
    weight_cast = 0 if activations == ADAPTER_DTYPE else 1  # weight.to(x.dtype): the base weight in fp32

    def ops(site):
        return WEIGHT_NORM_OPS + weight_cast + TOKEN_OPS + (1 if site.bias else 0) + casts  # base_result - bias

    cached = per_adapted_site(spec, sites, head_sites, lambda s: 4 * (s.d_in * s.d_out + s.d_out))
    return ServingCost(
        mergeable=True,
        extra_weight_bytes_unmerged=adapter_bytes(DORA, spec, sites, head_sites, run),
        extra_weight_bytes_merged=0,
        extra_flops_per_token_unmerged=per_adapted_site(spec, sites, head_sites, lambda s: lora_branch_flops(s, run.r)),
        extra_flops_per_token_merged=0,
        extra_sequential_ops_per_block_unmerged=sum(ops(s) for s in sites),
        extra_sequential_ops_per_block_merged=0,
        extra_flops_per_forward_unmerged=per_adapted_site(spec, sites, head_sites, lambda s: weight_norm_flops(s, run.r)),
        note=("merged: m (W + s B A) / ||W + s B A|| replaces W; unmerged: peft recomputes B A and the weight norm on "
              f"every forward call; peft.tuners.lora.dora.ENABLE_DORA_CACHING=True (eval mode) caches them instead, "
              f"{cached:,} bytes more and {WEIGHT_NORM_OPS - 1} kernels fewer per adapted module"),
    )


DORA = register_method(Method(
    name="dora",
    title="DoRA",
    paper="Liu et al. 2024, arXiv:2402.09353",
    recipe="peft LoraConfig(..., use_dora=True); adapters and magnitude in fp32",
    default_r=8,
    trainable=dora_trainable,
    frozen=lambda site, run: [],
    adapted_linear=dora_linear,
    serving=dora_serving,
    apply_to_model=lambda model, run, targets, notes: apply_lora(model, run, targets, notes, use_dora=True),
    recognise=lambda model, peft_config: is_lora_config(peft_config) and bool(getattr(peft_config, "use_dora", False)),
    recognise_priority=20,
))
