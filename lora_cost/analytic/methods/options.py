"""A method's typed options: each declares its name (the key in `RunConfig.method_options` and in the
JSON), its CLI flag, type, default and range; the CLI generates its flags from them and every value is
checked here, in one place, whichever way it came in (flag, Python API, profiler)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...errors import LoraCostError

_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


@dataclass(frozen=True)
class MethodOption:
    name: str  # key in method_options (API and JSON), e.g. "k"
    flag: str  # CLI flag, e.g. "--nola-k"; a bool option also gets "--no-..."
    type: type  # bool, int, float or str
    default: object
    help: str
    choices: tuple[str, ...] | None = None
    minimum: int | None = None  # smallest allowed value of an int option
    # largest allowed value of an int option: every int option is a size or a count of vectors (virtual
    # tokens, bases, hidden widths, ranks), and 2**20 is beyond any model's width, as for --r (spec.py)
    maximum: int | None = 1 << 20
    above: float | None = None  # a float option must be greater than this (LoRA+'s ratio > 0)

    def __post_init__(self) -> None:
        if self.type not in _TYPE_NAMES:
            raise TypeError(f"option {self.name}: type must be one of bool, int, float, str")
        if not self.flag.startswith("--"):
            raise ValueError(f"option {self.name}: flag {self.flag!r} must start with --")
        try:
            self.check(self.default)
        except LoraCostError as exc:  # a programming error in the method's declaration, not bad input
            raise ValueError(f"option {self.name}: its default fails its own check: {exc}") from None

    def check(self, value: object) -> object:
        """The value if it is of the declared type, within range and among the choices; else LoraCostError."""
        # bool is a subclass of int: an int option must not take True, a bool option not 1
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # 16 given through the Python API means 16.0
        if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
            raise LoraCostError(f"{self.flag} must be {_TYPE_NAMES[self.type]}, got {value!r}")
        if self.type is float and not math.isfinite(value):
            raise LoraCostError(f"{self.flag} must be a finite number, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise LoraCostError(f"{self.flag} must be one of {', '.join(self.choices)}, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise LoraCostError(f"{self.flag} must be at least {self.minimum}, got {value!r}")
        if self.type is int and self.maximum is not None and value > self.maximum:
            raise LoraCostError(f"{self.flag} must be at most {self.maximum:,}, got {value!r}")
        if self.above is not None and not value > self.above:
            raise LoraCostError(f"{self.flag} must be greater than {self.above:g}, got {value!r}")
        return value

    def value(self, run) -> object:
        """The run's value of this option, or its default."""
        value = run.option(self.name, self.default)
        return float(value) if self.type is float and isinstance(value, int) else value

    def describe_default(self) -> str:
        if self.type is bool:
            return "on" if self.default else "off"
        return str(self.default)
