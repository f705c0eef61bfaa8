"""LoRA: W x + (alpha / r) * B A x with A in R^{r x d_in}, B in R^{d_out x r}.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685, Sec. 4.1:
trainable parameters per adapted matrix r * (d_in + d_out).
Modelled library behaviour: peft `tuners/lora/layer.py` Linear.forward. peft keeps adapter weights
in fp32 when the base is 16-bit (`autocast_adapter_dtype=True`), so it casts the layer input to
fp32 once per adapted module (`_cast_input_dtype`); lora_A saves that fp32 input, lora_B saves the
[n, r] output of lora_A. With lora_dropout == 0 the dropout is nn.Identity (no mask, no copy).
"""

from __future__ import annotations

from .. import ops
from ...spec import LinearSite, RunConfig
from .base import Method, TensorGroup, register_method
from .serving import ServingCost, adapter_bytes, casts_around, per_adapted_site

ADAPTER_DTYPE = "fp32"  # peft autocast_adapter_dtype=True


def adapter_dtype(run: RunConfig) -> str:
    """The LoRA factors' dtype: fp32 (peft's default, autocast_adapter_dtype=True) unless --adapter-dtype
    says otherwise (lora_cost/analytic/adapter_dtypes.py: which values each method takes, and why)."""
    return run.adapter_dtype or ADAPTER_DTYPE


def lora_rank_rows(site: LinearSite, r: int) -> int:
    """Rows of lora_A (columns of lora_B): r, or E r on a 3-D expert parameter, where peft's ParamWrapper
    stacks one rank-r factor per expert in a single nn.Linear (tuners/lora/layer.py ParamWrapper.update_layer:
    `nn.Linear(in_features, r * num_experts)`, `nn.Linear(r * num_experts, out_features)`)."""
    return r * max(site.experts, 1)


def lora_trainable(site: LinearSite, run: RunConfig, freeze_a: bool = False) -> list[TensorGroup]:
    rows, dtype = lora_rank_rows(site, run.r), adapter_dtype(run)
    groups = [TensorGroup(f"{site.name}.lora_B", site.d_out * rows, 1, dtype, shape=(site.d_out, rows))]
    if not freeze_a:
        groups.insert(0, TensorGroup(f"{site.name}.lora_A", rows * site.d_in, 1, dtype, shape=(rows, site.d_in)))
    return groups


def lora_branch(ctx, x, site: LinearSite, *, freeze_a: bool = False):
    """The adapter path B(A(dropout(x))) of one module; returns (x cast to fp32, lora_A out, lora_B out)."""
    tape = ctx.tape
    r, dtype = ctx.rank, adapter_dtype(ctx.run)
    xa = ops.cast(tape, x, dtype) if not tape.autocast else x
    xa = ops.dropout(tape, xa, ctx.run.dropout)
    a = ops.linear(tape, xa, site.d_in, r, w_trainable=not freeze_a, w_dtype=dtype, kind="adapter")
    b = ops.linear(tape, a, r, site.d_out, w_trainable=True, w_dtype=dtype, kind="adapter")
    return xa, a, b


def merge_into_base(ctx, base_out, branch_out):
    """result + lora * scaling: the scalar multiply and the add save nothing; the sum is fp32 when
    the base output is 16-bit and is cast back (`result.to(torch_result_dtype)`)."""
    out = ops.add(ctx.tape, base_out, branch_out)
    return ops.cast(ctx.tape, out, base_out.dtype)


def lora_linear(ctx, x, site: LinearSite, *, freeze_a: bool = False):
    """peft Linear.forward, its references as peft holds them (ligeracc: tape.forward_live): `x` rebound to its
    cast stays alive to the return; lora_A's output is a temporary of the expression; `result` is rebound by the
    add, and the add's output by its cast back to the base output's dtype."""
    result = ctx.base_linear(x, site)
    dtype = result.dtype
    if x.rg:  # x's gradient: the base layer's and the adapter's, summed (peaks.py in_block, tape.gradient_summed)
        ctx.tape.gradient_summed(x)
    xa, a, b = lora_branch(ctx, x, site, freeze_a=freeze_a)
    del a
    # `lora_B(...) * scaling` writes a tensor of b's size while b is alive (a product with a Python float saves
    # nothing; b then dies, the product takes its place in the add): a moment of the forward (tape.buffer_alive), not
    # a storage of the allocation log (allocator/events.py), whose replay does not place it
    ctx.tape.buffer_alive(b.nbytes)
    result = ops.add(ctx.tape, result, b)
    del b
    return ops.cast(ctx.tape, result, dtype)


def lora_branch_flops(site: LinearSite, r: int) -> int:
    """x @ A.T then @ B.T for one token: 2 r d_in + 2 r d_out FLOPs (2 per multiply-add)."""
    return 2 * r * (site.d_in + site.d_out)


# peft Linear.forward at inference (dropout is Identity): `result = result + lora_B(lora_A(x)) * scaling`:
# two matmuls, the scaling and the add, plus the casts to the fp32 adapter dtype and back (serving.py)
LORA_BRANCH_OPS = 4


def lora_serving(spec, sites, head_sites, run, *, method=None, note: str = "") -> ServingCost:
    """Merged (peft merge_and_unload: W + s B A written into W): nothing extra. Unmerged: the fp32
    factors beside the base, their two matmuls per token, and four kernels plus casts per adapted module
    (Hu et al. 2021, Sec. 4.1)."""
    method = method or LORA
    activations = method.storage(run).linear_dtype
    per_module_ops = LORA_BRANCH_OPS + casts_around(adapter_dtype(run), activations)
    return ServingCost(
        mergeable=True,
        extra_weight_bytes_unmerged=adapter_bytes(method, spec, sites, head_sites, run),
        extra_weight_bytes_merged=0,
        extra_flops_per_token_unmerged=per_adapted_site(spec, sites, head_sites, lambda s: lora_branch_flops(s, run.r)),
        extra_flops_per_token_merged=0,
        extra_sequential_ops_per_block_unmerged=per_module_ops * len(sites),
        extra_sequential_ops_per_block_merged=0,
        note=note or "merged: W + s B A replaces W (peft merge_and_unload); unmerged: B(A(x)) beside each adapted W",
    )


def apply_lora(model, run: RunConfig, targets, notes, *, use_dora: bool = False, freeze_a: bool = False,
               prepared: bool = False):
    """Trace hook: peft LoraConfig(r, lora_alpha=2r, lora_dropout, target_modules) on the model.
    `prepared`: prepare_model_for_kbit_training already enabled checkpointing and input gradients."""
    import peft

    from ...trace.adapters import (count_adapted, enable_checkpointing, enable_input_grads, fan_in_fan_out, peft_model,
                                   split_parameter_targets)

    if run.grad_checkpointing and not prepared:
        enable_checkpointing(model)
    modules, parameters = split_parameter_targets(model, list(targets))
    cfg = peft.LoraConfig(r=run.r, lora_alpha=2 * run.r, lora_dropout=run.dropout, target_modules=modules or None,
                          target_parameters=parameters or None, use_dora=use_dora,
                          fan_in_fan_out=fan_in_fan_out(model, targets),
                          modules_to_save=list(run.modules_to_save) if run.modules_to_save else None)
    model = peft_model(model, cfg)
    if run.adapter_dtype not in (None, "fp32"):
        cast_adapters(model, run.adapter_dtype)
    if freeze_a:
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)
    if run.grad_checkpointing and not prepared:
        enable_input_grads(model)
    return model, count_adapted(model, "lora_A")


def cast_adapters(model, dtype: str) -> None:
    """--adapter-dtype bf16|fp16: the LoRA factors of every peft LoraLayer cast to `dtype`, as
    get_peft_model(..., autocast_adapter_dtype=False) leaves them on a model of that dtype and as the QLoRA
    script's `module.to(torch.bfloat16)` makes them (only lora_A and lora_B are cast here: the script's
    cast of the whole LoraLayer leaves a 4-bit base layer's packed integer weight as it is)."""
    import torch
    from peft.tuners.lora import LoraLayer

    target = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.lora_A.to(target)
            module.lora_B.to(target)


def is_lora_config(peft_config) -> bool:
    """Profiler: a peft LoraConfig (LoRA and the methods built on it)."""
    return type(peft_config).__name__ == "LoraConfig"


LORA = register_method(Method(
    forward_lifetimes=True,  # ligeracc: peft Linear.forward's references (lora.lora_linear)
    name="lora",
    title="LoRA",
    paper="Hu et al. 2021, arXiv:2106.09685",
    recipe="peft LoraConfig(r, lora_alpha=2r, lora_dropout, target_modules); adapters in fp32",
    default_r=8,
    trainable=lora_trainable,
    frozen=lambda site, run: [],
    adapted_linear=lora_linear,
    serving=lora_serving,
    apply_to_model=apply_lora,
    recognise=lambda model, peft_config: is_lora_config(peft_config),  # asked after its variants
))
