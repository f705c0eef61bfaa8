"""Pfeiffer bottleneck adapters (the LoRA paper's Adapter^P): the `adapters` library's SeqBnConfig, one
adapter after the feed-forward sublayer of every block, its input the residual stream plus the sublayer
output (normed in post-norm models), ReLU between the projections. Everything about bottleneck adapters
lives in `bottleneck.py`."""

from __future__ import annotations

from .base import Method, register_method
from .bottleneck import PFEIFFER, layout_fields

ADAPTER_PFEIFFER = register_method(Method(
    name="adapter-pfeiffer",
    title="Bottleneck adapters (Pfeiffer)",
    paper="Pfeiffer et al. 2021, arXiv:2005.00247 (EACL 2021)",
    recipe="adapters SeqBnConfig(reduction_factor): after the feed-forward, relu, base and LayerNorms frozen; "
           "adapters in the model's dtype",
    **layout_fields(PFEIFFER),
))
