"""A stand-in for torchao's low-bit AdamW (torchao/optim/adam.py AdamW8bit, AdamW4bit: what Trainer's
`adamw_torch_8bit` / `adamw_torch_4bit` build), documented as such: torchao is not a dependency, and its
update is a torch.compile'd function per tensor.

State, as `_AdamBase._new_buffer` allocates it for exp_avg and exp_avg_sq: a tensor of at least 4096
elements whose size divides by the block (256 for 8-bit, 128 for 4-bit) becomes an OptimState8bit /
OptimState4bit (subclass_8bit.py, subclass_4bit.py `zeros`): `codes` (uint8, one per element; 4-bit:
two per byte), `scale` (fp32, one per block) and `qmap` (fp32, 2^bits entries, one per state tensor);
any other tensor a plain `torch.zeros_like(p)` in the parameter dtype. `step` and the lr are CPU scalars.
Step: the stand-in updates the parameter in place and allocates nothing: the buffers inductor keeps in
the compiled `single_param_adam` are not modelled (the analytic engine counts none either).
"""

from __future__ import annotations

import torch

from ..analytic.optimizers import TORCHAO_MIN_SIZE, torchao_block


class TorchaoAdamStandIn(torch.optim.Optimizer):
    def __init__(self, params, bits: int, lr: float = 1e-5) -> None:
        super().__init__(params, {"lr": lr})
        self.bits = bits

    def init_state(self, mode) -> None:
        block = torchao_block(self.bits)
        with mode:
            for group in self.param_groups:
                for p in group["params"]:
                    st = self.state[p]
                    st["step"] = 1
                    for name in ("exp_avg", "exp_avg_sq"):
                        n = p.numel()
                        if n >= TORCHAO_MIN_SIZE and n % block == 0:
                            st[f"{name}.codes"] = torch.zeros(n * self.bits // 8, dtype=torch.uint8)
                            st[f"{name}.scale"] = torch.zeros(n // block, dtype=torch.float32)
                            st[f"{name}.qmap"] = torch.zeros(2 ** self.bits, dtype=torch.float32)
                        else:
                            st[name] = torch.zeros_like(p)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
                    self.state[p]["step"] += 1
        return None
