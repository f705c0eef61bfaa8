"""Model families, one module each, all registered in `base`'s single registry.

Each family module registers itself when imported; the registry imports a family's module on the first
lookup of one of its model types (base.py `family_index`), and every module when asked for all of them.
So a new family is one new module: no list of families to extend anywhere else.
"""

from .base import Architecture, ParamGroup, get_architecture, register_architecture, supported_model_types  # noqa: F401
