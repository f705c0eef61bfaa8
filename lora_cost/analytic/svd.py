"""What `torch.linalg.svd(A, full_matrices=False)` allocates on a CUDA device for one fp32 [m, n] matrix (GaLore's
projector refresh, galore_projector.py `get_orthogonal_matrix`). Torch-free: pure functions of the shape.

From torch's source (aten/src/ATen/native/BatchLinearAlgebra.cpp and cuda/linalg/BatchLinearAlgebraLib.cpp; the lines
are quoted in tests/data/galore_refresh_source.txt and checked by tests/test_galore_refresh.py):

* the structured kernel `_linalg_svd`'s meta function allocates the outputs first: U [m, k] (F-contiguous), S [k] (real
  dtype), Vh [k, n] (C-contiguous on cuSOLVER: its `.mT` is the F-contiguous V that cuSOLVER writes), k = min(m, n);
* `_linalg_svd_out` allocates `info = at::zeros(A.sizes()[:-2], kInt)`: a 0-dim int32 for one matrix (4 bytes, one
  512-byte block of the caching allocator);
* `svd_kernel` (CUDA) calls `svd_cusolver` (MAGMA is deprecated for it: `_warn_once_magma_deprecation`) with
  `Vh.mT()` as the V it writes (the outputs are used in place: `borrow_else_clone` copies nothing when U is
  F-contiguous and, on cuSOLVER, Vh C-contiguous, as the meta function made them); `svd_cusolver`'s default driver
  is gesvdj (`driver.value_or("gesvdj")`), which calls `svd_cusolver_gesvdj(cloneBatchedColumnMajor(A), ...)`
  (`svd_cusolver_gesvdjBatched` with the same copy when m, n <= 32): a column-major copy of A (m x n x 4 bytes, freed
  when the call returns); with m, n <= 32 and m != n, `svd_cusolver_gesvdjBatched` also makes a square U_ (m x m)
  or V_ (n x n) for the kernel, which assumes full matrices, and copies the k columns back;
* `apply_svd_cusolver_gesvdj` asks cuSOLVER for `lwork` (`gesvdj_buffersize`, cusolverDnSgesvdj_bufferSize) and takes
  `sizeof(float) * lwork` from the caching allocator (`allocator.allocate`): a size cuSOLVER decides at run time from
  its Jacobi implementation. It is NOT counted here: every estimate that contains an SVD says so in a warning;
* after the call `_check_gesvdj_convergence` copies `info` to the host; a matrix gesvdj did not converge on is redone
  by gesvd (`svd_cusolver_gesvd`: another column-major copy, an [n, k] Vh workspace, `lwork` and `min(m, n)` floats
  of work): data-dependent, named in the same warning, not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..units import DTYPE_BYTES
from .formulas.blocks import allocated

FP32 = DTYPE_BYTES["fp32"]

INT32 = 4  # bytes of the int32 info flag
GESVDJ_BATCHED_MAX = 32  # svd_cusolver: "if (m <= 32 && n <= 32)" gesvdjBatched (a cuSOLVER limit)


@dataclass(frozen=True)
class SvdBuffers:
    """The allocations of one reduced SVD of an fp32 [m, n] matrix, each as the caching allocator counts it."""

    outputs: int  # U [m, k] + S [k] + Vh [k, n], alive after the call
    info: int  # the int32 convergence flag, freed when the op returns
    input_copy: int  # cloneBatchedColumnMajor(A), freed when the op returns
    square: int = 0  # gesvdjBatched (m, n <= 32, m != n): the full-size U_ or V_, freed when the op returns

    @property
    def inside(self) -> int:
        """Alive inside the call: outputs + info + the column-major copy (cuSOLVER's workspace is not counted:
        SVD_WARNING)."""
        return self.outputs + self.info + self.input_copy + self.square


def svd_buffers(m: int, n: int) -> SvdBuffers:
    """torch.linalg.svd(fp32 [m, n], full_matrices=False) on CUDA through cuSOLVER gesvdj (gesvdjBatched for m, n <= 32)."""
    k = min(m, n)
    outputs = allocated(m * k * FP32) + allocated(k * FP32) + allocated(k * n * FP32)
    square = allocated(max(m, n) ** 2 * FP32) if m <= GESVDJ_BATCHED_MAX and n <= GESVDJ_BATCHED_MAX and m != n else 0
    return SvdBuffers(outputs=outputs, info=allocated(INT32), input_copy=allocated(m * n * FP32), square=square)


SVD_WARNING = ("torch.linalg.svd on CUDA (cuSOLVER gesvdj) also takes a workspace of `lwork` floats that "
               "cusolverDnSgesvdj_bufferSize returns at run time (BatchLinearAlgebraLib.cpp apply_svd_cusolver_gesvdj), "
               "and redoes a matrix gesvdj does not converge on with gesvd (another copy of it and its own workspace): "
               "neither is counted in the refresh step's peak")
