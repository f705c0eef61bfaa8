"""`--loss liger | chunked[:N]` in the trace: the CausalLM forward's tail replaced as each library does it.

`install_loss` swaps the task model's `forward` (the instance attribute; peft's LoraModel calls
`self.model.forward`) for: the decoder (`model.model`) on the inputs, then the loss on its last hidden
states, returning an output with the loss and no logits.

- liger: Liger-Kernel's `lce_forward` (liger_kernel/transformers/model/llama.py, 0.8.5) calls
  `LigerForCausalLMLoss(hidden_states, lm_head.weight, labels)` (transformers/model/loss_utils.py: pad the
  labels with -100, shift, flatten) and `LigerFusedLinearCrossEntropyFunction`. Its Triton kernels do not
  run on a CPU, so `LigerFusedLinearCEStandIn` below follows `fused_linear_cross_entropy_forward`
  allocation for allocation: `grad_input = zeros_like(_input)`, `grad_weight = zeros_like(weight)` when
  the head trains, `loss_1d` (fp32 [BT]), `target_mask`, then per chunk of `liger_chunk_size` rows the
  logits in the compute dtype (into one reused `logits_storage` buffer when `_can_use_mm_out`: CUDA, grad
  disabled, input and weight of one 16/32-bit dtype, no autocast), the cross-entropy kernel's in-place
  overwrite of the logits by their gradient (done here with in-place ops, whose [chunk, 1] temporaries
  the kernel keeps in registers), `grad_input[rows] = grad_logits @ W` and the weight-gradient
  accumulation (addmm into grad_weight for 16-bit, `grad_weight += mm(grad_logits.T, x_chunk).float()`
  for fp32); it saves `(grad_input, grad_weight, grad_bias)` and backward returns them.
  tests/test_losses.py asserts these rules against a quoted excerpt of the library's source.
- chunked:N: torchtune's `chunked_output` (`[output(c) for c in h.tensor_split(N, dim=1)]`) and
  CEWithChunkedOutputLoss (`logits.float()` and `cross_entropy(reduction="sum")` per chunk, divided by
  the count of labels that are not -100); the recipe shifts the labels itself and deletes the logits
  before backward, so the output holds none. This runs the real torch ops.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from ..analytic.losses import liger_chunk_size

IGNORE_INDEX = -100


def _count(mask: torch.Tensor) -> int:
    """`target_mask.sum().item()`; on fake tensors (no values) every label counts."""
    from torch._subclasses.fake_tensor import FakeTensor

    return mask.numel() if isinstance(mask, FakeTensor) else int(mask.sum().item())


def liger_forward(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor):
    """fused_linear_cross_entropy_forward (reduction="mean", no bias, no softcap, accum_dtype=None):
    (loss, grad_input, grad_weight)."""
    BT, H = x.shape
    V = weight.shape[0]
    chunk_size = liger_chunk_size(BT, H, V)
    num_chunks = -(-BT // chunk_size)
    input_requires_grad = x.requires_grad
    weight_needs_grad = weight.requires_grad
    grad_input = torch.zeros_like(x)
    grad_weight = torch.zeros_like(weight) if input_requires_grad and weight_needs_grad else None
    loss_1d = torch.zeros(BT, dtype=torch.float32, device=x.device)
    target_mask = target != IGNORE_INDEX
    n_non_ignore = max(_count(target_mask), 1)
    # _can_use_mm_out: the step runs on CUDA, inside Function.forward grad is disabled, no autocast here
    use_mm_out = x.dtype == weight.dtype and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
    logits_storage = torch.empty((chunk_size, V), dtype=x.dtype, device=x.device) if use_mm_out else None
    for chunk_id in range(num_chunks):
        start, end = chunk_id * chunk_size, min((chunk_id + 1) * chunk_size, BT)
        x_chunk = x[start:end]
        if logits_storage is not None:
            logits_chunk = logits_storage[: end - start]
            torch.mm(x_chunk, weight.t(), out=logits_chunk)
        else:
            logits_chunk = x_chunk @ weight.t()
        target_chunk = target[start:end]
        _cross_entropy_kernel(logits_chunk, target_chunk, loss_1d[start:end], n_non_ignore)
        grad_logits_chunk = logits_chunk
        if input_requires_grad:
            if use_mm_out and grad_logits_chunk.dtype == grad_input.dtype:
                torch.mm(grad_logits_chunk, weight, out=grad_input[start:end])
            else:
                grad_input[start:end] = grad_logits_chunk @ weight
        if grad_weight is not None:
            if grad_weight.dtype in (torch.float16, torch.bfloat16) and grad_logits_chunk.dtype == grad_weight.dtype:
                torch.addmm(grad_weight, grad_logits_chunk.t(), x_chunk, out=grad_weight)
            else:  # the legacy path (fp32): a parameter-sized temporary per chunk
                grad_weight += torch.mm(grad_logits_chunk.t(), x_chunk).float()
        del grad_logits_chunk, logits_chunk, x_chunk, target_chunk
    del logits_storage
    loss = torch.sum(loss_1d)
    return loss, grad_input, grad_weight


def _cross_entropy_kernel(logits: torch.Tensor, target: torch.Tensor, loss_out: torch.Tensor, n: int) -> None:
    """liger_cross_entropy_kernel, HAS_GRADIENTS: per row the loss (fp32) into loss_out, and the row
    overwritten by its gradient (softmax - one_hot(target)) / n; rows whose target is ignored become 0."""
    valid = target != IGNORE_INDEX
    safe = torch.where(valid, target, 0)
    row_max = logits.amax(-1, keepdim=True)
    logits.sub_(row_max).exp_()  # in place: the kernel holds these values in registers
    total = logits.sum(-1, keepdim=True, dtype=torch.float32)
    picked = logits.gather(-1, safe[:, None]).float()
    loss_out.copy_(torch.where(valid, (total.log() - picked.log()).squeeze(-1), 0.0) / n)
    logits.div_(total.to(logits.dtype))
    logits.scatter_add_(-1, safe[:, None], torch.full_like(picked, -1.0, dtype=logits.dtype))
    logits.mul_((valid[:, None] / n).to(logits.dtype))


class LigerFusedLinearCEStandIn(torch.autograd.Function):
    """LigerFusedLinearCrossEntropyFunction (reduction="mean"): the gradients are computed in the forward
    and saved; backward hands them on (grad_output is 1.0 for the step's loss: no scaling kernel)."""

    @staticmethod
    def forward(ctx, x, weight, target):
        loss, grad_input, grad_weight = liger_forward(x, weight, target)
        ctx.save_for_backward(grad_input.detach(), grad_weight.detach() if grad_weight is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_input, grad_weight = ctx.saved_tensors
        return grad_input, grad_weight, None


def liger_causal_lm_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """LigerForCausalLMLoss: labels padded with -100 and shifted, the hidden states flattened."""
    labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)
    shift_labels = labels[..., 1:].contiguous().view(-1)
    return LigerFusedLinearCEStandIn.apply(hidden.reshape(-1, hidden.shape[-1]), lm_head_weight, shift_labels)


def chunked_logits(lm_head, hidden: torch.Tensor, chunks: int) -> list[torch.Tensor]:
    """torchtune TransformerDecoder.chunked_output."""
    return [lm_head(c) for c in hidden.tensor_split(chunks, dim=1)]


def chunked_ce(logits: list[torch.Tensor], labels: torch.Tensor, chunks: int) -> torch.Tensor:
    """torchtune CEWithChunkedOutputLoss.forward (num_output_chunks = chunks)."""
    total_elements = (labels != IGNORE_INDEX).sum()
    labels = [c.reshape(-1) for c in labels.chunk(chunks, dim=1)]
    logits = [c.reshape(-1, c.size(-1)) for c in logits]
    total_loss = 0.0
    for logits_chunk, labels_chunk in zip(logits, labels):
        total_loss += F.cross_entropy(logits_chunk.float(), labels_chunk, ignore_index=IGNORE_INDEX, reduction="sum")
    return total_loss / total_elements


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """torchtune's recipes: `torch.hstack((labels[..., 1:], ignore_labels_cache[: b]))`."""
    ignore = torch.full((labels.shape[0], 1), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    return torch.hstack((labels[..., 1:], ignore))


def install_loss(model, run) -> None:
    """Replace the CausalLM forward (below peft) by the decoder and the run's loss."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind, chunks = run.loss_kind, run.loss_chunks

    def forward(self, input_ids=None, labels=None, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in ("logits_to_keep", "return_dict")}
        hidden = self.model(input_ids=input_ids, **kwargs)[0]
        if kind == "liger":
            loss = liger_causal_lm_loss(hidden, self.lm_head.weight, labels)
        else:
            logits = chunked_logits(self.lm_head, hidden, chunks)
            loss = chunked_ce(logits, shifted_labels(labels), chunks)
            del logits  # the recipe's `del logits` before backward
        return CausalLMOutputWithPast(loss=loss)

    base.forward = types.MethodType(forward, base)
