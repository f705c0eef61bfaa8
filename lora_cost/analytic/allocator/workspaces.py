"""Allocations a training step makes through the caching allocator that are not tensors: the cuBLAS
workspaces (torch-free).

Source: aten/src/ATen/cuda/CublasHandlePool.cpp (torch 2.9-2.11; the revision the code index holds
whose default is "32MiB for Hopper and Blackwell", majors 9, 10 and 12):

- `parseChosenWorkspaceSize`: `CUBLAS_WORKSPACE_CONFIG` (":SIZE_KIB:COUNT" pairs, summed), else the
  default: 4096 * 8 * 1024 B = 32 MiB on compute capability 9.x, 10.x and 12.x, else
  ":4096:2:16:8" = 4096 * 1024 * 2 + 16 * 1024 * 8 B = 8.125 MiB.
- `setWorkspaceForHandle`: one workspace per (cuBLAS handle, stream), taken from
  `CUDACachingAllocator::get()->allocate` the first time the pair runs a cuBLAS call, and held
  for the process's life (`cublas_handle_stream_to_workspace`).
- `getCUDABlasLtWorkspace`: with `unified_cublas_and_lt_workspaces()` (the default outside fbcode),
  cuBLASLt (addmm with a bias epilogue) uses that same (handle, stream) workspace: no second one.
- Handles come from a thread-local `PoolWindow`: a step's forward (the Python thread) and its
  backward (autograd's CUDA device thread, which also runs checkpointed recomputation) hold two
  handles on the one stream, hence two workspaces. The optimizer's foreach kernels call no cuBLAS.

Newer torch (the index's newest revision) adds `TORCH_CUBLAS_WORKSPACE_CACHE`, default off on
CUDA, after which a workspace is allocated per call and freed again; not modelled (the calibration
ran torch 2.11).
"""

from __future__ import annotations

import re

from ...errors import LoraCostError

MIB = 1 << 20
HOPPER_PLUS = 4096 * 8 * 1024  # 32 MiB: CublasHandlePool.cpp default for majors 9, 10, 12
OLDER = 4096 * 1024 * 2 + 16 * 1024 * 8  # ":4096:2:16:8" = 8.125 MiB
# Threads that run cuBLAS in one training step on one stream: the caller's (forward) and autograd's
# device thread (backward, checkpoint recomputation). See the module docstring.
CUBLAS_THREADS = 2
# Where the workspaces reach the allocator in a replayed run (trace/replay.py step_events, compose.py run_events):
# "before" the step, one per cuBLAS thread in a segment of its own, as the H100 rows' allocated counters show
# (the allocated memory at the measured step's start is weights + optimizer state + input ids, to the byte);
# "cached" after each thread's first cuBLAS op (CublasHandlePool.cpp setWorkspaceForHandle); "per_call"; "none".
WORKSPACE_MODES = ("before", "cached", "per_call", "none")
WORKSPACE_MODE = "before"
# aten ops whose CUDA kernels call cuBLAS / cuBLASLt (aten/src/ATen/native/cuda/Blas.cpp).
CUBLAS_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "addmv", "mv", "dot", "vdot", "addbmm", "_addmm_activation",
                        "_scaled_mm", "matmul", "linear", "_int_mm"})


def cublas_workspace_bytes(compute_capability: tuple[int, int] | None = (9, 0), config: str | None = None) -> int:
    """`getChosenWorkspaceSize` for a GPU of `compute_capability` and a CUBLAS_WORKSPACE_CONFIG value."""
    if config:
        pairs = re.findall(r":([0-9]+):([0-9]+)", config)
        if pairs:
            return sum(int(size) * 1024 * int(count) for size, count in pairs)
    major = (compute_capability or (9, 0))[0]
    return HOPPER_PLUS if major in (9, 10, 12) else OLDER


def parse_capability(text: str) -> tuple[int, int]:
    """'9.0' -> (9, 0); a GPU profile's compute capability."""
    m = re.fullmatch(r"\s*([0-9]+)\.([0-9]+)\s*", str(text))
    if not m:
        raise LoraCostError(f"compute capability: expected MAJOR.MINOR, got {text!r}")
    return int(m.group(1)), int(m.group(2))
