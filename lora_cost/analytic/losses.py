"""The causal-LM loss other than transformers' standard one (`--loss liger | chunked[:N]`), on the tape.

`standard` (context.lm_head_and_loss, ops.cross_entropy): transformers' ForCausalLMLoss
(loss/loss_utils.py): the LM head writes [n, vocab] logits, `logits.float()` copies them to fp32,
log_softmax saves its fp32 output; the logits live until the step ends (the output object holds them).

`liger`: Liger-Kernel's fused linear cross-entropy (liger_kernel 0.8.5,
ops/fused_linear_cross_entropy.py `fused_linear_cross_entropy_forward` and
`LigerFusedLinearCrossEntropyFunction`; transformers/model/llama.py `lce_forward`, which replaces the
CausalLM forward: no logits when training with labels). The hidden states [BT, H] are cut into chunks
of `liger_chunk_size` rows; per chunk `x_chunk @ W.T` writes [chunk, V] logits in the compute dtype
(into one buffer reused by every chunk, `logits_storage`, when input and weight share a dtype on CUDA,
else a new tensor per chunk), the Triton CE kernel upcasts each row to fp32 in registers and overwrites
the logits with their gradient, and `grad_logits @ W` fills that chunk's rows of `grad_input`
(`torch.zeros_like(_input)`), `grad_logits.T @ x_chunk` accumulates into `grad_weight`
(`torch.zeros_like(weight)`, only when the head trains). All three matmuls run in the forward. What the
Function keeps for backward is `ctx.save_for_backward(grad_input, grad_weight, grad_bias)`; backward
returns them (scaled only when the incoming gradient is not 1.0, which for the step's loss it is).
Trainer's `use_liger_kernel` also swaps RMSNorm, RoPE and SwiGLU for Liger kernels: `--liger` / `--liger-kernels`
(analytic/liger.py).

`chunked:N`: torchtune's CEWithChunkedOutputLoss (torchtune 0.6 modules/loss/ce_chunked_output_loss.py,
num_output_chunks=8 by default) with the model's output computed per chunk
(modules/transformer.py `chunked_output`: `[self.output(c) for c in h.tensor_split(N, dim=1)]`): the
[b, s/N, V] logits of every chunk in the compute dtype, then per chunk `logits.float()` and
`cross_entropy(reduction="sum")` (log_softmax saves its fp32 output, nll_loss its int64 targets,
from `labels.chunk(N, dim=1)` reshaped: a copy when b > 1), so only one chunk's fp32 copy exists at a
time; the recipe deletes the logits before backward (recipes/full_finetune_single_device.py
`del logits`), and the log-softmax backward holds one chunk's gradients at a time.
"""

from __future__ import annotations

from ..errors import LoraCostError
from ..spec import ModelSpec, RunConfig
from ..units import DTYPE_BYTES
from . import ops

# model types whose CausalLM forward Liger replaces (liger_kernel/transformers/monkey_patch.py
# MODEL_TYPE_TO_APPLY_LIGER_FN, 0.8.5) among the decoder families this tool models
LIGER_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral", "qwen3_moe", "gemma2", "gemma3_text")
# the families whose CausalLM the chunked output is modelled on (the decoder is `model`, the head `lm_head`)
CHUNKED_MODEL_TYPES = LIGER_MODEL_TYPES


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def liger_chunk_size(rows: int, hidden: int, vocab: int, chunk_mem_const: int = 1) -> int:
    """Rows per chunk of Liger's fused linear cross-entropy (fused_linear_cross_entropy_forward):
    inc_factor = cdiv(V, chunk_mem_const * H); chunk_size = min(next_power_of_2(cdiv(BT, inc_factor)), BT),
    so a chunk's [chunk, V] logits are about as large as the [BT, H] input."""
    inc_factor = -(-vocab // (chunk_mem_const * hidden))
    return min(_next_power_of_2(-(-rows // inc_factor)), rows)


def check_loss(spec: ModelSpec, run: RunConfig, task: str) -> None:
    """Refuse the combinations of --loss this tool does not model (one line each)."""
    if run.loss_kind == "standard":
        return
    flag = f"--loss {run.loss_kind}"
    if task != "causal-lm":
        raise LoraCostError(f"{flag} replaces the causal-LM loss; {spec.name} runs --task {task}")
    allowed = LIGER_MODEL_TYPES if run.loss_kind == "liger" else CHUNKED_MODEL_TYPES
    if spec.model_type not in allowed:
        raise LoraCostError(f"{flag} is modelled for model types {', '.join(allowed)}; not {spec.model_type}"
                            + (" (Liger has no fused forward for it)" if run.loss_kind == "liger" else ""))
    if spec.final_softcap is not None:
        raise LoraCostError(f"{flag} with final logit soft-capping ({spec.name}) is not modelled yet")
    if run.loss_kind == "liger" and run.autocast_dtype:
        raise LoraCostError("--loss liger under autocast (--precision amp-*) is not modelled yet: Liger's "
                            "amp_custom_fwd matmuls and fp32 accumulators differ there")
    if run.loss_kind == "chunked" and run.seq % run.loss_chunks:
        raise LoraCostError(f"--loss {run.loss}: the chunks must divide --seq {run.seq} (torchtune splits the "
                            "logits with tensor_split and the labels with chunk; they pair up only then)")


def liger_loss(ctx, x) -> None:
    """Liger's fused linear cross-entropy on the final hidden states x ([BT, H]), in the "loss" scope."""
    tape, spec = ctx.tape, ctx.spec
    H, V = spec.hidden, spec.vocab
    rows = x.numel // H
    w_dtype = ctx.other_dtype
    trains = ctx.head_trainable  # the LM head's weight (tied or not): full fine-tuning
    compute = ops.promote(x.dtype, w_dtype)
    chunk = liger_chunk_size(rows, H, V)
    tape.scope = "loss"
    if x.rg:
        # ctx.save_for_backward(grad_input, grad_weight, grad_bias): the gradients computed in the forward
        tape.save(tape.new(rows * H, x.dtype, False), "fused loss input gradient")
        if trains:
            tape.save(tape.new(V * H, w_dtype, False), "fused loss weight gradient")
    # the chunk's logits (overwritten by their gradient); with input and weight in different dtypes each
    # chunk's logits are a new tensor and `grad_logits @ weight` a new [chunk, H] before its copy into grad_input
    mm_out = x.dtype == w_dtype
    logits = chunk * V * DTYPE_BYTES[compute]
    tape.transient(logits if mm_out else logits + chunk * H * DTYPE_BYTES[compute])
    if trains and w_dtype == "fp32":  # the legacy path: torch.mm(grad_logits.T, x_chunk) is a new [V, H]
        tape.transient(logits + V * H * 4)
    matmuls = 1 + int(x.rg) + int(trains and x.rg)  # logits; grad_input; grad_weight (all in the forward)
    tape.add_flops("lm_head", 2 * rows * H * V * matmuls, 0)
    ctx.logits_bytes = 0  # no logits outlive the loss
    ctx.loss_logits_bytes = logits + (0 if mm_out else chunk * H * DTYPE_BYTES[compute])
    ctx.loss_copy_bytes = 0  # the fp32 upcast happens in the kernel's registers
    ctx.log_softmax_bytes = 0  # backward hands the saved gradients on: no [n, vocab] buffer


def chunked_loss(ctx, x) -> None:
    """torchtune's chunked output and CEWithChunkedOutputLoss on the final hidden states x ([b, s, H])."""
    tape, spec, run = ctx.tape, ctx.spec, ctx.run
    H, V, N = spec.hidden, spec.vocab, run.loss_chunks
    b, s = run.batch, ctx.seq
    rows = b * (s // N)
    trains = ctx.head_trainable  # full fine-tuning, or peft's trained copy (--modules-to-save lm_head)
    tape.scope = "head"
    # labels shifted by the recipe: hstack((labels[..., 1:], ignore)) is a new [b, s] int64 tensor
    labels = tape.new(b * s, "int64", False)
    logits = []
    for i in range(N):
        # h.tensor_split(N, dim=1) gives views; for b > 1 they are not contiguous and the head's matmul folds
        # [b, s/N, H] into rows with a copy (aten::matmul reshape), which mm saves when the weight trains.
        # (Under autocast the cast to the autocast dtype keeps the strides, and that copy is the one saved.)
        piece = _rows(x, rows * H) if b == 1 or tape.autocast else tape.new(rows * H, x.dtype, x.rg)
        if trains and piece.sid == x.sid and not tape.autocast:
            tape.save(x, "linear inputs")  # a saved view keeps its whole storage: h itself
        logits.append(ops.linear(tape, piece, H, V, w_trainable=trains, w_dtype=ctx.other_dtype, kind="lm_head",
                                 cast_cached=i > 0 and trains))
    tape.scope = "loss"
    copy = 0
    first = None
    for lg in logits:
        # labels.chunk(N, dim=1)[i].reshape(-1): a view for one row, else a new int64 tensor
        targets = labels if b == 1 else tape.new(rows, "int64", False)
        before = tape.saved[("loss", "log-softmax output")]
        copy = ops.cross_entropy(tape, lg, targets, upcast=True)
        if first is None:
            first = tape.saved[("loss", "log-softmax output")] - before
    # total_loss / total_elements: div saves its int64 divisor (derivatives.yaml div.Tensor: other)
    tape.save(tape.new(1, "int64", False), "loss targets")
    ctx.logits_bytes = 0  # the recipe deletes the logits before backward
    ctx.loss_logits_bytes = sum(lg.nbytes for lg in logits)  # every chunk's logits exist when the loss runs
    if trains and N >= 2 and x.rg:
        # moments: in backward every chunk's cross-entropy backward runs first (the loss sums them), leaving N
        # [rows, V] logits gradients in the logits' dtype; then the head's backward, chunk by chunk: each mm
        # returns a [V, H] weight gradient that autograd's InputBuffer adds to the sum of the chunks before
        # out of place (torch/csrc/autograd/input_buffer.cpp `accumulate`: `old_var + var`, checked on CPU
        # tensors in tests/test_moments.py), so at the second chunk the sum so far, the new gradient and
        # their sum are alive, with N - 2 chunks' logits gradients still waiting and two chunks' input
        # gradients [rows, H] (peaks.py: "accumulating the LM head's gradient over the loss chunks")
        # (the weight gradient in the dtype the head's matmul computes in, its logits': autocast's under AMP,
        # whose cached cast of the weight sums the chunks' gradients before its one ToCopyBackward)
        ctx.head_accumulation_bytes = (3 * V * H * DTYPE_BYTES[logits[0].dtype] + (N - 2) * logits[0].nbytes
                                       + 2 * rows * H * DTYPE_BYTES[x.dtype])
    ctx.loss_copy_bytes = copy  # one chunk's fp32 copy at a time
    ctx.log_softmax_bytes = first or 0  # log-softmax backward: one chunk's gradient in and out


def _rows(x, numel: int):
    """A view of x's storage holding `numel` of its elements (one chunk of h.tensor_split)."""
    from .tape import Tensor

    return Tensor(numel, x.dtype, x.rg, x.sid)


def loss_and_head(ctx, x) -> None:
    """The LM head and the loss of `--loss liger | chunked[:N]` (context.lm_head_and_loss calls this)."""
    if ctx.run.loss_kind == "liger":
        liger_loss(ctx, x)
    else:
        chunked_loss(ctx, x)
    ctx.method.after_loss(ctx)


def notes(spec: ModelSpec, run: RunConfig) -> tuple[str, ...]:
    """What an estimate with --loss liger | chunked or --adapter-dtype assumes (its assumptions list)."""
    out = []
    if run.loss_kind == "liger":
        out.append(f"loss: Liger fused linear cross-entropy (liger-kernel 0.8.5 lce_forward): chunks of "
                   f"{liger_chunk_size(run.tokens, spec.hidden, spec.vocab)} rows, no tokens x vocab logits, the input "
                   "(and a trained head's weight) gradient computed in the forward and kept"
                   + ("" if run.liger_kernels else "; the RMSNorm, RoPE and SwiGLU are transformers' here (Trainer's "
                      "use_liger_kernel also swaps them for Liger kernels: --liger)"))
    elif run.loss_kind == "chunked":
        out.append(f"loss: torchtune CEWithChunkedOutputLoss over {run.loss_chunks} chunks (the LM head per chunk, fp32 "
                   "upcast one chunk at a time; the logits deleted before backward, as torchtune's recipes do)")
    from .qlora_recast import recast  # task "recast"
    if recast(run):
        out.append("the QLoRA script's recast (artidoro/qlora qlora.py): LoRA factors, embed_tokens and lm_head in bf16, "
                   "norms fp32, the step under Trainer's bf16 autocast; bitsandbytes' packed weights and QuantState "
                   "untouched")
    elif run.adapter_dtype not in (None, "fp32"):
        out.append(f"adapters in {run.adapter_dtype}: peft get_peft_model(..., autocast_adapter_dtype=False) on a "
                   f"{run.adapter_dtype} model, or the factors cast by hand as the QLoRA script casts its LoRA layers (its "
                   "bf16 embeddings and head too: --qlora-recast --precision amp-bf16); the layer input is not "
                   "copied to fp32")
    return tuple(out)
