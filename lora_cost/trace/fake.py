"""Turn a model built on the meta device into fake tensors (FakeTensorMode: shapes, no data).

Parameters keep their identity rules: a tensor shared by several modules (tied embeddings, VeRA's
shared projections) becomes one fake tensor shared the same way.
"""

from __future__ import annotations

import torch
from torch import nn


def materialize(model: nn.Module, mode) -> None:
    """Replace every meta parameter, buffer and tensor attribute of `model` by a fake CPU tensor."""
    memo: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:
            with mode:
                memo[id(t)] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")
        return memo[id(t)]

    params: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in params:
                params[id(p)] = nn.Parameter(fake(p), requires_grad=p.requires_grad)
            mod._parameters[name] = params[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = fake(b)
        for name, value in list(vars(mod).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.is_meta:
                setattr(mod, name, fake(value))
