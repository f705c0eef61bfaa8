"""A stand-in for galore_torch's GaLoreAdamW (not a dependency of lora-cost): the update of
galore_torch/adamw.py `AdamW.step` with the 'std' projector of galore_torch/galore_projector.py,
transcribed op for op so that the trace's allocator sees the same buffers, and written here because
the package is not installed with the trace extras.

As Trainer builds it (transformers trainer_optimizer.py `_get_galore_optimizer`, optim_args defaults):
rank 128, update_proj_gap 200, scale 0.25, proj_type 'std'; the targeted parameters (every nn.Linear
weight, `optim_target_modules="all-linear"`) form their own group, the others a plain AdamW group.
The state of a targeted [m, n] weight: the projector's orthogonal matrix (SVD of the gradient:
Vh[:rank] [rank, n] when m >= n, else U[:, :rank] [m, rank], cast back to the parameter dtype, or for
fp32 a view that keeps the whole Vh / U alive), and exp_avg, exp_avg_sq shaped like the projected
gradient ([m, rank] or [rank, n]). The traced step is a steady one (step % update_proj_gap != 0: no SVD); the
engine traces the refresh step (an SVD per projected gradient) as a second run, `refresh_next_step` (task "galore").
"""

from __future__ import annotations

import math

import torch

from ..analytic.optimizers import GALORE_RANK, GALORE_UPDATE_GAP  # Trainer's optim_args defaults: rank, update_proj_gap
from ..analytic.svd import GESVDJ_BATCHED_MAX

GALORE_SCALE = 0.25  # trainer_optimizer.py _get_galore_optimizer: optim_args "scale", default 0.25


class Projector:
    """galore_projector.py GaLoreProjector, proj_type 'std', no quantisation."""

    def __init__(self, rank: int) -> None:
        self.rank, self.ortho_matrix = rank, None

    def project(self, full_rank_grad, step: int):
        if full_rank_grad.shape[0] >= full_rank_grad.shape[1]:
            if self.ortho_matrix is None or step % GALORE_UPDATE_GAP == 0:
                self.ortho_matrix = self._orthogonal(full_rank_grad, "right")
            return torch.matmul(full_rank_grad, self.ortho_matrix.t())
        if self.ortho_matrix is None or step % GALORE_UPDATE_GAP == 0:
            self.ortho_matrix = self._orthogonal(full_rank_grad, "left")
        return torch.matmul(self.ortho_matrix.t(), full_rank_grad)

    def project_back(self, low_rank_grad):
        if low_rank_grad.shape[0] >= low_rank_grad.shape[1]:
            full_rank_grad = torch.matmul(low_rank_grad, self.ortho_matrix)
        else:
            full_rank_grad = torch.matmul(self.ortho_matrix, low_rank_grad)
        return full_rank_grad * GALORE_SCALE

    def _orthogonal(self, weights, kind: str):
        """get_orthogonal_matrix, types 'right' and 'left', op for op (the products it makes and drops included:
        they are alive with the SVD's outputs, analytic/optimizers.py `_galore_refresh_tensor`)."""
        float_data = weights.dtype == torch.float
        matrix = weights if float_data else weights.float()
        U, s, Vh = cuda_svd(matrix)
        if kind == "right":
            A = U[:, : self.rank] @ torch.diag(s[: self.rank])  # noqa: F841 (made and dropped, as the library does)
            B = Vh[: self.rank, :]
            return B if float_data else B.type(weights.dtype)
        A = U[:, : self.rank]
        B = torch.diag(s[: self.rank]) @ Vh[: self.rank, :]  # noqa: F841
        return A if float_data else A.type(weights.dtype)


def cuda_svd(matrix):
    """torch.linalg.svd(matrix, full_matrices=False) with what its CUDA kernel allocates and frees inside the call
    (analytic/svd.py, from BatchLinearAlgebra.cpp `_linalg_svd_out` and BatchLinearAlgebraLib.cpp `svd_cusolver`):
    fake tensors' meta kernel makes the outputs U, S, Vh; the int32 `info` and the column-major copy of the input
    (`cloneBatchedColumnMajor`) are made here, with the outputs alive, and dropped. cuSOLVER's gesvdj workspace
    (`lwork`, a run-time query) is not: the result's warning names it."""
    U, s, Vh = torch.linalg.svd(matrix, full_matrices=False)
    m, n = matrix.shape
    info = torch.zeros((), dtype=torch.int32, device=matrix.device)
    column_major = matrix.mT.contiguous()  # [n, m] row-major: the [m, n] matrix in column-major order
    # gesvdjBatched (m, n <= 32) assumes full matrices: a square U_ or V_ when m != n (svd_cusolver_gesvdjBatched)
    square = matrix.new_empty((max(m, n), max(m, n))) if m <= GESVDJ_BATCHED_MAX and n <= GESVDJ_BATCHED_MAX and m != n else None
    del info, column_major, square
    return U, s, Vh


class GaLoreAdamWStandIn(torch.optim.Optimizer):
    def __init__(self, params, targets: set, lr: float = 1e-5) -> None:
        params = list(params)
        groups = [{"params": [p for p in params if id(p) not in targets]},
                  {"params": [p for p in params if id(p) in targets], "rank": GALORE_RANK}]
        super().__init__([g for g in groups if g["params"]], {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-6})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                if "rank" in group:
                    if "projector" not in state:
                        state["projector"] = Projector(group["rank"])
                    grad = state["projector"].project(grad, state["step"])
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                beta1, beta2 = group["betas"]
                state["step"] += 1
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"] * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                norm_grad = exp_avg / denom
                if "rank" in group:
                    norm_grad = state["projector"].project_back(norm_grad)
                p.add_(norm_grad, alpha=-step_size)
        return None

    def refresh_next_step(self) -> None:
        """Make the next step a refresh step (state["step"] a multiple of update_proj_gap, every state made: the
        step at 200, which the first step, with no old matrix and fewer states, does not exceed)."""
        for st in self.state.values():
            if "projector" in st:
                st["step"] = GALORE_UPDATE_GAP

    def state_tensors(self):
        """Every state tensor, the projectors' matrices included (what the allocator keeps between steps)."""
        for st in self.state.values():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    yield v
                elif k == "projector" and v.ortho_matrix is not None:
                    yield v.ortho_matrix


def galore_targets(model) -> set:
    """Trainer's optim_target_modules="all-linear": every nn.Linear's weight, by parameter name (a tied LM head's
    weight is named after the embedding it shares, so it is not a target)."""
    names = dict(model.named_parameters())
    return {id(names[f"{n}.weight"]) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and f"{n}.weight" in names and names[f"{n}.weight"].requires_grad}
