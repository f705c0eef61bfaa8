"""Encoders with a masked-LM head: RoBERTa and BERT (transformers `RobertaForMaskedLM`, `BertForMaskedLM`).

Embeddings: word + token_type + position, LayerNorm, dropout. Block (post-LN):
x = LN(x + dropout(dense(attn(query(x), key(x), value(x))))), then
x = LN(x + dropout(output.dense(gelu(intermediate.dense(x))))). Bidirectional attention, no mask
when nothing is padded (sdpa keeps its fused kernels). Head: dense, gelu, LayerNorm, decoder tied to
the word embedding, plus a bias. The loss is nn.CrossEntropyLoss on the logits as they are (no fp32
upcast, unlike the causal-LM loss). Dropouts default to the config's 0.1.
"""

from __future__ import annotations

from .. import ops
from ...spec import LinearSite, ModelSpec
from .base import (MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, Architecture, ParamGroup, divisible, integer, prob,
                   register_architecture, require)


def _from_config(name: str, cfg: dict, source: str) -> ModelSpec:
    d = require(cfg, "hidden_size", name)
    heads = require(cfg, "num_attention_heads", name)
    divisible(name, "hidden_size", d, "num_attention_heads", heads)  # as BertSelfAttention.__init__ checks
    hidden_dropout = prob(cfg, "hidden_dropout_prob", name, 0.1)
    # null means no token-type embedding (transformers skips a 0-row table the same way)
    types = 0 if "type_vocab_size" in cfg and cfg["type_vocab_size"] is None else \
        integer(cfg, "type_vocab_size", name, default=2, minimum=0, maximum=MAX_VOCAB)
    return ModelSpec(
        name=name, family="bert", model_type=cfg["model_type"], hidden=d,
        layers=require(cfg, "num_hidden_layers", name, maximum=MAX_LAYERS), heads=heads, kv_heads=heads,
        head_dim=d // heads, intermediate=require(cfg, "intermediate_size", name),
        vocab=require(cfg, "vocab_size", name, maximum=MAX_VOCAB),
        max_positions=require(cfg, "max_position_embeddings", name, maximum=MAX_POSITIONS), tie_embeddings=True,
        qkv_bias=True, mlp_bias=True, hidden_dropout=hidden_dropout,
        attention_dropout=prob(cfg, "attention_probs_dropout_prob", name, 0.1), embedding_dropout=hidden_dropout,
        type_vocab_size=types, source=source)


def _sites(spec: ModelSpec) -> tuple[LinearSite, ...]:
    d, i = spec.hidden, spec.intermediate
    # attention.output.dense, intermediate.dense and output.dense are all named "dense" (peft matches all three)
    return (LinearSite("query", d, d, True), LinearSite("key", d, d, True), LinearSite("value", d, d, True),
            LinearSite("dense", d, d, True, path="attention.output.dense"),
            LinearSite("dense", d, i, True, path="intermediate.dense"), LinearSite("dense", i, d, True, path="output.dense"))


HEAD_DENSE = "dense"  # lm_head.dense, also matched by a "dense" target and by all-linear


def _head_site(spec: ModelSpec) -> LinearSite:
    return LinearSite(HEAD_DENSE, spec.hidden, spec.hidden, True, path="lm_head.dense")


def _params(spec: ModelSpec) -> list[ParamGroup]:
    d, L = spec.hidden, spec.layers
    groups = [ParamGroup("word_embeddings", spec.vocab * d, 1, "embedding"),
              ParamGroup("position_embeddings", spec.max_positions * d, 1, "embedding"),
              ParamGroup("token_type_embeddings", spec.type_vocab_size * d, 1, "embedding"),
              ParamGroup("embeddings.LayerNorm", 2 * d, 1, "norm", bias_numel=d)]
    for s in _sites(spec):
        groups.append(ParamGroup(f"layer.*.{s.name}.weight", s.d_in * s.d_out, L, "linear"))
        groups.append(ParamGroup(f"layer.*.{s.name}.bias", s.d_out, L, "bias"))
    groups.append(ParamGroup("layer.*.LayerNorm (x2)", 2 * d, 2 * L, "norm", bias_numel=d))
    groups += [ParamGroup("lm_head.dense", d * d, 1, "head"), ParamGroup("lm_head.dense.bias", d, 1, "bias"),
               ParamGroup("lm_head.layer_norm", 2 * d, 1, "norm", bias_numel=d), ParamGroup("lm_head.bias", spec.vocab, 1, "bias")]
    return [g for g in groups if g.numel > 0]


def _forward(ctx) -> None:
    spec, run, tape = ctx.spec, ctx.run, ctx.tape
    d, n, seq = spec.hidden, ctx.tokens, ctx.seq
    query, key, value, attn_out, inter, out = _sites(spec)
    shape = ops.AttentionShape(ctx.batch, seq, spec.heads, spec.heads, spec.head_dim, causal=False)
    hidden_p = ctx.model_dropout(spec.hidden_dropout)

    def ln(t):
        return ctx.layer_norm(t, d)

    tape.scope = "embeddings"
    word = ctx.stream_input(ctx.word_embeddings(d))
    if spec.model_type == "roberta":  # position ids computed from the input ids: an int64 [b, s] tensor
        positions = ctx.embedding(n, d)
    else:  # BERT slices a registered position_ids buffer: never counted as an activation
        positions = tape.new(seq * d, ctx.other_dtype, ctx.base_trainable)
    e = ops.add(tape, word, positions)
    if spec.type_vocab_size:  # token_type_ids: BERT expands a [1, s] int64 tensor, RoBERTa builds a [b, s] one
        e = ops.add(tape, e, ctx.embedding(seq if spec.model_type == "bert" else n, d))
    x = ops.dropout(tape, ln(e), ctx.model_dropout(spec.embedding_dropout))

    def block(x):
        q, k, v = ctx.linear(x, query), ctx.linear(x, key), ctx.linear(x, value)
        a = ctx.attention(q, k, v, shape, implementation=run.attention,
                          dropout_p=ctx.model_dropout(spec.attention_dropout), softmax_fp32=False)
        x = ctx.residual("attention", ops.dropout(tape, ctx.linear(a, attn_out), hidden_p), x, ln)
        f = ops.gelu(tape, ctx.linear(x, inter))
        return ctx.residual("ffn", ops.dropout(tape, ctx.linear(f, out), hidden_p), x, ln)

    x = ctx.blocks(x, dict.fromkeys(ctx.stack.kinds, block))  # every kind of block is alike here
    if run.task in ("seq-cls", "token-cls"):  # heads.py: the classifier instead of the masked-LM head
        from ..heads import classifier_and_loss
        classifier_and_loss(ctx, x, token_dropout=hidden_p, upcast_tokens=False)
        return
    tape.scope = "head"
    h = ops.gelu(tape, ctx.head_site_linear(x, _head_site(spec)))
    ctx.lm_head_and_loss(ln(h), upcast=False, shifted_labels=False)


BERT = register_architecture(Architecture(
    family="bert", model_types=("roberta", "bert"),
    description="BERT/RoBERTa encoder with the masked-LM head (post-LayerNorm, GELU, tied decoder)",
    from_config=_from_config, linear_sites=_sites, default_targets=("query", "value"),
    params=_params, forward=_forward, head_sites=lambda spec: (_head_site(spec),),
    tasks=("masked-lm", "seq-cls", "token-cls")))
