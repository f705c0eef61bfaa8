"""Liger-Kernel's RMSNorm, RoPE and SwiGLU swaps (`--liger`, `--liger-kernels`) in the trace.

Liger's kernels are Triton (GPU only), so the trace applies the swaps as
`liger_kernel.transformers.monkey_patch.apply_liger_kernel_to_<llama|mistral|qwen2|qwen3|phi3>(model=...)` does (0.8.5:
`_patch_rms_norm_module` on `norm` and every layer's `input_layernorm`, `post_attention_layernorm`, Qwen3's
`self_attn.q_norm`/`k_norm`; `_patch_swiglu_module(layer.mlp, LigerSwiGLUMLP)` (Phi-3: `LigerPhi3SwiGLUMLP`); the modeling module's
`apply_rotary_pos_emb` replaced), with stand-in autograd Functions that allocate and save exactly what Liger's
Functions do (analytic/liger.py quotes the rules; tests/test_liger_kernels.py checks them against the library's
source, kept in tests/data/liger_save_rules.txt). The stand-ins compute no values: the trace runs on fake tensors,
and a Triton kernel's arithmetic happens in registers (its only allocations are the ones written here).
"""

from __future__ import annotations

import contextlib
import sys
import types

import torch

from ..analytic.liger import SM_COUNT


class LigerRMSNormStandIn(torch.autograd.Function):
    """LigerRMSNormFunction (ops/rms_norm.py; casting_mode "llama", in_place=True)."""

    @staticmethod
    def forward(ctx, X, W, eps, in_place=True):
        ctx.in_place = in_place
        X = X.contiguous()  # @ensure_contiguous
        shape = X.shape
        X = X.view(-1, shape[-1])  # rms_norm_forward: X.view(-1, dim)
        Y = torch.empty((X.shape[0], X.shape[1]), dtype=X.dtype, device=X.device)
        RSTD = torch.empty(X.shape[0], dtype=torch.float32, device=X.device)  # fp32 in llama casting mode
        ctx.save_for_backward(X, W, RSTD)
        return Y.view(*shape)

    @staticmethod
    def backward(ctx, dY):
        X, W, RSTD = ctx.saved_tensors
        dY = dY.contiguous()  # @ensure_contiguous
        dW = None
        if ctx.needs_input_grad[1]:  # _dW: fp32 [sm_count, n_cols], summed and cast to W's dtype
            dW = torch.empty((SM_COUNT, X.shape[1]), dtype=torch.float32, device=X.device).sum(dim=0).to(W.dtype)
        return (dY if ctx.in_place else torch.zeros_like(dY)), dW, None, None  # in_place: dX = dY


def _rms_norm_forward(self, hidden_states):
    """LigerRMSNorm.forward, bound to the model's RMSNorm instance (`_patch_rms_norm_module`; Gemma 2 / 3:
    offset 1.0, casting_mode "gemma", in_place=False)."""
    eps = getattr(self, "variance_epsilon", None) or getattr(self, "eps", None) or 1e-6
    return LigerRMSNormStandIn.apply(hidden_states, self.weight, eps, getattr(self, "liger_in_place", True))


class LigerSiLUMulStandIn(torch.autograd.Function):
    """LigerSiLUMulFunction (ops/swiglu.py): c = empty_like(a), saves a and b; backward writes da, db into them."""

    @staticmethod
    def forward(ctx, a, b):
        a, b = a.contiguous(), b.contiguous()  # @ensure_contiguous
        c = torch.empty_like(a)
        ctx.save_for_backward(a, b)
        return c

    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        dc = dc.contiguous()  # @ensure_contiguous
        return a, b  # swiglu_backward: the gradients stored into a and b in place


def _swiglu_forward(self, x):
    """LigerSwiGLUMLP.forward, bound to the model's MLP instance (`_patch_swiglu_module`)."""
    return self.down_proj(LigerSiLUMulStandIn.apply(self.gate_proj(x), self.up_proj(x)))


def _phi3_swiglu_forward(self, x):
    """LigerPhi3SwiGLUMLP.forward: the fused gate_up_proj's output chunked (views; the Function copies them)."""
    gate, up_states = self.gate_up_proj(x).chunk(2, dim=-1)
    return self.down_proj(LigerSiLUMulStandIn.apply(gate, up_states))


class LigerRopeStandIn(torch.autograd.Function):
    """LigerRopeFunction (ops/rope.py): q and k rotated in place, saves cos and sin."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        # rope_forward: q.transpose(1, 2).contiguous() (a no-op on a projection's view(...).transpose(1, 2)),
        # the kernel writes into it, and q.transpose(1, 2) comes back: the same storage
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        k = k.transpose(1, 2).contiguous().transpose(1, 2)
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        dq = dq.transpose(1, 2).contiguous().transpose(1, 2)  # rope_backward: rotated in place
        dk = dk.transpose(1, 2).contiguous().transpose(1, 2)
        return dq, dk, None, None


def liger_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """liger_kernel.transformers.rope.liger_rotary_pos_emb."""
    return LigerRopeStandIn.apply(q, k, cos, sin)


def _decoder(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix, base)


@contextlib.contextmanager
def liger_swaps(built, spec, run):
    """Apply the run's Liger block kernels to the built model for the step (the RoPE swap is a module global of the
    modeling file, restored afterwards so later traces in this process run transformers' own)."""
    kernels = run.liger_kernels
    if not kernels:
        yield
        return
    decoder = _decoder(built.model)
    gemma = "geglu" in kernels or hasattr(decoder.layers[0], "pre_feedforward_layernorm")
    if "rms_norm" in kernels:
        norms = [decoder.norm]
        for layer in decoder.layers:
            norms += [layer.input_layernorm, layer.post_attention_layernorm]
            if gemma:  # apply_liger_kernel_to_gemma2 / gemma3_text: the feed-forward's two norms too
                norms += [layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm]
            if spec.qk_norm:  # Qwen3, Gemma 3: q_norm and k_norm too
                norms += [layer.self_attn.q_norm, layer.self_attn.k_norm]
        for norm in norms:
            norm.forward = types.MethodType(_rms_norm_forward, norm)
            norm.liger_in_place = not gemma
    if "swiglu" in kernels or "geglu" in kernels:  # LigerGEGLUMLP.forward is LigerSwiGLUMLP's with GELUMul
        for layer in decoder.layers:
            forward = _phi3_swiglu_forward if hasattr(layer.mlp, "gate_up_proj") else _swiglu_forward
            layer.mlp.forward = types.MethodType(forward, layer.mlp)
    with contextlib.ExitStack() as stack:
        if "rope" in kernels:
            from unittest import mock
            module = sys.modules[type(decoder.layers[0].self_attn).__module__]
            stack.enter_context(mock.patch.object(module, "apply_rotary_pos_emb", liger_rotary_pos_emb))
        yield
