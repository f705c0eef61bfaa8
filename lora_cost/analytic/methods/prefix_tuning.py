"""Prefix tuning: N trainable key/value vectors prepended to every attention layer's own.

Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", arXiv:2101.00190,
Sec. 4.2-4.3 (the prefix activations, optionally reparameterised by an MLP). The LoRA paper's
"PrefixLayer" baseline (Hu et al. 2021, arXiv:2106.09685, Sec. 5.1) trains these activations.
Modelled library behaviour: peft `PrefixTuningConfig` and peft/tuners/prefix_tuning/model.py
`PrefixEncoder`: without projection an nn.Embedding(N, L * 2 * kv_dim); with `prefix_projection`
Embedding(N, kv_dim) -> Linear(kv_dim, h) -> Tanh -> Linear(h, L * 2 * kv_dim), kv_dim = token_dim
(the hidden size; kv_heads * head_dim for grouped-query models, peft utils/other.py
`_prepare_prompt_learning_config`). `PeftModel.get_prompt` runs it on the [b, N] prompt tokens, casts
to the model dtype, and wraps the per-layer [b, kv_heads, N, head_dim] keys and values in a
`DynamicCache`; each attention layer's cache update concatenates them with its own keys and values
(torch.cat: nothing saved), so queries stay s long and keys grow to N + s. The causal mask then has
an offset, so sdpa gets an explicit mask (no is_causal, no enable_gqa: the efficient kernel on CUDA).
Labels are unchanged (the prefix is not part of the sequence).
"""

from __future__ import annotations

from .. import ops
from ...errors import LoraCostError
from .base import Method, TensorGroup, register_method
from .options import MethodOption
from .prompt_tuning import (NO_LINEAR_ADAPTER, PROMPT_DTYPE, VIRTUAL_TOKENS, active_config, apply_prompt_learning,
                            check_virtual_tokens, peft_type, prompt_indices, prompt_serving, virtual_tokens)

PROJECTION = MethodOption("prefix_projection", "--prefix-projection", int, 0,
                          "hidden size of prefix tuning's reparameterisation MLP (0: no MLP, the prefixes train "
                          "directly)", minimum=0)


def kv_dim(spec) -> int:
    return spec.kv_heads * spec.head_dim if spec.kv_heads != spec.heads else spec.hidden


def encoder_groups(spec, run) -> list[TensorGroup]:
    n, c, h = virtual_tokens(run), kv_dim(spec), PROJECTION.value(run)
    out = spec.layers * 2 * c
    if not h:
        return [TensorGroup("prompt_encoder.embedding", n * out, 1, PROMPT_DTYPE)]
    return [TensorGroup("prompt_encoder.embedding", n * c, 1, PROMPT_DTYPE),
            TensorGroup("prompt_encoder.transform", c * h + h + h * out + out, 1, PROMPT_DTYPE)]


def prefix_encoder(ctx, x):
    """`get_prompt`: the encoder on the [b, N] prompt tokens (an expanded view of N int64 ids), then the
    cast to the model dtype; view, permute and split are views. Hands the embeddings on unchanged."""
    tape, spec, run = ctx.tape, ctx.spec, ctx.run
    n, c, h = virtual_tokens(run), kv_dim(spec), PROJECTION.value(run)
    out = spec.layers * 2 * c
    indices = prompt_indices(ctx, n)
    rows = ctx.batch * n
    if not h:
        tape.save(indices, "token indices")
        kv = tape.new(rows * out, PROMPT_DTYPE, True)
    else:
        tape.save(indices, "token indices")
        e = tape.new(rows * c, PROMPT_DTYPE, True)  # the lookup over the batch-expanded ids: [b, N, c]
        t = ops.linear(tape, e, c, h, w_trainable=True, w_dtype=PROMPT_DTYPE, kind="adapter")
        t = tape.new(t.numel, t.dtype, True)
        tape.save(t, "adapter extras")  # tanh saves its output
        kv = ops.linear(tape, t, h, out, w_trainable=True, w_dtype=PROMPT_DTYPE, kind="adapter")
    ops.cast(tape, kv, ctx.weight_dtype if not tape.autocast else kv.dtype)
    return x


def join_prefix(ctx, k, v):
    """The cache update: torch.cat((prefix, k), dim=-2) for keys and values; saves nothing, and the
    result requires grad (the prefix trains)."""
    tape, spec = ctx.tape, ctx.spec
    numel = ctx.batch * spec.kv_heads * ctx.kv_seq * spec.head_dim  # [b, kv_heads, N + s, head_dim]
    # the prefix is in the stored weights' dtype (`.to(base_model_torch_dtype)`): fp32 under AMP, where
    # torch.cat (on autocast's promote list) joins it with the 16-bit keys in fp32
    dtype = ops.promote(k.dtype, ctx.run.weight_dtype)
    return tape.new(numel, dtype, True), tape.new(numel, dtype, True)


def check_prefix(spec, sites, run) -> None:
    """peft refuses prefix tuning on a model with gradient checkpointing on (peft_model.py
    `_setup_prompt_encoder`: "PREFIX_TUNING does not work with gradient checkpointing.")."""
    check_virtual_tokens(spec, run, "prefix-tuning", run.seq + virtual_tokens(run))
    if run.grad_checkpointing:
        raise LoraCostError("prefix-tuning does not work with --grad-checkpointing (peft refuses the combination)")


def prefix_serving(spec, sites, head_sites, run):
    """The trained prefixes are kept as N keys and values per layer in fp32 (peft's inference mode
    builds Embedding(N, L x 2 x kv_dim) and drops the MLP): each token attends over N more keys in
    every layer, which sit in the KV cache from the start (no kernel added inside a block)."""
    n = virtual_tokens(run)
    return prompt_serving(spec, sites, head_sites, run, stored_numel=spec.layers * 2 * n * kv_dim(spec))


def observed(cfg) -> dict:
    """Profiler: the options of a live peft PrefixTuningConfig."""
    return {"virtual_tokens": cfg.num_virtual_tokens,
            "prefix_projection": cfg.encoder_hidden_size if cfg.prefix_projection else 0}


def apply_prefix_tuning(model, run, targets, notes):
    import peft

    h = PROJECTION.value(run)
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual_tokens(run),
                                  prefix_projection=bool(h), encoder_hidden_size=h or None)
    return apply_prompt_learning(model, run, notes, cfg)


PREFIX_TUNING = register_method(Method(
    name="prefix-tuning",
    title="Prefix tuning",
    paper="Li & Liang 2021, arXiv:2101.00190",
    recipe="peft PrefixTuningConfig(task_type=CAUSAL_LM, num_virtual_tokens=N, prefix_projection): N keys and "
           "values per layer through a DynamicCache; encoder in fp32",
    **NO_LINEAR_ADAPTER,
    options=(VIRTUAL_TOKENS, PROJECTION),
    # the queries sit at positions N .. N + s - 1 (cache_position starts after the prefix)
    validate=check_prefix,
    model_trainable=lambda spec, groups, run: encoder_groups(spec, run),
    extra_keys=virtual_tokens,
    key_values=join_prefix,
    input_embeddings=prefix_encoder,
    serving=prefix_serving,
    apply_to_model=apply_prefix_tuning,
    recognise=lambda model, peft_config: peft_type(peft_config) == "PrefixTuningConfig",
    observed_options=lambda model: observed(active_config(model)),
))
