"""(IA)3: learned vectors that rescale keys, values and the feed-forward activation.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", arXiv:2205.05638 (NeurIPS 2022), Sec. 3.3: l_k, l_v in R^{d_k}, l_ff in R^{d_ff} per block.
Modelled library behaviour: peft `tuners/ia3/layer.py` Linear, with peft's default targets per family
(`utils/constants.py` TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING and
..._FEEDFORWARD_MODULES_MAPPING). One fp32 vector per adapted module (peft casts 16-bit adapters to
fp32, `autocast_adapter_dtype=True`): of d_in elements on a feed-forward module, d_out otherwise.
Linear.forward builds `ia3_scaling = 1 * ia3_l.flatten()` (a new [d] tensor) and then

    feed-forward:  base_layer((x.to(fp32) * ia3_scaling).to(x.dtype))
    otherwise:     (base_layer(x) * ia3_scaling).to(result.dtype)

The product saves its tensor operand (the layer input, or the layer output) for the vector's gradient,
and the [d] scaling when that operand needs a gradient. The scalar multiply and the casts save nothing.
"""

from __future__ import annotations

from .. import ops
from ...units import DTYPE_BYTES
from .base import Method, TensorGroup, no_rank_limit, register_method
from .serving import ServingCost

ADAPTER_DTYPE = "fp32"  # peft autocast_adapter_dtype=True

# peft's default targets and feed-forward modules, by config model_type (peft utils/constants.py);
# GPT-3 (no transformers class) follows GPT-2's and Llama's choice: keys, values, the MLP's output layer
DEFAULT_TARGETS = {
    "gpt2": ("c_attn", "mlp.c_proj"),
    "llama": ("k_proj", "v_proj", "down_proj"),
    "mistral": ("k_proj", "v_proj", "down_proj"),
    "qwen2": ("q_proj", "v_proj", "down_proj"),
    "gemma2": ("q_proj", "v_proj", "down_proj"),
    "gemma3_text": ("q_proj", "v_proj", "down_proj"),
    "bert": ("key", "value", "output.dense"),
    "roberta": ("key", "value", "output.dense"),
    "gpt3": ("k_proj", "v_proj", "fc_out"),
    "bloom": ("query_key_value", "mlp.dense_4h_to_h"),
}
FEEDFORWARD = ("mlp.c_proj", "down_proj", "output.dense", "fc_out", "mlp.dense_4h_to_h")


def feedforward_targets(targets) -> list[str]:
    """The feed-forward modules among the targets, as the trace hook passes them to IA3Config (peft
    requires them to be a subset of target_modules). With the defaults, the family's MLP output layer."""
    return [f for f in FEEDFORWARD if f in targets]


def is_feedforward(site, targets) -> bool:
    """A targeted module scales its input (l_ff) when a feed-forward name among the targets matches it
    (peft `_check_target_module_exists` on feedforward_modules); None targets: the family defaults."""
    if targets is None:
        names = FEEDFORWARD
    elif tuple(targets) == ("all-linear",):  # every linear by its name: the feed-forward names that are plain names
        names = [f for f in FEEDFORWARD if "." not in f]
    else:
        names = feedforward_targets(targets)
    return any(site.matches(f) for f in names)


def vector_numel(site, targets) -> int:
    return site.d_in if is_feedforward(site, targets) else site.d_out


def ia3_trainable(site, run) -> list[TensorGroup]:
    return [TensorGroup(f"{site.name}.ia3_l", vector_numel(site, run.targets), 1, ADAPTER_DTYPE)]


def ia3_linear(ctx, x, site):
    tape = ctx.tape
    # ia3_scaling = 1 * ia3_l.flatten(): a new fp32 tensor that requires grad
    scaling = tape.new(vector_numel(site, ctx.targets), ADAPTER_DTYPE, True)
    if is_feedforward(site, ctx.targets):
        scaled = ops.mul(tape, ops.cast(tape, x, ADAPTER_DTYPE), scaling, "adapter extras")
        return ctx.base_linear(ops.cast(tape, scaled, x.dtype), site)
    out = ctx.base_linear(x, site)
    return ops.cast(tape, ops.mul(tape, out, scaling, "adapter extras"), out.dtype)


def ia3_serving(spec, sites, head_sites, run) -> ServingCost:
    """Merged: each vector folds into its weight's rows or columns (peft Linear.merge), nothing is left.
    Unmerged: the vectors, one elementwise multiply per adapted module (1 FLOP per element and token)."""
    per_block = sum(vector_numel(s, run.targets) for s in sites)
    head = sum(vector_numel(s, run.targets) for s in head_sites)
    numel = per_block * spec.layers + head
    return ServingCost(mergeable=True, extra_weight_bytes_unmerged=numel * DTYPE_BYTES[ADAPTER_DTYPE],
                       extra_weight_bytes_merged=0, extra_flops_per_token_unmerged=numel,
                       extra_flops_per_token_merged=0, extra_sequential_ops_per_block_unmerged=len(sites),
                       extra_sequential_ops_per_block_merged=0,
                       note="(IA)3 vectors fold into the adapted weights when merged")


def apply_ia3(model, run, targets, notes):
    """Trace hook: peft IA3Config(target_modules, feedforward_modules, fan_in_fan_out)."""
    import peft

    from ...trace.adapters import count_adapted, enable_checkpointing, enable_input_grads, fan_in_fan_out, peft_model

    if run.grad_checkpointing:
        enable_checkpointing(model)
    cfg = peft.IA3Config(target_modules=list(targets), feedforward_modules=feedforward_targets(targets),
                         fan_in_fan_out=fan_in_fan_out(model, targets))
    model = peft_model(model, cfg)
    if run.grad_checkpointing:
        enable_input_grads(model)
    return model, count_adapted(model, "ia3_l")


def validate_ia3(spec, sites, run) -> None:
    from ...errors import LoraCostError

    if run.dropout:
        raise LoraCostError("--dropout (adapter dropout) does not apply to ia3")
    if run.targets is None and spec.model_type not in DEFAULT_TARGETS:
        raise LoraCostError(f"ia3 has no default targets for {spec.model_type}; give --targets")


IA3 = register_method(Method(
    name="ia3",
    title="(IA)3 (learned rescaling vectors)",
    paper="Liu et al. 2022, arXiv:2205.05638 (NeurIPS 2022)",
    recipe="peft IA3Config(target_modules, feedforward_modules) with peft's per-family defaults; vectors in fp32",
    default_r=None,
    trainable=ia3_trainable,
    frozen=lambda site, run: [],
    adapted_linear=ia3_linear,
    max_rank=no_rank_limit,
    validate=validate_ia3,
    serving=ia3_serving,
    default_targets=lambda spec: DEFAULT_TARGETS.get(spec.model_type, ("q_proj", "v_proj")),
    uses_rank=False,
    apply_to_model=apply_ia3,
    recognise=lambda model, peft_config: type(peft_config).__name__ == "IA3Config",
))
