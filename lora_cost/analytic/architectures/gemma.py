"""Gemma 2 and Gemma 3 text decoders (transformers `Gemma2ForCausalLM`, `Gemma3ForCausalLM` with the
`gemma3_text` config; models/gemma2/modeling_gemma2.py, models/gemma3/modeling_gemma3.py).

Block: four RMSNorms, h = x + post_attention_layernorm(o_proj(attn(input_layernorm(x)))), then
h + post_feedforward_layernorm(down_proj(gelu_tanh(gate_proj(m)) * up_proj(m))), m = pre_feedforward_layernorm(h).
The RMSNorm weight enters as (1 + w), multiplied in fp32 (ops.gemma_rms_norm). The token embeddings are
scaled by sqrt(hidden) (`embed_scale`, a 0-d buffer in the embedding dtype: a new [n, d] tensor, nothing
saved). The layers alternate sliding-window and global ("full") attention (config `layer_types`; by
default Gemma 2 alternates 1:1 starting with a sliding layer, Gemma 3 has 5 sliding layers per global
one, `sliding_window_pattern` 6): the block plan has the two kinds.

Gemma 2 soft-caps the attention scores (`attn_logit_softcapping`: cap * tanh(scores / cap)); sdpa cannot,
so `Gemma2PreTrainedModel._supports_sdpa = False`: transformers runs eager attention (asked for nothing,
it falls back from sdpa to eager; asked for sdpa, it refuses), whose tanh output is one more [b, h, s, s]
saved tensor. Gemma 2 (and Gemma 3 when its config sets it) also soft-caps the [n, vocab] logits
(`final_logit_softcapping`): the tanh output is saved next to the logits. Gemma 3 never soft-caps the
attention (its attention does not pass the cap on), runs sdpa, normalises each head's q and k
(`q_norm`/`k_norm`, Gemma RMSNorms over head_dim) before RoPE, and has one rotary table pair per layer
kind (local theta 10k, global 1M): each pair is shared by the layers of its kind, saved once.
A sliding layer under sdpa needs an explicit mask once the sequence exceeds the window (as Mistral).
"""

from __future__ import annotations

import math

from ...attention_kernels import is_fused
from .. import liger, ops
from ...errors import LoraCostError, shown
from ...spec import LinearSite, ModelSpec
from ..stack import Stack
from .base import (MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, Architecture, ParamGroup, divisible, flag, integer, prob,
                   register_architecture, require)

SLIDING, FULL = "sliding", "full"
_LAYER_TYPES = {"sliding_attention": SLIDING, "full_attention": FULL}
_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")  # both run aten.gelu, which saves its input
# the configuration classes' defaults (configuration_gemma2.py, configuration_gemma3.py Gemma3TextConfig)
_DEFAULTS = {"gemma2": dict(pattern=2, attn_softcap=50.0, final_softcap=30.0, positions=8192),
             "gemma3_text": dict(pattern=6, attn_softcap=None, final_softcap=None, positions=131_072)}


def _cap(cfg: dict, key: str, name: str, default: float | None) -> float | None:
    """A soft-capping value: a positive finite number, or null for none."""
    if key not in cfg:
        return default
    value = cfg[key]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise LoraCostError(f"{name}: config field {key!r} must be a positive number or null, got {shown(value)}")
    return float(value)


def _layer_kinds(cfg: dict, name: str, layers: int, pattern: int) -> tuple[str, ...]:
    types = cfg.get("layer_types")
    if types is None:
        if cfg["model_type"] == "gemma3_text":  # Gemma2Config has no pattern field: it always alternates
            pattern = integer(cfg, "sliding_window_pattern", name, default=pattern, maximum=MAX_LAYERS)
        return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(layers))
    if not isinstance(types, list) or len(types) != layers or any(t not in _LAYER_TYPES for t in types):
        raise LoraCostError(f"{name}: config field 'layer_types' must list {layers:,} values, each "
                            f"'sliding_attention' or 'full_attention'")
    return tuple(_LAYER_TYPES[t] for t in types)


def _from_config(name: str, cfg: dict, source: str) -> ModelSpec:
    model_type = cfg["model_type"]
    defaults = _DEFAULTS[model_type]
    d = require(cfg, "hidden_size", name)
    heads = require(cfg, "num_attention_heads", name)
    kv = integer(cfg, "num_key_value_heads", name, default=heads, maximum=heads)
    divisible(name, "num_attention_heads", heads, "num_key_value_heads", kv)
    layers = require(cfg, "num_hidden_layers", name, maximum=MAX_LAYERS)
    activation = cfg.get("hidden_activation", "gelu_pytorch_tanh")
    if activation not in _ACTIVATIONS:
        raise LoraCostError(f"{name}: config field 'hidden_activation' must be one of {', '.join(_ACTIVATIONS)}, "
                            f"got {shown(activation)}")
    if flag(cfg, "use_bidirectional_attention", name, False):
        raise LoraCostError(f"{name}: use_bidirectional_attention (an encoder) is not modelled; use --engine trace")
    return ModelSpec(
        name=name, family="gemma", model_type=model_type, hidden=d, layers=layers, heads=heads, kv_heads=kv,
        head_dim=integer(cfg, "head_dim", name, default=256), intermediate=require(cfg, "intermediate_size", name),
        vocab=require(cfg, "vocab_size", name, maximum=MAX_VOCAB),
        max_positions=integer(cfg, "max_position_embeddings", name, default=defaults["positions"],
                              maximum=MAX_POSITIONS),
        tie_embeddings=flag(cfg, "tie_word_embeddings", name, True),
        qkv_bias=flag(cfg, "attention_bias", name, False),
        attention_dropout=prob(cfg, "attention_dropout", name, 0.0),
        sliding_window=integer(cfg, "sliding_window", name, default=4096, maximum=MAX_POSITIONS),
        qk_norm=model_type == "gemma3_text", layer_kinds=_layer_kinds(cfg, name, layers, defaults["pattern"]),
        attn_softcap=_cap(cfg, "attn_logit_softcapping", name, defaults["attn_softcap"])
        if model_type == "gemma2" else None,
        final_softcap=_cap(cfg, "final_logit_softcapping", name, defaults["final_softcap"]), source=source)


def _sites(spec: ModelSpec) -> tuple[LinearSite, ...]:
    d, hd, i, b = spec.hidden, spec.head_dim, spec.intermediate, spec.qkv_bias
    q, kv = spec.heads * hd, spec.kv_heads * hd
    return (LinearSite("q_proj", d, q, b), LinearSite("k_proj", d, kv, b), LinearSite("v_proj", d, kv, b),
            LinearSite("o_proj", q, d, b), LinearSite("gate_proj", d, i, False), LinearSite("up_proj", d, i, False),
            LinearSite("down_proj", i, d, False))


def _params(spec: ModelSpec) -> list[ParamGroup]:
    d, L = spec.hidden, spec.layers
    groups = [ParamGroup("embed_tokens", spec.vocab * d, 1, "embedding")]
    for s in _sites(spec):
        groups.append(ParamGroup(f"layers.*.{s.name}.weight", s.d_in * s.d_out, L, "linear"))
        if s.bias:
            groups.append(ParamGroup(f"layers.*.{s.name}.bias", s.d_out, L, "bias"))
    groups.append(ParamGroup("layers.*.input_layernorm, post_attention_layernorm, pre_feedforward_layernorm, "
                             "post_feedforward_layernorm", d, 4 * L, "norm"))
    if spec.qk_norm:
        groups.append(ParamGroup("layers.*.self_attn.q_norm, k_norm", spec.head_dim, 2 * L, "norm"))
    groups.append(ParamGroup("norm", d, 1, "norm"))
    if not spec.tie_embeddings:
        groups.append(ParamGroup("lm_head", spec.vocab * d, 1, "head"))
    return groups


def _stack(spec: ModelSpec) -> Stack:
    return Stack.of(spec.layer_kinds)



def _forward(ctx) -> None:
    spec, run, tape = ctx.spec, ctx.run, ctx.tape
    d, hd = spec.hidden, spec.head_dim
    q_site, k_site, v_site, o_site, gate, up, down = _sites(spec)
    seq, kv_seq = ctx.seq, ctx.kv_seq
    # Gemma 2 cannot run sdpa (soft-capping): transformers' default falls back to eager
    # (flash-attention 2/3 and flex take the soft-capping inside the kernel)
    implementation = "eager" if spec.model_type == "gemma2" and not is_fused(run.attention) else run.attention
    softcap = spec.attn_softcap is not None and implementation == "eager"

    tape.scope = "embeddings"
    emb = ops.scale(tape, ctx.embedding(None, d))  # * embed_scale: the scaled-embedding module's output
    x = ctx.stream_input(ctx.method.input_embeddings(ctx, emb))
    table = ctx.position_rows * hd  # position_ids are [1, s]: one table pair per rotary kind, shared by the batch
    kinds = ctx.stack.kinds if spec.model_type == "gemma3_text" else (None,)  # Gemma 2: one pair for all
    tables = {k: (tape.new(table, x.dtype, False), tape.new(table, x.dtype, False)) for k in kinds}
    if kv_seq != seq and not x.rg:  # prefix keys: kept once (see llama.py)
        for cos, sin in tables.values():
            tape.save(cos, "rotary tables")
            tape.save(sin, "rotary tables")

    def norm(t, width=d):
        if "rms_norm" in run.liger_kernels:  # LigerRMSNormForGemma2/3: offset 1, gemma casting, in_place=False
            return liger.rms_norm(tape, t, width, w_trainable=ctx.base_trainable, in_place=False)
        return ops.gemma_rms_norm(tape, t, width, w_trainable=ctx.base_trainable)

    def block_of(kind: str):
        cos, sin = tables[kind if kind in tables else None]
        window = kind == SLIDING and spec.sliding_window is not None and seq > spec.sliding_window
        masked = implementation == "sdpa" and (window or kv_seq != seq)

        # ligeracc: the sublayers as functions of their own, so that their locals (the norm output, q, k, v, the
        # attention output; the MLP's intermediates) die when they return, as in Gemma3Attention.forward and
        # Gemma3MLP.forward (tape.forward_live follows these references)
        def attention(a):
            q, k, v = ctx.linear(a, q_site), ctx.linear(a, k_site), ctx.linear(a, v_site)
            if spec.qk_norm:
                q, k = norm(q, hd), norm(k, hd)
            if "rope" in run.liger_kernels:  # LigerRopeFunction: in place, saves cos and sin
                q, k = liger.rope(tape, q, k, cos, sin)
            else:
                q, k = ops.rope(tape, q, cos, sin), ops.rope(tape, k, cos, sin)
            k, v = ctx.key_values(k, v)
            shape = ops.AttentionShape(ctx.batch, seq, spec.heads, spec.kv_heads, hd, causal=True, kv_seq=kv_seq)
            impl = implementation
            if masked:  # explicit mask under sdpa: transformers repeats k and v itself (repeat_kv, a copy) ...
                # ... except from one key/value head, where expand + reshape is a view (unless autocast then casts
                # the expanded view, which materialises every head; see llama.py)
                one_head_view = spec.kv_heads == 1 and not (tape.autocast and k.dtype != tape.autocast)
                if spec.kv_heads != spec.heads and not one_head_view:
                    k = tape.new(k.numel * spec.heads // spec.kv_heads, k.dtype, k.rg)
                    v = tape.new(v.numel * spec.heads // spec.kv_heads, v.dtype, v.rg)
                tape.transient(ctx.batch * seq * kv_seq)  # the [b, 1, s, s_kv] bool mask
                shape = ops.AttentionShape(ctx.batch, seq, spec.heads, spec.heads, hd, True, kv_seq)
                impl = "sdpa-masked"
            attn = ctx.attention(q, k, v, shape, implementation=impl,
                                 dropout_p=ctx.model_dropout(spec.attention_dropout), softmax_fp32=True,
                                 softcap=softcap)
            del q, k, v  # the attention module hands only its output to o_proj
            return ctx.linear(attn, o_site)

        def mlp(m):
            if "geglu" in run.liger_kernels:  # LigerGEGLUMLP: down_proj(LigerGELUMulFunction(gate_proj(m), up_proj(m)))
                return ctx.linear(liger.swiglu(tape, ctx.linear(m, gate), ctx.linear(m, up)), down)
            # Gemma3MLP: down_proj(act_fn(gate_proj(x)) * up_proj(x)), every intermediate a temporary
            return ctx.linear(ops.mul(tape, ops.gelu(tape, ctx.linear(m, gate)), ctx.linear(m, up), "activation function"),
                              down)

        def block(x):
            x = ctx.residual("attention", norm(attention(norm(x))), x)
            return ctx.residual("ffn", norm(mlp(norm(x))), x)
        return block

    x = ctx.blocks(x, {kind: block_of(kind) for kind in ctx.stack.kinds})
    tape.scope = "head"
    x = norm(x)  # the model returns the normed states: the last block's output dies unless saved
    ctx.lm_head_and_loss(x, upcast=True, softcap=spec.final_softcap is not None)


def _notes(spec: ModelSpec, run) -> tuple[str, ...]:
    out = []
    if spec.model_type == "gemma2" and run.attention == "sdpa":
        out.append("gemma2: attention runs transformers' eager path whatever is asked (Gemma2 cannot run sdpa, "
                   "which has no soft-capping): the [b, h, s, s] scores' tanh and softmax are saved")
    if spec.final_softcap is not None:
        out.append(f"{spec.model_type}: final logit soft-capping ({spec.final_softcap:g} * tanh(logits / "
                   f"{spec.final_softcap:g})) saves one more [tokens, vocab] tensor")
    return tuple(out)


GEMMA = register_architecture(Architecture(
    family="gemma", model_types=("gemma2", "gemma3_text"),
    description="Gemma 2/3 decoder: (1 + w) RMSNorms before and after each sublayer, scaled embeddings, "
                "sliding and global attention layers, soft-capping, GeGLU MLP",
    from_config=_from_config, linear_sites=_sites, default_targets=("q_proj", "v_proj"),
    params=_params, forward=_forward, stack=_stack, notes=_notes,
    forward_lifetimes=True,
    tasks=("causal-lm", "seq-cls", "token-cls")))  # heads.py: transformers' classifiers of the family
