"""Composite kernels CUDA runs op by op, which FakeTensorMode would answer in one step.

An op registered only as CompositeExplicitAutograd has no CUDA kernel of its own: on a GPU its C++
body runs, and every tensor the body creates is a real allocation. FakeTensorMode answers such an op
from its meta function (torch/_meta_registrations.py), so a dispatch mode above it sees the output
and nothing of the body. For the ops listed here the allocator replays the installed torch's own body
(`OpOverload._op_dk(CompositeExplicitAutograd, ...)`) with itself re-entered, so each intermediate is
allocated and freed where the body allocates and frees it.

  * `aten._safe_softmax` (aten/src/ATen/native/transformers/attention.cpp), the softmax of the math
    sdpa path since torch 2.5: `out = softmax(x)`, `masked = x.isneginf()` (a bool tensor the size of
    the scores), `masked_rows = all(masked, dim, keepdim)`, `where_out(out, masked_rows, 0, out)`.
    The bool mask is alive while the probabilities are written: [b, h, s, s] bytes on top of the
    scores and the probabilities, in the forward and again in a checkpointed block's recomputation.
    (Older bodies used `eq` and an out-of-place `where`, a second [b, h, s, s] probabilities tensor
    for a moment; the replay runs whichever body the installed torch has.)

Only ops whose registration lists no device kernel belong here (native_functions.yaml: `_safe_softmax`
dispatches CompositeExplicitAutograd and NestedTensor only); an op with a CUDA kernel (e.g. the
`_foreach_*` family) runs that kernel on a GPU, not its composite fallback.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten
_CEA = torch._C.DispatchKey.CompositeExplicitAutograd

# (a torch without the op's composite kernel, or without `_op_dk`, keeps the one-step meta answer)
REPLAYED = frozenset(op for op in (aten._safe_softmax.default,)
                     if hasattr(op, "_op_dk")
                     and torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeExplicitAutograd"))


def replays(func) -> bool:
    return func in REPLAYED


def replay(mode, func, args, kwargs):
    """Run `func`'s composite body with `mode` (the allocator) active, so its ops allocate through it."""
    with mode:
        return func._op_dk(_CEA, *args, **kwargs)
