"""Houlsby bottleneck adapters (the LoRA paper's Adapter^H): the `adapters` library's DoubleSeqBnConfig,
an adapter after the attention and one after the feed-forward sublayer of every block, SiLU ("swish")
between the projections. Everything about bottleneck adapters lives in `bottleneck.py`."""

from __future__ import annotations

from .base import Method, register_method
from .bottleneck import (HOULSBY, REDUCTION_FACTOR, apply_with, block_trainable, observed_reduction_factor,
                         recognise_with, residual_with, serving_with, validate)

ADAPTER_HOULSBY = register_method(Method(
    name="adapter-houlsby",
    title="Bottleneck adapters (Houlsby)",
    paper="Houlsby et al. 2019, arXiv:1902.00751 (ICML 2019)",
    recipe="adapters DoubleSeqBnConfig(reduction_factor): after attention and after the feed-forward, swish, "
           "base and LayerNorms frozen; adapters in the model's dtype",
    default_r=None,
    trainable=lambda site, run: [],
    frozen=lambda site, run: [],
    adapted_linear=lambda ctx, x, site: ctx.base_linear(x, site),
    adapts_linears=False,
    modules_per_block=2,
    block_trainable=block_trainable(HOULSBY),
    residual=residual_with(HOULSBY),
    options=(REDUCTION_FACTOR,),
    validate=validate,
    serving=serving_with(HOULSBY),
    apply_to_model=apply_with(HOULSBY),
    recognise=recognise_with(HOULSBY),
    observed_options=observed_reduction_factor,
))
