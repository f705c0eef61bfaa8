"""Pfeiffer bottleneck adapters (the LoRA paper's Adapter^P): the `adapters` library's SeqBnConfig, one
adapter after the feed-forward sublayer of every block, its input the residual stream plus the sublayer
output (normed in post-norm models), ReLU between the projections. Everything about bottleneck adapters
lives in `bottleneck.py`."""

from __future__ import annotations

from .base import Method, register_method
from .bottleneck import (PFEIFFER, REDUCTION_FACTOR, apply_with, block_trainable, observed_reduction_factor,
                         recognise_with, residual_with, serving_with, validate)

ADAPTER_PFEIFFER = register_method(Method(
    name="adapter-pfeiffer",
    title="Bottleneck adapters (Pfeiffer)",
    paper="Pfeiffer et al. 2021, arXiv:2005.00247 (EACL 2021)",
    recipe="adapters SeqBnConfig(reduction_factor): after the feed-forward, relu, base and LayerNorms frozen; "
           "adapters in the model's dtype",
    default_r=None,
    trainable=lambda site, run: [],
    frozen=lambda site, run: [],
    adapted_linear=lambda ctx, x, site: ctx.base_linear(x, site),
    adapts_linears=False,
    modules_per_block=1,
    block_trainable=block_trainable(PFEIFFER),
    residual=residual_with(PFEIFFER),
    options=(REDUCTION_FACTOR,),
    validate=validate,
    serving=serving_with(PFEIFFER),
    apply_to_model=apply_with(PFEIFFER),
    recognise=recognise_with(PFEIFFER),
    observed_options=observed_reduction_factor,
))
