"""Fine-tuning methods, one module each, all registered in `base`'s single registry."""

from .base import Method, TensorGroup, all_methods, get_method, register_method  # noqa: F401
from . import full, lora, lora_fa, dora, qlora, vera, nola  # noqa: F401  (registration side effects)
