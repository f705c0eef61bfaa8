"""Phi-3 and Phi-4 (transformers `Phi3ForCausalLM`, model_type phi3).

A Llama-style block (pre-RMSNorm, RoPE, grouped-query attention, SwiGLU) whose projections are fused
(transformers models/phi3/modeling_phi3.py):

  * `self_attn.qkv_proj`: one [d, (h + 2 kv) hd] linear; q, k and v are slices of its output
    (`qkv[..., :h*hd]` ..., then `.view(...).transpose(1, 2)`): views of one storage. A peft target
    `qkv_proj` adapts the whole fused matrix (one LoRA pair for q, k and v together), and `all-linear`
    resolves to qkv_proj, o_proj, gate_up_proj and down_proj.
  * `mlp.gate_up_proj`: one [d, 2i] linear, `gate, up = out.chunk(2, -1)` (views), `up * silu(gate)`.
    silu saves `gate`, a view, so the whole [n, 2i] output is kept (as Llama keeps gate and up apart).
  * RoPE: `q_rot = q[..., :rotary_dim]`, `cat([q_rot*cos + rotate_half(q_rot)*sin, q_pass])`; the
    products save the shared cos/sin tables ([s, rotary_dim]; partial_rotary_factor < 1 rotates part
    of each head). The cat makes q and k new contiguous tensors; v stays a view of qkv_proj's output,
    so an attention kernel that saves v keeps that whole storage (flash / memory-efficient sdpa, and
    eager's matmul with one sequence, whose reshape to [b*h, s, hd] is then a view; with several
    sequences that reshape copies v, and grouped heads are copied by repeat_kv).
  * resid_pdrop: dropout on both residual branches; no embedding dropout (embd_pdrop is unused).
  * sliding_window (Phi-3-mini: 2047): past it transformers builds an explicit mask, as for Mistral.

peft has no default target modules for phi3 (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING);
the default here is `qkv_proj`, the fused matrix that holds the query and value projections.
"""

from __future__ import annotations

from ...attention_kernels import is_fused
from .. import liger, ops
from ..tape import Tensor
from ...errors import LoraCostError, shown
from ...spec import LinearSite, ModelSpec
from .base import (MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, Architecture, ParamGroup, divisible, flag, integer, prob,
                   register_architecture, require)


def _partial_rotary_factor(cfg: dict, name: str) -> float:
    """partial_rotary_factor, top level or inside rope_parameters / rope_scaling (Phi3Config reads both)."""
    value = cfg.get("partial_rotary_factor")
    for key in ("rope_parameters", "rope_scaling"):
        inner = cfg.get(key)
        if value is None and isinstance(inner, dict):
            value = inner.get("partial_rotary_factor")
    if value is None:
        return 1.0
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
        raise LoraCostError(f"{name}: config field 'partial_rotary_factor' must be a number in (0, 1], got {shown(value)}")
    return float(value)


def _from_config(name: str, cfg: dict, source: str) -> ModelSpec:
    d = require(cfg, "hidden_size", name)
    heads = require(cfg, "num_attention_heads", name)
    kv = integer(cfg, "num_key_value_heads", name, default=heads, maximum=heads)
    divisible(name, "num_attention_heads", heads, "num_key_value_heads", kv)
    if cfg.get("head_dim") is None and d < heads:
        raise LoraCostError(f"{name}: hidden_size {d:,} is smaller than num_attention_heads {heads:,} (no head_dim given)")
    head_dim = integer(cfg, "head_dim", name, default=d // heads)
    # Phi3RotaryEmbedding: dim = int(head_dim * factor) with head_dim = config.head_dim or d // heads;
    # inv_freq has ceil(dim / 2) entries and cos/sin repeat them twice
    rotary = int(head_dim * _partial_rotary_factor(cfg, name))
    rotary = 2 * -(-rotary // 2)
    if rotary == 0:
        raise LoraCostError(f"{name}: partial_rotary_factor leaves no rotary dimension of head_dim {head_dim}")
    hidden_dropout = prob(cfg, "resid_pdrop", name, 0.0)
    return ModelSpec(
        name=name, family="phi3", model_type="phi3", hidden=d,
        layers=require(cfg, "num_hidden_layers", name, maximum=MAX_LAYERS), heads=heads, kv_heads=kv,
        head_dim=head_dim, intermediate=require(cfg, "intermediate_size", name),
        vocab=require(cfg, "vocab_size", name, maximum=MAX_VOCAB),
        max_positions=require(cfg, "max_position_embeddings", name, maximum=MAX_POSITIONS),
        tie_embeddings=flag(cfg, "tie_word_embeddings", name, False),
        hidden_dropout=hidden_dropout, attention_dropout=prob(cfg, "attention_dropout", name, 0.0),
        sliding_window=integer(cfg, "sliding_window", name, default=None, maximum=MAX_POSITIONS),
        rotary_dim=0 if rotary >= head_dim else rotary, source=source)


def _sites(spec: ModelSpec) -> tuple[LinearSite, ...]:
    d, hd, i = spec.hidden, spec.head_dim, spec.intermediate
    q, kv = spec.heads * hd, spec.kv_heads * hd
    return (LinearSite("qkv_proj", d, q + 2 * kv, False), LinearSite("o_proj", q, d, False),
            LinearSite("gate_up_proj", d, 2 * i, False), LinearSite("down_proj", i, d, False))


def _params(spec: ModelSpec) -> list[ParamGroup]:
    d, L = spec.hidden, spec.layers
    groups = [ParamGroup("embed_tokens", spec.vocab * d, 1, "embedding")]
    for s in _sites(spec):
        groups.append(ParamGroup(f"layers.*.{s.name}.weight", s.d_in * s.d_out, L, "linear"))
    groups.append(ParamGroup("layers.*.input_layernorm, post_attention_layernorm", d, 2 * L, "norm"))
    groups.append(ParamGroup("norm", d, 1, "norm"))
    if not spec.tie_embeddings:
        groups.append(ParamGroup("lm_head", spec.vocab * d, 1, "head"))
    return groups


def _slice(t: Tensor, numel: int) -> Tensor:
    """A slice of t's output (a view: same storage, fewer elements)."""
    return Tensor(numel, t.dtype, t.rg, t.sid)


def _rope(tape, t: Tensor, rotary_numel: int, cos: Tensor, sin: Tensor) -> Tensor:
    """cat([q_rot*cos + rotate_half(q_rot)*sin, q_pass]): the products save the shared tables; the
    cat returns a new contiguous tensor of the whole head."""
    rot = _slice(t, rotary_numel)
    a = ops.mul(tape, rot, cos, "rotary tables")
    b = ops.mul(tape, tape.new(rot.numel, rot.dtype, rot.rg), sin, "rotary tables")
    out = ops.add(tape, a, b)
    return tape.new(t.numel, out.dtype, out.rg)


def _forward(ctx) -> None:
    spec, run, tape = ctx.spec, ctx.run, ctx.tape
    d, hd, i = spec.hidden, spec.head_dim, spec.intermediate
    qkv_site, o_site, gate_up, down = _sites(spec)
    seq, kv_seq = ctx.seq, ctx.kv_seq
    n = ctx.tokens
    rotary = spec.rotary_dim or hd
    # flash / flex take the window inside the kernel (window_size, the block mask): no explicit mask
    masked = (spec.sliding_window is not None and seq > spec.sliding_window or kv_seq != seq) and not is_fused(run.attention)
    shape = ops.AttentionShape(ctx.batch, seq, spec.heads, spec.kv_heads, hd, causal=True, kv_seq=kv_seq)
    dropout = ctx.model_dropout(spec.hidden_dropout)

    tape.scope = "embeddings"
    x = ctx.stream_input(ctx.word_embeddings(d))
    table = ctx.position_rows * rotary  # position_ids [1, s]: one table shared by the batch
    cos, sin = tape.new(table, x.dtype, False), tape.new(table, x.dtype, False)
    if kv_seq != seq and not x.rg:
        tape.save(cos, "rotary tables")
        tape.save(sin, "rotary tables")

    def norm(t):
        return ctx.rms_norm(t, d)

    # ligeracc: the sublayers as functions of their own, so that their locals die when they return, as in
    # Phi3Attention.forward (qkv and its q, k, v views) and Phi3MLP.forward (gate_up's output, whose gate view
    # lives to the return) (tape.forward_live follows these references)
    def attention(a):
        qkv = ctx.linear(a, qkv_site)
        q_numel, kv_numel = n * spec.heads * hd, n * spec.kv_heads * hd
        if "rope" in run.liger_kernels:  # LigerRopeFunction on the slices: contiguous copies, rotated in place
            q, k = liger.rope(tape, _slice(qkv, q_numel), _slice(qkv, kv_numel), cos, sin, copies=True)
        else:
            q = _rope(tape, _slice(qkv, q_numel), q_numel * rotary // hd, cos, sin)
            k = _rope(tape, _slice(qkv, kv_numel), kv_numel * rotary // hd, cos, sin)
        # v: a view of the fused output; a kernel saving it keeps that whole storage, unless eager's
        # matmul reshape (several sequences) copies it first
        v = qkv.view() if run.attention != "eager" or ctx.batch == 1 else tape.new(kv_numel, qkv.dtype, qkv.rg)
        k, v = ctx.key_values(k, v)
        if masked:  # explicit mask: no enable_gqa, repeat_kv copies grouped k and v
            # (one key/value head: expand + reshape is a view and nothing is copied, unless autocast then
            # casts the expanded view (fp32 keys from the fp32 rotary tables under AMP): every head made)
            one_head_view = spec.kv_heads == 1 and not (tape.autocast and k.dtype != tape.autocast)
            if spec.kv_heads != spec.heads and not one_head_view:
                k = tape.new(k.numel * spec.heads // spec.kv_heads, k.dtype, k.rg)
                v_numel = kv_numel if v.sid == qkv.sid else v.numel  # the view spans all of qkv's output
                v = tape.new(v_numel * spec.heads // spec.kv_heads, v.dtype, v.rg)
            tape.transient(ctx.batch * seq * kv_seq)  # the [b, 1, s, s_kv] bool mask
        attn = ctx.attention(q, k, v, shape if not masked else
                             ops.AttentionShape(ctx.batch, seq, spec.heads, spec.heads, hd, True, kv_seq),
                             implementation=run.attention if not masked or run.attention == "eager" else "sdpa-masked",
                             dropout_p=ctx.model_dropout(spec.attention_dropout), softmax_fp32=True)
        del q, k, v, qkv  # Phi3Attention.forward hands only the attention output to o_proj
        return ctx.linear(attn, o_site)

    def mlp(m):
        gu = ctx.linear(m, gate_up)  # gate, up = chunk(2): views of this [n, 2i] output
        if "swiglu" in run.liger_kernels:  # LigerPhi3SwiGLUMLP: @ensure_contiguous copies both chunks (liger.py)
            h = liger.swiglu(tape, tape.new(n * i, gu.dtype, gu.rg), tape.new(n * i, gu.dtype, gu.rg))
        else:
            act = tape.new(n * i, gu.dtype, gu.rg)
            if gu.rg:
                tape.save(gu, "activation function")  # silu saves gate: the whole storage
                tape.save(act, "activation function")  # up * act: up's gradient reads act
                tape.save(gu, "activation function")  # and act's reads up (the same storage, kept once)
            h = tape.new(n * i, gu.dtype, gu.rg)
            del act  # the activation's output is a temporary of `up_states * self.activation_fn(gate)`
        return ctx.linear(h, down)  # gu (the gate view) is alive until Phi3MLP.forward returns

    def block(x):
        x = ctx.residual("attention", ops.dropout(tape, attention(norm(x)), dropout), x)
        return ctx.residual("ffn", ops.dropout(tape, mlp(norm(x)), dropout), x)

    x = ctx.blocks(x, dict.fromkeys(ctx.stack.kinds, block))
    tape.scope = "head"
    x = norm(x)  # Phi3Model.forward returns the normed states: the last block's output dies unless saved
    ctx.lm_head_and_loss(x, upcast=True)


PHI3 = register_architecture(Architecture(
    family="phi3", model_types=("phi3",),
    description="Phi-3 / Phi-4: Llama-style decoder with fused qkv_proj and gate_up_proj",
    from_config=_from_config, linear_sites=_sites, default_targets=("qkv_proj",),
    params=_params, forward=_forward,
    forward_lifetimes=True,
    tasks=("causal-lm", "seq-cls", "token-cls")))  # heads.py: transformers' classifiers of the family
