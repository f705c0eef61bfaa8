"""What the optimizer adds to a run: its state, fp32 master weights, the step's temporaries, and where
they happen (after backward, or inside it with --optimizer-in-backward). Torch-free arithmetic over the
trainable tensor groups.

--master-weights fp32 (mixed precision with fp32 master weights, as Megatron-LM's
`Float16OptimizerWithFloat16Params` and DeepSpeed's bf16/fp16 optimizers do it): the model's
trainable weights stay 16-bit (forward, backward and their gradients are 16-bit); the optimizer keeps
an fp32 copy of each 16-bit trainable tensor (4 B/element) and runs on those copies, so its states are
fp32 (AdamW: 8 B/element). At the step the 16-bit gradients are copied into fp32 gradients of the
masters, all of them before the update (Megatron `_copy_model_grads_to_main_grads`: `main_param.grad =
model_param.grad.float()`), the inner optimizer updates the masters, and the masters are copied back
into the 16-bit weights (`_copy_main_params_to_model_params`). Steady: 2 + 4 + 8 = 14 B per element,
16 with the gradients. (This is the `model_param.grad.float()` branch, 16-bit gradients. Megatron's DDP
with `accumulate_allreduce_grads_in_fp32` and DeepSpeed's BF16_Optimizer accumulate gradients in
persistent fp32 buffers instead, 2 B more per element: not what this flag models.) Tensors that are already fp32 (peft's adapters, amp/fp32 precision) get no
copy. Without the flag the optimizer works on the parameters as they are: Trainer's bf16 full
fine-tuning (`torch_dtype=bfloat16`, no master copy) keeps AdamW states in bf16; the bitsandbytes
32-bit optimizers keep fp32 states whatever the weights (12 B per element with 16-bit weights and
gradients: the QLoRA paper's "more than 780 GB" for LLaMA-65B, tests/test_optimizers.py).

--optimizer-in-backward (torchtune recipes' `optimizer_in_bwd`, e.g. `full_finetune_single_device.py`:
one optimizer per parameter, stepped from `register_post_accumulate_grad_hook`, then `zero_grad`):
each gradient lives only until its own step, which runs inside backward; no moment holds all
gradients, and the step's temporaries are one tensor's. Per tensor: its gradient, its fp32 copy (with
master weights) and the optimizer's temporaries for that tensor alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import LoraCostError
from .methods.base import TensorGroup
from .optimizers import FP32, Optimizer
from ..units import DTYPE_BYTES


@dataclass(frozen=True)
class OptimizerBudget:
    state_bytes: int  # optimizer state (on the fp32 masters with master weights)
    master_bytes: int  # fp32 master copies of the 16-bit trainable tensors
    step_temporaries: int  # alive during opt.step() after backward (0 when stepped in backward)
    block_transient: int  # in backward (--optimizer-in-backward): the largest block tensor's gradient + step
    head_transient: int  # ... and the largest tensor outside the blocks (embeddings, LM head)


def master_group(g: TensorGroup) -> TensorGroup:
    """The fp32 tensor the optimizer updates for `g` (itself when `g` is fp32)."""
    return g if DTYPE_BYTES[g.dtype] >= FP32 else replace(g, dtype="fp32")


def _copied(g: TensorGroup) -> bool:
    return DTYPE_BYTES[g.dtype] < FP32


def tensor_step_bytes(opt: Optimizer, g: TensorGroup, master: bool) -> int:
    """Stepping one tensor of `g` from its own hook: its gradient, its fp32 gradient copy, the step's
    temporaries on the tensor the optimizer updates."""
    grad = g.numel * DTYPE_BYTES[g.dtype]
    copy = g.numel * FP32 if master and _copied(g) else 0
    return grad + copy + opt.tensor_temporaries(master_group(g) if master else g)


def optimizer_budget(opt: Optimizer, trainable: list[TensorGroup], master_weights: str | None,
                     in_backward: bool, block_groups: list[TensorGroup]) -> OptimizerBudget:
    """`block_groups`: the trainable groups whose tensors live inside the blocks (their gradients arrive
    block by block); the others (embeddings, LM head, classifier) get theirs at either end of backward."""
    master = master_weights == "fp32"
    if master and not any(_copied(g) for g in trainable):
        raise LoraCostError("--master-weights fp32: every trainable tensor is already fp32 (peft keeps adapters in fp32; "
                            "fp32/amp precision keeps fp32 weights): there is no 16-bit weight to keep a master copy of")
    stepped = [master_group(g) for g in trainable] if master else list(trainable)
    state = sum(opt.state_bytes(g) for g in stepped)
    master_bytes = sum(g.total_numel * FP32 for g in trainable if _copied(g)) if master else 0
    if in_backward:
        ids = {id(g) for g in block_groups}
        block = max((tensor_step_bytes(opt, g, master) for g in block_groups), default=0)
        head = max((tensor_step_bytes(opt, g, master) for g in trainable if id(g) not in ids), default=0)
        return OptimizerBudget(state, master_bytes, 0, block, head)
    grad_copies = sum(g.total_numel * FP32 for g in trainable if _copied(g)) if master else 0
    return OptimizerBudget(state, master_bytes, grad_copies + opt.step_temporaries(stepped), 0, 0)
