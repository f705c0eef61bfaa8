"""AdaLoRA: W x + s / (ranknum + 1e-5) * P Lambda Q x, with the rank budget pruned while training.

Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
arXiv:2303.10512 (ICLR 2023): Sec. 3.1 the SVD-form update P Lambda Q with an orthogonality
regulariser ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2; Sec. 3.2-3.3 importance scores smoothed by moving
averages (sensitivity and uncertainty), and a cubic budget schedule that masks the least important
singular values until the average rank is target_r.

Modelled library behaviour: peft 0.21 `tuners/adalora/`:
  * `layer.py` SVDLinear: lora_A [r, d_in], lora_E [r, 1], lora_B [d_out, r] (fp32 parameters, created
    at init_r and never resized: pruning sets lora_E entries to zero), forward
        x = x.to(fp32); result += (dropout(x) @ (lora_A * lora_E).T @ lora_B.T) * scaling / (ranknum + 1e-5)
    The product A * E is a new [r, d_in] tensor each forward, saved by the first matmul when x needs a
    gradient; that matmul saves x, the second one its [n, r] input. The add is in place: the output
    keeps the base output's dtype and storage.
  * ranknum trains. peft creates it with requires_grad=False on the CPU, then moves it to the base
    layer's device and dtype; `Tensor.to` across devices (or dtypes) returns a plain tensor, which
    nn.ParameterDict wraps in a new Parameter, requiring grad. On a CUDA model that always happens
    (on the CPU it happens for 16-bit models only), so ranknum is one trainable parameter per adapted
    matrix (counted by peft's print_trainable_parameters) and the division saves its [n, d_out] fp32
    numerator as well as the divisor.
  * `model.py` AdaLoraModel.forward: when the model returns a loss it adds orth_reg_weight times the
    mean over every lora_A and lora_B of ||p p^T - I||_F (A) or ||p^T p - I||_F (B): an r x r product
    each (2 r^2 d FLOPs forward, both operands need a gradient), and torch.norm saves the r x r
    difference and its scalar result. Its backward runs before the loss's (its nodes are younger), so
    every lora_A and lora_B gradient exists from the start of backward. PeftModelForCausalLM (and every
    peft task model) calls it; a bare PeftModel without a task_type calls the transformers model
    directly and skips it.
  * `layer.py` RankAllocator.update_ipt (peft's `update_and_allocate`, called after opt.step() and
    before zero_grad until total_step - tfinal): ipt, exp_avg_ipt and exp_avg_unc, each shaped like
    every lora_A, lora_E and lora_B: three fp32 copies of the adapters kept outside the optimizer.
    Its update builds |p * grad| and the two moving averages parameter by parameter, at most three
    temporaries of one parameter's size at once. mask_to_budget (every deltaT steps) adds one
    parameter-sized score at a time and vectors of r: less than update_ipt's; the trace engine cannot
    run it on fake tensors (it reads a threshold with .item()), so it is modelled here only.
"""

from __future__ import annotations

from dataclasses import replace

from .. import ops
from ...errors import LoraCostError
from ...spec import LinearSite, RunConfig
from ...units import DTYPE_BYTES
from .base import Method, TensorGroup, register_method
from .lora import ADAPTER_DTYPE
from .options import MethodOption
from .serving import ServingCost

INIT_R = MethodOption("init_r", "--init-r", int, 12, "AdaLoRA's initial rank (peft init_r; --r names the same number)",
                      minimum=1)
TARGET_R = MethodOption("target_r", "--target-r", int, 8, "AdaLoRA's target average rank (peft target_r)", minimum=1)
TOTAL_STEP = 1000  # peft requires total_step; the schedule changes no tensor shape
STATE_COPIES = 3  # RankAllocator: ipt, exp_avg_ipt, exp_avg_unc
UPDATE_TEMPORARIES = 3  # beta * avg, the |ipt - avg| chain and the sum, of one parameter's size
# kernels of one adapted module's branch, in order: A * E, x @ (A E)^T, @ B^T, * scaling,
# ranknum + 1e-5, division, in-place add (and the input cast when the base is 16-bit)
BRANCH_KERNELS = 7
# DivBackward0 for ranknum: the fp32 incoming gradient, grad / other, (self / other) / other, -grad and
# their product, of which this many [n, d_out] buffers are alive at once beyond the block's usual two
DIV_BACKWARD_BUFFERS = 3


def resolve(run: RunConfig) -> RunConfig:
    """--r and --init-r name the same number (the rank the tensors carry; the planner sweeps --r);
    --target-r defaults to peft's 8, or to the initial rank when that is smaller."""
    given = dict(run.method_options)
    init = given.get("init_r")
    if run.r is not None and init is not None and run.r != init:
        raise LoraCostError(f"--r {run.r} and --init-r {init} disagree: for adalora both are the initial rank; give one")
    r = run.r if run.r is not None else (init if init is not None else INIT_R.default)
    target = given.get("target_r")
    if target is not None and target > r:
        raise LoraCostError(f"--target-r {target} is above the initial rank {r}: AdaLoRA only prunes ranks")
    if target is None:
        target = min(TARGET_R.default, r)
    options = {**given, "init_r": r, "target_r": target}
    return replace(run, r=r, method_options=tuple(sorted(options.items())))


def adalora_trainable(site: LinearSite, run: RunConfig) -> list[TensorGroup]:
    r = run.r
    return [TensorGroup(f"{site.name}.lora_A", r * site.d_in, 1, ADAPTER_DTYPE, grad_at_backward_start=True),
            TensorGroup(f"{site.name}.lora_E", r, 1, ADAPTER_DTYPE),
            TensorGroup(f"{site.name}.lora_B", site.d_out * r, 1, ADAPTER_DTYPE, grad_at_backward_start=True),
            TensorGroup(f"{site.name}.ranknum", 1, 1, ADAPTER_DTYPE)]


def svd_linear(ctx, x, site: LinearSite):
    tape = ctx.tape
    r = ctx.rank
    base_out = ctx.base_linear(x, site)
    xa = ops.cast(tape, x, ADAPTER_DTYPE) if not tape.autocast else x
    xa = ops.dropout(tape, xa, ctx.run.dropout)
    n = xa.numel // site.d_in
    # lora_A * lora_E: both parameters (saved, not activations); a new [r, d_in] tensor
    ae = tape.new(r * site.d_in, ADAPTER_DTYPE, True)
    if tape.autocast:  # matmul runs in the autocast dtype: both operands cast (A*E is no leaf: not cached)
        xa, ae = ops.cast(tape, xa, tape.autocast), ops.cast(tape, ae, tape.autocast)
    # x @ (A E)^T, folded to one mm: saves x for (A E)'s gradient, (A E) when x needs one
    if xa.rg:
        tape.save(ae, "adapter extras")
    tape.save(xa, "linear inputs")
    tape.matmul("adapter", n, site.d_in, r, grad_a=xa.rg, grad_b=True)
    down = tape.new(n * r, xa.dtype, True)
    up = ops.linear(tape, down, r, site.d_out, w_trainable=True, w_dtype=ADAPTER_DTYPE, kind="adapter")  # @ lora_B.T
    scaled = tape.new(up.numel, up.dtype, True)  # * scaling (a Python float: saves nothing)
    # / (ranknum + 1e-5): ranknum trains, so div saves the numerator and the divisor
    tape.save(scaled, "adapter extras")
    tape.save(tape.new(1, ADAPTER_DTYPE, True), "adapter extras")
    # its backward: grad / other for the numerator, -grad * ((self / other) / other) summed for ranknum
    tape.transient(DIV_BACKWARD_BUFFERS * scaled.nbytes, backward=True)
    tape.new(up.numel, ops.promote(up.dtype, ADAPTER_DTYPE), True)  # the quotient, added in place
    return base_out.view(rg=True)


def adapted_sites(ctx) -> list[tuple[LinearSite, int]]:
    """(site, how many of it): the adapted block linears in every layer, the adapted head linears once."""
    from ..architectures import get_architecture

    arch = get_architecture(ctx.spec.model_type)
    blocks = [(s, ctx.spec.layers) for s in arch.linear_sites(ctx.spec) if ctx.is_target(s)]
    return blocks + [(s, 1) for s in arch.head_sites(ctx.spec) if ctx.is_target(s)]


def orthogonal_regulariser(ctx) -> None:
    """AdaLoraModel.forward after the loss: for each lora_A [r, d_in] ||A A^T - I||_F, for each lora_B
    [d_out, r] ||B^T B - I||_F. Under autocast the product casts both operands (the parameter's cached
    copy and its transpose's own copy, both saved) and torch.norm runs on an fp32 copy."""
    tape = ctx.tape
    r = ctx.rank
    low = tape.autocast
    for site, count in adapted_sites(ctx):
        for d in (site.d_in, site.d_out):
            for _ in range(count):
                if low:
                    tape.save(tape.new(r * d, low, True), "orthogonal regulariser")
                    tape.save(tape.new(r * d, low, True), "orthogonal regulariser")
                else:
                    tape.mark_saved()  # the parameter and its transpose
                tape.matmul("orthogonal regulariser", r, d, r, grad_a=True, grad_b=True)
                tape.save(tape.new(r * r, "fp32", True), "orthogonal regulariser")  # p p^T - I (norm's input)
                tape.save(tape.new(1, "fp32", True), "orthogonal regulariser")  # the norm (its result)


def loop_state(trainable: list[TensorGroup]) -> tuple[int, int]:
    """RankAllocator: three copies of every lora_A, lora_E, lora_B (not ranknum: its name has no 'lora_'),
    and update_ipt's temporaries, three of the largest such parameter at once."""
    tracked = [g for g in trainable if g.name.rsplit(".", 1)[-1] in ("lora_A", "lora_E", "lora_B")]
    state = STATE_COPIES * sum(g.total_numel * DTYPE_BYTES[g.dtype] for g in tracked)
    largest = max((g.numel * DTYPE_BYTES[g.dtype] for g in tracked), default=0)
    return state, UPDATE_TEMPORARIES * largest


def _per_matrix(sites, head_sites, spec, per_site) -> int:
    return sum(per_site(s) for s in sites) * spec.layers + sum(per_site(s) for s in head_sites)


def notes(spec, sites, head_sites, run) -> tuple[str, ...]:
    r, target = run.r, TARGET_R.value(run)
    held = _per_matrix(sites, head_sites, spec, lambda s: r * (s.d_in + s.d_out + 1) + 1)
    final = _per_matrix(sites, head_sites, spec, lambda s: target * (s.d_in + s.d_out + 1))
    state = _per_matrix(sites, head_sites, spec, lambda s: STATE_COPIES * 4 * r * (s.d_in + s.d_out + 1))
    return (
        f"adalora: every number is for the tensors at the initial rank init_r={r}; peft's rank allocator masks "
        f"singular values (zeroes lora_E entries) towards target_r={target} but never shrinks lora_A, lora_E, "
        f"lora_B, so memory and FLOPs stay those of rank {r} for the whole run",
        f"adalora at the final rank: about {final:,} effective trainable parameters (target_r={target} triplets "
        f"per adapted matrix on average; which matrices keep them depends on the learned importance), of "
        f"{held:,} held (ranknum included: on a GPU peft 0.21 leaves it trainable)",
        f"adalora: this is a budgeting-phase step (rank allocator state {state:,} B alive, updated after "
        f"opt.step()); after total_step - tfinal peft frees that state, so final-phase steps peak that much lower",
    )


def serving(spec, sites, head_sites, run) -> ServingCost:
    """P Lambda Q * s / ranknum folds into W (peft `merge`: get_delta_weight); unmerged, each adapted
    module adds LoRA's two products, the A * E scaling and the division, in fp32."""
    r = run.r
    weight = 4 * _per_matrix(sites, head_sites, spec, lambda s: r * (s.d_in + s.d_out + 1) + 1)
    flops = _per_matrix(sites, head_sites, spec, lambda s: 2 * r * (s.d_in + s.d_out))
    kernels = BRANCH_KERNELS + (1 if run.weight_dtype != "fp32" else 0)
    return ServingCost(mergeable=True, extra_weight_bytes_unmerged=weight, extra_weight_bytes_merged=0,
                       extra_flops_per_token_unmerged=flops, extra_flops_per_token_merged=0,
                       extra_sequential_ops_per_block_unmerged=kernels * len(sites),
                       extra_sequential_ops_per_block_merged=0,
                       note="merged: B (A * E) * s / ranknum folds into W; unmerged: LoRA's two products at the "
                            "initial rank (masked ranks still compute) plus the A * E scaling (r x d_in per call)")


def _is_causal(model) -> bool:
    return getattr(model.config, "model_type", "") not in ("bert", "roberta")


def apply_adalora(model, run: RunConfig, targets, notes_out):
    """Trace hook: peft AdaLoraConfig(init_r, target_r, total_step, lora_dropout, target_modules) with the
    causal-LM task model (its forward adds the orthogonal regulariser); for masked-LM families, for which
    peft has no task model, the AdaLoraModel itself, whose forward is the same."""
    import peft

    from ...trace.adapters import count_adapted, enable_checkpointing, enable_input_grads, fan_in_fan_out, peft_model

    if run.grad_checkpointing:
        enable_checkpointing(model)
    causal = _is_causal(model)
    cfg = peft.AdaLoraConfig(init_r=run.r, target_r=TARGET_R.value(run), total_step=TOTAL_STEP,
                             lora_dropout=run.dropout, target_modules=list(targets),
                             fan_in_fan_out=fan_in_fan_out(model, targets), task_type="CAUSAL_LM" if causal else None)
    model = peft_model(model, cfg)
    # on the meta device peft skips moving the adapters to the base layer's device, which on a GPU
    # re-wraps ranknum in a Parameter that requires grad (see the module docstring): do what the GPU gets
    for name, p in model.named_parameters():
        if ".ranknum." in name:
            p.requires_grad_(True)
    if run.grad_checkpointing:
        enable_input_grads(model)
    notes_out.append("adalora: ranknum made trainable as on a GPU; the rank allocator's update_ipt runs after "
                     "opt.step(); mask_to_budget (data-dependent) is not run")
    if not causal:
        model = model.base_model
    return model, count_adapted(model, "lora_E")


def trace_loop(model, run):
    """Trace hook: the rank allocator's state as a step in the budgeting phase finds it, and its update."""
    import torch

    tuner = model if hasattr(model, "rankallocator") else model.base_model
    alloc = tuner.rankallocator
    state = []
    for name, p in tuner.model.named_parameters():
        if "lora_" in name and alloc.adapter_name in name:
            for table in (alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc):
                table[name] = torch.zeros_like(p)
                state.append(table[name])
    return state, lambda: alloc.update_ipt(tuner.model)


def observed_options(model) -> dict:
    cfg = next(iter(model.peft_config.values()))
    return {"init_r": int(cfg.init_r), "target_r": int(cfg.target_r)}


ADALORA = register_method(Method(
    name="adalora",
    title="AdaLoRA",
    paper="Zhang et al. 2023, arXiv:2303.10512 (ICLR 2023)",
    recipe="peft AdaLoraConfig(init_r, target_r, total_step, target_modules), PeftModelForCausalLM; "
           "update_and_allocate after opt.step(); adapters in fp32",
    default_r=INIT_R.default,
    trainable=adalora_trainable,
    frozen=lambda site, run: [],
    adapted_linear=svd_linear,
    options=(INIT_R, TARGET_R),
    resolve=resolve,
    rank_affine=False,  # the regulariser's r x r products
    after_loss=orthogonal_regulariser,
    loop_state=loop_state,
    notes=notes,
    serving=serving,
    apply_to_model=apply_adalora,
    trace_loop=trace_loop,
    recognise=lambda model, peft_config: type(peft_config).__name__ == "AdaLoraConfig",
    observed_options=observed_options,
))
