"""NoLA: LoRA's A and B each re-parameterised as a linear mixture of fixed random bases.

Koohpayegani et al. 2024, "NOLA: Compressing LoRA using Linear Combination of Random Basis",
arXiv:2310.02556 (ICLR 2024), Sec. 3: A = sum_i alpha_i A_i (k bases), B = sum_j beta_j B_j
(l bases); only the k + l coefficients train per adapted matrix.

No mainstream library ships NoLA; this models the authors' reference layer (UCDvision/NOLA,
`NOLALinear` / `GenerateParams` in their peft fork): each factor is an nn.Linear whose frozen
weight is its initial value, and every forward regenerates the bases from a stored seed,
materialising a [k, rows, cols] fp32 basis tensor, contracts it with the coefficients (an einsum,
counted as a matmul) and adds the frozen weight; backward regenerates the bases once more to get
the coefficient gradient. The bases are never stored: they are transients of size k*r*d_in
(resp. l*d_out*r) floats. The mixed factor W = sum + weight is a new [r, d_in] tensor, which the
matmul x @ W.T saves (with x) for backward.
"""

from __future__ import annotations

from .. import ops
from .base import Method, TensorGroup, register_method
from .lora import ADAPTER_DTYPE, LORA, lora_serving, merge_into_base
from .serving import per_adapted_site
from .options import MethodOption

K = MethodOption("k", "--nola-k", int, 1024, "number of random bases for A", minimum=1)
L = MethodOption("l", "--nola-l", int, 1024, "number of random bases for B", minimum=1)


def _mixed_factor(ctx, rows: int, cols: int, bases: int):
    """GenerateParams(coefficients) + weight: FLOPs of the einsum, basis transient, the new factor."""
    tape = ctx.tape
    tape.matmul("adapter", 1, bases, rows * cols, grad_a=False, grad_b=False)  # b,boi->oi
    tape.add_flops("adapter", 0, 2 * bases * rows * cols)  # d,dl->l in backward
    tape.transient(4 * bases * rows * cols)
    # backward regenerates the bases for the coefficients' gradient, and einsum copies them: two buffers
    tape.transient(2 * 4 * bases * rows * cols, backward=True)
    return tape.new(rows * cols, ADAPTER_DTYPE, True)


def nola_linear(ctx, x, site):
    tape = ctx.tape
    r = ctx.rank
    k = K.value(ctx.run)
    l_ = L.value(ctx.run)
    base_out = ctx.base_linear(x, site)
    xa = ops.cast(tape, x, ADAPTER_DTYPE) if not tape.autocast else x
    xa = ops.dropout(tape, xa, ctx.run.dropout)
    w_a = _mixed_factor(ctx, r, site.d_in, k)
    a = ops.linear(tape, xa, site.d_in, r, w_trainable=True, w_dtype=ADAPTER_DTYPE, kind="adapter")
    if xa.rg:
        tape.save(w_a, "adapter extras")
    w_b = _mixed_factor(ctx, site.d_out, r, l_)
    b = ops.linear(tape, a, r, site.d_out, w_trainable=True, w_dtype=ADAPTER_DTYPE, kind="adapter")
    tape.save(w_b, "adapter extras")
    return merge_into_base(ctx, base_out, b)


def apply_nola(model, run, targets, notes):
    """Trace hook: the project's reference NOLALinear (lora_cost/trace/nola.py) on every targeted linear."""
    from ...trace.adapters import enable_checkpointing, enable_input_grads
    from ...trace.nola import attach_nola

    if run.grad_checkpointing:
        enable_checkpointing(model)
    adapted = attach_nola(model, targets, run.r, K.value(run), L.value(run), run.dropout)
    if run.grad_checkpointing:
        enable_input_grads(model)
    return model, adapted


def nola_serving(spec, sites, head_sites, run):
    """Mixed once at load (A = A0 + sum alpha_i A_i, B likewise), NoLA is a LoRA of rank r: merged it
    folds into W, unmerged it serves the two mixed fp32 factors (the seeds and coefficients suffice to
    rebuild them). The reference layer as written regenerates and mixes the bases on every forward."""
    k, l_ = K.value(run), L.value(run)
    mixing = per_adapted_site(spec, sites, head_sites, lambda s: 2 * k * run.r * s.d_in + 2 * l_ * s.d_out * run.r)
    return lora_serving(spec, sites, head_sites, run, method=LORA, note=(
        "merged: W + s B A with the mixed factors; unmerged: the mixed factors A and B, computed once at load "
        f"({mixing:,} FLOPs); NOLALinear as written regenerates the bases and spends those FLOPs on every forward"))


NOLA = register_method(Method(
    name="nola",
    title="NoLA",
    paper="Koohpayegani et al. 2024, arXiv:2310.02556 (ICLR 2024)",
    recipe="the authors' NOLALinear factors (seeded random bases regenerated each pass); coefficients in fp32",
    default_r=8,
    trainable=lambda site, run: [TensorGroup(f"{site.name}.nola_alpha", K.value(run), 1, ADAPTER_DTYPE),
                                 TensorGroup(f"{site.name}.nola_beta", L.value(run), 1, ADAPTER_DTYPE)],
    frozen=lambda site, run: [TensorGroup(f"{site.name}.nola_A0", run.r * site.d_in, 1, ADAPTER_DTYPE),
                              TensorGroup(f"{site.name}.nola_B0", site.d_out * run.r, 1, ADAPTER_DTYPE)],
    adapted_linear=nola_linear,
    serving=nola_serving,
    options=(K, L),
    apply_to_model=apply_nola,
))
