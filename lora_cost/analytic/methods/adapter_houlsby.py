"""Houlsby bottleneck adapters (the LoRA paper's Adapter^H): the `adapters` library's DoubleSeqBnConfig,
an adapter after the attention and one after the feed-forward sublayer of every block, SiLU ("swish")
between the projections. Everything about bottleneck adapters lives in `bottleneck.py`."""

from __future__ import annotations

from .base import Method, register_method
from .bottleneck import HOULSBY, layout_fields

ADAPTER_HOULSBY = register_method(Method(
    name="adapter-houlsby",
    title="Bottleneck adapters (Houlsby)",
    paper="Houlsby et al. 2019, arXiv:1902.00751 (ICML 2019)",
    recipe="adapters DoubleSeqBnConfig(reduction_factor): after attention and after the feed-forward, swish, "
           "base and LayerNorms frozen; adapters in the model's dtype",
    **layout_fields(HOULSBY),
))
