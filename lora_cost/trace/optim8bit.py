"""Stand-ins for bitsandbytes' 8-bit, 32-bit and paged AdamW and Lion (no CUDA kernels here), documented as such.

State, as bitsandbytes `optim/optimizer.py` Optimizer2State.init_state allocates it:
  * AdamW8bit (constants in lora_cost/analytic/formulas/storage.py): for a parameter of at least
    `min_8bit_size` (4096) elements, two uint8 states shaped
    like the parameter and, blockwise (256), two fp32 absmax vectors of ceil(n / 256); smaller
    parameters keep two fp32 states. The quantisation maps are shared by all parameters (counted once).
  * 32-bit variants: fp32 states whatever the parameter dtype (init_state: `dtype = torch.float32`).
  * Lion (Optimizer1State): `state1` (and `absmax1`) only: one state instead of two.
  * paged variants: the same states in CUDA managed memory (`F.get_paged`), outside PyTorch's
    caching allocator: they are not counted in the simulated allocated memory and are reported as
    `paged_optimizer_bytes`.
Step: bitsandbytes' fused update kernels (`optimizer_update_8bit_blockwise`, `optimizer_update_32bit`)
read the gradient and write the parameter and both states in place, with no temporary buffer; the
stand-in updates the parameter in place (`add_` with alpha) and allocates nothing either.
"""

from __future__ import annotations

import torch

from ..analytic.formulas.storage import BNB_8BIT_BLOCK, BNB_8BIT_MIN_SIZE, blocks as n_blocks


class BnbAdamStandIn(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-5, eight_bit: bool = True, paged: bool = False, states: int = 2) -> None:
        super().__init__(params, {"lr": lr})
        self.eight_bit, self.paged, self.states = eight_bit, paged, states

    def init_state(self, mode) -> None:
        with mode:
            for group in self.param_groups:
                for p in group["params"]:
                    st = self.state[p]
                    st["step"] = 1
                    if self.eight_bit and p.numel() >= BNB_8BIT_MIN_SIZE:
                        blocks = n_blocks(p.numel(), BNB_8BIT_BLOCK)
                        for i in range(1, self.states + 1):
                            st[f"state{i}"] = torch.zeros_like(p, dtype=torch.uint8)
                            st[f"absmax{i}"] = torch.zeros(blocks, dtype=torch.float32)
                    else:
                        for i in range(1, self.states + 1):
                            st[f"state{i}"] = torch.zeros_like(p, dtype=torch.float32)

    def state_bytes(self) -> int:
        return sum(v.untyped_storage().nbytes() for st in self.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])  # in place, like the fused kernel
                    self.state[p]["step"] += 1
        return None
