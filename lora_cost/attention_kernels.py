"""The attention implementations transformers offers for training (`attn_implementation`), one registry.

Torch-free: the spec, the CLI and both engines read it. What each kernel saves for backward is written
where the engines apply it (analytic/ops.py `fused_kernel_attention`, trace/kernels.py); here are the
names, what transformers calls each, and the facts that decide which runs are refused.

Sources (the versions the rules were read from):
  * flash-attention 2: flash_attn/flash_attn_interface.py (FlashAttnFunc / FlashAttnVarlenFunc,
    Dao-AILab/flash-attention 2.8): saves q, k, v, out_padded, softmax_lse ([b, h, s_q] fp32; varlen
    [h, total_q]), rng_state (int64 [2]) and, varlen, cu_seqlens_q/k; fp16/bf16 only, head_dim <= 256,
    head_dim padded to a multiple of 8.
  * flash-attention 3: hopper/flash_attn_interface.py (FlashAttnFunc: `ctx.save_for_backward(q, k, v, out,
    softmax_lse)`; no dropout, so no rng state).
  * flex: torch/_higher_order_ops/flex_attention.py (FlexAttentionAutogradOp saves query, key, value, out,
    logsumexp, max_scores (torch 2.13: both fp32 [b, h, s]) and the block mask's index tensors) via transformers integrations/flex_attention.py.
  * transformers integrations/flash_attention.py + modeling_flash_attention_utils.py (v5.24): fp32 q, k, v
    are cast to the autocast dtype, else (quantized model) `config.dtype`, else the first Linear's weight
    dtype (`get_target_dtype`, `fa_peft_integration_check`); padding-free batches take the varlen kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import LoraCostError


@dataclass(frozen=True)
class AttentionKernel:
    name: str  # the --attention value
    hf_name: str  # transformers' attn_implementation
    aliases: tuple[str, ...]
    description: str  # the assumption line of an estimate
    fused: bool  # saves q, k, v, out and the log-sum-exp, never an [s, s] matrix (flash, flex)
    half_only: bool  # the kernel runs fp16/bf16 only
    casts_fp32_inputs: bool  # transformers casts fp32 q, k, v to the compute dtype before the kernel
    saves_rng_state: bool  # int64 [2] Philox seed/offset saved per call (flash-attention 2)
    head_dim_multiple: int  # the kernel pads head_dim to a multiple of this (1: no padding)
    max_head_dim: int | None
    packing: bool  # padding-free (position_ids) batches: the varlen kernel, no mask
    softcap: bool  # takes the scores' tanh soft-capping (Gemma 2) inside the kernel
    dropout: bool  # applies attention dropout
    # the [b, s, h*d] output handed to o_proj is a fresh copy. Not for the fused kernels: flash's output is
    # [b, s, h, d]; flex's takes the query's stride order (torch `_permute_strides`), and the query is a
    # transpose of the [b, s, h*d] projection, so transformers' transpose(1, 2).contiguous() is a view
    output_is_copy: bool
    row_statistics: int = 1  # fp32 [b, h, s] tensors saved: the log-sum-exp (flex: and the row maxima)


_REGISTRY: dict[str, AttentionKernel] = {}
_ALIASES: dict[str, str] = {}


def register_kernel(k: AttentionKernel) -> AttentionKernel:
    for key in (k.name, *k.aliases):
        if key in _ALIASES:
            raise ValueError(f"attention {key!r} registered twice")
        _ALIASES[key] = k.name
    _REGISTRY[k.name] = k
    return k


register_kernel(AttentionKernel(
    "sdpa", "sdpa", (), "kernel chosen as torch does on sm80+: flash for 16-bit, memory-efficient for fp32, math for "
    "fp32 grouped-query", fused=False, half_only=False, casts_fp32_inputs=False, saves_rng_state=False,
    head_dim_multiple=1, max_head_dim=None, packing=False, softcap=False, dropout=True, output_is_copy=True))
register_kernel(AttentionKernel(
    "eager", "eager", (), "transformers eager path", fused=False, half_only=False, casts_fp32_inputs=False,
    saves_rng_state=False, head_dim_multiple=1, max_head_dim=None, packing=False, softcap=True, dropout=True,
    output_is_copy=True))
register_kernel(AttentionKernel(
    "flash-attention-2", "flash_attention_2", ("flash_attention_2",),
    "flash-attn 2 (FlashAttnFunc): saves q, k, v, out, fp32 log-sum-exp [b, h, s] and the rng state, no s x s "
    "tensor; fp32 inputs cast to the compute dtype; backward recomputes the scores (2.5x the forward matmuls)",
    fused=True, half_only=True, casts_fp32_inputs=True, saves_rng_state=True, head_dim_multiple=8, max_head_dim=256,
    packing=True, softcap=True, dropout=True, output_is_copy=False))
register_kernel(AttentionKernel(
    "flash-attention-3", "flash_attention_3", ("flash_attention_3",),
    "flash-attn 3 (hopper FlashAttnFunc): saves q, k, v, out and the fp32 log-sum-exp [b, h, s], no s x s tensor; "
    "fp32 inputs cast to the compute dtype; no attention dropout; backward recomputes the scores (2.5x the forward "
    "matmuls)", fused=True, half_only=True, casts_fp32_inputs=True, saves_rng_state=False, head_dim_multiple=1,
    max_head_dim=256, packing=True, softcap=True, dropout=False, output_is_copy=False))
register_kernel(AttentionKernel(
    "flex", "flex_attention", ("flex_attention",),
    "torch flex_attention (FlexAttentionAutogradOp): saves q, k, v, out, the fp32 log-sum-exp and row maxima [b, h, s], no "
    "s x s tensor; the causal BlockMask (int32, about 4 b (s/128)^2 elements, built once per forward) is not "
    "counted; backward recomputes the scores (2.5x the forward matmuls)",
    fused=True, half_only=False, casts_fp32_inputs=False, saves_rng_state=False, head_dim_multiple=1,
    max_head_dim=None, packing=False, softcap=True, dropout=False, output_is_copy=False, row_statistics=2))

ATTENTIONS: tuple[str, ...] = tuple(_REGISTRY)
ATTENTION_SPELLINGS: tuple[str, ...] = tuple(_ALIASES)
ALIASES: dict[str, str] = dict(_ALIASES)  # every accepted spelling -> its registry name


def canonical_attention(name: object) -> str:
    """The registry name of an --attention value or transformers spelling; a one-line error otherwise."""
    if not isinstance(name, str) or name not in _ALIASES:
        raise LoraCostError(f"unknown attention {name!r}; choose one of {', '.join(ATTENTIONS)} "
                            f"(or transformers' spellings {', '.join(a for a in _ALIASES if a not in _REGISTRY)})")
    return _ALIASES[name]


def get_kernel(name: str) -> AttentionKernel:
    return _REGISTRY[canonical_attention(name)]


def is_fused(name: str) -> bool:
    """A fused kernel (flash-attention 2/3, flex); False for sdpa, eager and the engines' internal paths."""
    return name in _ALIASES and _REGISTRY[_ALIASES[name]].fused


# transformers v5.24: model classes whose `_supports_flash_attn` / `_supports_flex_attn` is False among the
# families lora-cost models (models/bloom, models/gpt2: flex; models/t5: flash). Checked against the installed
# transformers by tests/test_attention_kernels.py.
NO_FLASH_FAMILIES = ("bloom", "t5", "mt5")
NO_FLEX_FAMILIES = ("bloom", "gpt2")
FLEX_NOT_MODELLED = ("t5", "mt5")  # transformers runs T5's relative position bias as a flex score_mod: not modelled


def check_kernel_run(spec, run, method) -> None:
    """Refuse, in one line, a run with a kernel that cannot take it (or that lora-cost does not model)."""
    k = get_kernel(run.attention)
    family = spec.model_type
    if run.packing and not k.packing:
        raise LoraCostError(f"--packing (padding-free batches) is modelled with the varlen flash kernels only "
                            f"(flash-attention-2, flash-attention-3); with {k.name} transformers builds a "
                            "block-diagonal mask from position_ids, not modelled")
    if run.packing and (spec.decoder_layers or family in ("bert", "roberta") or run.task not in (None, "causal-lm")):
        raise LoraCostError("--packing applies to causal language models (DataCollatorWithFlattening / TRL packing)")
    if not k.fused:
        return
    if k.name.startswith("flash") and family in NO_FLASH_FAMILIES:
        raise LoraCostError(f"transformers has no {k.name} for {family} models (_supports_flash_attn is False); "
                            "use --attention sdpa or eager")
    if k.name == "flex" and family in NO_FLEX_FAMILIES:
        raise LoraCostError(f"transformers has no flex attention for {family} models (_supports_flex_attn is "
                            "False); use --attention sdpa or eager")
    if k.name == "flex" and family in FLEX_NOT_MODELLED:
        raise LoraCostError(f"flex attention on {family} (its position bias as a score_mod) is not modelled; use "
                            "--attention sdpa or eager")
    if k.half_only and run.precision == "fp32":
        raise LoraCostError(f"{k.name} runs fp16/bf16 only: with --precision fp32 transformers hands it fp32 q, k, v "
                            "(the weights' dtype); use bf16, fp16 or amp-*")
    if k.max_head_dim is not None and spec.head_dim > k.max_head_dim:
        raise LoraCostError(f"{k.name} takes head_dim <= {k.max_head_dim}; {spec.name} has {spec.head_dim}")
    if not k.casts_fp32_inputs and run.autocast_dtype is not None:
        raise LoraCostError(f"{k.name} under autocast (--precision {run.precision}) is not modelled: q, k and v "
                            "reach it in mixed dtypes; use bf16 or fp16")
    p_attn = run.model_dropout if run.model_dropout is not None else spec.attention_dropout
    if k.name == "flex" and p_attn > 0:
        raise LoraCostError(f"flex attention has no attention dropout (transformers raises on dropout {p_attn:g}); "
                            "use --model-dropout 0 or another kernel")
    if method.extra_keys(run):
        raise LoraCostError(f"{method.name} with {k.name} is not modelled (its prefix keys make s_k != s_q); "
                            "use --attention sdpa or eager")
