"""Mixture-of-experts models in the trace: transformers' default experts path (integrations/moe.py
`grouped_mm_experts_forward`) runs `aten._grouped_mm` over all n*k (token, expert) rows.

Routing is data-dependent in value only: the sort, the gathers and `histc` keep static shapes ([n*k, d]
rows, [E] offsets), so the fake tensors' arbitrary routing cannot change a shape, a saved tensor or a FLOP
count; the trace therefore needs no forced routing, and it measures balanced and imbalanced routing alike
(the grouped GEMM's cost does not depend on how rows spread over experts).

What it does need: torch's meta kernel for `_grouped_mm` copies the checks of the CUDA kernel that accepts
only bf16 operands (aten/src/ATen/native/cuda/GroupedBlas.cpp); for other dtypes the CUDA op runs its
fallback (one matmul per group), same shapes and dtypes. `any_dtype_grouped_mm` lets the fake kernel accept
them (fp32 runs, AMP's fp32 master weights, the experts QLoRA's preparation casts to fp32).
"""

from __future__ import annotations

import contextlib

import torch

GROUPED_MM = torch.ops.aten._grouped_mm.default


def _grouped_mm_meta(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
    """The output shape of _grouped_mm, as torch's _create_grouped_mm_output_tensor: 2-D x 2-D (groups along
    k, a weight gradient) [m, S] x [S, n] -> [E, m, n]; 2-D x 3-D [S, k] x [E, k, n] -> [S, n]; 3-D x 2-D
    [E, m, k] x [k, N] -> [m, N]; 3-D x 3-D batched. In a's dtype unless out_dtype is given."""
    dtype = out_dtype or mat_a.dtype
    if mat_a.dim() == 2 and mat_b.dim() == 2:  # K grouped (a weight gradient): one [m, n] per group
        shape = (offs.shape[0], mat_a.shape[0], mat_b.shape[1])
    elif mat_a.dim() == 2 and mat_b.dim() == 3:
        shape = (mat_a.shape[0], mat_b.shape[-1])
    elif mat_a.dim() == 3 and mat_b.dim() == 2:
        shape = (mat_a.shape[1], mat_b.shape[-1])
    else:
        shape = (mat_a.shape[0], mat_a.shape[1], mat_b.shape[-1])
    return mat_a.new_empty(shape, dtype=dtype)


@contextlib.contextmanager
def any_dtype_grouped_mm():
    """Replace the Meta kernel of aten._grouped_mm (which fake tensors run) for the duration of a trace;
    the dispatcher restores torch's own when the library is destroyed."""
    lib = torch.library.Library("aten", "IMPL")
    try:
        lib.impl("_grouped_mm", _grouped_mm_meta, "Meta", allow_override=True)
        yield
    finally:
        lib._destroy()
