"""DeBERTa-v2 and DeBERTa-v3 (model_type deberta-v2): disentangled attention, masked-LM head.

transformers models/deberta_v2/modeling_deberta_v2.py, op by op (what each keeps for backward is
PyTorch's autograd rule for the op, derivatives.yaml):

Embeddings (DebertaV2Embeddings): word (+ absolute positions when `position_biased_input`, a slice of
the position_ids buffer; + token types when type_vocab_size > 0), LayerNorm, then `embeddings * mask`
with the [b, s, 1] attention mask (DebertaV2Model makes `torch.ones(b, s)`, fp32, when the step passes
none: mul saves it when the embeddings need a gradient), dropout.
Encoder (DebertaV2Encoder): the [b, 1, s, s] mask (fp32 product of the [b, s] ones with themselves), the
[1, s, s] int64 relative positions, and `rel_embeddings = LayerNorm(rel_embeddings.weight)` (2 x span
rows; `norm_rel_ebd` "layer_norm") are made once and passed to every layer.
Layer (DisentangledSelfAttention, then BERT's output/intermediate/output with post-LayerNorm):
  q, k, v = query_proj(x), key_proj(x), value_proj(x), each `transpose_for_scores`: view, permute,
    contiguous (a copy), view to [b*h, s, hd];
  scores = bmm(q, k^T / scale)          scale = sqrt(hd * (1 + c2p + p2c)), a new 0-dim fp32 tensor;
    the division saves it (`.to(q.dtype)`: a copy unless fp32) when k needs a gradient;
  rel = pos_dropout(rel_embeddings); pos_k = key_proj(rel) (or pos_key_proj), pos_q = query_proj(rel)
    (or pos_query_proj), each transpose_for_scores'd and `.repeat(b, 1, 1)` to [b*h, 2 span, hd] (a copy);
  c2p: gather(bmm(q, pos_k^T), -1, c2p_pos) / scale: gather saves its whole input [b*h, s, 2 span]
    and its int64 index (a new [s, s] tensor, expanded), the division its own new scale;
  p2c: gather(bmm(k, pos_q^T), -1, p2c_pos)^T / scale, likewise;
  scores + c2p + p2c, view [b, h, s, s], masked_fill(~mask.bool(), min): saves the new bool ~mask;
  softmax (saves its output), dropout, bmm with v, permute + contiguous (a copy) to [n, h*hd].
The convolution of DeBERTa-v2 xlarge/xxlarge (ConvLayer, `conv_kernel_size` > 0) runs once, after the
first layer, outside the checkpointed layers: Conv1d over the permuted embedding output (a copy; the
convolution saves input and weight whenever any gradient is needed), permute back (a copy),
masked_fill_ of the padding (in place: saves the bool [b, s] mask), dropout, the activation, the
residual sum with the first layer's output, LayerNorm, and `* input_mask` (saves the mask).
Head (LegacyDebertaV2OnlyMLMHead, `legacy` true, the default): dense, gelu, LayerNorm, decoder tied to
the word embedding with its own bias; nn.CrossEntropyLoss on the logits as they are (no fp32 upcast).
FLOPs: every bmm counts 2 x its multiply-adds (FlopCounterMode); gather, masked_fill and softmax none.
"""

from __future__ import annotations

from .. import ops
from ...errors import LoraCostError, shown
from ...spec import DisentangledShape, LinearSite, ModelSpec
from .base import (MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, Architecture, ParamGroup, divisible, flag, integer, prob,
                   register_architecture, require)

# methods whose placement in this model is not modelled (virtual tokens shift the relative-position
# table's use; bottleneck adapters sit in BERT's output modules differently): refused, not guessed
_NOT_MODELLED = ("prefix-tuning", "prompt-tuning", "p-tuning", "adapter-houlsby", "adapter-pfeiffer",
                 "adalora")  # AdaLoRA: its peft model on DebertaV2ForMaskedLM fails in the trace, so nothing checks it


def _pos_att_type(cfg: dict, name: str) -> tuple[bool, bool]:
    """config `pos_att_type`: "p2c|c2p" (published configs) or a list; null: neither."""
    value = cfg.get("pos_att_type")
    if value is None:
        return False, False
    if isinstance(value, str):
        parts = [x.strip() for x in value.lower().split("|") if x.strip()]
    elif isinstance(value, list) and all(isinstance(x, str) for x in value):
        parts = [x.strip().lower() for x in value]
    else:
        raise LoraCostError(f"{name}: config field 'pos_att_type' must be a string like \"p2c|c2p\" or a list, "
                            f"got {shown(value)}")
    unknown = [p for p in parts if p not in ("c2p", "p2c")]
    if unknown:
        raise LoraCostError(f"{name}: config field 'pos_att_type' has {shown(unknown[0])}; DeBERTa-v2 knows c2p and p2c")
    return "c2p" in parts, "p2c" in parts


def _choice(cfg: dict, key: str, name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = cfg.get(key, default)
    if value is None:
        value = default
    if value not in allowed:
        raise LoraCostError(f"{name}: config field {key!r} must be one of {', '.join(allowed)} (modelled), got {shown(value)}")
    return value


def _from_config(name: str, cfg: dict, source: str) -> ModelSpec:
    d = require(cfg, "hidden_size", name)
    heads = require(cfg, "num_attention_heads", name)
    divisible(name, "hidden_size", d, "num_attention_heads", heads)  # DisentangledSelfAttention.__init__ checks it
    head_dim = integer(cfg, "attention_head_size", name, default=d // heads)
    if head_dim * heads != d:  # attention.output.dense is hidden x hidden: transformers fails on any other width
        raise LoraCostError(f"{name}: attention_head_size {head_dim} x {heads} heads must equal hidden_size {d}")
    max_positions = require(cfg, "max_position_embeddings", name, maximum=MAX_POSITIONS)
    if integer(cfg, "embedding_size", name, default=d) != d:
        raise LoraCostError(f"{name}: an embedding_size other than hidden_size (embed_proj) is not modelled")
    if not flag(cfg, "legacy", name, True):
        raise LoraCostError(f"{name}: config field 'legacy' false (DebertaV2OnlyMLMHead) is not modelled; "
                            "the published configs use the legacy head")
    _choice(cfg, "hidden_act", name, "gelu", ("gelu",))
    _choice(cfg, "pooler_hidden_act", name, "gelu", ("gelu",))
    if integer(cfg, "pooler_hidden_size", name, default=d) != d:
        raise LoraCostError(f"{name}: a pooler_hidden_size other than hidden_size is not modelled")
    relative = flag(cfg, "relative_attention", name, False)
    max_rel = integer(cfg, "max_relative_positions", name, default=-1, minimum=-(1 << 30), maximum=MAX_POSITIONS)
    if max_rel < 1:
        max_rel = max_positions  # as DisentangledSelfAttention.__init__
    buckets = integer(cfg, "position_buckets", name, default=-1, minimum=-(1 << 30), maximum=MAX_POSITIONS)
    c2p, p2c = _pos_att_type(cfg, name)
    norm = cfg.get("norm_rel_ebd", "none")
    if not isinstance(norm, str):
        raise LoraCostError(f"{name}: config field 'norm_rel_ebd' must be a string such as \"layer_norm\", got {shown(norm)}")
    conv = integer(cfg, "conv_kernel_size", name, default=0, minimum=0, maximum=1 << 10)
    groups = integer(cfg, "conv_groups", name, default=1)
    if conv:
        divisible(name, "hidden_size", d, "conv_groups", groups)
    hidden_dropout = prob(cfg, "hidden_dropout_prob", name, 0.1)
    cls_dropout = None if cfg.get("cls_dropout") is None else prob(cfg, "cls_dropout", name, 0.0)
    shape = DisentangledShape(
        relative=relative, span=buckets if buckets > 0 else max_rel, c2p=c2p, p2c=p2c,
        share_att_key=flag(cfg, "share_att_key", name, False),
        norm_rel_ebd="layer_norm" in [x.strip() for x in norm.lower().split("|")],
        position_biased_input=flag(cfg, "position_biased_input", name, True), conv_kernel=conv, conv_groups=groups,
        conv_act=_choice(cfg, "conv_act", name, "tanh", ("tanh", "gelu")) if conv else "tanh",
        pooler_dropout=prob(cfg, "pooler_dropout", name, 0.0), cls_dropout=cls_dropout)
    return ModelSpec(
        name=name, family="deberta", model_type=cfg["model_type"], hidden=d,
        layers=require(cfg, "num_hidden_layers", name, maximum=MAX_LAYERS), heads=heads, kv_heads=heads,
        head_dim=head_dim, intermediate=require(cfg, "intermediate_size", name),
        vocab=require(cfg, "vocab_size", name, maximum=MAX_VOCAB), max_positions=max_positions, tie_embeddings=True,
        qkv_bias=True, mlp_bias=True, hidden_dropout=hidden_dropout,
        attention_dropout=prob(cfg, "attention_probs_dropout_prob", name, 0.1), embedding_dropout=hidden_dropout,
        type_vocab_size=integer(cfg, "type_vocab_size", name, default=0, minimum=0, maximum=MAX_VOCAB),
        source=source, disentangled=shape)


def _sites(spec: ModelSpec) -> tuple[LinearSite, ...]:
    d, i, a = spec.hidden, spec.intermediate, spec.heads * spec.head_dim
    g = spec.disentangled
    sites = [LinearSite("query_proj", d, a, True, path="attention.self.query_proj"),
             LinearSite("key_proj", d, a, True, path="attention.self.key_proj"),
             LinearSite("value_proj", d, a, True, path="attention.self.value_proj")]
    if g.relative and not g.share_att_key:
        if g.c2p:
            sites.append(LinearSite("pos_key_proj", d, a, True, path="attention.self.pos_key_proj"))
        if g.p2c:
            sites.append(LinearSite("pos_query_proj", d, a, True, path="attention.self.pos_query_proj"))
    # attention.output.dense, intermediate.dense and output.dense are all named "dense" (peft matches all three)
    sites += [LinearSite("dense", a, d, True, path="attention.output.dense"),
              LinearSite("dense", d, i, True, path="intermediate.dense"), LinearSite("dense", i, d, True, path="output.dense")]
    return tuple(sites)


def _head_site(spec: ModelSpec) -> LinearSite:
    return LinearSite("dense", spec.hidden, spec.hidden, True, path="cls.predictions.transform.dense")


def _params(spec: ModelSpec) -> list[ParamGroup]:
    d, L, g = spec.hidden, spec.layers, spec.disentangled
    groups = [ParamGroup("word_embeddings", spec.vocab * d, 1, "embedding")]
    if g.position_biased_input:
        groups.append(ParamGroup("position_embeddings", spec.max_positions * d, 1, "embedding"))
    groups += [ParamGroup("token_type_embeddings", spec.type_vocab_size * d, 1, "embedding"),
               ParamGroup("embeddings.LayerNorm", 2 * d, 1, "norm", bias_numel=d)]
    if g.relative:
        groups.append(ParamGroup("encoder.rel_embeddings", 2 * g.span * d, 1, "embedding"))
    if g.norm_rel_ebd:  # made whatever relative_attention says (DebertaV2Encoder.__init__)
        groups.append(ParamGroup("encoder.LayerNorm", 2 * d, 1, "norm", bias_numel=d))
    if g.conv_kernel:  # nn.Conv1d: not an nn.Linear, so never 4-bit; kept like T5's wo
        groups += [ParamGroup("encoder.conv.conv.weight", d * d // g.conv_groups * g.conv_kernel, 1, "kept-linear"),
                   ParamGroup("encoder.conv.conv.bias", d, 1, "bias"),
                   ParamGroup("encoder.conv.LayerNorm", 2 * d, 1, "norm", bias_numel=d)]
    for s in _sites(spec):
        groups.append(ParamGroup(f"layer.*.{s.path}.weight", s.d_in * s.d_out, L, "linear"))
        groups.append(ParamGroup(f"layer.*.{s.path}.bias", s.d_out, L, "bias"))
    groups.append(ParamGroup("layer.*.LayerNorm (x2)", 2 * d, 2 * L, "norm", bias_numel=d))
    # cls.predictions: transform.dense, transform.LayerNorm, the decoder tied to word_embeddings, its bias
    # transform.dense is an nn.Linear that is not the output embedding: bitsandbytes quantises it (kind "linear")
    groups += [ParamGroup("lm_head.transform.dense", d * d, 1, "linear"), ParamGroup("lm_head.transform.dense.bias", d, 1, "bias"),
               ParamGroup("lm_head.transform.LayerNorm", 2 * d, 1, "norm", bias_numel=d),
               ParamGroup("lm_head.bias", spec.vocab, 1, "bias")]
    return [g for g in groups if g.numel > 0]


def _heads_copy(tape, t: ops.Tensor, heads: int, rows: int) -> ops.Tensor:
    """transpose_for_scores / the context's permute: `.permute(0, 2, 1, 3).contiguous()` copies unless
    the permuted tensor is already contiguous (one head or one row)."""
    return tape.new(t.numel, t.dtype, t.rg) if heads > 1 and rows > 1 else t


def _repeated_heads(tape, t: ops.Tensor, heads: int, rows: int, batch: int) -> ops.Tensor:
    """A projection of the position table as the scores use it: transpose_for_scores (a copy for more than
    one head), then `.repeat(batch, 1, 1)` to [batch*heads, rows, hd], always a new tensor (repeat saves
    nothing: its backward sums over the copies)."""
    t = _heads_copy(tape, t, heads, rows)
    return tape.new(batch * t.numel, t.dtype, t.rg)


def bmm(tape, a: ops.Tensor, b: ops.Tensor, batch: int, m: int, k: int, n: int) -> ops.Tensor:
    """torch.bmm [batch, m, k] @ [batch, k, n] (on autocast's lower-precision list): saves b when a needs a
    gradient and a when b does; 2*batch*m*k*n FLOPs forward, as much again per operand needing a gradient."""
    if tape.autocast:
        a, b = ops.cast(tape, a, tape.autocast), ops.cast(tape, b, tape.autocast)
    if a.rg:
        tape.save(b, "attention q, k, v")
    if b.rg:
        tape.save(a, "attention q, k, v")
    tape.matmul("attention", batch * m, k, n, grad_a=a.rg, grad_b=b.rg)
    return tape.new(batch * m * n, ops.promote(a.dtype, b.dtype), a.rg or b.rg)


def _divide_by_scale(tape, x: ops.Tensor) -> ops.Tensor:
    """x / scale.to(x.dtype) with scale a new 0-dim fp32 tensor (scaled_size_sqrt): div saves the divisor
    (a 0-dim copy unless x is fp32) when x needs a gradient."""
    if x.rg:
        tape.save(tape.new(1, x.dtype, False), "attention scale")
    return tape.new(x.numel, x.dtype, x.rg)


def _gather(tape, x: ops.Tensor, rows: int, index_numel: int) -> ops.Tensor:
    """torch.gather(x, -1, index): backward scatters into x's shape, and autograd keeps x itself
    (derivatives.yaml: gather_backward(grad, self, dim, index)) and the int64 index (a new [s, s]
    clamp output per call, expanded as a view)."""
    index = tape.new(index_numel, "int64", False)
    if x.rg:
        tape.save(x, "relative position scores")
        tape.save(index, "relative position indices")
    return tape.new(rows, x.dtype, x.rg)


def _forward(ctx) -> None:
    spec, run, tape = ctx.spec, ctx.run, ctx.tape
    if ctx.method.name in _NOT_MODELLED:
        raise LoraCostError(f"{ctx.method.name} is not modelled for DeBERTa-v2 ({spec.name}) yet")
    g = spec.disentangled
    d, n, b, s = spec.hidden, ctx.tokens, ctx.batch, ctx.seq
    h, hd = spec.heads, spec.head_dim
    sites = {s_.path.split(".")[-1] if s_.name == "dense" else s_.name: s_ for s_ in _sites(spec)}
    query, key, value = sites["query_proj"], sites["key_proj"], sites["value_proj"]
    pos_key = key if g.share_att_key else sites.get("pos_key_proj")
    pos_query = query if g.share_att_key else sites.get("pos_query_proj")
    attn_out = next(s_ for s_ in _sites(spec) if s_.path == "attention.output.dense")
    inter = next(s_ for s_ in _sites(spec) if s_.path == "intermediate.dense")
    out = next(s_ for s_ in _sites(spec) if s_.path == "output.dense")
    hidden_p = ctx.model_dropout(spec.hidden_dropout)
    attn_p = ctx.model_dropout(spec.attention_dropout)
    rows2 = 2 * g.span  # rows of the relative position table
    trainable = ctx.base_trainable

    def ln(t):
        return ctx.layer_norm(t, d)

    tape.scope = "embeddings"
    # DebertaV2Model.forward: attention_mask = torch.ones(b, s) (default dtype fp32)
    mask = tape.new(b * s, "fp32", False)
    x = ctx.stream_input(ctx.word_embeddings(d))
    if g.position_biased_input:  # a slice of the position_ids buffer: never an activation
        x = ops.add(tape, x, tape.new(s * d, ctx.other_dtype, trainable))
    if spec.type_vocab_size:  # torch.zeros(b, s, dtype=long) token types
        x = ops.add(tape, x, ctx.embedding(n, d))
    x = ln(x)
    x = ops.mul(tape, x, ops.cast(tape, mask, x.dtype), "attention mask")  # mask.to(embeddings.dtype)
    x = ops.dropout(tape, x, ctx.model_dropout(spec.embedding_dropout))
    emb = x
    # the encoder's shared tensors: the [b, 1, s, s] fp32 mask, the [1, s, s] int64 relative positions and
    # the normalised table. GradientCheckpointingLayer passes the mask positionally to torch.utils.checkpoint,
    # which keeps it (once: one tensor for every layer); the others travel as keyword arguments in a partial
    if run.grad_checkpointing:
        ctx.checkpoint_extra_bytes += b * s * s * 4
    rel = None
    if g.relative:
        table = tape.parameter(rows2 * d, ctx.other_dtype, trainable)
        rel = ln(table) if g.norm_rel_ebd else table

    def attention(x):
        q = _heads_copy(tape, ctx.linear(x, query), h, s)
        k = _heads_copy(tape, ctx.linear(x, key), h, s)
        v = _heads_copy(tape, ctx.linear(x, value), h, s)
        bh = b * h
        kt = _divide_by_scale(tape, k)  # k^T / scale: the transpose is a view
        scores = bmm(tape, q, kt, bh, s, hd, s)
        if g.relative and (g.c2p or g.p2c):
            r = ops.dropout(tape, rel, hidden_p)  # pos_dropout
            pk = pq = None
            if g.share_att_key or g.c2p:
                pk = ctx.linear(r, pos_key)
            if g.share_att_key or g.p2c:
                pq = ctx.linear(r, pos_query)
            pk, pq = (None if t is None else _repeated_heads(tape, t, h, rows2, b) for t in (pk, pq))
            score = None
            if g.c2p:
                c2p = bmm(tape, q, pk, bh, s, hd, rows2)
                score = _divide_by_scale(tape, _gather(tape, c2p, bh * s * s, s * s))
                score = tape.new(score.numel, score.dtype, score.rg)  # 0 + c2p: a new tensor
            if g.p2c:
                p2c = bmm(tape, k, pq, bh, s, hd, rows2)
                p2c = _divide_by_scale(tape, _gather(tape, p2c, bh * s * s, s * s))
                score = ops.add(tape, score, p2c) if score is not None else tape.new(p2c.numel, p2c.dtype, p2c.rg)
            scores = ops.add(tape, scores, score)
        # masked_fill(~mask.bool(), min): mask.bool() and its negation are new bool [b, 1, s, s] tensors
        if scores.rg:
            tape.save(tape.new(b * s * s, "bool", False), "attention mask")
        scores = tape.new(scores.numel, scores.dtype, scores.rg)
        tape.transient(2 * scores.nbytes)
        probs = tape.new(scores.numel, "fp32" if tape.autocast else scores.dtype, scores.rg)  # softmax (fp32 under autocast)
        if probs.rg:
            tape.save(probs, "attention probabilities")
        probs = ops.dropout(tape, probs, attn_p)
        a = bmm(tape, probs, v, bh, s, s, hd)
        return _heads_copy(tape, a, h, s)

    def block(x):
        x = ctx.residual("attention", ops.dropout(tape, ctx.linear(attention(x), attn_out), hidden_p), x, ln)
        f = ops.gelu(tape, ctx.linear(x, inter))
        return ctx.residual("ffn", ops.dropout(tape, ctx.linear(f, out), hidden_p), x, ln)

    if g.conv_kernel:
        x = ctx.blocks(x, {kind: _with_conv(ctx, block, emb, mask) for kind in ctx.stack.kinds})
    else:
        x = ctx.blocks(x, dict.fromkeys(ctx.stack.kinds, block))
    if run.task in ("seq-cls", "token-cls"):  # heads.py: the classifier instead of the masked-LM head
        from ..heads import classifier_and_loss
        classifier_and_loss(ctx, x, token_dropout=hidden_p, upcast_tokens=False)
        return
    tape.scope = "head"
    t = ops.gelu(tape, ctx.head_site_linear(x, _head_site(spec)))
    ctx.lm_head_and_loss(ln(t), upcast=False, shifted_labels=False)


def _with_conv(ctx, block, emb, mask):
    """The first layer followed by ConvLayer; every later layer as it is. The convolution runs once, so
    its saves are counted once: in the first layer's scope (never repeated) in a plain step, and with the
    embeddings' under checkpointing (it is outside the checkpointed layer, so its saves are kept). Its
    output must not be a tensor of the embeddings' scope in a plain step: the repeated layer saving it
    would then count it once for all layers (tape.save), where each layer saves its own input."""
    state = {"first": True}

    def first_then_conv(x):
        y = block(x)
        if not state["first"]:
            return y
        state["first"] = False
        scope = ctx.tape.scope
        if ctx.run.grad_checkpointing:
            ctx.tape.scope = "embeddings"
        y = _conv(ctx, emb, y, mask)
        ctx.tape.scope = scope
        return y

    return first_then_conv


def _conv(ctx, emb, residual, mask):
    """ConvLayer.forward (see the module docstring)."""
    tape, spec, g = ctx.tape, ctx.spec, ctx.spec.disentangled
    d, n = spec.hidden, ctx.tokens
    x = tape.new(emb.numel, emb.dtype, emb.rg)  # permute(0, 2, 1).contiguous()
    w_trainable = ctx.base_trainable
    w_dtype = ctx.other_dtype if ctx.method.name != "qlora" else "fp32"
    if tape.autocast:  # conv1d is on autocast's lower-precision list: input and weight cast
        x = ops.cast(tape, x, tape.autocast)
        w = tape.new(d * d // g.conv_groups * g.conv_kernel, tape.autocast, False)
    else:
        w = None
    if x.rg or w_trainable:  # convolution_backward needs input and weight for either gradient
        tape.save(x, "linear inputs")
        if w is not None:
            tape.save(w, "autocast weight copies")
        else:
            tape.mark_saved()
    flops = 2 * n * d * (d // g.conv_groups) * g.conv_kernel
    tape.add_flops("base", flops, flops * (int(x.rg) + int(w_trainable)))
    rg = x.rg or w_trainable or (ctx.method.trains_biases)
    y = tape.new(n * d, ops.promote(x.dtype, w_dtype) if not tape.autocast else tape.autocast, rg)
    y = tape.new(y.numel, y.dtype, y.rg)  # permute(0, 2, 1).contiguous()
    if y.rg:  # masked_fill_ (in place) keeps the bool mask (1 - input_mask).bool()
        tape.save(tape.new(n, "bool", False), "attention mask")
    y = ops.dropout(tape, y, ctx.model_dropout(spec.hidden_dropout))
    y = ops.gelu(tape, y) if g.conv_act == "gelu" else ops.tanh(tape, y)
    y = ctx.layer_norm(ops.add(tape, residual, y), d)
    m = ops.cast(tape, mask, y.dtype)  # input_mask.to(output.dtype)
    return ops.mul(tape, y, m, "attention mask")


def _notes(spec: ModelSpec, run) -> tuple[str, ...]:
    if run.attention == "eager":
        return ()
    return ("transformers has no sdpa path for DeBERTa-v2 (DisentangledSelfAttention): its own eager attention runs "
            "whatever --attention says, saving the [b, h, s, s] probabilities and the c2p/p2c scores",)


DEBERTA = register_architecture(Architecture(
    family="deberta", model_types=("deberta-v2",),
    description="DeBERTa-v2/v3 encoder: disentangled attention (relative position buckets, c2p/p2c), masked-LM head",
    from_config=_from_config, linear_sites=_sites, default_targets=("query_proj", "value_proj"),
    params=_params, forward=_forward, head_sites=lambda spec: (_head_site(spec),), notes=_notes,
    tasks=("masked-lm", "seq-cls", "token-cls")))
