"""GPT-2 (transformers `GPT2LMHeadModel`) and GPT-3 175B as described in the GPT-3 paper.

GPT-2 block (pre-LN): x + c_proj(attn(c_attn(ln_1(x)))), then x + mlp.c_proj(gelu_new(c_fc(ln_2(x)))).
`c_attn` is one fused [d, 3d] Conv1D for q, k and v, so sdpa's q, k, v are views of one storage.
GPT-3 (Brown et al. 2020, Table 2.1) has the same block with separate q, k, v and output
projections (named q_proj, k_proj, v_proj, out_proj, fc_in, fc_out here) and exact GELU.
The LM head is tied to the token embedding.
"""

from __future__ import annotations

from .. import ops
from ...units import DTYPE_BYTES
from ...spec import LinearSite, ModelSpec
from .base import (MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, Architecture, ParamGroup, divisible, flag, integer, prob,
                   register_architecture, require)


def _from_config(name: str, cfg: dict, source: str) -> ModelSpec:
    d = require(cfg, "n_embd", name, "hidden_size")
    heads = require(cfg, "n_head", name, "num_attention_heads")
    divisible(name, "n_embd", d, "n_head", heads)  # as GPT2Attention.__init__ checks
    inner = integer(cfg, "n_inner", name, default=4 * d)
    dropout = lambda key: prob(cfg, key, name, 0.1 if cfg["model_type"] == "gpt2" else 0.0)  # noqa: E731
    return ModelSpec(
        name=name, family=cfg["model_type"], model_type=cfg["model_type"], hidden=d,
        layers=require(cfg, "n_layer", name, "num_hidden_layers", maximum=MAX_LAYERS), heads=heads, kv_heads=heads,
        head_dim=d // heads, intermediate=inner, vocab=require(cfg, "vocab_size", name, maximum=MAX_VOCAB),
        max_positions=require(cfg, "n_positions", name, maximum=MAX_POSITIONS),
        tie_embeddings=flag(cfg, "tie_word_embeddings", name, True), qkv_bias=True, mlp_bias=True,
        hidden_dropout=dropout("resid_pdrop"), attention_dropout=dropout("attn_pdrop"),
        embedding_dropout=dropout("embd_pdrop"), source=source)


def _gpt2_sites(spec: ModelSpec) -> tuple[LinearSite, ...]:
    d, i = spec.hidden, spec.intermediate
    return (LinearSite("c_attn", d, 3 * d, True, True, "attn.c_attn"), LinearSite("c_proj", d, d, True, True, "attn.c_proj"),
            LinearSite("c_fc", d, i, True, True, "mlp.c_fc"), LinearSite("c_proj", i, d, True, True, "mlp.c_proj"))


def _gpt3_sites(spec: ModelSpec) -> tuple[LinearSite, ...]:
    d, i = spec.hidden, spec.intermediate
    return (LinearSite("q_proj", d, d, True), LinearSite("k_proj", d, d, True), LinearSite("v_proj", d, d, True),
            LinearSite("out_proj", d, d, True), LinearSite("fc_in", d, i, True), LinearSite("fc_out", i, d, True))


def _params(spec: ModelSpec) -> list[ParamGroup]:
    d, L = spec.hidden, spec.layers
    sites = _gpt2_sites(spec) if spec.family == "gpt2" else _gpt3_sites(spec)
    groups = [ParamGroup("wte", spec.vocab * d, 1, "embedding"), ParamGroup("wpe", spec.max_positions * d, 1, "embedding")]
    for s in sites:
        groups.append(ParamGroup(f"h.*.{s.name}.weight", s.d_in * s.d_out, L, "linear"))
        groups.append(ParamGroup(f"h.*.{s.name}.bias", s.d_out, L, "bias"))
    groups.append(ParamGroup("h.*.ln_1, ln_2", 2 * d, 2 * L, "norm", bias_numel=d))  # LayerNorm weight + bias
    groups.append(ParamGroup("ln_f", 2 * d, 1, "norm", bias_numel=d))
    if not spec.tie_embeddings:
        groups.append(ParamGroup("lm_head", spec.vocab * d, 1, "head"))
    return groups


def _forward(ctx) -> None:
    spec, run, tape = ctx.spec, ctx.run, ctx.tape
    d = spec.hidden
    gpt2 = spec.family == "gpt2"
    sites = _gpt2_sites(spec) if gpt2 else _gpt3_sites(spec)
    seq = ctx.seq
    shape = ops.AttentionShape(ctx.batch, seq, spec.heads, spec.heads, spec.head_dim, causal=True, kv_seq=ctx.kv_seq)

    tape.scope = "embeddings"
    tok = ctx.stream_input(ctx.word_embeddings(d))
    pos = ctx.embedding(seq, d)  # position_ids of shape [1, s], broadcast over the batch
    x = ops.dropout(tape, ops.add(tape, tok, pos), ctx.model_dropout(spec.embedding_dropout))
    if run.attention == "eager":  # a [b, 1, s, s] additive causal mask, passed positionally to each block
        ctx.checkpoint_extra_bytes = ctx.batch * seq * ctx.kv_seq * DTYPE_BYTES[x.dtype]

    # prefix keys offset the causal mask: sdpa gets an explicit one (no is_causal), as in llama.py
    implementation = "sdpa-masked" if run.attention == "sdpa" and ctx.kv_seq != seq else run.attention

    def block(x):
        a = ctx.layer_norm(x, d)
        if gpt2:
            qkv = ctx.linear(a, sites[0])
            q = k = v = qkv.view()  # split + view + transpose of one storage
            if ctx.kv_seq != seq and run.attention == "eager" and ctx.batch > 1:
                # prefix keys: q alone reaches matmul, whose reshape of the transposed view to [b*h, s, hd]
                # copies it (with one sequence the reshape is a view of c_attn's output)
                q = tape.new(ctx.tokens * d, q.dtype, q.rg)
            rest = sites[1:]
        else:
            q, k, v = (ctx.linear(a, s) for s in sites[:3])
            rest = sites[3:]
        k, v = ctx.key_values(k, v)
        attn = ctx.attention(q, k, v, shape, implementation=implementation,
                             dropout_p=ctx.model_dropout(spec.attention_dropout), softmax_fp32=False)
        o = ops.dropout(tape, ctx.linear(attn, rest[0]), ctx.model_dropout(spec.hidden_dropout))
        x = ctx.residual("attention", o, x)
        m = ctx.layer_norm(x, d)
        f = ctx.linear(m, rest[1])
        f = ops.gelu_tanh_python(tape, f) if gpt2 else ops.gelu(tape, f)
        p = ops.dropout(tape, ctx.linear(f, rest[2]), ctx.model_dropout(spec.hidden_dropout))
        return ctx.residual("ffn", p, x)

    x = ctx.blocks(x, dict.fromkeys(ctx.stack.kinds, block))  # every kind of block is alike here
    tape.scope = "head"
    x = ctx.layer_norm(x, d)
    ctx.lm_head_and_loss(x, upcast=True)


GPT2 = register_architecture(Architecture(
    family="gpt2", model_types=("gpt2",),
    description="GPT-2: fused c_attn Conv1D, pre-LayerNorm, gelu_new MLP, tied LM head",
    from_config=_from_config, linear_sites=_gpt2_sites, default_targets=("c_attn",),
    params=_params, forward=_forward,
    tasks=("causal-lm", "seq-cls", "token-cls")))

GPT3 = register_architecture(Architecture(
    family="gpt3", model_types=("gpt3",),
    description="GPT-3 175B as in Brown et al. 2020: GPT-2 block with separate q/k/v/out projections",
    from_config=_from_config, linear_sites=_gpt3_sites, default_targets=("q_proj", "v_proj"),
    params=_params, forward=_forward))
