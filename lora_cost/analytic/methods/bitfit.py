"""BitFit: only the bias terms train; every weight stays frozen.

Ben Zaken, Ravfogel and Goldberg 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models", arXiv:2106.10199 (ACL 2022), Sec. 2: every bias of the
model trains (linear biases and LayerNorm betas), about 0.08% of BERT-large's parameters.
peft has no BitFit; the recipe modelled is the paper's:

    for name, p in model.named_parameters(): p.requires_grad = "bias" in name

What the step then keeps (PyTorch's derivatives.yaml): no weight trains, so no addmm saves its input
(`mat1` is saved only for `mat2`'s gradient); a trainable bias saves nothing (its gradient is the
incoming gradient summed over rows), but it makes the layer's output require grad, so every op after
the earliest trainable bias saves what its input gradient needs (the activation functions, attention's
probabilities, each LayerNorm's input and statistics, which `native_layer_norm` keeps when only its
bias trains). Before the earliest bias (GPT-2's embeddings, a Qwen2 block's first RMSNorm) nothing is
kept. `ops.linear` / `ops.layer_norm` take `b_trainable` from the context (`Method.trains_biases`).
"""

from __future__ import annotations

from ...errors import LoraCostError
from .base import Method, TensorGroup, no_rank_limit, register_method
from .serving import NONE


def bias_groups(spec, groups, run) -> list[TensorGroup]:
    """Every bias of the model as the architecture declares its parameters: the "bias" groups and the
    bias part of each LayerNorm (`ParamGroup.bias_numel`), stored in the run's weight dtype."""
    dtype = run.weight_dtype
    out = []
    for g in groups:
        if g.kind == "bias":
            out.append(TensorGroup(g.name, g.numel, g.count, dtype))
        elif g.bias_numel:
            out.append(TensorGroup(f"{g.name} bias", g.bias_numel, g.count, dtype))
    return out


def validate_bitfit(spec, sites, run) -> None:
    from ..architectures import get_architecture

    if run.targets is not None:
        raise LoraCostError("--targets does not apply to bitfit (every bias of the model trains)")
    if run.dropout:
        raise LoraCostError("--dropout (adapter dropout) does not apply to bitfit")
    if not bias_groups(spec, get_architecture(spec.model_type).params(spec), run):
        raise LoraCostError(f"bitfit needs biases, and {spec.name} ({spec.model_type}) has none")


def apply_bitfit(model, run, targets, notes):
    """Trace hook: requires_grad = "bias" in the parameter's name; with checkpointing, the inputs made
    to require grad as for the adapter methods (enable_input_require_grads)."""
    from ...trace.adapters import enable_checkpointing, enable_input_grads

    for name, p in model.named_parameters():
        p.requires_grad_("bias" in name)
    if run.grad_checkpointing:
        enable_checkpointing(model)
        enable_input_grads(model)
    return model, 0


def recognise_bitfit(model, peft_config) -> bool:
    """Profiler: no peft adapters, and exactly the parameters named "bias" train."""
    named = list(model.named_parameters())
    return peft_config is None and any("bias" in n for n, _ in named) and \
        all(p.requires_grad == ("bias" in n) for n, p in named)


BITFIT = register_method(Method(
    name="bitfit",
    title="BitFit (biases only)",
    paper="Ben Zaken et al. 2022, arXiv:2106.10199 (ACL 2022)",
    recipe='p.requires_grad = "bias" in name for every parameter (no peft method)',
    default_r=None,
    trainable=lambda site, run: [],
    frozen=lambda site, run: [],
    adapted_linear=lambda ctx, x, site: ctx.base_linear(x, site),
    max_rank=no_rank_limit,
    validate=validate_bitfit,
    serving=lambda *args: NONE,  # the trained biases replace the base ones: nothing extra at inference
    trains_biases=True,
    model_trainable=bias_groups,
    default_targets=lambda spec: (),
    uses_rank=False,
    apply_to_model=apply_bitfit,
    recognise=recognise_bitfit,
))
