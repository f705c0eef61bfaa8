"""Data types, their sizes, and human-readable formatting of bytes and FLOPs."""

from __future__ import annotations

# Bytes per element of the tensor dtypes the estimator reasons about.
DTYPE_BYTES: dict[str, int] = {
    "fp32": 4,
    "bf16": 2,
    "fp16": 2,
    "int64": 8,
    "int32": 4,
    "uint8": 1,
    "bool": 1,
}

GIB = 2**30
MIB = 2**20


def dtype_bytes(dtype: str) -> int:
    return DTYPE_BYTES[dtype]


def fmt_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'; binary prefixes, as nvidia-smi and torch.cuda report memory."""
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fmt_flops(n: float) -> str:
    """Decimal prefixes, as FLOP counts are usually quoted (1 TFLOP = 1e12)."""
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} FLOP"


def fmt_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def parse_bytes(text: str) -> int:
    """'24GiB' -> 25769803776, '40GB' -> 40e9, '1.5 TiB', '8000000000'. Raises ValueError."""
    t = text.strip().replace(" ", "")
    units = {"tib": 2**40, "gib": 2**30, "mib": 2**20, "kib": 2**10,
             "tb": 10**12, "gb": 10**9, "mb": 10**6, "kb": 10**3, "b": 1}
    low = t.lower()
    for suffix, scale in units.items():
        if low.endswith(suffix):
            number = low[: -len(suffix)]
            break
    else:
        number, scale = low, 1
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"cannot read a memory size from {text!r} (try 24GiB, 40GB or a byte count)") from None
    if not 0 < value < float("inf") or value * scale < 1:  # NaN fails too; 1e-9 is not a budget of 0 bytes
        raise ValueError(f"memory size must be a finite number of at least one byte, got {text!r}")
    if value * scale == float("inf"):
        raise ValueError(f"memory size too large, got {text!r}")
    return int(value * scale)
