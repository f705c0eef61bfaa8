"""Per-family tensor accounting, registered once each in `base`'s registry."""

from .base import Architecture, ParamGroup, get_architecture, register_architecture, supported_model_types  # noqa: F401
from . import gpt2, llama, bert  # noqa: F401  (registration side effects)
