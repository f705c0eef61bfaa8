"""BLOOM and BLOOMZ (transformers `BloomForCausalLM`, models/bloom/modeling_bloom.py).

Embeddings: word_embeddings, then `word_embeddings_layernorm` (a LayerNorm before the first block);
no position embeddings. Block (pre-LN): x + dropout(dense(attn(query_key_value(ln(x))))), then
x + dropout(dense_4h_to_h(gelu(dense_h_to_4h(ln(x))))); ln_f; the LM head is tied to the embeddings.

Attention is BLOOM's own eager code (no sdpa or flash path in transformers, so `--attention` does
not change it): `query_key_value` is one fused [d, 3d] linear whose output is viewed as
[b, s, h, 3, hd]; q, k and v are strided views, and `reshape(b*h, s, hd)` copies each of them
unless there is one sequence (then they stay views of the fused output, one storage). ALiBi: the
bias `slopes * arange(s)`, [b*h, 1, s] in the stream dtype, built once per forward and added by
`alibi.baddbmm(q, k^T, beta=1, alpha=1/sqrt(hd))` (derivatives.yaml baddbmm: `self`'s gradient saves
nothing, so the bias is never kept). Then + the [b, 1, s, s] causal mask, softmax in fp32 (saved),
`.to(dtype)`, dropout, `bmm(probs, v)`: the saves of transformers' eager attention.
GELU is `GeLUFunction`, a custom autograd Function that saves its input (tanh approximation).

peft's default LoRA targets for bloom: `query_key_value` (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
"""

from __future__ import annotations

from .. import ops
from ...errors import LoraCostError
from ...spec import LinearSite, ModelSpec
from .base import (MAX_LAYERS, MAX_VOCAB, Architecture, ParamGroup, divisible, flag, prob, register_architecture,
                   require)


def _from_config(name: str, cfg: dict, source: str) -> ModelSpec:
    d = require(cfg, "n_embed", name, "hidden_size")  # BloomConfig: n_embed, when given, overrides hidden_size
    heads = require(cfg, "n_head", name, "num_attention_heads")
    divisible(name, "hidden_size", d, "n_head", heads)  # as BloomAttention.__init__ checks
    if flag(cfg, "apply_residual_connection_post_layernorm", name, False):
        raise LoraCostError(f"{name}: apply_residual_connection_post_layernorm=true is not modelled")
    if flag(cfg, "slow_but_exact", name, False):
        raise LoraCostError(f"{name}: slow_but_exact=true (tensor-parallel sliced linears) is not modelled")
    dropout = prob(cfg, "hidden_dropout", name, 0.0)
    return ModelSpec(
        name=name, family="bloom", model_type="bloom", hidden=d,
        layers=require(cfg, "n_layer", name, "num_hidden_layers", maximum=MAX_LAYERS), heads=heads, kv_heads=heads,
        head_dim=d // heads, intermediate=4 * d, vocab=require(cfg, "vocab_size", name, maximum=MAX_VOCAB),
        max_positions=1 << 30,  # ALiBi: no position table, no trained length limit in the config
        tie_embeddings=flag(cfg, "tie_word_embeddings", name, True), qkv_bias=True, mlp_bias=True,
        hidden_dropout=dropout, attention_dropout=prob(cfg, "attention_dropout", name, 0.0), source=source)


def _sites(spec: ModelSpec) -> tuple[LinearSite, ...]:
    d, i = spec.hidden, spec.intermediate
    return (LinearSite("query_key_value", d, 3 * d, True, path="self_attention.query_key_value"),
            LinearSite("dense", d, d, True, path="self_attention.dense"),
            LinearSite("dense_h_to_4h", d, i, True, path="mlp.dense_h_to_4h"),
            LinearSite("dense_4h_to_h", i, d, True, path="mlp.dense_4h_to_h"))


def _params(spec: ModelSpec) -> list[ParamGroup]:
    d, L = spec.hidden, spec.layers
    groups = [ParamGroup("word_embeddings", spec.vocab * d, 1, "embedding"),
              ParamGroup("word_embeddings_layernorm", 2 * d, 1, "norm", bias_numel=d)]
    for s in _sites(spec):
        groups.append(ParamGroup(f"h.*.{s.path}.weight", s.d_in * s.d_out, L, "linear"))
        groups.append(ParamGroup(f"h.*.{s.path}.bias", s.d_out, L, "bias"))
    groups.append(ParamGroup("h.*.input_layernorm, post_attention_layernorm", 2 * d, 2 * L, "norm", bias_numel=d))
    groups.append(ParamGroup("ln_f", 2 * d, 1, "norm", bias_numel=d))
    if not spec.tie_embeddings:
        groups.append(ParamGroup("lm_head", spec.vocab * d, 1, "head"))
    return groups


def _bloom_gelu_buffers(tape, x, saved_after: int) -> None:
    """`GeLUFunction` (which saves its input) runs chains of Python elementwise ops on [n, 4d] tensors,
    so several such buffers are alive at once. Forward (bloom_gelu_forward): x*0.5, 0.79788456*x,
    0.044715*x and their product (4), and the output: 5. Backward (bloom_gelu_back): tanh_out, 0.5*x,
    1 - tanh^2, 0.1070322243*x*x and 0.797 + that (5), with the incoming gradient: 6.
    What dense_4h_to_h saves (`saved_after`) does not exist yet when the forward runs and is freed
    before this backward runs, but peaks.py counts the block's saves whole at both moments: taken off."""
    if x.rg:
        tape.transient(max(5 * x.nbytes - saved_after, 0))
        tape.transient(max(6 * x.nbytes - saved_after, 0), backward=True)
    else:
        tape.transient(6 * x.nbytes)  # input, 4 buffers, output; nothing saved


def _forward(ctx) -> None:
    spec, tape = ctx.spec, ctx.tape
    d = spec.hidden
    qkv_site, dense, h_to_4h, four_h_to_h = _sites(spec)
    seq, kv_seq = ctx.seq, ctx.kv_seq
    shape = ops.AttentionShape(ctx.batch, seq, spec.heads, spec.heads, spec.head_dim, causal=True, kv_seq=kv_seq)
    dropout = ctx.model_dropout(spec.hidden_dropout)

    tape.scope = "embeddings"
    x = ctx.stream_input(ctx.word_embeddings(d))
    x = ctx.layer_norm(x, d)  # word_embeddings_layernorm
    tape.transient(ctx.batch * spec.heads * kv_seq * 4)  # the ALiBi bias, [b*h, 1, s] (fp32 before the cast)

    def block(x):
        a = ctx.layer_norm(x, d)
        qkv = ctx.linear(a, qkv_site)
        if ctx.batch == 1:  # reshape(b*h, s, hd) of a [1, h, s, hd] strided view is a view
            q = k = v = qkv.view()
        else:  # several sequences: each reshape copies
            q, k, v = (tape.new(ctx.tokens * d, qkv.dtype, qkv.rg) for _ in range(3))
        k, v = ctx.key_values(k, v)
        attn = ctx.attention(q, k, v, shape, implementation="eager",
                             dropout_p=ctx.model_dropout(spec.attention_dropout), softmax_fp32=True)
        x = ctx.residual("attention", ops.dropout(tape, ctx.linear(attn, dense), dropout), x)
        m = ctx.layer_norm(x, d)
        h = ctx.linear(m, h_to_4h)
        f = ops.gelu(tape, h)  # GeLUFunction saves its input
        before = tape.saved_in(tape.scope)
        out = ops.dropout(tape, ctx.linear(f, four_h_to_h), dropout)
        _bloom_gelu_buffers(tape, h, tape.saved_in(tape.scope) - before)
        return ctx.residual("ffn", out, x)

    x = ctx.blocks(x, dict.fromkeys(ctx.stack.kinds, block))
    tape.scope = "head"
    ctx.lm_head_and_loss(ctx.layer_norm(x, d), upcast=True)


BLOOM = register_architecture(Architecture(
    family="bloom", model_types=("bloom",),
    description="BLOOM: ALiBi, fused query_key_value, embedding LayerNorm, GELU MLP, tied LM head (eager attention only)",
    from_config=_from_config, linear_sites=_sites, default_targets=("query_key_value",),
    params=_params, forward=_forward,
    tasks=("causal-lm", "seq-cls", "token-cls")))  # heads.py: transformers' classifiers of the family
