"""Encoder-decoder T5 and mT5 (transformers `T5ForConditionalGeneration`, `MT5ForConditionalGeneration`).

The block plan is two kinds: `encoder` blocks, then `decoder` blocks (stack.py). Both stacks
(modeling_t5.py T5Stack) embed with the shared table, apply dropout, run their blocks and end with
final_layer_norm and dropout. Block (pre-norm, T5LayerNorm = RMS without mean, fp32 variance):
x + dropout(o(attn(q(n), k(n), v(n)) + bias)), n = layer_norm(x); the decoder adds cross-attention,
whose keys and values are k and v of the encoder output; then x + dropout(FFN(layer_norm(x))) with
FFN = wo(dropout(act(wi(m)))) (relu, T5 v1.0) or wo(dropout(act(wi_0(m)) * wi_1(m))) (gated-gelu:
T5 v1.1, flan-t5, mT5/mt0, T0). No 1/sqrt(d) scaling of the scores (T5Attention.scaling = 1.0).

The relative position bias: the first block of each stack owns `relative_attention_bias`, an
Embedding(buckets, heads) looked up at an [s, s_k] bucket table; the [1, h, s, s_k] result is passed
to every later block of the stack (T5Stack.forward). Cross-attention has no learned bias: the first
decoder block makes a [1, h, t, s] zeros tensor (requires_grad under gradient checkpointing) that
every decoder block shares. With sdpa the bias is the additive mask (integrations/sdpa_attention.py
`create_position_bias_mask`): the memory-efficient kernel takes it and saves it.

transformers 5 ties lm_head to the shared embedding for every T5/mT5 config (configuration_t5.py
__post_init__ forces tie_word_embeddings=True); T5 v1.0 configs (tie_word_embeddings absent or true)
scale the decoder output by d_model^-0.5 before lm_head (`scale_decoder_outputs`), T5 v1.1/flan and
mT5 do not. The loss is CrossEntropyLoss on the logits as they are (no fp32 upcast) over the decoder's
positions; the decoder input is the labels shifted right (`_shift_right`: a new int64 tensor).
"""

from __future__ import annotations

from .. import ops
from ..stack import BlockGroup, Stack
from ...errors import LoraCostError
from ...units import DTYPE_BYTES
from ...spec import LinearSite, ModelSpec
from .base import MAX_LAYERS, MAX_VOCAB, Architecture, ParamGroup, flag, integer, prob, register_architecture, require

ENCODER, DECODER = "encoder", "decoder"
_ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu", "gelu_pytorch_tanh")


def _from_config(name: str, cfg: dict, source: str) -> ModelSpec:
    d = require(cfg, "d_model", name, "hidden_size")
    heads = require(cfg, "num_heads", name, "num_attention_heads")
    encoder = require(cfg, "num_layers", name, "num_hidden_layers", maximum=MAX_LAYERS)
    decoder = integer(cfg, "num_decoder_layers", name, default=encoder, maximum=MAX_LAYERS)
    proj = cfg.get("feed_forward_proj", "relu")
    parts = proj.split("-") if isinstance(proj, str) else []
    gated = len(parts) == 2 and parts[0] == "gated"
    act = "gelu_new" if proj == "gated-gelu" else (parts[-1] if parts else "")
    if not parts or len(parts) > 2 or (len(parts) == 2 and not gated) or act not in _ACTIVATIONS:
        raise LoraCostError(f"{name}: config field 'feed_forward_proj' must be 'relu', 'gated-gelu' or "
                            f"[gated-]<{'|'.join(_ACTIVATIONS)}>, got {proj!r}")
    model_type = cfg["model_type"]
    # configuration_t5.py: scale_decoder_outputs = tie_word_embeddings is not False (mT5 never scales)
    tied_flag = flag(cfg, "tie_word_embeddings", name, True)
    dropout = prob(cfg, "dropout_rate", name, 0.1)
    return ModelSpec(
        name=name, family="t5", model_type=model_type, hidden=d, layers=encoder + decoder, heads=heads,
        kv_heads=heads, head_dim=require(cfg, "d_kv", name, "head_dim"), intermediate=require(cfg, "d_ff", name),
        vocab=require(cfg, "vocab_size", name, maximum=MAX_VOCAB),
        max_positions=1 << 30,  # relative positions: no table bounds the length
        tie_embeddings=model_type == "t5" and tied_flag,  # here: whether the decoder output is scaled
        hidden_dropout=dropout, attention_dropout=dropout, embedding_dropout=dropout, decoder_layers=decoder,
        relative_attention_buckets=integer(cfg, "relative_attention_num_buckets", name, default=32),
        ffn_activation=act, gated_ffn=gated, source=source)


def _ffn_sites(spec: ModelSpec) -> tuple[LinearSite, ...]:
    d, f = spec.hidden, spec.intermediate
    wo = LinearSite("wo", f, d, False, quantised=False)  # T5PreTrainedModel._keep_in_fp32_modules = ["wo"]
    if spec.gated_ffn:
        return LinearSite("wi_0", d, f, False), LinearSite("wi_1", d, f, False), wo
    return LinearSite("wi", d, f, False), wo


def _attention_sites(spec: ModelSpec, path: str, blocks: int = 0) -> tuple[LinearSite, ...]:
    d, inner = spec.hidden, spec.heads * spec.head_dim
    return (LinearSite("q", d, inner, False, path=f"{path}.q", blocks=blocks),
            LinearSite("k", d, inner, False, path=f"{path}.k", blocks=blocks),
            LinearSite("v", d, inner, False, path=f"{path}.v", blocks=blocks),
            LinearSite("o", inner, d, False, path=f"{path}.o", blocks=blocks))


def _sites(spec: ModelSpec) -> tuple[LinearSite, ...]:
    """Self-attention and the feed-forward in every block, cross-attention in the decoder's only
    (peft matches `q` in both SelfAttention and EncDecAttention)."""
    return (*_attention_sites(spec, "SelfAttention"), *_ffn_sites(spec),
            *_attention_sites(spec, "EncDecAttention", blocks=spec.decoder_layers))


def _stack(spec: ModelSpec) -> Stack:
    return Stack((BlockGroup(ENCODER, spec.layers - spec.decoder_layers), BlockGroup(DECODER, spec.decoder_layers)))


def _params(spec: ModelSpec) -> list[ParamGroup]:
    d, L, Ld = spec.hidden, spec.layers, spec.decoder_layers
    groups = [ParamGroup("shared", spec.vocab * d, 1, "embedding"),
              ParamGroup("{encoder,decoder}.block.0.SelfAttention.relative_attention_bias",
                         spec.relative_attention_buckets * spec.heads, 2, "embedding")]
    for s in _sites(spec):
        # wo stays out of 4-bit quantisation under QLoRA ("kept": stored like the other non-linear weights)
        groups.append(ParamGroup(f"block.*.{s.path or s.name}.weight", s.d_in * s.d_out, s.blocks or L,
                                 "linear" if s.quantised else "kept-linear"))
    groups.append(ParamGroup("block.*.layer.*.layer_norm", d, 2 * L + Ld, "norm"))
    groups.append(ParamGroup("{encoder,decoder}.final_layer_norm", d, 2, "norm"))
    return groups  # lm_head is the shared table (transformers 5 ties every T5/mT5)


def _t5_norm(ctx, x):
    """T5LayerNorm: v = x.to(fp32).pow(2).mean(-1); h = x * rsqrt(v + eps); h.to(w.dtype) if w is
    16-bit; w * h. pow saves the fp32 copy, the product saves x itself (not the copy) and rsqrt."""
    tape, width = ctx.tape, ctx.spec.hidden
    rows = x.numel // width
    if x.rg:
        tape.save(ops.cast(tape, x, "fp32"), "norm inputs")
        tape.save(x, "norm inputs")
        tape.save(tape.new(rows, "fp32", False), "norm statistics")
    h = tape.new(x.numel, ops.promote(x.dtype, "fp32"), x.rg)
    w_dtype = ctx.other_dtype
    if w_dtype in ("bf16", "fp16"):
        h = ops.cast(tape, h, w_dtype)
    if ctx.base_trainable:
        tape.save(h, "norm inputs")
    return tape.new(x.numel, ops.promote(w_dtype, h.dtype), x.rg or ctx.base_trainable)


# methods whose placement inside an encoder-decoder block is not modelled here (prefix keys in self- and
# cross-attention; bottleneck adapters after cross-attention): refused rather than estimated wrongly
_NOT_MODELLED = ("prefix-tuning", "adapter-houlsby", "adapter-pfeiffer")


def _forward(ctx) -> None:
    spec, run, tape = ctx.spec, ctx.run, ctx.tape
    if ctx.method.name in _NOT_MODELLED:
        raise LoraCostError(f"{ctx.method.name} is not modelled for encoder-decoder models ({spec.name}, t5) yet")
    d, h, hd, b = spec.hidden, spec.heads, spec.head_dim, ctx.batch
    s, t = ctx.seq, run.decoder_seq
    q_site, k_site, v_site, o_site, *rest = _sites(spec)
    ffn_sites, cross_sites = rest[:-4], rest[-4:]
    p = ctx.model_dropout(spec.hidden_dropout)
    p_attn = ctx.model_dropout(spec.attention_dropout)
    trainable = ctx.base_trainable
    bias_dtype = ctx.other_dtype  # the relative_attention_bias table's dtype

    def position_bias(rows, keys):
        """compute_bias: an Embedding lookup at an [rows, keys] int64 bucket table (saved when it trains)."""
        return ops.embedding(tape, tape.new(rows * keys, "int64", False), h, w_trainable=trainable, w_dtype=bias_dtype)

    def attend(x_q, x_kv, sites, rows, keys, bias, causal, cross=False):
        qs, ks, vs, os_ = sites
        q = ctx.linear(x_q, qs)
        k, v = ctx.linear(x_kv, ks), ctx.linear(x_kv, vs)
        if bias is None:  # cross-attention: [1, h, t, s] zeros in q's dtype, made by the first decoder block
            bias = shared["cross_bias"] = tape.new(h * rows * keys, q.dtype if not tape.autocast else tape.autocast,
                                                   run.grad_checkpointing)
            if run.grad_checkpointing:  # passed to every checkpointed block: kept once
                ctx.checkpoint_extra_bytes += bias.nbytes
        shape = ops.AttentionShape(b, rows, h, h, hd, causal=causal, kv_seq=keys)
        if run.attention == "eager":
            a = ctx.attention(q, k, v, shape, implementation="eager", dropout_p=p_attn, softmax_fp32=False,
                              extra_grad=bias.rg)
        else:
            padded = -(-keys // 16) * 16
            # the additive mask: the shared zeros of cross-attention when no padding copies it, else a
            # per-layer copy (contiguous() of the permuted bias, torch.where with the causal mask, the pad)
            mask = bias if cross and padded == keys else tape.new(h * rows * padded, bias.dtype, False)
            a = ctx.attention(q, k, v, shape, implementation="sdpa-masked", dropout_p=p_attn, softmax_fp32=False,
                              mask=mask)
        return ops.dropout(tape, ctx.linear(a, os_), p)

    def ffn(x):
        m = _t5_norm(ctx, x)
        if spec.gated_ffn:
            wi0, wi1, wo = ffn_sites
            g = _activation(tape, ctx.linear(m, wi0), spec.ffn_activation)
            f = ops.mul(tape, g, ctx.linear(m, wi1), "activation function")
        else:
            wi, wo = ffn_sites
            f = _activation(tape, ctx.linear(m, wi), spec.ffn_activation)
        f = ops.dropout(tape, f, p)
        return ctx.residual("ffn", ops.dropout(tape, ctx.linear(f, wo), p), x)

    shared = {}

    def encoder_block(x):
        if "enc_bias" not in shared:  # the first encoder block computes the bias all of them share
            shared["enc_bias"] = position_bias(s, s)
            if run.grad_checkpointing:  # passed to every later checkpointed block: kept once
                ctx.checkpoint_extra_bytes += shared["enc_bias"].nbytes
        n = _t5_norm(ctx, x)
        a = attend(n, n, (q_site, k_site, v_site, o_site), s, s, shared["enc_bias"], False)
        return ffn(ctx.residual("attention", a, x))

    def decoder_block(x):
        if "dec_bias" not in shared:
            shared["dec_bias"] = position_bias(t, t)
            if run.grad_checkpointing:
                ctx.checkpoint_extra_bytes += shared["dec_bias"].nbytes
        n = _t5_norm(ctx, x)
        x = ctx.residual("attention", attend(n, n, (q_site, k_site, v_site, o_site), t, t, shared["dec_bias"], True), x)
        n = _t5_norm(ctx, x)
        c = attend(n, shared["enc"], cross_sites, t, s, shared.get("cross_bias"), False, cross=True)
        return ffn(ctx.residual("cross-attention", c, x))

    tape.scope = "embeddings"
    x = ops.dropout(tape, ctx.stream_input(ctx.word_embeddings(d)), p)
    x = ctx.blocks(x, {ENCODER: encoder_block}, kinds=(ENCODER,))
    tape.scope = "embeddings"  # the encoder's final norm and the decoder's embedding: outside the blocks
    enc = ops.dropout(tape, _t5_norm(ctx, x), p)
    shared["enc"] = enc
    if run.grad_checkpointing:  # every checkpointed decoder block holds the encoder output (one shared tensor)
        ctx.checkpoint_extra_bytes += enc.nbytes
    y = ops.dropout(tape, ctx.stream_input(ctx.embedding(b * t, d)), p)
    if run.grad_checkpointing and run.attention == "eager":  # the decoder's [b, 1, t, t] float causal mask
        ctx.checkpoint_extra_bytes += b * t * t * DTYPE_BYTES[y.dtype]
    y = ctx.blocks(y, {DECODER: decoder_block}, kinds=(DECODER,))
    tape.scope = "head"
    y = ops.dropout(tape, _t5_norm(ctx, y), p)
    if spec.tie_embeddings:  # sequence_output * d_model**-0.5 (T5 v1.0)
        y = ops.scale(tape, y)
    ctx.lm_head_and_loss(y, upcast=False, label_tokens=b * t)


def _activation(tape, x, name):
    if name == "relu":
        return ops.relu(tape, x)
    if name == "gelu_new":
        return ops.gelu_tanh_python(tape, x)
    if name == "silu":
        return ops.silu(tape, x)
    return ops.gelu(tape, x)


T5 = register_architecture(Architecture(
    family="t5", model_types=("t5", "mt5"),
    description="T5/mT5 encoder-decoder: relative position bias, T5LayerNorm, ReLU or gated-GELU FFN, cross-attention",
    from_config=_from_config, linear_sites=_sites, default_targets=("q", "v"), params=_params, forward=_forward,
    stack=_stack))
