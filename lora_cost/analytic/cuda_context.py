"""Device memory outside PyTorch's caching allocator, per GPU profile and library set (torch-free).

The bundled figures (profiles/cuda_context.json) are measurements: device used minus reserved after a
training step, on the GPU and software named with each figure. A step's context is the figure for its
GPU and model family (the kernels a family runs are loaded lazily, CUDA_MODULE_LOADING=LAZY, so the
family changes it by up to 22 MiB on the H100), plus each loaded library's own device state
(bitsandbytes: 0 B measured beyond its family). A GPU or family without a measurement gets the
largest figure and says so.
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


def context_for(gpu: str | None, family: str, libraries: tuple[str, ...] = ()) -> CudaContext:
    """The context figure for `gpu` (a bundled profile name; None: the calibration's H100) and the
    model family, with the libraries' extra device state."""
    table = _table()
    gpu = gpu or "h100-80gb"
    for m in table["measurements"]:
        if gpu in m["gpus"]:
            extra = sum(m.get("libraries", {}).get(lib, 0) for lib in libraries)
            figures = m["by_family"]
            if family in figures:
                return CudaContext(figures[family] + extra, 0 if gpu == m["gpus"][0] else m["spread_bytes"], True,
                                   m["source"])
            return CudaContext(max(figures.values()) + extra, m["spread_bytes"], False,
                               m["source"] + f" ({family}: not measured; the largest family figure)")
    d = table["default"]
    return CudaContext(d["bytes"], d["spread_bytes"], False, d["source"])
