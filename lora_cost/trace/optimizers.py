"""The trace engine's optimizers: the real torch / transformers ones where they run on CPU fake tensors,
the documented bitsandbytes stand-in (optim8bit.py) where they do not, and two wrappers for
--master-weights fp32 and --optimizer-in-backward (the rules: lora_cost/analytic/optimizer_budget.py).

Stand-in: GaLore AdamW (galore.py, a transcription of galore_torch's step). Real: torch.optim.AdamW foreach (`adamw-torch`) and fused (`adamw-torch-fused`: `_fused_adamw_` has a
meta kernel, and `_init_group` puts each `step` on the parameter's device), torch.optim.SGD,
transformers' Adafactor as Trainer builds it. Their state is created by one real step on zero
gradients before the traced step (AdamW and SGD keep the explicit construction of step.init_state).
"""

from __future__ import annotations

import torch


def make_base(name: str, params: list, galore_targets: set = frozenset()):
    """The optimizer registered as `name` (any accepted spelling) over `params` (GaLore: projecting `galore_targets`)."""
    from ..analytic.optimizers import get_optimizer
    name = get_optimizer(name).name
    if name == "adamw-torch":  # foreach: what PyTorch defaults to for CUDA tensors (CPU defaults to the loop)
        return torch.optim.AdamW(params, lr=1e-5, foreach=True)
    if name == "adamw-torch-fused":  # transformers trainer_optimizer.py _get_adamw_torch: fused=True
        return torch.optim.AdamW(params, lr=1e-5, fused=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-5, momentum=0.9, foreach=True)
    if name == "adafactor":  # trainer_optimizer.py _get_adafactor
        from transformers.optimization import Adafactor
        return Adafactor(params, lr=1e-5, scale_parameter=False, relative_step=False)
    if name in ("adamw-torch-8bit", "adamw-torch-4bit"):  # trainer_optimizer.py: torchao AdamW8bit / AdamW4bit
        from .optim_torchao import TorchaoAdamStandIn
        return TorchaoAdamStandIn(params, bits=8 if "8bit" in name else 4)
    if name == "galore-adamw":  # trainer_optimizer.py _get_galore_optimizer; the stand-in of galore.py
        from .galore import GaLoreAdamWStandIn
        return GaLoreAdamWStandIn(params, galore_targets)
    from .optim8bit import BnbAdamStandIn

    return BnbAdamStandIn(params, lr=1e-5, eight_bit="8bit" in name, paged=name.startswith("paged"),
                          states=1 if "lion" in name else 2)


def warm_state(opt, mode) -> None:
    """Create an optimizer's state as its own first step does: one step on zero gradients (fake tensors:
    nothing is computed), then zero_grad. Run before the traced step, outside the allocator's view."""
    params = [p for group in opt.param_groups for p in group["params"]]
    with mode:
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    opt.zero_grad(set_to_none=True)


def refresh_next_step(opt) -> None:
    """Make the next step an optimizer's occasional heavier one (GaLore's projector refresh, galore.py), through
    the wrappers; an optimizer without one is left as it is."""
    if hasattr(opt, "per_tensor"):
        for _, one in opt.per_tensor:
            refresh_next_step(one)
    elif hasattr(opt, "inner"):
        refresh_next_step(opt.inner)
    elif hasattr(opt, "refresh_next_step"):
        opt.refresh_next_step()


def state_tensors(opt):
    """Every tensor an optimizer (or a wrapper of them) keeps between steps."""
    if hasattr(opt, "per_tensor"):
        for _, one in opt.per_tensor:
            yield from state_tensors(one)
    elif hasattr(opt, "inner"):
        yield from state_tensors(opt.inner)
    elif hasattr(opt, "state_tensors"):
        yield from opt.state_tensors()
    else:
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    yield v


class MasterWeights:
    """fp32 master copies of the 16-bit trainable tensors, the inner optimizer updating them (Megatron-LM
    `Float16OptimizerWithFloat16Params`): at `step`, every 16-bit gradient is copied into an fp32
    gradient of its master first (`_copy_model_grads_to_main_grads`), the inner optimizer steps, the
    masters are written back into the 16-bit weights (`_copy_main_params_to_model_params`) and the fp32
    gradients dropped. fp32 tensors are their own masters."""

    def __init__(self, params: list, make_inner) -> None:
        self.params, self.make_inner = params, make_inner
        self.pairs: list = []
        self.inner = None

    def init_state(self, mode, init_inner) -> None:
        with mode:
            self.pairs = [(p, p.detach().float() if p.dtype in (torch.bfloat16, torch.float16) else p) for p in self.params]
        if not self.masters and not getattr(self, "part_of_many", False):
            from ..errors import LoraCostError
            raise LoraCostError("--master-weights fp32: every trainable tensor is already fp32: there is no 16-bit "
                                "weight to keep a master copy of")
        self.inner = self.make_inner([m for _, m in self.pairs])
        init_inner(self.inner, mode)

    @property
    def masters(self) -> list:
        return [m for p, m in self.pairs if m is not p]

    @property
    def state(self):
        return self.inner.state

    @property
    def paged(self) -> bool:
        return getattr(self.inner, "paged", False)

    def state_bytes(self) -> int:
        return self.inner.state_bytes()

    @torch.no_grad()
    def step(self, closure=None):
        for p, m in self.pairs:
            if m is not p and p.grad is not None:
                m.grad = p.grad.float()
        self.inner.step()
        for p, m in self.pairs:
            if m is not p:
                p.copy_(m)
                m.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


class InBackward:
    """torchtune's `optimizer_in_bwd`: one optimizer per trainable tensor, stepped and zeroed from the
    tensor's `register_post_accumulate_grad_hook` (recipes/full_finetune_single_device.py); the loop's
    own opt.step() and zero_grad() then have nothing to do."""

    def __init__(self, params: list, make_one) -> None:
        self.per_tensor = [(p, make_one([p])) for p in params]
        self.handles: list = []
        for _, opt in self.per_tensor:
            opt.part_of_many = True  # a master-weights wrapper of one fp32 tensor is fine; all of them is not

    def init_state(self, mode, init_one) -> None:
        for _, opt in self.per_tensor:
            init_one(opt, mode)
        if any(isinstance(opt, MasterWeights) for _, opt in self.per_tensor) and not self.masters:
            from ..errors import LoraCostError
            raise LoraCostError("--master-weights fp32: every trainable tensor is already fp32: there is no 16-bit "
                                "weight to keep a master copy of")

    def install(self, snapshot=None) -> None:
        """`snapshot()`: the FLOP counter's per-op counts; what the steps count is kept apart in `step_flops`
        (optimizer work, not the model's backward, though it runs inside it)."""
        self.step_flops: dict[str, int] = {}

        def hook(p, opt):
            before = snapshot() if snapshot else {}
            opt.step()
            opt.zero_grad(set_to_none=True)
            for op, v in (snapshot() if snapshot else {}).items():
                if v - before.get(op, 0):
                    self.step_flops[op] = self.step_flops.get(op, 0) + v - before.get(op, 0)

        self.handles = [p.register_post_accumulate_grad_hook(lambda p, opt=opt: hook(p, opt)) for p, opt in self.per_tensor]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    @property
    def state(self) -> dict:
        out = {}
        for _, opt in self.per_tensor:
            out.update(opt.state)
        return out

    @property
    def masters(self) -> list:
        return [m for _, opt in self.per_tensor for m in getattr(opt, "masters", [])]

    @property
    def paged(self) -> bool:
        return any(getattr(opt, "paged", False) for _, opt in self.per_tensor)

    def state_bytes(self) -> int:
        return sum(opt.state_bytes() for _, opt in self.per_tensor if hasattr(opt, "state_bytes"))

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None
