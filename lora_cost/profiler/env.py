"""The software and device a profile was taken on."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

import torch

from .results import Environment


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | None, cuda_context_bytes: int | None) -> Environment:
    dev = device or torch.device("cpu")
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = f"{dev.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return Environment(python=sys.version.split()[0], platform=platform.platform(), torch=torch.__version__,
                       transformers=_version("transformers"), peft=_version("peft"),
                       bitsandbytes=_version("bitsandbytes"), fvcore=_version("fvcore"), device=name,
                       device_type=dev.type, cuda_context_bytes=cuda_context_bytes)
