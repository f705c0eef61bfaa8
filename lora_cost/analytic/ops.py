"""What each PyTorch op keeps for backward, as pure functions over `tape.Tensor` stand-ins.

Every rule below is PyTorch's autograd formula for the op (tools/autograd/derivatives.yaml):
an input is saved only if the gradient that reads it is needed, e.g. `mm` saves `mat1` only
when `mat2` requires grad. Sizes are element counts of the [batch*seq, width] activations.
Kernels are those a CUDA GPU runs (the calibration target), not the CPU's.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..attention_kernels import get_kernel, is_fused
from .formulas.attention import matmul_attention_backward_flops, sdpa_backward_flops, sdpa_forward_flops
from .tape import Tape, Tensor
from ..units import DTYPE_BYTES


def promote(a: str, b: str) -> str:
    """Result dtype of a binary op: fp32 wins over 16-bit (torch type promotion)."""
    if a == b:
        return a
    if "fp32" in (a, b):
        return "fp32"
    return a


def cast(tape: Tape, x: Tensor, dtype: str) -> Tensor:
    """`x.to(dtype)`: a no-op (same storage) when the dtype already matches, else a new tensor."""
    if x.dtype == dtype:
        return x
    return tape.new(x.numel, dtype, x.rg)


def linear(tape: Tape, x: Tensor, d_in: int, d_out: int, *, w_trainable: bool, w_dtype: str,
           kind: str = "base", counted: bool = True, b_trainable: bool = False, cast_cached: bool = False) -> Tensor:
    """nn.Linear / GPT-2 Conv1D (addmm): [n, d_in] @ [d_in, d_out].

    Saves the input for the weight gradient only if the weight trains; the weight itself is a
    parameter (not an activation) unless autocast made a low-precision copy of it, which is saved
    when the input needs a gradient (torch/csrc/autograd autocast cache).
    A trainable bias (BitFit) saves nothing: addmm's `self` gradient is the incoming gradient summed
    over rows (derivatives.yaml `addmm`: self: maybe_multiply(grad, beta), no saved input), but the
    output then requires grad even when neither the input nor the weight does.
    `cast_cached`: autocast already cast this weight in this forward and cached the copy (its cache keeps
    casts of leaf tensors that require grad: a trained weight used again, as in a chunked LM head).
    """
    n = x.numel // d_in
    if tape.autocast:
        x = cast(tape, x, tape.autocast)
        if x.rg and not cast_cached and w_dtype != tape.autocast:  # a weight already in it is used as it is
            tape.save(tape.new(d_in * d_out, tape.autocast, False), "autocast weight copies")
        out_dtype = tape.autocast
    else:
        out_dtype = promote(x.dtype, w_dtype)
    if w_trainable:
        tape.save(x, "linear inputs")
        tape.weight_gradient(d_in * d_out * DTYPE_BYTES[w_dtype])
    elif x.rg:
        tape.mark_saved()  # the (parameter) weight, kept for the input gradient
    # inputs are saved before the kernel runs (VariableType), so this matmul follows the save
    tape.matmul(kind, n, d_in, d_out, grad_a=x.rg, grad_b=w_trainable, counted=counted)
    return tape.new(n * d_out, out_dtype, x.rg or w_trainable or b_trainable)


def layer_norm(tape: Tape, x: Tensor, width: int, *, w_trainable: bool, b_trainable: bool = False) -> Tensor:
    """aten.native_layer_norm: saves input, mean and rstd (fp32 on CUDA) whenever a grad is needed
    (one backward formula serves input, weight and bias, so a trainable bias alone saves all three)."""
    if tape.autocast:  # layer_norm is on autocast's fp32 list
        x = cast(tape, x, "fp32")
    rg = x.rg or w_trainable or b_trainable
    if rg:
        rows = x.numel // width
        tape.save(x, "norm inputs")
        tape.save(tape.new(rows, "fp32", False), "norm statistics")
        tape.save(tape.new(rows, "fp32", False), "norm statistics")
        # native_layer_norm_backward is one kernel (aten/src/ATen/native/cuda/layer_norm_kernel.cu
        # layer_norm_backward_cuda): the incoming gradient and grad_input, both x's shape and dtype
        tape.norm_backward_buffers(2 * x.nbytes)
    return tape.new(x.numel, x.dtype, rg)


def rms_norm(tape: Tape, x: Tensor, width: int, *, w_trainable: bool, w_dtype: str) -> Tensor:
    """transformers' LlamaRMSNorm (also Qwen2, Mistral), op by op:

        h = x.to(fp32); v = h.pow(2).mean(-1); h = h * rsqrt(v + eps); return w * h.to(x.dtype)

    pow saves h (an fp32 copy of x unless x is fp32); rsqrt saves its [n, 1] result; the product
    saves h and the rsqrt; `w * h` saves the normalised h (in x's dtype) only if w trains.
    """
    rows = x.numel // width
    if x.rg or w_trainable:
        # backward, op by op (torch/csrc/autograd/FunctionsManual.cpp): the product's gradient of h waits
        # to be summed with the variance path's; MeanBackward1 expands and divides (one fp32 [n, d]);
        # PowBackward0 is pow_backward = grad * (2 * h.pow(1)): three fp32 [n, d] at its last allocation.
        # Five fp32 [n, d] buffers then (the incoming gradient, consumed by the first products, is gone).
        tape.norm_backward_buffers(5 * x.numel * 4)
    h = cast(tape, x, "fp32")
    if x.rg:
        tape.save(h, "norm inputs")
        tape.save(tape.new(rows, "fp32", False), "norm statistics")
    normed = tape.new(x.numel, "fp32", x.rg)
    normed = cast(tape, normed, x.dtype) if x.dtype != "fp32" else normed
    if w_trainable:
        tape.save(normed, "norm inputs")
    return tape.new(x.numel, promote(w_dtype, normed.dtype) if not tape.autocast else promote(w_dtype, normed.dtype),
                    x.rg or w_trainable)


def gemma_rms_norm(tape: Tape, x: Tensor, width: int, *, w_trainable: bool) -> Tensor:
    """transformers' Gemma2RMSNorm / Gemma3RMSNorm (also their q/k norms), op by op:

        h = x.float(); h = h * rsqrt(h.pow(2).mean(-1) + eps); out = h * (1.0 + w.float()); out.type_as(x)

    As LlamaRMSNorm, pow and the product save the fp32 h and the [n, 1] rsqrt; unlike it the weight
    multiplies in fp32: `1.0 + w.float()` is a new [width] fp32 tensor that the product saves for the
    gradient of h (every call makes its own), and a trainable w saves the fp32 normalised h.
    """
    rows = x.numel // width
    if x.rg or w_trainable:
        # backward as LlamaRMSNorm's (rms_norm), op by op (torch/csrc/autograd/FunctionsManual.cpp): the product's gradient of h waits
        # to be summed with the variance path's; MeanBackward1 expands and divides (one fp32 [n, d]);
        # PowBackward0 is pow_backward = grad * (2 * h.pow(1)): three fp32 [n, d] at its last allocation.
        # Five fp32 [n, d] buffers then (the incoming gradient, consumed by the first products, is gone).
        tape.norm_backward_buffers(5 * x.numel * 4)
    h = cast(tape, x, "fp32")
    if x.rg:
        tape.save(h, "norm inputs")
        tape.save(tape.new(rows, "fp32", False), "norm statistics")
        tape.save(tape.new(width, "fp32", False), "norm statistics")  # 1 + w
    normed = tape.new(x.numel, "fp32", x.rg)
    if w_trainable:
        tape.save(normed, "norm inputs")
    return cast(tape, tape.new(x.numel, "fp32", x.rg or w_trainable), x.dtype)


def tanh_softcap(tape: Tape, x: Tensor) -> Tensor:
    """cap * tanh(x / cap) (Gemma 2's logit soft-capping): the divide and the multiply by a Python
    float save nothing; tanh saves its output (derivatives.yaml: tanh_backward(grad, result))."""
    t = tape.new(x.numel, x.dtype, x.rg)
    if x.rg:
        tape.save(t, "logit soft-capping")
    return tape.new(x.numel, x.dtype, x.rg)


def dropout(tape: Tape, x: Tensor, p: float) -> Tensor:
    """nn.Dropout in training: p == 0 returns the input itself (ATen `_dropout`); otherwise
    `native_dropout` returns a new tensor and saves a bool mask of the input's shape."""
    if p <= 0.0:
        return x
    if x.rg:
        tape.save(tape.new(x.numel, "bool", False), "dropout masks")
    return tape.new(x.numel, x.dtype, x.rg)


def gelu_tanh_python(tape: Tape, x: Tensor) -> Tensor:
    """transformers' NewGELUActivation (GPT-2 `gelu_new`), written with Python ops:

        0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))

    pow saves its input, tanh its output, and the final product both factors (scalar multiplies
    and additions save nothing): four tensors of x's size. Under autocast `pow` is on the fp32
    list, so its input is an fp32 copy and the tanh branch runs in fp32 while 0.5*x keeps x's dtype.
    """
    if not x.rg:
        return tape.new(x.numel, x.dtype, False)
    x_pow = cast(tape, x, "fp32") if tape.autocast else x
    tape.save(x_pow, "activation function")
    inner = promote(x.dtype, x_pow.dtype)
    tape.save(tape.new(x.numel, inner, False), "activation function")  # tanh output
    half_x = tape.new(x.numel, x.dtype, True)
    one_plus = tape.new(x.numel, inner, True)
    return mul(tape, half_x, one_plus, "activation function")


def gelu(tape: Tape, x: Tensor) -> Tensor:
    """aten.gelu (exact or tanh): saves its input."""
    if x.rg:
        tape.save(x, "activation function")
    return tape.new(x.numel, x.dtype, x.rg)


def silu(tape: Tape, x: Tensor) -> Tensor:
    """aten.silu: saves its input."""
    if x.rg:
        tape.save(x, "activation function")
    return tape.new(x.numel, x.dtype, x.rg)


def tanh(tape: Tape, x: Tensor) -> Tensor:
    """aten.tanh: saves its output (derivatives.yaml: tanh_backward(grad, result))."""
    out = tape.new(x.numel, x.dtype, x.rg)
    if x.rg:
        tape.save(out, "activation function")
    return out


def relu(tape: Tape, x: Tensor, kind: str = "activation function") -> Tensor:
    """aten.relu: saves its output (derivatives.yaml: threshold_backward(grad, result, 0))."""
    out = tape.new(x.numel, x.dtype, x.rg)
    if x.rg:
        tape.save(out, kind)
    return out


def scale(tape: Tape, x: Tensor) -> Tensor:
    """x * a Python float: a new tensor, nothing saved (mul by a Scalar keeps only the number)."""
    return tape.new(x.numel, x.dtype, x.rg)


def mul(tape: Tape, a: Tensor, b: Tensor, kind: str = "elementwise products") -> Tensor:
    """Elementwise a * b: saves b if a needs a grad, a if b does."""
    if a.rg:
        tape.save(b, kind)
    if b.rg:
        tape.save(a, kind)
    return tape.new(max(a.numel, b.numel), promote(a.dtype, b.dtype), a.rg or b.rg)


def rope(tape: Tape, t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """transformers' apply_rotary_pos_emb, q*cos + rotate_half(q)*sin: the products save the (shared)
    cos and sin tables; rotate_half's cat makes a new tensor that is not saved."""
    a = mul(tape, t, cos, "rotary tables")
    b = mul(tape, tape.new(t.numel, t.dtype, t.rg), sin, "rotary tables")
    return add(tape, a, b)


def scale_by_parameter(tape: Tape, x: Tensor, kind: str) -> Tensor:
    """x * p for a trainable parameter vector p (VeRA's lambdas): saves x for p's gradient; p is a
    parameter, kept but not an activation."""
    tape.save(x, kind)
    return tape.new(x.numel, promote(x.dtype, "fp32"), True)


def add(tape: Tape, a: Tensor, b: Tensor) -> Tensor:
    """Elementwise a + b saves nothing."""
    return tape.new(max(a.numel, b.numel), promote(a.dtype, b.dtype), a.rg or b.rg)


def embedding(tape: Tape, indices: Tensor, width: int, *, w_trainable: bool, w_dtype: str) -> Tensor:
    """aten.embedding: saves the int64 indices when the table trains."""
    if w_trainable:
        tape.save(indices, "token indices")
    return tape.new(indices.numel * width, w_dtype, w_trainable)


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    kv_seq: int | None = None  # keys/values attended to (prefix tuning prepends some); None: seq

    @property
    def keys(self) -> int:
        return self.seq if self.kv_seq is None else self.kv_seq


def sdpa_backend(dtype: str, shape: AttentionShape, gqa_in_kernel: bool) -> str:
    """The kernel `F.scaled_dot_product_attention` picks on an sm80+ GPU with no attention mask
    (torch/csrc/.../transformers/cuda/sdp_utils.cpp): flash for 16-bit inputs with head_dim <= 256;
    otherwise memory-efficient, which cannot broadcast grouped key/value heads, so fp32 with
    `enable_gqa=True` falls back to the math path (seen in the H100 calibration: its fp32 GQA rows
    save the full [b, h, s, s] probabilities)."""
    if dtype in ("bf16", "fp16") and shape.head_dim <= 256:
        return "flash"
    if gqa_in_kernel:
        return "math"
    return "efficient"


def attention(tape: Tape, q: Tensor, k: Tensor, v: Tensor, shape: AttentionShape, *, implementation: str,
              dropout_p: float, softmax_fp32: bool, softcap: bool = False, mask: Tensor | None = None,
              extra_grad: bool = False, cast_to: str | None = None, documents: int | None = None) -> Tensor:
    """Attention core from q, k, v (each [b, heads or kv_heads, s, head_dim]) to the [n, h*hd] output.

    sdpa (flash / efficient): saves q, k, v, the output and the fp32 log-sum-exp; nothing of size s^2.
    math fallback and transformers' eager path: save the [b, h, s, s] probabilities (plus, with
    dropout, a bool mask and the dropped probabilities) and the operands of both batched matmuls.
    `softcap` (Gemma 2 eager: scores = cap * tanh(scores / cap) before the mask) also saves the
    [b, h, s, s_k] tanh output in the scores' dtype.
    FLOPs (FlopCounterMode): forward 4*b*h*s^2*hd; backward 10*b*h*s^2*hd for the fused kernels
    (they recompute the scores), 8*b*h*s^2*hd for the two explicit batched matmuls.
    `mask`: the additive mask the memory-efficient kernel saves under "sdpa-masked", where it is not
    sdpa's own conversion of a [b, 1, s, s_kv] bool mask (T5's position bias); `extra_grad`: the
    scores need a gradient besides through q and k (a trainable additive bias, T5's).
    """
    if is_fused(implementation):  # flash-attention 2/3, flex: their own saving rule
        return fused_kernel_attention(tape, q, k, v, shape, get_kernel(implementation), cast_to=cast_to,
                                      documents=documents, dropout_p=dropout_p)
    b, s, h, kvh, hd = shape.batch, shape.seq, shape.heads, shape.kv_heads, shape.head_dim
    sk = shape.keys  # [b, h, s, hd] queries against [b, kvh, sk, hd] keys and values
    if tape.autocast:  # scaled_dot_product_attention and matmul run in the autocast dtype
        q, k, v = (cast(tape, t, tape.autocast) for t in (q, k, v))
    dt = q.dtype
    rg = q.rg or k.rg or v.rg
    score_numel = b * h * s * sk
    gqa = kvh != h
    if implementation == "sdpa":
        backend = sdpa_backend(dt, shape, gqa_in_kernel=gqa)
    elif implementation == "sdpa-masked":  # an explicit mask rules flash out; efficient takes masks
        backend = "efficient"
    else:
        backend = "eager"
    out_numel = b * s * h * hd
    if backend in ("flash", "efficient"):
        if rg:
            for t in (q, k, v):
                tape.save(t, "attention q, k, v")
            if implementation == "sdpa-masked" and mask is not None:
                tape.save(mask, "attention mask")
            elif implementation == "sdpa-masked":
                # sdpa turns a bool mask into an additive one in q's dtype (convert_boolean_attn_mask),
                # padded to a multiple of 16 along the keys, and the efficient kernel saves it
                tape.save(tape.new(b * s * (-(-sk // 16) * 16), dt, False), "attention mask")
        tape.add_flops("attention", sdpa_forward_flops(b, h, s, sk, hd, hd),
                       sdpa_backward_flops(b, h, s, sk, hd, hd) if rg else 0)
        out = tape.new(out_numel, dt, rg)
        if rg:
            tape.save(out, "attention output")
            lse_len = s if backend == "flash" else -(-s // 32) * 32  # efficient pads to 32
            tape.save(tape.new(b * h * lse_len, "fp32", False), "attention log-sum-exp")
        return out
    # math / eager: explicit batched matmuls and a materialised softmax, each saving per its own rule.
    full, full_kv = b * h * s * hd, b * h * sk * hd
    if backend == "math":  # scaled copies of q and k (and k, v expanded to every head when grouped)
        q = tape.new(full, dt, q.rg)
        k = tape.new(full_kv, dt, k.rg)
        v = tape.new(full_kv, dt, v.rg) if gqa else v
    elif gqa and not (kvh == 1 and b == 1):
        # transformers' repeat_kv: expand + reshape, a copy (matmul's own reshape to [b*h, s, hd] too).
        # With one key/value head and one sequence both reshapes are views: nothing is copied.
        k, v = tape.new(full_kv, dt, k.rg), tape.new(full_kv, dt, v.rg)
    # scores = q @ k^T: saves k if q needs a grad and q if k does
    if q.rg:
        tape.save(k, "attention q, k, v")
    if k.rg:
        tape.save(q, "attention q, k, v")
    scores_rg = q.rg or k.rg or extra_grad
    if softcap and scores_rg:
        tape.save(tape.new(score_numel, dt, False), "attention probabilities")  # the tanh output
    # softmax (fp32 when asked for, and always under autocast) saves its output
    probs_dtype = "fp32" if (softmax_fp32 or tape.autocast or backend == "math" and dt == "fp32") else dt
    probs = tape.new(score_numel, probs_dtype, scores_rg)
    if scores_rg:
        tape.save(probs, "attention probabilities")
    probs = cast(tape, probs, dt)  # .to(q.dtype) / autocast's cast for the next matmul
    probs = dropout(tape, probs, dropout_p)
    if probs.rg:
        tape.save(v, "attention q, k, v")
    if v.rg:
        tape.save(probs, "attention probabilities")
    rg = scores_rg or v.rg
    # the [b, s, s] float mask transformers builds for eager attention lives through the forward
    if backend == "eager" and shape.causal:
        tape.transient(b * s * sk * DTYPE_BYTES[dt])
    tape.transient(score_numel * DTYPE_BYTES[dt] * 2, pieces=2)  # two score tensors (matmul, then scaled/masked)
    # each batched matmul costs 2*b*h*s^2*hd per operand that needs a gradient (q, k; probs, v)
    tape.add_flops("attention", sdpa_forward_flops(b, h, s, sk, hd, hd),
                   matmul_attention_backward_flops(b, h, s, sk, hd, hd, q=q.rg, k=k.rg, probs=probs.rg, v=v.rg))
    # [b, h, s, hd] -> transpose(1, 2).reshape: a copy, so the output projection sees a new storage
    return tape.new(out_numel, dt, rg)


def fused_kernel_attention(tape: Tape, q: Tensor, k: Tensor, v: Tensor, shape: AttentionShape, kernel, *,
                           cast_to: str | None, documents: int | None, dropout_p: float) -> Tensor:
    """flash-attention 2/3 and flex, as transformers calls them (attention_kernels.py names the sources).

    flash (integrations/flash_attention.py): q, k, v arrive as [b, s, h, d] transposes (views; flash-attn's
    `maybe_contiguous` copies only when stride(-1) != 1); fp32 ones are cast to `cast_to` first
    (`fa_peft_integration_check`: the QLoRA fp32 stream, AMP). flash-attn 2 pads head_dim to a multiple of
    8 (copies). Grouped k/v heads are read in place (no repeat_kv). FlashAttnFunc saves q, k, v, out,
    softmax_lse (fp32 [b, h, s]) and rng_state (int64 [2], flash 2); its output is [b, s, h, d], which the
    model reshapes to [b, s, h*d] as a view: o_proj's input is the saved output itself.
    --packing (`documents` sequences flattened into one row, `_prepare_from_posids`): q, k, v are
    `.contiguous()` copies of the transposes (those copies are saved), the varlen kernel also saves
    cu_seqlens_q/k (one int32 [documents + 1] tensor, the same for both) and its softmax_lse is [h, total_q]:
    the same elements.
    flex (integrations/flex_attention.py): q, k, v in [b, h, s, d] as they come (fp32 stays fp32), grouped
    heads native (enable_gqa) when their count is a power of two; saves q, k, v, out, logsumexp and
    max_scores (fp32 [b, h, s] each, torch 2.13 FlexAttentionAutogradOp); the output takes the query's
    stride order (`_permute_strides`: [b, s, h, d] in memory), so transformers' transpose(1, 2).contiguous()
    is a view and o_proj's input is the saved output, as with flash.
    FLOPs: the fused-kernel convention of FlopCounterMode's sdpa formulas (causal not discounted): forward
    4 b h s s_k d, backward 10 b h s s_k d (the backward recomputes S = QK^T and P: 2.5x the forward's
    matmuls, flash-attention 2 paper, Dao 2023, Sec. 3.1 / Algorithm 2). With --packing: documents x s^2.
    """
    b, s, h, kvh, hd = shape.batch, shape.seq, shape.heads, shape.kv_heads, shape.head_dim
    sk = shape.keys
    rg = q.rg or k.rg or v.rg
    # sizes from the shape (a fused-projection family's q, k, v are views of one [n, 3d] storage)
    heads = (h, kvh, kvh)
    target = cast_to if q.dtype == "fp32" else (tape.autocast if tape.autocast else None)
    if kernel.casts_fp32_inputs and target is not None:  # `.to(target_dtype)`: a copy of each view that differs
        q, k, v = (t if t.dtype == target else tape.new(b * sk_or_s * n * hd, target, t.rg)
                   for t, n, sk_or_s in zip((q, k, v), heads, (s, sk, sk)))
    dt = q.dtype
    if kernel.name == "flex" and kvh != h and h & (h - 1):
        # integrations/flex_attention.py: a head count that is not a power of two takes repeat_kv (copies
        # of k and v at every query head) and enable_gqa=False
        heads = (h, h, h)
        k, v = tape.new(b * sk * h * hd, dt, k.rg), tape.new(b * sk * h * hd, dt, v.rg)
    packed = documents is not None
    if packed:  # .contiguous() of the [1, S, h, d] transposes: new tensors
        q, k, v = (tape.new(b * s * n * hd, t.dtype, t.rg) for t, n in zip((q, k, v), heads))
    pad = (-hd) % kernel.head_dim_multiple
    if pad:  # F.pad to the next multiple: copies at the padded width
        q, k, v = (tape.new(b * s * n * (hd + pad), t.dtype, t.rg) for t, n in zip((q, k, v), heads))
    out = tape.new(b * s * h * (hd + pad), dt, rg)
    if rg:
        for t in (q, k, v):
            tape.save(t, "attention q, k, v")
        tape.save(out, "attention output")
        for _ in range(kernel.row_statistics):  # log-sum-exp (flex: and max_scores), fp32 [b, h, s]
            tape.save(tape.new(b * h * s, "fp32", False), "attention log-sum-exp")
        if kernel.saves_rng_state:  # Philox seed and offset
            tape.save(tape.new(2, "int64", False), "attention kernel state")
        if packed:  # cu_seqlens_q (the same tensor as cu_seqlens_k)
            tape.save(tape.new(documents + 1, "int32", False), "attention kernel state")
    tape.add_flops("attention", sdpa_forward_flops(b, h, s, sk, hd, hd), sdpa_backward_flops(b, h, s, sk, hd, hd) if rg else 0)
    if pad or kernel.output_is_copy:  # out[..., :hd] reshaped: a copy
        return tape.new(b * s * h * hd, dt, rg)
    return out


def cross_entropy(tape: Tape, logits: Tensor, targets: Tensor, *, upcast: bool) -> int:
    """Token-level cross entropy on [n, vocab] logits; returns the bytes of its input copy.

    transformers' causal-LM loss calls `logits.float()` first (a copy unless fp32), then
    log_softmax saves its [n, vocab] output and nll_loss saves the int64 targets and a scalar.
    """
    x = cast(tape, logits, "fp32") if (upcast or tape.autocast) else logits
    copy_bytes = x.nbytes if x.sid != logits.sid else 0
    # the log-softmax output and the loss require grad as the logits do (the gradient flows through them)
    tape.save(tape.new(x.numel, x.dtype, x.rg), "log-softmax output")
    tape.save(targets, "loss targets")
    tape.save(tape.new(1, "fp32", x.rg), "loss targets")
    return copy_bytes
