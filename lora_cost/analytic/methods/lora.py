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

ADAPTER_DTYPE = "fp32"  # peft autocast_adapter_dtype=True


def lora_trainable(site: LinearSite, run: RunConfig, freeze_a: bool = False) -> list[TensorGroup]:
    r = run.r
    groups = [TensorGroup(f"{site.name}.lora_B", site.d_out * r, 1, ADAPTER_DTYPE)]
    if not freeze_a:
        groups.insert(0, TensorGroup(f"{site.name}.lora_A", r * site.d_in, 1, ADAPTER_DTYPE))
    return groups


def lora_branch(ctx, x, site: LinearSite, *, freeze_a: bool = False):
    """The adapter path B(A(dropout(x))) of one module; returns (x cast to fp32, lora_A out, lora_B out)."""
    tape = ctx.tape
    r = ctx.rank
    xa = ops.cast(tape, x, ADAPTER_DTYPE) if not tape.autocast else x
    xa = ops.dropout(tape, xa, ctx.run.dropout)
    a = ops.linear(tape, xa, site.d_in, r, w_trainable=not freeze_a, w_dtype=ADAPTER_DTYPE, kind="adapter")
    b = ops.linear(tape, a, r, site.d_out, w_trainable=True, w_dtype=ADAPTER_DTYPE, kind="adapter")
    return xa, a, b


def merge_into_base(ctx, base_out, branch_out):
    """result + lora * scaling: the scalar multiply and the add save nothing; the sum is fp32 when
    the base output is 16-bit and is cast back (`result.to(torch_result_dtype)`)."""
    out = ops.add(ctx.tape, base_out, branch_out)
    return ops.cast(ctx.tape, out, base_out.dtype)


def lora_linear(ctx, x, site: LinearSite, *, freeze_a: bool = False):
    base_out = ctx.base_linear(x, site)
    _, _, b = lora_branch(ctx, x, site, freeze_a=freeze_a)
    return merge_into_base(ctx, base_out, b)


def apply_lora(model, run: RunConfig, targets, notes, *, use_dora: bool = False, freeze_a: bool = False,
               prepared: bool = False):
    """Trace hook: peft LoraConfig(r, lora_alpha=2r, lora_dropout, target_modules) on the model.
    `prepared`: prepare_model_for_kbit_training already enabled checkpointing and input gradients."""
    import peft

    from ...trace.adapters import count_adapted, enable_checkpointing, enable_input_grads, fan_in_fan_out, peft_model

    if run.grad_checkpointing and not prepared:
        enable_checkpointing(model)
    cfg = peft.LoraConfig(r=run.r, lora_alpha=2 * run.r, lora_dropout=run.dropout, target_modules=list(targets),
                          use_dora=use_dora, fan_in_fan_out=fan_in_fan_out(model, targets))
    model = peft_model(model, cfg)
    if freeze_a:
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)
    if run.grad_checkpointing and not prepared:
        enable_input_grads(model)
    return model, count_adapted(model, "lora_A")


def is_lora_config(peft_config) -> bool:
    """Profiler: a peft LoraConfig (LoRA and the methods built on it)."""
    return type(peft_config).__name__ == "LoraConfig"


LORA = register_method(Method(
    name="lora",
    title="LoRA",
    paper="Hu et al. 2021, arXiv:2106.09685",
    recipe="peft LoraConfig(r, lora_alpha=2r, lora_dropout, target_modules); adapters in fp32",
    default_r=8,
    trainable=lora_trainable,
    frozen=lambda site, run: [],
    adapted_linear=lora_linear,
    apply_to_model=apply_lora,
    recognise=lambda model, peft_config: is_lora_config(peft_config),  # asked after its variants
))
