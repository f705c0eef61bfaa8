"""Mixture-of-experts decoders: Mixtral and Qwen3-MoE (transformers `MixtralForCausalLM`, `Qwen3MoeForCausalLM`).

The attention half of a block is Llama's (Qwen3-MoE adds Qwen3's per-head q/k RMSNorm); the feed-forward
half is a sparse MoE block (modeling_mixtral.py / modeling_qwen3_moe.py, transformers 5.24):

    logits = x @ router.T                        # [n, E]: `gate`, a TopKRouter holding an [E, d] weight
    p = softmax(logits in fp32); w, idx = topk(p, k)
    w /= w.sum(-1)                               # Mixtral always; Qwen3-MoE when norm_topk_prob
    out = experts(x, idx, w)                     # every expert's gate_up_proj [E, 2I, d], down_proj [E, d, I]

Every expert's weights are resident (3-D parameters, not nn.Linear). transformers runs the experts with its
default `grouped_mm` implementation (integrations/moe.py `grouped_mm_experts_forward`, chosen whenever torch has
grouped_mm: CUDA sm80+ and CPU alike): the n*k (token, expert) pairs are sorted by expert, gathered
(`x[perm // k]`), multiplied by one grouped GEMM per projection over the whole S = n*k rows, weighted and
put back in token order (`out[inv_perm]`, a sum over k). So the saved bytes and the FLOPs depend on n*k only,
never on how tokens spread over experts, and no per-expert buffer exists: the routing balance
(`--moe-imbalance`) changes nothing in this path, which the estimate says. FLOPs: the router
(2 n d E) plus 2 S (d 2I + I d) for the experts, exactly k experts per token.

Adapters: peft (utils/transformers_weight_conversion.py `_convert_peft_config_moe`) maps the v4 names of the
expert and router linears (Mixtral w1/w3/w2/gate; Qwen3-MoE gate_proj/up_proj/down_proj/gate) and `all-linear`
onto `target_parameters` (the fused gate and up projections at rank 2r, `rank_pattern`), wrapping the parameters in
`lora.ParamWrapper`; the parameters can also be named directly (`experts.gate_up_proj`, rank r). ParamWrapper
(tuners/lora/layer.py) materialises W' = W + s B A for the whole expert stack on every forward (`adapted_parameter`),
which the grouped GEMM keeps for backward with its input. QLoRA: bitsandbytes quantises nn.Linear modules only, so
the experts and the router stay 16-bit and `prepare_model_for_kbit_training` casts them to fp32 like every other
non-quantised parameter.
"""

from __future__ import annotations

from ...attention_kernels import is_fused
from .. import ops
from ...errors import LoraCostError
from ...spec import LinearSite, ModelSpec, MoeShape
from ..stack import Stack
from ..methods.lora import ADAPTER_DTYPE
from ...units import DTYPE_BYTES
from ..tape import Tensor
from .base import (MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, Architecture, ParamGroup, divisible, flag, integer, prob,
                   register_architecture, require)

# the names peft maps to the router and the experts' target_parameters, per model type
EXPERT_TARGETS = {"mixtral": ("gate", "w1", "w3", "w2"), "qwen3_moe": ("gate", "gate_proj", "up_proj", "down_proj")}
SPARSE, DENSE = "moe", "dense"
FUSED = "gate_up_proj"  # transformers 5's fused expert parameter [E, 2I, d]


def _from_config(name: str, cfg: dict, source: str) -> ModelSpec:
    model_type = cfg["model_type"]
    d = require(cfg, "hidden_size", name)
    heads = require(cfg, "num_attention_heads", name)
    kv = integer(cfg, "num_key_value_heads", name, default=heads, maximum=heads)
    divisible(name, "num_attention_heads", heads, "num_key_value_heads", kv)
    if cfg.get("head_dim") is None and d < heads:
        raise LoraCostError(f"{name}: hidden_size {d:,} is smaller than num_attention_heads {heads:,} (no head_dim given)")
    head_dim = integer(cfg, "head_dim", name, default=d // heads)
    layers = require(cfg, "num_hidden_layers", name, maximum=MAX_LAYERS)
    intermediate = require(cfg, "intermediate_size", name)
    if model_type == "mixtral":
        experts = require(cfg, "num_local_experts", name, maximum=1 << 16)
        top_k = integer(cfg, "num_experts_per_tok", name, maximum=experts)
        expert_width, norm_topk, dense = intermediate, True, ()
        window = integer(cfg, "sliding_window", name, default=None, maximum=MAX_POSITIONS)
    else:  # qwen3_moe
        experts = require(cfg, "num_experts", name, maximum=1 << 16)
        top_k = integer(cfg, "num_experts_per_tok", name, maximum=experts)
        expert_width = require(cfg, "moe_intermediate_size", name)
        norm_topk = flag(cfg, "norm_topk_prob", name, False)
        step = integer(cfg, "decoder_sparse_step", name, default=1, maximum=MAX_LAYERS)
        only = cfg.get("mlp_only_layers") or []
        if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
            raise LoraCostError(f"{name}: config field 'mlp_only_layers' must be a list of layer indices, got {only!r}")
        dense = tuple(i for i in range(layers) if i in only or (i + 1) % step)
        window = integer(cfg, "sliding_window", name, default=None, maximum=MAX_POSITIONS)
        if not flag(cfg, "use_sliding_window", name, False):
            window = None
    if flag(cfg, "output_router_logits", name, False):
        raise LoraCostError(f"{name}: output_router_logits (the load-balancing auxiliary loss) is not modelled; "
                            "set it to false or use --engine trace")
    return ModelSpec(
        name=name, family="moe", model_type=model_type, hidden=d, layers=layers, heads=heads, kv_heads=kv,
        head_dim=head_dim, intermediate=intermediate, vocab=require(cfg, "vocab_size", name, maximum=MAX_VOCAB),
        max_positions=require(cfg, "max_position_embeddings", name, maximum=MAX_POSITIONS),
        tie_embeddings=flag(cfg, "tie_word_embeddings", name, False),
        qkv_bias=model_type == "qwen3_moe" and flag(cfg, "attention_bias", name, False),
        attention_dropout=prob(cfg, "attention_dropout", name, 0.0), sliding_window=window,
        qk_norm=model_type == "qwen3_moe", source=source,
        moe=MoeShape(experts=experts, top_k=top_k, expert_intermediate=expert_width, norm_topk=norm_topk,
                     dense_layers=dense))


def _attention_sites(spec: ModelSpec) -> tuple[LinearSite, ...]:
    d, hd, b = spec.hidden, spec.head_dim, spec.qkv_bias
    q, kv = spec.heads * hd, spec.kv_heads * hd
    return (LinearSite("q_proj", d, q, b), LinearSite("k_proj", d, kv, b), LinearSite("v_proj", d, kv, b),
            LinearSite("o_proj", q, d, b))


def _sites(spec: ModelSpec) -> tuple[LinearSite, ...]:
    """The attention projections, plus the router and expert names peft accepts, in the sparse blocks only.
    peft maps these v4 names onto transformers 5's parameters (`_MOE_TARGET_MODULE_MAPPING`): the router to
    `gate.weight` (a 2-D [E, d] parameter of a TopKRouter, not an nn.Linear), the gate and up projections to
    the fused `gate_up_proj` [E, 2I, d], the down projection to `down_proj` [E, d, I]. The two names fused into
    gate_up_proj are two sites of the one parameter: peft gives it rank 2r (`rank_pattern`), so each carries
    half of its lora_A [E 2r, d] and lora_B [2I, E 2r] (r E (d + 2I) each)."""
    d, e, i = spec.hidden, spec.moe.experts, spec.moe.expert_intermediate
    sparse = spec.layers - len(spec.moe.dense_layers)
    if not sparse:
        return _attention_sites(spec)
    router, gate, up, down = EXPERT_TARGETS[spec.model_type]
    sites = (*_attention_sites(spec), LinearSite(router, d, e, False, path="mlp.gate", blocks=sparse, experts=1),
             LinearSite(gate, d, 2 * i, False, path=f"mlp.experts.{gate}", blocks=sparse, experts=e),
             LinearSite(up, d, 2 * i, False, path=f"mlp.experts.{up}", blocks=sparse, experts=e),
             LinearSite(down, i, d, False, path=f"mlp.experts.{down}", blocks=sparse, experts=e),
             # the parameters by their transformers 5 names (peft target_parameters): rank r, no fusion rule
             LinearSite(FUSED, d, 2 * i, False, path=f"mlp.experts.{FUSED}", blocks=sparse, experts=e, all_linear=False))
    if down != "down_proj":  # Mixtral's w2 is the parameter experts.down_proj
        sites += (LinearSite("down_proj", i, d, False, path="mlp.experts.down_proj", blocks=sparse, experts=e,
                             all_linear=False),)
    return sites


def _stack(spec: ModelSpec) -> Stack:
    dense = set(spec.moe.dense_layers)
    return Stack.of(DENSE if i in dense else SPARSE for i in range(spec.layers))


def _params(spec: ModelSpec) -> list[ParamGroup]:
    d, L, moe = spec.hidden, spec.layers, spec.moe
    sparse = L - len(moe.dense_layers)
    groups = [ParamGroup("embed_tokens", spec.vocab * d, 1, "embedding")]
    for s in _attention_sites(spec):
        groups.append(ParamGroup(f"layers.*.self_attn.{s.name}.weight", s.d_in * s.d_out, L, "linear"))
        if s.bias:
            groups.append(ParamGroup(f"layers.*.self_attn.{s.name}.bias", s.d_out, L, "bias"))
    if sparse:
        # not nn.Linear: bitsandbytes leaves them unquantised (and peft's kbit preparation casts them to fp32)
        groups.append(ParamGroup("layers.*.mlp.gate.weight (router)", moe.experts * d, sparse, "router"))
        groups.append(ParamGroup("layers.*.mlp.experts.gate_up_proj, down_proj",
                                 3 * moe.experts * moe.expert_intermediate * d, sparse, "experts"))
    if moe.dense_layers:
        groups.append(ParamGroup("layers.*.mlp.gate_proj, up_proj, down_proj", 3 * d * spec.intermediate,
                                 len(moe.dense_layers), "linear"))
    groups.append(ParamGroup("layers.*.input_layernorm, post_attention_layernorm", d, 2 * L, "norm"))
    if spec.qk_norm:
        groups.append(ParamGroup("layers.*.self_attn.q_norm, k_norm", spec.head_dim, 2 * L, "norm"))
    groups.append(ParamGroup("norm", d, 1, "norm"))
    if not spec.tie_embeddings:
        groups.append(ParamGroup("lm_head", spec.vocab * d, 1, "head"))
    return groups



# methods whose peft layer is lora.ParamWrapper on a targeted parameter and that the engines model: LoRA and what
# only changes the optimizer (LoRA+) or freezes lora_A (LoRA-FA); QLoRA leaves the experts unquantised.
# ParamWrapper raises on use_dora and on lora_dropout != 0 (peft tuners/lora/layer.py ParamWrapper.__init__)
PARAM_WRAPPER_METHODS = ("lora", "qlora", "lora-fa", "lora-plus")


def _picked(site: LinearSite, targets) -> bool:
    return site.name in targets or any(site.matches(t) for t in targets)


def expert_adapters(ctx) -> tuple[bool, int, int]:
    """What peft adapts in a sparse block: (the router?, gate_up_proj's rank factor, down_proj's), a rank
    factor 0 meaning not adapted; checked as peft checks them (`_convert_peft_config_moe`)."""
    if ctx.base_trainable:
        return False, 0, 0
    sites = _sites(ctx.spec)
    if len(sites) == 4:  # no sparse block
        return False, 0, 0
    router, gate, up, down, fused = sites[4:9]
    down_v5 = sites[9] if len(sites) > 9 else None
    hit = [s for s in sites[4:] if _picked(s, ctx.targets)]
    if not hit:
        return False, 0, 0
    names = ", ".join(s.name for s in hit)
    method = ctx.method.name
    if method not in PARAM_WRAPPER_METHODS:
        raise LoraCostError(
            f"{ctx.spec.name}: {method} on the router or the experts ({names}; all-linear includes them) is not "
            "modelled: peft adapts them through lora.ParamWrapper (target_parameters), which refuses DoRA and "
            f"serves LoRA only; use {', '.join(PARAM_WRAPPER_METHODS)} or adapt the attention projections")
    if ctx.run.dropout:
        raise LoraCostError(f"{ctx.spec.name}: --dropout with adapters on the router or the experts ({names}): peft's "
                            "lora.ParamWrapper does not work with lora_dropout != 0")
    if _picked(gate, ctx.targets) != _picked(up, ctx.targets):
        have, missing = (gate, up) if _picked(gate, ctx.targets) else (up, gate)
        raise LoraCostError(f"{ctx.spec.name}: target {have.name} needs {missing.name} too: peft cannot convert one "
                            "without the other, both are fused into experts.gate_up_proj")
    for a, b in ((gate, fused), (down, down_v5)):
        if b is not None and _picked(a, ctx.targets) and _picked(b, ctx.targets):
            raise LoraCostError(f"{ctx.spec.name}: {a.name} and {b.name} name the same expert parameter "
                                f"(experts.{b.name}); target it once")
    gate_up = 2 if _picked(gate, ctx.targets) else 1 if _picked(fused, ctx.targets) else 0
    down_rank = 1 if _picked(down, ctx.targets) or down_v5 is not None and _picked(down_v5, ctx.targets) else 0
    return _picked(router, ctx.targets), gate_up, down_rank


def adapted_parameter(ctx, experts: int, d_in: int, d_out: int, rank: int, dtype: str) -> Tensor:
    """The parametrised weight W' = W + s B A that peft's ParamWrapper hands the module for one forward
    (tuners/lora/layer.py `_activate_lora`, under nn.utils.parametrize.cached(): computed once per forward).
    3-D experts with one adapter: `_LoraFactorsProxy`, torch.baddbmm(W, lhs [E, d_out, rank], rhs [E, rank, d_in])
    with autocast off; lhs and rhs are views of lora_B and lora_A `.to(W.dtype)`: copies when the fp32 adapters
    (peft autocast_adapter_dtype) differ from W's dtype, and baddbmm saves each for the other's gradient.
    A 2-D parameter (the router): `_LoraParameterProxy`, W + (B @ A) * s cast to W's dtype: the matmul keeps
    the factors themselves (parameters), the add and the cast keep nothing. W' is a new tensor of W's size."""
    tape = ctx.tape
    freeze_a = ctx.method.name == "lora-fa"
    w_bytes = max(experts, 1) * d_out * d_in * DTYPE_BYTES[dtype]
    # nn.utils.parametrize.register_parametrization (unsafe=False) evaluates the proxy once to check its dtype and
    # shape (ParametrizationList.__init__: `Z = self()`), outside `cached()`: one more W + s B A forward whose
    # result and graph are dropped at once (a W-sized transient; FlopCounterMode counts the baddbmm of the experts'
    # proxy, while the router's proxy only adds the delta its wrapper computed once before registering)
    if experts:
        tape.add_flops("adapter", 2 * experts * d_out * rank * d_in, 0)
    tape.transient(w_bytes)
    if experts:
        copies = dtype != ADAPTER_DTYPE
        make = tape.new if copies else tape.parameter
        lhs, rhs = make(experts * d_out * rank, dtype, True), make(experts * rank * d_in, dtype, not freeze_a)
        if rhs.rg:
            tape.save(lhs, "expert adapters")  # d rhs = lhs^T @ grad
        tape.save(rhs, "expert adapters")  # d lhs = grad @ rhs^T
        tape.matmul("adapter", experts * d_out, rank, d_in, grad_a=True, grad_b=not freeze_a)
    else:
        tape.mark_saved()  # B @ A keeps the (parameter) factors
        tape.matmul("adapter", d_out, rank, d_in, grad_a=True, grad_b=not freeze_a)
    # not an activation the block's gradients run through (peaks.py's widest activation): its one gradient is the
    # backward transient the caller records
    return Tensor(max(experts, 1) * d_out * d_in, dtype, True)


def moe_feed_forward(ctx, x):
    """The sparse MoE block on the normed stream x ([n, d]), as transformers' grouped_mm path runs it."""
    spec, tape, moe = ctx.spec, ctx.tape, ctx.spec.moe
    d, E, k, I = spec.hidden, moe.experts, moe.top_k, moe.expert_intermediate
    n = x.numel // d
    S = n * k  # (token, expert) pairs: each token reaches k experts
    # the router: F.linear(x, gate.weight), a parameter outside nn.Linear (fp32 under QLoRA's preparation)
    adapt_router, gate_up_rank, down_rank = expert_adapters(ctx)
    expert_dtype = ctx.other_dtype  # the router and expert weights: the run's dtype, fp32 under QLoRA
    if adapt_router:  # F.linear(x, W'): W' = W + s B A requires grad, so the input is kept, and W' itself
        router_w = adapted_parameter(ctx, 0, d, E, ctx.rank, expert_dtype)
        logits = ops.linear(tape, x, d, E, w_trainable=True, w_dtype=ctx.other_dtype, kind="router")
        if x.rg and not tape.autocast:  # under autocast linear keeps its low-precision copy of W' instead
            tape.save(router_w, "adapted expert weights")
        tape.transient(router_w.nbytes, backward=True)  # W''s [E, d] gradient, read by the delta's matmul backward
    else:
        logits = ops.linear(tape, x, d, E, w_trainable=ctx.base_trainable, w_dtype=ctx.other_dtype, kind="router")
    # Mixtral: softmax(logits.float()); Qwen3-MoE: softmax(logits, dtype=float): both an fp32 [n, E] result
    probs = ops.cast(tape, logits, "fp32")
    probs = tape.new(n * E, "fp32", probs.rg)
    if probs.rg:
        tape.save(probs, "router")  # softmax saves its output
    weights = tape.new(n * k, "fp32", probs.rg)  # topk values
    if probs.rg:
        tape.save(tape.new(n * k, "int64", False), "router")  # topk saves its indices
    if moe.norm_topk and weights.rg:  # w /= w.sum(-1, keepdim=True): div_ keeps the divisor and the dividend
        tape.save(tape.new(n, "fp32", False), "router")
        tape.save(tape.new(n * k, "fp32", False), "router")
    if spec.model_type == "qwen3_moe":
        weights = ops.cast(tape, weights, logits.dtype)  # router_top_value.to(router_logits.dtype)
    # experts (integrations/moe.py grouped_mm_experts_forward)
    if x.rg:
        tape.save(tape.new(S, "int64", False), "routing indices")  # x[perm // k] keeps its index
    selected = tape.new(S * d, x.dtype, x.rg)
    if weights.rg:
        tape.save(tape.new(S, "int64", False), "routing indices")  # w.reshape(-1)[perm] keeps perm
    sample_w = tape.new(S, weights.dtype, weights.rg)
    offsets = tape.new(E, "int32", False)  # histc + cumsum: rows per expert, read by both grouped GEMMs
    selected = ops.cast(tape, selected, expert_dtype)  # grouped_mm(input.to(weight.dtype), ...)

    def grouped(inp, d_in, d_out, rank_factor):
        weight = adapted_parameter(ctx, E, d_in, d_out, rank_factor * ctx.rank, expert_dtype) if rank_factor else None
        w_grad = ctx.base_trainable or weight is not None
        if inp.rg or w_grad:
            tape.save(offsets, "routing indices")
        if w_grad:
            tape.save(inp, "linear inputs")
        if weight is not None and inp.rg:
            tape.save(weight, "adapted expert weights")  # W' (not a parameter) for the input gradient
        elif inp.rg:
            tape.mark_saved()  # the (parameter) expert weights, kept for the input gradient
        tape.matmul("experts", S, d_in, d_out, grad_a=inp.rg, grad_b=w_grad)
        if weight is not None:  # the [E, d_out, d_in] gradient of W', read by baddbmm's backward, then freed
            tape.transient(weight.nbytes, backward=True)
        return tape.new(S * d_out, expert_dtype, inp.rg or w_grad)

    gate_up = grouped(selected, d, 2 * I, gate_up_rank)
    # chunk(2, -1): gate and up are two views of the one [S, 2I] storage, which silu(gate) keeps whole
    if gate_up.rg:
        tape.save(gate_up, "activation function")
    act = tape.new(S * I, gate_up.dtype, gate_up.rg)
    h = ops.mul(tape, act, Tensor(S * I, gate_up.dtype, gate_up.rg, gate_up.sid), "activation function")
    h = ops.cast(tape, h, expert_dtype)
    down = grouped(h, I, d, down_rank)
    weighted = ops.mul(tape, down, sample_w, "routing weights")  # proj_out * sample_weights_g.unsqueeze(-1)
    if weighted.rg:
        tape.save(tape.new(S, "int64", False), "routing indices")  # weighted_out[inv_perm] keeps inv_perm
    out = tape.new(n * d, weighted.dtype, weighted.rg)  # .view(n, k, d).sum(1)
    return ops.cast(tape, out, x.dtype)  # .to(hidden_states.dtype)


def _forward(ctx) -> None:
    spec, run, tape = ctx.spec, ctx.run, ctx.tape
    expert_adapters(ctx)  # bad targets refused before anything runs
    d = spec.hidden
    q_site, k_site, v_site, o_site = _attention_sites(spec)
    seq, kv_seq = ctx.seq, ctx.kv_seq
    # flash / flex take the window inside the kernel (window_size, the block mask): no explicit mask
    masked = (spec.sliding_window is not None and seq > spec.sliding_window or kv_seq != seq) and not is_fused(run.attention)
    shape = ops.AttentionShape(ctx.batch, seq, spec.heads, spec.kv_heads, spec.head_dim, causal=True, kv_seq=kv_seq)

    tape.scope = "embeddings"
    x = ctx.stream_input(ctx.word_embeddings(d))
    table = ctx.position_rows * spec.head_dim
    cos, sin = tape.new(table, x.dtype, False), tape.new(table, x.dtype, False)
    if kv_seq != seq and not x.rg:
        tape.save(cos, "rotary tables")
        tape.save(sin, "rotary tables")

    def norm(t):
        return ctx.rms_norm(t, d)

    def attention_half(x):
        a = norm(x)
        q, k, v = ctx.linear(a, q_site), ctx.linear(a, k_site), ctx.linear(a, v_site)
        if spec.qk_norm:
            q, k = ctx.rms_norm(q, spec.head_dim), ctx.rms_norm(k, spec.head_dim)
        q, k = ops.rope(tape, q, cos, sin), ops.rope(tape, k, cos, sin)
        k, v = ctx.key_values(k, v)
        if masked:  # explicit mask: transformers repeats k and v itself (see llama.py)
            if spec.kv_heads != spec.heads:
                k = tape.new(k.numel * spec.heads // spec.kv_heads, k.dtype, k.rg)
                v = tape.new(v.numel * spec.heads // spec.kv_heads, v.dtype, v.rg)
            tape.transient(ctx.batch * seq * kv_seq)
        attn = ctx.attention(q, k, v, shape if not masked else
                             ops.AttentionShape(ctx.batch, seq, spec.heads, spec.heads, spec.head_dim, True, kv_seq),
                             implementation=run.attention if not masked or run.attention == "eager" else "sdpa-masked",
                             dropout_p=ctx.model_dropout(spec.attention_dropout), softmax_fp32=True)
        return ctx.residual("attention", ctx.linear(attn, o_site), x)

    def sparse_block(x):
        x = attention_half(x)
        return ctx.residual("ffn", moe_feed_forward(ctx, norm(x)), x)

    def dense_block(x):  # Qwen3MoeMLP; peft's MoE name mapping leaves its linears untargeted
        x = attention_half(x)
        m = norm(x)
        i = spec.intermediate
        act = ops.silu(tape, ctx.base_linear(m, LinearSite("gate_proj", d, i, False)))
        h = ops.mul(tape, act, ctx.base_linear(m, LinearSite("up_proj", d, i, False)), "activation function")
        return ctx.residual("ffn", ctx.base_linear(h, LinearSite("down_proj", i, d, False)), x)

    x = ctx.blocks(x, {SPARSE: sparse_block, DENSE: dense_block})
    tape.scope = "head"
    ctx.lm_head_and_loss(norm(x), upcast=True)


def _notes(spec: ModelSpec, run) -> tuple[str, ...]:
    moe = spec.moe
    return (f"mixture of experts: {moe.experts} experts, {moe.top_k} per token; balanced routing assumed "
            f"(each expert receives n*{moe.top_k}/{moe.experts} tokens); transformers' grouped_mm experts path "
            "processes all n*k (token, expert) rows at once, so saved bytes, FLOPs and transients depend on n*k only"
            + (f" (--moe-imbalance {run.moe_imbalance:g} changes nothing here)" if run.moe_imbalance else ""),)


MOE = register_architecture(Architecture(
    family="moe", model_types=("mixtral", "qwen3_moe"),
    description="Mixture-of-experts decoder (Mixtral, Qwen3-MoE): Llama attention, top-k routed SwiGLU experts",
    from_config=_from_config, linear_sites=_sites, default_targets=("q_proj", "v_proj"),
    params=_params, forward=_forward, stack=_stack, notes=_notes,
    tasks=("causal-lm", "seq-cls", "token-cls")))  # heads.py: transformers' classifiers of the family
