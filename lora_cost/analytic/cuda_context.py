"""Device memory outside PyTorch's caching allocator, per GPU profile and library set (torch-free).

The bundled figures (profiles/cuda_context.json) are measurements: device used minus reserved after a
training step, on the GPU and software named with each figure. The kernels a step runs are loaded
lazily (CUDA_MODULE_LOADING=LAZY), so the figure moves with the model family and recipe: by up to
22 MiB across the H100 rows. One figure per GPU is used, the largest measured, with that spread as
its uncertainty, rather than a table keyed on the families that happen to have been measured; each
loaded library's own device state is added (bitsandbytes: 0 B measured). A GPU without a measurement
gets the default figure and says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

from ..profiles import profiles_dir


@dataclass(frozen=True)
class CudaContext:
    bytes: int
    spread_bytes: int  # uncertainty of the figure (largest minus smallest measured)
    measured: bool  # a measurement for this GPU and family (not a fallback)
    source: str


@lru_cache(maxsize=1)
def _table() -> dict:
    return json.loads((profiles_dir() / "cuda_context.json").read_text())


@lru_cache(maxsize=1024)  # speed: a pure function of the bundled table, asked once per estimate (sweeps: per batch)
def context_for(gpu: str | None, family: str, libraries: tuple[str, ...] = ()) -> CudaContext:
    """The context figure for `gpu` (a bundled profile name; None: the calibration's H100), with the
    libraries' extra device state. `family` is kept for the record: it does not select the figure."""
    table = _table()
    gpu = gpu or "h100-80gb"
    for m in table["measurements"]:
        if gpu in m["gpus"]:
            extra = sum(m.get("libraries", {}).get(lib, 0) for lib in libraries)
            figures = m["by_family"]  # the evidence: the same software on each family measured
            return CudaContext(max(figures.values()) + extra, m["spread_bytes"], True,
                               m["source"] + " (the largest figure; the spread across families is its uncertainty)")
    d = table["default"]
    return CudaContext(d["bytes"], d["spread_bytes"], False, d["source"])
