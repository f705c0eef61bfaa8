"""Bottleneck adapters (Houlsby and Pfeiffer), as the `adapters` library (AdapterHub) builds them.

Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751 (an adapter
after the attention and one after the feed-forward sublayer); Pfeiffer et al. 2021, "AdapterFusion",
arXiv:2005.00247 (one adapter, after the feed-forward sublayer). These are the LoRA paper's Adapter^H
and Adapter^P baselines (Hu et al. 2021, arXiv:2106.09685, Sec. 5.1).

Modelled library behaviour (adapters 1.3.0; `configuration/adapter_config.py` DoubleSeqBnConfig and
SeqBnConfig, `methods/bottleneck.py` BottleneckLayer.bottleneck_layer_forward, `methods/modeling.py`
Adapter): with the sublayer output h (after its dropout), the residual stream x and the family's
post-norm LN (BERT/RoBERTa; None in the pre-norm GPT-2 and Llama blocks):

    pre_forward:  residual = h  (residual_before_ln=True)
                  hidden = LN(h + x) or h + x  if original_ln_before (Pfeiffer), else hidden = h (Houlsby)
    Adapter:      up = adapter_up(act(adapter_down(hidden))) ; up = up * 1.0 (scaling) ; dropout(up) + residual
    post_forward: LN(out + x) or out + x  (original_ln_after=True)

adapter_down/up are nn.Linear with bias (bottleneck m = int(hidden // reduction_factor), default factor
16); act is "swish" (nn.SiLU) for Houlsby and "relu" for Pfeiffer. `train_adapter` freezes the whole
model (freeze_model) and unfreezes the adapters only: the LayerNorms do NOT train (Houlsby's paper trains
them; the library's named configs do not). The library creates the adapters with the default dtype
(fp32); a 16-bit model runs only after `model.adapter_to(name, dtype=...)` (nn.Linear refuses mixed
dtypes), so the adapters are in the model's weight dtype (fp32 under AMP, where autocast casts them).
The `dropout` of the config is this tool's --dropout (default 0, the library's default).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import ops
from ...errors import LoraCostError
from .base import TensorGroup
from .options import MethodOption
from .serving import ServingCost
from ...units import DTYPE_BYTES

REDUCTION_FACTOR = MethodOption("reduction_factor", "--reduction-factor", int, 16,
                                "bottleneck adapters: bottleneck size = hidden size / this factor", minimum=1)


@dataclass(frozen=True)
class BottleneckConfig:
    """The fields of the library's BnConfig that decide the cost (the rest keep their defaults)."""

    points: tuple[str, ...]  # "attention" (mh_adapter) and/or "ffn" (output_adapter)
    non_linearity: str  # "swish" (SiLU) or "relu"
    original_ln_before: bool  # add the residual stream (and the post-norm) before the adapter


HOULSBY = BottleneckConfig(points=("attention", "ffn"), non_linearity="swish", original_ln_before=False)  # DoubleSeqBnConfig
PFEIFFER = BottleneckConfig(points=("ffn",), non_linearity="relu", original_ln_before=True)  # SeqBnConfig


def bottleneck_size(spec, run) -> int:
    """int(hidden // reduction_factor), at least 1 (BottleneckLayer.add_adapter, Adapter.__init__)."""
    return max(spec.hidden // REDUCTION_FACTOR.value(run), 1)


def adapter_params(d: int, m: int) -> int:
    """One adapter: down [m, d] + bias m, up [d, m] + bias d = 2dm + m + d (the LoRA paper's per-layer
    Adapter^H count, Hu et al. 2021 Sec. 5.1, without its LayerNorm term)."""
    return 2 * d * m + m + d


def block_trainable(config: BottleneckConfig):
    def groups(spec, run) -> list[TensorGroup]:
        d, m, dtype = spec.hidden, bottleneck_size(spec, run), run.weight_dtype
        out = []
        for point in config.points:
            where = {"attention": "attention_adapters", "ffn": "output_adapters"}[point]
            out += [TensorGroup(f"{where}.adapter_down.weight", m * d, 1, dtype),
                    TensorGroup(f"{where}.adapter_down.bias", m, 1, dtype),
                    TensorGroup(f"{where}.adapter_up.weight", d * m, 1, dtype),
                    TensorGroup(f"{where}.adapter_up.bias", d, 1, dtype)]
        return out
    return groups


def adapter_forward(ctx, config: BottleneckConfig, hidden, residual):
    """Adapter.forward: down (addmm, trainable), act, up (addmm), * scaling, dropout, + residual."""
    tape, d = ctx.tape, ctx.spec.hidden
    m = bottleneck_size(ctx.spec, ctx.run)
    dtype = ctx.run.weight_dtype
    down = ops.linear(tape, hidden, d, m, w_trainable=True, w_dtype=dtype, kind="adapter")
    act = ops.silu(tape, down) if config.non_linearity == "swish" else ops.relu(tape, down)
    up = ops.linear(tape, act, m, d, w_trainable=True, w_dtype=dtype, kind="adapter")
    up = ops.dropout(tape, ops.scale(tape, up), ctx.run.dropout)
    return ops.add(tape, up, residual)


def residual_with(config: BottleneckConfig):
    """The `residual` hook: BottleneckLayer.bottleneck_layer_forward at the points the config adapts."""
    def residual(ctx, point, out, x, norm):
        tape = ctx.tape
        if point not in config.points:  # no adapter here: the block's own residual (and post-norm)
            y = ops.add(tape, out, x)
            return norm(y) if norm is not None else y
        hidden = out
        if config.original_ln_before:  # pre_forward: the stream is added (and normed) before the adapter
            hidden = ops.add(tape, out, x)
            hidden = norm(hidden) if norm is not None else hidden
        y = ops.add(tape, adapter_forward(ctx, config, hidden, out), x)  # post_forward
        return norm(y) if norm is not None else y
    return residual


def validate(spec, sites, run) -> None:
    factor = REDUCTION_FACTOR.value(run)
    if spec.hidden % factor:
        raise LoraCostError(f"--reduction-factor {factor} does not divide the hidden size {spec.hidden} of {spec.name}")


def serving_with(config: BottleneckConfig):
    """Not mergeable: a non-linearity sits between the projections, so the adapters stay in the served
    model. Per adapter and token: 2 * (d*m + m*d) matmul FLOPs (the FlopCounterMode convention; the
    bias adds, the non-linearity and the adds are m + d + m + 2d elementwise operations more, not
    counted). Kernels added on a block's critical path per adapter: down (addmm), act, up (addmm), the
    scaling multiply and the adapter's residual add; Pfeiffer adds the stream before the adapter (one
    add more, and in post-norm BERT/RoBERTa a second LayerNorm)."""
    def serving(spec, sites, head_sites, run) -> ServingCost:
        d, m, L = spec.hidden, bottleneck_size(spec, run), spec.layers
        adapters = len(config.points) * L
        weight_bytes = adapters * adapter_params(d, m) * DTYPE_BYTES[run.weight_dtype]
        flops = adapters * 2 * (d * m + m * d)
        per_adapter = 5 + (0 if not config.original_ln_before else 1 + (1 if spec.family == "bert" else 0))
        ops_per_block = len(config.points) * per_adapter
        return ServingCost(mergeable=False, extra_weight_bytes_unmerged=weight_bytes,
                           extra_weight_bytes_merged=weight_bytes, extra_flops_per_token_unmerged=flops,
                           extra_flops_per_token_merged=flops, extra_sequential_ops_per_block_unmerged=ops_per_block,
                           extra_sequential_ops_per_block_merged=ops_per_block,
                           note="bottleneck adapters cannot merge: a non-linearity sits between their projections")
    return serving


def apply_with(config: BottleneckConfig):
    """Trace hook: the project's reference of the library's layer (lora_cost/trace/bottleneck.py)."""
    def apply(model, run, targets, notes):
        from ...trace.adapters import enable_checkpointing, enable_input_grads
        from ...trace.bottleneck import attach_bottleneck

        if run.grad_checkpointing:
            enable_checkpointing(model)
        adapted = attach_bottleneck(model, points=config.points, non_linearity=config.non_linearity,
                                    original_ln_before=config.original_ln_before,
                                    reduction_factor=REDUCTION_FACTOR.value(run), dropout=run.dropout)
        if run.grad_checkpointing:
            enable_input_grads(model)
        notes.append("bottleneck adapters: a reference of the adapters library's layer (lora_cost/trace/bottleneck.py); "
                     "the library itself pins transformers 4.57")
        return model, adapted
    return apply


def recognise_with(config: BottleneckConfig):
    """Profiler: a model with the library's (or the reference's) Adapter modules at exactly the config's
    points, the base frozen."""
    def recognise(model, peft_config) -> bool:
        if peft_config is not None:
            return False
        names = [n for n, _ in model.named_parameters()] if hasattr(model, "named_parameters") else []
        points = {p for n in names if ".adapter_down." in n or ".adapter_up." in n
                  for p in (("attention",) if "attention_adapters" in n else ("ffn",) if "output_adapters" in n else ())}
        trains_base = any(p.requires_grad for n, p in model.named_parameters() if ".adapter_" not in n)
        return bool(points) and points == set(config.points) and not trains_base
    return recognise


def observed_reduction_factor(model) -> dict:
    """The reduction factor of a live model: hidden size / the adapter_down output width."""
    for name, p in model.named_parameters():
        if name.endswith("adapter_down.0.weight") or name.endswith("adapter_down.weight"):
            m, d = p.shape
            return {"reduction_factor": d // m}
    return {}


def layout_fields(config: BottleneckConfig) -> dict:
    """The Method fields of a bottleneck-adapter layout: no linear layer adapted (the adapters are modules
    of their own, `config.points` per block), everything else derived from the layout."""
    return dict(default_r=None, trainable=lambda site, run: [], frozen=lambda site, run: [],
                adapted_linear=lambda ctx, x, site: ctx.base_linear(x, site), adapts_linears=False,
                modules_per_block=len(config.points), block_trainable=block_trainable(config),
                residual=residual_with(config), options=(REDUCTION_FACTOR,), validate=validate,
                serving=serving_with(config), apply_to_model=apply_with(config), recognise=recognise_with(config),
                observed_options=observed_reduction_factor)
