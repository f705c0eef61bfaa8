"""NoLA reference layer (Koohpayegani et al. 2024, arXiv:2310.02556), written for the trace engine.

Follows the authors' code (github.com/UCDvision/NOLA README "Simple Code of NOLA": `GenerateParams`,
`NOLALinear` and `LoRA`, also in their peft fork llama/peft/tuners/lora.py):
each LoRA factor is an nn.Linear whose frozen weight is its initial value; the factor used in the
forward is `weight + sum_i coeff_i * basis_i`, where the k bases of the factor's shape are
regenerated from a stored seed inside a custom autograd Function on every forward (a [k, rows, cols]
fp32 buffer that lives only during that op) and regenerated once more in backward for the
coefficients' gradient. Only the coefficients train (k for A, l for B per adapted matrix).
As in peft's LoRA, the layer input is cast to the (fp32) adapter dtype and the branch output is
scaled by alpha / r (alpha = 2r) and added to the frozen base layer's output.
"""

from __future__ import annotations

import torch
from torch import nn


class NolaFactor(nn.Module):
    """The authors' NOLALinear: x @ (GenerateParams(coefficients) + weight).t(), weight frozen."""

    def __init__(self, rows: int, cols: int, bases: int, seed: int) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols
        self.weight = nn.Parameter(torch.empty(rows, cols, dtype=torch.float32), requires_grad=False)
        self.coefficients = nn.Parameter(torch.zeros(bases, dtype=torch.float32))
        # the authors keep the seed as a frozen int64 parameter of one element
        self.seed = nn.Parameter(torch.full((1,), seed, dtype=torch.int64), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = GenerateParams.apply(self.coefficients, self.rows, self.cols) + self.weight
        return x @ w.t()


class GenerateParams(torch.autograd.Function):
    """The authors' GenerateParams: einsum('b,boi->oi', coefficients, basis) with the basis
    regenerated from the seed in backward; saves only the coefficients (a parameter)."""

    @staticmethod
    def forward(ctx, coefficients, rows: int, cols: int):
        out = torch.zeros(rows, cols, device=coefficients.device)  # allocated, then replaced (as upstream)
        basis = torch.zeros(coefficients.shape[0], rows, cols, device=coefficients.device, dtype=coefficients.dtype)
        nn.init.uniform_(basis, a=-1.0, b=1.0)  # after torch.manual_seed(seed) upstream
        out = torch.einsum("b,boi->oi", coefficients, basis)
        ctx.save_for_backward(coefficients)
        ctx.shape = (rows, cols)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        (coefficients,) = ctx.saved_tensors
        rows, cols = ctx.shape
        basis = torch.zeros(coefficients.shape[0], rows, cols, device=coefficients.device, dtype=coefficients.dtype)
        nn.init.uniform_(basis, a=-1.0, b=1.0)
        # under autocast the forward einsum ran in 16-bit; the (fp32) coefficient gradient needs the
        # incoming gradient in the basis dtype (upstream code assumes one dtype throughout)
        return torch.einsum("boi,oi->b", basis, grad_output.to(basis.dtype)), None, None


class NolaLinear(nn.Module):
    """A frozen base linear (nn.Linear or GPT-2 Conv1D) plus the NoLA branch B(A(dropout(x)))."""

    def __init__(self, base: nn.Module, d_in: int, d_out: int, r: int, k: int, l: int, dropout: float, seed: int) -> None:
        super().__init__()
        self.base_layer = base
        self.nola_A = NolaFactor(r, d_in, k, seed)
        self.nola_B = NolaFactor(d_out, r, l, seed + 1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = 2.0  # lora_alpha / r with alpha = 2r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        dtype = result.dtype
        xa = x.to(torch.float32)  # peft _cast_input_dtype to the adapter dtype
        result = result + self.nola_B(self.nola_A(self.dropout(xa))) * self.scaling
        return result.to(dtype)


def attach_nola(model: nn.Module, targets, r: int, k: int, l: int, dropout: float) -> int:
    """Freeze the model and wrap every targeted nn.Linear / Conv1D (not the output embedding) in a
    NolaLinear; returns how many were wrapped."""
    from transformers.pytorch_utils import Conv1D

    for p in model.parameters():
        p.requires_grad_(False)
    wanted = set(targets)
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name not in wanted or not isinstance(child, (nn.Linear, Conv1D)) or child is model.get_output_embeddings():
                continue
            d_in, d_out = (child.in_features, child.out_features) if isinstance(child, nn.Linear) else tuple(child.weight.shape)
            setattr(parent, name, NolaLinear(child, d_in, d_out, r, k, l, dropout, seed=count))
            count += 1
    return count
