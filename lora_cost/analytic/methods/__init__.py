"""Fine-tuning methods, one module each, all registered in `base`'s single registry.

Every module of this package is imported here (each method module registers itself), so a new
method is one new module: no list of methods to extend anywhere else.
"""

import importlib
import pkgutil

from .base import Method, TensorGroup, all_methods, get_method, register_method  # noqa: F401

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
