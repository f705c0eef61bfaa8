"""Stand-ins for the fused attention kernels that cannot run on the CPU: flash-attention 2/3 and flex.

flash-attn is CUDA-only, and torch's flex_attention needs torch.compile (its eager CPU fallback
materialises the scores), so the trace runs transformers' own integration code (the casts, transposes and
the padding-free path of integrations/flash_attention.py + modeling_flash_attention_utils.py, and the
repeat_kv / transpose of integrations/flex_attention.py) down to the kernel call, and replaces only the
kernel by `FusedAttention`, an autograd Function that saves what the library's Function saves (the
sources and rules are in lora_cost/attention_kernels.py; tests/test_attention_kernels.py asserts them
against the libraries' `save_for_backward` lines):

  * flash-attention 2 FlashAttnFunc / FlashAttnVarlenFunc: q, k, v (padded to a multiple of 8 along
    head_dim), out_padded, softmax_lse (fp32 [b, h, s], varlen [h, total]), rng_state (int64 [2]); varlen
    also cu_seqlens_q, cu_seqlens_k.
  * flash-attention 3 (hopper) FlashAttnFunc / FlashAttnVarlenFunc: q, k, v, out, softmax_lse (+ cu_seqlens).
  * flex (FlexAttentionAutogradOp, torch 2.13): query, key, value, out, logsumexp, max_scores ([b, h, s]
    fp32 each). The BlockMask is
    not built on the CPU trace (transformers' flex mask interface is answered with None), as the analytic
    engine leaves it uncounted.

The kernels' FLOPs are counted through two custom ops (`lora_cost::fused_attention_forward/backward`)
that FlopCounterMode maps to the fused-kernel formulas of analytic/formulas/attention.py (flops.py).
"""

from __future__ import annotations

import torch

from ..attention_kernels import AttentionKernel, get_kernel

_FA2 = get_kernel("flash-attention-2")
_FA3 = get_kernel("flash-attention-3")
_FLEX = get_kernel("flex")


@torch.library.custom_op("lora_cost::fused_attention_forward", mutates_args=())
def fused_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str,
                            documents: int) -> tuple[torch.Tensor, torch.Tensor]:
    """out (q's shape and dtype) and the fp32 log-sum-exp ([b, h, s]; varlen [h, total])."""
    return _forward_shapes(q, layout)


@fused_attention_forward.register_fake
def _(q, k, v, layout, documents):
    return _forward_shapes(q, layout)


def _forward_shapes(q: torch.Tensor, layout: str):
    if layout == "bshd":  # flash: [b, s, h, d]
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    elif layout == "thd":  # flash varlen: [total, h, d]
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:  # "bhsd", flex
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    # flash-attn: `out = torch::empty_like(q)`; flex: the query's stride order (`_permute_strides`)
    return torch.empty_like(q), lse


@torch.library.custom_op("lora_cost::fused_attention_backward", mutates_args=())
def fused_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str,
                             documents: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@fused_attention_backward.register_fake
def _(dout, q, k, v, layout, documents):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class FusedAttention(torch.autograd.Function):
    """The kernel's autograd Function: saves q, k, v, out, lse (+ rng state, + cu_seqlens) as the library does."""

    @staticmethod
    def forward(ctx, q, k, v, kernel: AttentionKernel, layout: str, documents: int, cu_seqlens):
        if kernel.half_only and q.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError(f"{kernel.name} only supports fp16 and bf16 (got {q.dtype})")  # flash-attn's own check
        head_dim = q.shape[-1]
        pad = (-head_dim) % kernel.head_dim_multiple
        if pad:  # FlashAttnFunc: q, k, v = F.pad(..., [0, 8 - head_size_og % 8])
            q, k, v = (torch.nn.functional.pad(t, [0, pad]) for t in (q, k, v))
        out, lse = torch.ops.lora_cost.fused_attention_forward(q, k, v, layout, documents)
        saved = [q, k, v, out, lse] + [torch.empty_like(lse) for _ in range(kernel.row_statistics - 1)]  # flex: max_scores
        if cu_seqlens is not None:
            saved += [cu_seqlens, cu_seqlens]  # cu_seqlens_q is cu_seqlens_k (prepare_fa_kwargs_from_position_ids)
        if kernel.saves_rng_state:
            saved.append(torch.empty(2, dtype=torch.int64, device=q.device))
        ctx.save_for_backward(*saved)
        ctx.layout, ctx.documents, ctx.head_dim = layout, documents, head_dim
        return out[..., :head_dim] if pad else out

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors[:3]  # (the real kernels read out and lse too)
        dq, dk, dv = torch.ops.lora_cost.fused_attention_backward(dout, q, k, v, ctx.layout, ctx.documents)
        hd = ctx.head_dim
        return dq[..., :hd], dk[..., :hd], dv[..., :hd], None, None, None, None


# ---- flash-attn's entry points, with the parameters transformers inspects (`_lazy_define_process_function`)
def flash2_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                alibi_slopes=None, deterministic=False, return_attn_probs=False):
    return FusedAttention.apply(q, k, v, _FA2, "bshd", q.shape[0], None)


def flash2_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                       softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                       deterministic=False, return_attn_probs=False, block_table=None):
    return FusedAttention.apply(q, k, v, _FA2, "thd", cu_seqlens_q.shape[0] - 1, cu_seqlens_q)


def flash3_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None, v_descale=None,
                window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False,
                sm_margin=0, return_attn_probs=False):
    return FusedAttention.apply(q, k, v, _FA3, "bshd", q.shape[0], None)


def flash3_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, seqused_q=None,
                       seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                       v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                       pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False):
    return FusedAttention.apply(q, k, v, _FA3, "thd", cu_seqlens_q.shape[0] - 1, cu_seqlens_q)


def flex_standin(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                 return_lse=False, kernel_options=None, training=False, **kwargs):
    """transformers' `compile_friendly_flex_attention(query, key, value, training=..., **kwargs)`."""
    out = FusedAttention.apply(query, key, value, _FLEX, "bhsd", query.shape[0], None)
    if return_lse or kwargs.get("return_aux") is not None:
        raise RuntimeError("the CPU trace calls flex without the log-sum-exp (return_lse is False on cpu)")
    return out


_FLASH = {"flash_attention_2": (flash2_func, flash2_varlen_func), "flash_attention_3": (flash3_func, flash3_varlen_func)}


def install(kernel_name: str) -> None:
    """Point transformers at the stand-in for `kernel_name` (idempotent; nothing for sdpa/eager)."""
    kernel = get_kernel(kernel_name)
    if not kernel.fused:
        return
    if kernel.name == "flex":
        import transformers.integrations.flex_attention as flex
        flex.compile_friendly_flex_attention = flex_standin
        return
    import transformers.modeling_flash_attention_utils as fa
    func, varlen = _FLASH[kernel.hf_name]
    fa._flash_fn, fa._flash_varlen_fn, fa._flash_with_kvcache_fn = func, varlen, None
    fa._pad_fn, fa._unpad_fn = fa._pad_input, fa._unpad_input
    fa._process_flash_kwargs_fn = fa._lazy_define_process_function(varlen)
    fa._process_with_kvcache_kwargs_fn = dict
    fa._loaded_implementation = kernel.hf_name


def packed_position_patches(run):
    """--packing: the value-reading helpers of the padding-free path, answered from the run's shape (fake
    tensors have no values): every row is `run.seq` long, `run.batch` of them in the flattened row."""
    from unittest import mock

    def prepare(position_ids):
        cu = torch.empty(run.batch + 1, dtype=torch.int32, device=position_ids.device)
        return (cu, cu), (run.seq, run.seq)

    return (mock.patch("transformers.modeling_flash_attention_utils._is_packed_sequence", lambda p, b: True),
            mock.patch("transformers.modeling_flash_attention_utils.prepare_fa_kwargs_from_position_ids", prepare))


def flops_mapping() -> dict:
    """FlopCounterMode custom_mapping entries for the stand-in ops (the fused-kernel formulas)."""
    from ..analytic.formulas.attention import sdpa_backward_flops, sdpa_forward_flops

    def dims(q, k, layout, documents):
        if layout == "bshd":
            return q[0], q[2], q[1], k[1], q[3]
        if layout == "thd":  # `documents` sequences of equal length in the flattened row
            return documents, q[1], q[0] // documents, k[0] // documents, q[2]
        return q[0], q[1], q[2], k[2], q[3]

    def forward(q, k, v, layout, documents, *args, out_shape=None, **kwargs):
        b, h, s, sk, d = dims(q, k, layout, documents)
        return sdpa_forward_flops(b, h, s, sk, d, d)

    def backward(dout, q, k, v, layout, documents, *args, out_shape=None, **kwargs):
        b, h, s, sk, d = dims(q, k, layout, documents)
        return sdpa_backward_flops(b, h, s, sk, d, d)

    return {torch.ops.lora_cost.fused_attention_forward: forward,
            torch.ops.lora_cost.fused_attention_backward: backward}
