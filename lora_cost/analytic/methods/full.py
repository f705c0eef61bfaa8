"""Full fine-tuning: every parameter trains; no adapter."""

from __future__ import annotations

from .base import Method, register_method

FULL = register_method(Method(
    name="full",
    title="Full fine-tuning",
    paper="(baseline)",
    recipe="all model parameters require grad; with --precision bf16 weights, gradients and AdamW moments are all bf16 (pure bf16)",
    default_r=None,
    trainable=lambda site, run: [],
    frozen=lambda site, run: [],
    adapted_linear=lambda ctx, x, site: ctx.base_linear(x, site),
    base_trainable=True,
))
