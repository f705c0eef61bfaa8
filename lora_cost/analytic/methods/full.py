"""Full fine-tuning: every parameter trains; no adapter."""

from __future__ import annotations

from dataclasses import replace

from .base import Method, register_method
from .serving import NONE, ServingCost


def apply_full(model, run, targets, notes):
    """Trace hook: every parameter requires grad (no adapter, nothing adapted)."""
    from ...trace.adapters import enable_checkpointing

    for p in model.parameters():
        p.requires_grad_(True)
    if run.grad_checkpointing:
        enable_checkpointing(model)
    return model, 0


def full_serving(spec, sites, head_sites, run) -> ServingCost:
    """Nothing beside the base: the fine-tuned weights are the model (one whole copy per task)."""
    return replace(NONE, note="the served model is the fine-tuned model itself: the base's size, one whole copy per task")


def recognise_full(model, peft_config) -> bool:
    """Profiler: no peft adapters and every parameter trains."""
    return peft_config is None and all(p.requires_grad for p in model.parameters())


FULL = register_method(Method(
    forward_lifetimes=True,  # ligeracc: peft Linear.forward's references (lora.lora_linear)
    name="full",
    title="Full fine-tuning",
    paper="(baseline)",
    recipe="all model parameters require grad; with --precision bf16 weights, gradients and AdamW moments are all bf16 (pure bf16)",
    default_r=None,
    trainable=lambda site, run: [],
    frozen=lambda site, run: [],
    adapted_linear=lambda ctx, x, site: ctx.base_linear(x, site),
    base_trainable=True,
    serving=full_serving,
    apply_to_model=apply_full,
    recognise=recognise_full,
))
