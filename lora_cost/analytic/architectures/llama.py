"""Llama-style decoders: Llama 2/3, Mistral, Qwen2, Qwen3 (transformers `LlamaForCausalLM` and kin).

Block (pre-RMSNorm): x + o_proj(attn(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))) with
n = input_layernorm(x), then x + down_proj(silu(gate_proj(m)) * up_proj(m)), m = post_attention_layernorm(x).
Grouped-query attention: k_proj and v_proj have kv_heads * head_dim outputs; on CUDA, with no mask,
transformers passes `enable_gqa=True` to sdpa (integrations/sdpa_attention.py `use_gqa_in_sdpa`).
RoPE saves only the shared cos/sin tables (q*cos + rotate_half(q)*sin). Qwen2 has q/k/v biases.
Mistral builds an explicit sliding-window mask once the sequence exceeds its window.
Qwen3 (modeling_qwen3.py Qwen3Attention) normalises each head's q and k with an RMSNorm over head_dim
(`q_norm(q_proj(x).view(..., head_dim))`) before RoPE, and has no q/k/v biases.
"""

from __future__ import annotations

from ...attention_kernels import is_fused
from .. import liger, ops
from ...spec import LinearSite, ModelSpec
from ...errors import LoraCostError
from .base import (MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, Architecture, ParamGroup, divisible, flag, integer, prob,
                   register_architecture, require)


def _from_config(name: str, cfg: dict, source: str) -> ModelSpec:
    d = require(cfg, "hidden_size", name)
    heads = require(cfg, "num_attention_heads", name)
    kv = integer(cfg, "num_key_value_heads", name, default=heads, maximum=heads)
    divisible(name, "num_attention_heads", heads, "num_key_value_heads", kv)
    if cfg.get("head_dim") is None and d < heads:
        raise LoraCostError(f"{name}: hidden_size {d:,} is smaller than num_attention_heads {heads:,} (no head_dim given)")
    head_dim = integer(cfg, "head_dim", name, default=d // heads)
    model_type = cfg["model_type"]
    window = integer(cfg, "sliding_window", name, default=None, maximum=MAX_POSITIONS)
    use_window = flag(cfg, "use_sliding_window", name, False)
    if model_type == "llama" or (model_type in ("qwen2", "qwen3") and not use_window):
        window = None
    return ModelSpec(
        name=name, family="llama", model_type=model_type, hidden=d,
        layers=require(cfg, "num_hidden_layers", name, maximum=MAX_LAYERS), heads=heads, kv_heads=kv,
        head_dim=head_dim, intermediate=require(cfg, "intermediate_size", name),
        vocab=require(cfg, "vocab_size", name, maximum=MAX_VOCAB),
        max_positions=require(cfg, "max_position_embeddings", name, maximum=MAX_POSITIONS),
        tie_embeddings=flag(cfg, "tie_word_embeddings", name, False),
        qkv_bias=flag(cfg, "attention_bias", name, model_type == "qwen2"), mlp_bias=flag(cfg, "mlp_bias", name, False),
        attention_dropout=prob(cfg, "attention_dropout", name, 0.0), sliding_window=window,
        qk_norm=model_type == "qwen3", source=source)


def _sites(spec: ModelSpec) -> tuple[LinearSite, ...]:
    d, hd, i = spec.hidden, spec.head_dim, spec.intermediate
    q, kv = spec.heads * hd, spec.kv_heads * hd
    b, mb = spec.qkv_bias, spec.mlp_bias
    return (LinearSite("q_proj", d, q, b), LinearSite("k_proj", d, kv, b), LinearSite("v_proj", d, kv, b),
            LinearSite("o_proj", q, d, False), LinearSite("gate_proj", d, i, mb), LinearSite("up_proj", d, i, mb),
            LinearSite("down_proj", i, d, mb))


def _params(spec: ModelSpec) -> list[ParamGroup]:
    d, L = spec.hidden, spec.layers
    groups = [ParamGroup("embed_tokens", spec.vocab * d, 1, "embedding")]
    for s in _sites(spec):
        groups.append(ParamGroup(f"layers.*.{s.name}.weight", s.d_in * s.d_out, L, "linear"))
        if s.bias:
            groups.append(ParamGroup(f"layers.*.{s.name}.bias", s.d_out, L, "bias"))
    groups.append(ParamGroup("layers.*.input_layernorm, post_attention_layernorm", d, 2 * L, "norm"))
    if spec.qk_norm:
        groups.append(ParamGroup("layers.*.self_attn.q_norm, k_norm", spec.head_dim, 2 * L, "norm"))
    groups.append(ParamGroup("norm", d, 1, "norm"))
    if not spec.tie_embeddings:
        groups.append(ParamGroup("lm_head", spec.vocab * d, 1, "head"))
    return groups



def _forward(ctx) -> None:
    spec, run, tape = ctx.spec, ctx.run, ctx.tape
    d = spec.hidden
    q_site, k_site, v_site, o_site, gate, up, down = _sites(spec)
    seq = ctx.seq
    kv_seq = ctx.kv_seq  # a prefix (prefix tuning) lengthens the keys, and forces an explicit causal mask
    # flash / flex take the window inside the kernel (window_size, the block mask): no explicit mask
    masked = (spec.sliding_window is not None and seq > spec.sliding_window or kv_seq != seq) and not is_fused(run.attention)
    shape = ops.AttentionShape(ctx.batch, seq, spec.heads, spec.kv_heads, spec.head_dim, causal=True, kv_seq=kv_seq)

    tape.scope = "embeddings"
    x = ctx.stream_input(ctx.word_embeddings(d))
    table = ctx.position_rows * spec.head_dim  # position_ids are [1, s]: one table shared by the batch
    cos, sin = tape.new(table, x.dtype, False), tape.new(table, x.dtype, False)
    if kv_seq != seq and not x.rg:
        # prefix keys: the first block's q and k need no gradient, so a later block is the first to save
        # the shared tables; they are kept once (the repeated block would count them once per layer)
        tape.save(cos, "rotary tables")
        tape.save(sin, "rotary tables")

    def norm(t):
        return ctx.rms_norm(t, d)

    # ligeracc: the sublayers are functions of their own, as transformers' modules are, so that their locals (the
    # norm output, q, k, v, the attention output; the MLP's gate and activation outputs) die when they return,
    # as in LlamaAttention.forward and LlamaMLP.forward (tape.forward_live follows these references)
    def attention(a):
        q, k, v = ctx.linear(a, q_site), ctx.linear(a, k_site), ctx.linear(a, v_site)
        if spec.qk_norm:  # over each head's head_dim values
            q, k = ctx.rms_norm(q, spec.head_dim), ctx.rms_norm(k, spec.head_dim)
        if "rope" in run.liger_kernels:  # LigerRopeFunction: in place, saves cos and sin (analytic/liger.py)
            q, k = liger.rope(tape, q, k, cos, sin)
        else:
            q, k = ops.rope(tape, q, cos, sin), ops.rope(tape, k, cos, sin)
        k, v = ctx.key_values(k, v)
        if masked:  # explicit mask: no enable_gqa, transformers repeats k and v itself (copies)
            # (one key/value head: expand + reshape is a view, unless autocast then casts the expanded view
            # (fp32 prefix keys under AMP), which materialises every head; only prefix runs take this path)
            one_head_view = spec.kv_heads == 1 and kv_seq != seq and not (tape.autocast and k.dtype != tape.autocast)
            if spec.kv_heads != spec.heads and not one_head_view:
                k = tape.new(k.numel * spec.heads // spec.kv_heads, k.dtype, k.rg)
                v = tape.new(v.numel * spec.heads // spec.kv_heads, v.dtype, v.rg)
            tape.transient(ctx.batch * seq * kv_seq)  # the [b, 1, s, s_kv] bool mask
        attn = ctx.attention(q, k, v, shape if not masked else
                             ops.AttentionShape(ctx.batch, seq, spec.heads, spec.heads, spec.head_dim, True, kv_seq),
                             implementation=run.attention if not masked or run.attention == "eager" else "sdpa-masked",
                             dropout_p=ctx.model_dropout(spec.attention_dropout), softmax_fp32=True)
        del q, k, v  # LlamaAttention.forward hands only the attention output to o_proj
        return ctx.linear(attn, o_site)

    def mlp(m):
        if "swiglu" in run.liger_kernels:  # LigerSwiGLUMLP: down_proj(LigerSiLUMulFunction(gate_proj(m), up_proj(m)))
            return ctx.linear(liger.swiglu(tape, ctx.linear(m, gate), ctx.linear(m, up)), down)
        # LlamaMLP: down_proj(act_fn(gate_proj(x)) * up_proj(x)), every intermediate a temporary
        return ctx.linear(ops.mul(tape, ops.silu(tape, ctx.linear(m, gate)), ctx.linear(m, up), "activation function"), down)

    def block(x):
        x = ctx.residual("attention", attention(norm(x)), x)
        return ctx.residual("ffn", mlp(norm(x)), x)

    x = ctx.blocks(x, dict.fromkeys(ctx.stack.kinds, block))  # every kind of block is alike here
    tape.scope = "head"
    x = norm(x)  # LlamaModel.forward returns the normed states: the last block's output dies unless saved
    ctx.lm_head_and_loss(x, upcast=True)


LLAMA = register_architecture(Architecture(
    family="llama", model_types=("llama", "mistral", "qwen2", "qwen3"),
    description="Llama-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP",
    from_config=_from_config, linear_sites=_sites, default_targets=("q_proj", "v_proj"),
    params=_params, forward=_forward, forward_lifetimes=True, tasks=("causal-lm", "seq-cls", "token-cls")))
