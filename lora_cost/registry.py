"""One small registry type, used once per concept (methods, optimizers, architectures)."""

from __future__ import annotations

from typing import Generic, Iterable, TypeVar

from .errors import LoraCostError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> entries. Registering a name twice is a programming error; looking up an unknown
    name is the user's error (LoraCostError naming the choices)."""

    def __init__(self, kind: str, normalise=lambda name: name, load=None) -> None:
        self.kind = kind
        self._normalise = normalise
        self._entries: dict[str, T] = {}
        # entries registered on demand (a registry whose modules are imported lazily): load(name) imports
        # what registers `name`, load(None) everything; called only when an entry is missing, or by all()
        self._load = load

    def _ensure(self, key: str) -> None:
        if key not in self._entries and self._load is not None:
            self._load(key)
            if key not in self._entries:
                self._load(None)

    def register(self, entry: T, names: Iterable[str]) -> T:
        for name in names:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        key = self._normalise(name)
        self._ensure(key)
        if key not in self._entries:
            raise LoraCostError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self._entries)}")
        return self._entries[key]

    def knows(self, name: str) -> bool:
        key = self._normalise(name)
        self._ensure(key)
        return key in self._entries

    def all(self) -> dict[str, T]:
        if self._load is not None:
            self._load(None)
        return dict(self._entries)


def dashed(name: str) -> str:
    """'lora_fa' and 'LoRA-FA' both name 'lora-fa'."""
    return name.lower().replace("_", "-")
