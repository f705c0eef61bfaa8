"""Model families, one module each, all registered in `base`'s single registry.

Every module of this package is imported here (each family module registers itself), so a new
family is one new module: no list of families to extend anywhere else.
"""

import importlib
import pkgutil

from .base import Architecture, ParamGroup, get_architecture, register_architecture, supported_model_types  # noqa: F401

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
