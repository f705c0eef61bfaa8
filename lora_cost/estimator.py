"""Compose an architecture, a method and a run into an `Estimate` of one training step.

The step modelled is the reference recipe of transformers + peft (+ bitsandbytes for QLoRA):
`loss = model(input_ids, labels=input_ids).loss; loss.backward(); opt.step();
opt.zero_grad(set_to_none=True)`, in steady state (optimizer state allocated, gradients freed
between steps). Memory is PyTorch's *allocated* memory on a CUDA device.

How the peak is found. The architecture's forward runs on the symbolic tape (`tape.py`), which
gives the bytes autograd keeps per scope (embeddings, each block, head, loss). Then the moments
where allocated memory can peak are evaluated:
  forward  - at the loss: everything saved, the logits, and their fp32 copy (causal-LM loss);
  backward - at the loss gradient: the log-softmax backward holds its incoming and outgoing
             [n, vocab] gradients on top of everything saved (the usual peak); and at the top and
             bottom block, where saved activations have been partly freed and parameter gradients
             partly accumulated (with checkpointing, one block's recomputed activations are alive);
  optimizer - gradients plus the optimizer's temporaries (foreach AdamW: one state-sized buffer).
The logits stay alive through backward and the optimizer step (the step's output object holds them).
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

from .architectures import get_architecture
from .architectures.base import Architecture
from .errors import LoraCostError
from .methods import get_method
from .methods.base import Method, TensorGroup
from .methods.qlora import bits_per_weight, nf4_bytes
from .optimizers import get_optimizer
from .profiles import load_gpu, load_model
from .results import Estimate, FlopEstimate, GpuFit, MemoryEstimate, PhasePeak, Term
from .record import SCOPES, StepRecord, affine_record
from .spec import LinearSite, ModelSpec, RunConfig
from .units import DTYPE_BYTES, fmt_bytes

# The caching allocator reserves more than it hands out: segments are rounded to 2 MiB (20 MiB for
# requests of 1-10 MiB) and freed blocks stay cached for reuse, so fragments pile up. On the H100
# calibration set the reserved peak exceeded the allocated peak by a median 10% (3% to 51%).
ALLOCATOR_SLACK = 0.10
# The CUDA context (driver state, kernels, cuBLAS workspaces) is outside torch's counters: 0.73 to
# 0.76 GiB on the calibration H100 (device used minus reserved, torch 2.11).
CUDA_CONTEXT_BYTES = 3 * (1 << 28)  # 0.75 GiB
# Sustained fraction of peak tensor throughput assumed for a step-time estimate (typical training MFU).
DEFAULT_UTILISATION = 0.4
ALL_LINEAR = "all-linear"


# ---------------------------------------------------------------------------------------------
def resolve_targets(arch: Architecture, spec: ModelSpec, method: Method, targets) -> tuple[tuple[str, ...], list[LinearSite], list[LinearSite]]:
    """The target names, the per-block sites they adapt and the head sites they adapt."""
    names, sites, head = _resolve_targets(arch, spec, method.base_trainable, tuple(targets) if targets is not None else None)
    return names, list(sites), list(head)


@lru_cache(maxsize=4096)
def _resolve_targets(arch: Architecture, spec: ModelSpec, base_trainable: bool, targets):
    block_sites = arch.linear_sites(spec)
    head_sites = arch.head_sites(spec)
    names = {s.name for s in block_sites} | {s.name for s in head_sites}
    if base_trainable:
        return (), (), ()
    if targets is None:
        wanted = tuple(arch.default_targets)
    elif tuple(targets) == (ALL_LINEAR,):
        wanted = tuple(dict.fromkeys(s.name for s in (*block_sites, *head_sites)))
    else:
        wanted = tuple(t.strip() for t in targets if t.strip())
        if not wanted:
            raise LoraCostError("--targets is empty")
        for t in wanted:
            if t not in names:
                raise LoraCostError(f"target module {t!r} matches nothing in {spec.name}; its linear modules are "
                                    f"{', '.join(sorted(names))} (or use all-linear)")
    chosen = set(wanted)
    return wanted, tuple(s for s in block_sites if s.name in chosen), tuple(s for s in head_sites if s.name in chosen)


def _check_options(method: Method, run: RunConfig) -> None:
    for key, _ in run.method_options:
        if key not in method.options:
            flag = {"k": "--nola-k", "l": "--nola-l", "quant_type": "--quant-type", "double_quant": "--double-quant"}.get(key, key)
            raise LoraCostError(f"{flag} does not apply to method {method.name}")


@lru_cache(maxsize=4096)
def _forward_key(run: RunConfig) -> RunConfig:
    """The run as far as the forward simulation is concerned: rank 1 (the record is affine in r)
    and no optimizer."""
    return replace(run, r=1 if run.r is not None else None, optimizer="adamw")


@lru_cache(maxsize=512)
def _param_groups(arch: Architecture, spec: ModelSpec):
    return tuple(arch.params(spec))


@lru_cache(maxsize=2048)
def _base_weight_bytes(arch: Architecture, spec: ModelSpec, quantized: bool, dtype: str, double_quant: bool) -> int:
    """The pretrained weights as stored: one dtype, or under QLoRA NF4 block linears and the rest in
    fp32 (prepare_model_for_kbit_training casts every non-quantised parameter)."""
    total = 0.0
    for g in _param_groups(arch, spec):
        if quantized and g.kind == "linear":
            total += g.count * nf4_bytes(g.numel, double_quant=double_quant)
        elif quantized:
            total += g.total * 4
        else:
            total += g.total * DTYPE_BYTES[dtype]
    return int(total)


def _groups_bytes(groups: list[TensorGroup]) -> int:
    return sum(g.total_numel * DTYPE_BYTES[g.dtype] for g in groups)


def estimate(model: str | ModelSpec, method: str = "lora", *, r: int | None = None, targets=None, batch: int = 1,
             seq: int = 512, precision: str = "bf16", optimizer: str = "adamw", grad_checkpointing: bool = False,
             attention: str = "sdpa", dropout: float = 0.0, model_dropout: float | None = None,
             method_options: dict | None = None, gpu: str | None = None,
             utilisation: float = DEFAULT_UTILISATION) -> Estimate:
    """Estimate memory and FLOPs of one training step. Raises LoraCostError on bad input."""
    spec = model if isinstance(model, ModelSpec) else load_model(model)
    if isinstance(targets, str):
        targets = tuple(t for t in targets.split(","))
    run = RunConfig(method=method, r=r, targets=tuple(targets) if targets is not None else None, batch=batch, seq=seq,
                    precision=precision, optimizer=optimizer, grad_checkpointing=grad_checkpointing,
                    attention=attention, dropout=dropout, model_dropout=model_dropout,
                    method_options=tuple(sorted((method_options or {}).items())))
    return estimate_run(spec, run, gpu=gpu, utilisation=utilisation)


def estimate_run(spec: ModelSpec, run: RunConfig, *, gpu: str | None = None,
                 utilisation: float = DEFAULT_UTILISATION) -> Estimate:
    method = get_method(run.method)
    arch = get_architecture(spec.model_type)
    opt = get_optimizer(run.optimizer)
    _check_options(method, run)
    if method.base_trainable:
        if run.r is not None:
            raise LoraCostError("--r does not apply to full fine-tuning")
        if run.dropout:
            raise LoraCostError("--dropout (adapter dropout) does not apply to full fine-tuning")
    if run.method != method.name or (not method.base_trainable and run.r is None):
        run = replace(run, method=method.name, r=None if method.base_trainable else method.rank(run))
    target_names, sites, head_sites = resolve_targets(arch, spec, method, run.targets)
    adapted = sites + head_sites
    method.validate(spec, adapted, run)
    warnings = []
    if run.seq > spec.max_positions:
        warnings.append(f"sequence length {run.seq} exceeds the model's maximum of {spec.max_positions} positions")

    weight_dtype = run.weight_dtype
    # the forward does not depend on the optimizer, and depends on the rank affinely (record.py)
    rec = affine_record(spec, _forward_key(run), frozenset(target_names)).at(run.r)

    L = spec.layers
    reps = {"layer0": 1, "layer1": L - 1}  # block 1 stands for blocks 1..L-1

    # ---- parameters ------------------------------------------------------------------------
    param_groups = _param_groups(arch, spec)
    total_params = sum(g.total for g in param_groups)
    base_weight_bytes = _base_weight_bytes(arch, spec, method.quantized_base, weight_dtype,
                                           bool(method.option(run, "double_quant")))

    if method.base_trainable:
        trainable_groups = [TensorGroup(g.name, g.numel, g.count, weight_dtype) for g in param_groups]
        # groups named "...*..." repeat in every block (count is a multiple of L)
        per_layer_trainable = sum(g.total // L for g in param_groups if "*" in g.name) * DTYPE_BYTES[weight_dtype]
        frozen_groups: list[TensorGroup] = []
    else:
        trainable_groups, frozen_groups = [], []
        for s in sites:
            trainable_groups += [TensorGroup(g.name, g.numel, L, g.dtype) for g in method.trainable(s, run)]
            frozen_groups += [TensorGroup(g.name, g.numel, L, g.dtype) for g in method.frozen(s, run)]
        for s in head_sites:
            trainable_groups += method.trainable(s, run)
            frozen_groups += method.frozen(s, run)
        if adapted:
            frozen_groups += method.shared_frozen(adapted, run)
        per_layer_trainable = _groups_bytes(trainable_groups[: len(trainable_groups) - sum(len(method.trainable(s, run)) for s in head_sites)]) // max(L, 1)
    trainable_params = sum(g.total_numel for g in trainable_groups)
    trainable_bytes = _groups_bytes(trainable_groups)
    adapter_trainable_bytes = 0 if method.base_trainable else trainable_bytes
    frozen_adapter_bytes = _groups_bytes(frozen_groups)
    gradient_bytes = trainable_bytes
    state_bytes = sum(opt.state_bytes(g) for g in trainable_groups)
    opt_alloc = 0 if opt.paged else state_bytes
    opt_paged = state_bytes if opt.paged else 0
    opt_temp = opt.step_temporaries(trainable_groups)
    frozen_base_bytes = 0 if method.base_trainable else base_weight_bytes
    weights_total = base_weight_bytes + adapter_trainable_bytes + frozen_adapter_bytes
    steady = weights_total + opt_alloc

    # ---- saved activations -----------------------------------------------------------------
    saved_scope = {s: rec.saved.get(s, 0) for s in SCOPES}
    body = [saved_scope["layer0"]] + [saved_scope["layer1"]] * (L - 1)
    if run.grad_checkpointing:
        inputs = rec.layer_input_bytes
        kept = [inputs[0] + rec.checkpoint_extra_bytes] + [inputs[-1]] * (L - 1)
    else:
        kept = body
    S_emb, S_head, S_loss = saved_scope["embeddings"], saved_scope["head"], saved_scope["loss"]
    saved_total = S_emb + sum(kept) + S_head + S_loss
    logits = rec.logits_bytes
    ls = rec.log_softmax_bytes

    # ---- peaks -----------------------------------------------------------------------------
    def trans(scope: str, backward: bool = False) -> int:
        table = rec.backward_transient if backward else rec.forward_transient
        return table.get(scope, 0)

    layer_scopes = ["layer0", "layer1"][: min(L, 2)]
    fwd_transient = max([trans(s) for s in ("embeddings", *layer_scopes, "head")] + [0])
    fwd_candidates = [
        (steady + saved_total + logits + rec.loss_copy_bytes, "computing the loss (logits and their fp32 copy alive)",
         [("saved_activations", saved_total), ("logits", logits), ("logits_fp32_copy", rec.loss_copy_bytes)]),
        (steady + S_emb + sum(kept) + fwd_transient, "inside a block (largest short-lived buffer)",
         [("saved_activations", S_emb + sum(kept)), ("transient_buffers", fwd_transient)]),
    ]
    G_total = gradient_bytes
    G_layers = per_layer_trainable * L if sites or method.base_trainable else 0
    G_head = max(G_total - G_layers, 0)
    residual = rec.layer_input_bytes[-1] if rec.layer_input_bytes else 0

    def layer_backward(i: int) -> tuple[int, list]:
        scope = layer_scopes[min(i, len(layer_scopes) - 1)]
        remaining_saved = S_emb + sum(kept[: i + 1])
        recompute = body[i] if run.grad_checkpointing else 0
        grads_so_far = G_head + per_layer_trainable * (L - i) if (sites or method.base_trainable) else G_head
        # activation gradients inside the block: an incoming and an outgoing gradient of the widest
        # activation, and the residual stream's gradient in and out. (A product's backward briefly holds
        # three of the widest, but with 3 the checkpointed 7B rows of the H100 calibration, where this
        # moment decides the peak, are overestimated by 0.3-2.9%; with 2 they are within 1.7%.)
        grad_buffers = 2 * rec.largest.get(scope, 0) + 2 * residual + trans(scope, backward=True)
        terms = [("saved_activations", remaining_saved), ("recomputed_activations", recompute),
                 ("gradients", grads_so_far), ("logits", logits), ("activation_gradient_buffers", grad_buffers)]
        return steady + sum(v for _, v in terms), terms

    bwd_candidates = [
        (steady + saved_total + logits + 2 * ls, "start of backward: log-softmax gradient in and out",
         [("saved_activations", saved_total), ("logits", logits), ("loss_gradient_buffers", 2 * ls)]),
    ]
    for i, where in ((L - 1, "backward through the last block"), (0, "backward through the first block")):
        total, terms = layer_backward(i)
        bwd_candidates.append((total, where, terms))
    bwd_candidates.append((steady + G_total + logits, "end of backward", [("gradients", G_total), ("logits", logits)]))
    opt_candidates = [(steady + G_total + logits + opt_temp, "optimizer step",
                       [("gradients", G_total), ("logits", logits), ("optimizer_temporaries", opt_temp)])]

    def steady_terms() -> list[tuple[str, int]]:
        return [("weights", frozen_base_bytes + frozen_adapter_bytes), ("trainable_weights", trainable_bytes),
                ("optimizer_state", opt_alloc)]

    phases = []
    for phase, cands in (("forward", fwd_candidates), ("backward", bwd_candidates), ("optimizer", opt_candidates)):
        total, where, extra = max(cands, key=lambda c: c[0])
        terms = tuple(Term(name, int(v), "", "") for name, v in steady_terms() + extra if v)
        phases.append(PhasePeak(phase, int(total), where, terms))
    peak = max(phases, key=lambda p: p.peak_bytes)
    device = int(peak.peak_bytes * (1 + ALLOCATOR_SLACK)) + CUDA_CONTEXT_BYTES + opt_paged

    # ---- FLOPs -----------------------------------------------------------------------------
    def scaled_flops(phase: str) -> int:
        return sum(rec.flops.get((s, phase), 0) * reps.get(s, 1) for s in SCOPES)

    fwd = scaled_flops("fwd")
    bwd = scaled_flops("bwd")
    # Non-reentrant checkpointing reruns each block's forward inside backward, stopping as soon as
    # the last tensor the block saves has been recomputed (torch.utils.checkpoint early stop), so
    # the block's trailing kernels (usually the last projection's matmul) are not rerun.
    layer_fwd = sum((rec.flops.get((s, "fwd"), 0) - rec.flops_after_last_save.get(s, 0)) * reps[s] for s in layer_scopes)
    uncounted = sum(v * reps.get(s, 1) for s, v in rec.uncounted.items())
    uncounted_bwd = 0
    if run.grad_checkpointing:
        bwd += layer_fwd
        uncounted_bwd = sum((rec.uncounted.get(s, 0) - rec.uncounted_after_last_save.get(s, 0)) * reps[s] for s in layer_scopes)

    # ---- explanation -----------------------------------------------------------------------
    memory_terms = _memory_terms(spec, run, method, opt, base_weight_bytes, frozen_base_bytes, trainable_bytes,
                                 trainable_params, frozen_adapter_bytes, state_bytes, opt_temp, saved_total, logits,
                                 ls, rec.loss_copy_bytes, weight_dtype)
    saved_by_kind: dict[str, int] = {}
    for (scope, kind), v in rec.saved_by_kind.items():
        if run.grad_checkpointing and scope.startswith("layer"):
            continue
        saved_by_kind[kind] = saved_by_kind.get(kind, 0) + v * reps.get(scope, 1)
    if run.grad_checkpointing:
        saved_by_kind["checkpointed block inputs"] = sum(kept)
    kinds = tuple(Term(k, int(v), "", "") for k, v in sorted(saved_by_kind.items(), key=lambda kv: -kv[1]))

    memory = MemoryEstimate(
        peak_bytes=peak.peak_bytes, peak_phase=peak.phase,
        components=tuple(Term(t.name, t.value, *_describe(t.name)) for t in peak.terms),
        phases=tuple(phases), device_bytes=device, steady_bytes=int(steady), saved_activation_bytes=int(saved_total),
        saved_by_kind=kinds, terms=memory_terms)
    flop_terms = _flop_terms(rec, reps, run, layer_fwd)
    flops = FlopEstimate(forward=int(fwd), backward=int(bwd), forward_uncounted=int(uncounted),
                         backward_uncounted=int(uncounted_bwd), terms=flop_terms)

    gpu_fit = None
    if gpu is not None:
        g = load_gpu(gpu)
        tflops = g.fp32_tflops if run.precision == "fp32" else g.bf16_tflops_dense
        gpu_fit = GpuFit(gpu=g.name, memory_bytes=g.memory_bytes, fits=device <= g.memory_bytes,
                         headroom_bytes=g.memory_bytes - device,
                         step_time_s=(fwd + bwd) / (tflops * 1e12 * utilisation), utilisation=utilisation)
    assumptions = (
        "reference recipe: transformers + peft (+ bitsandbytes for QLoRA) on a CUDA GPU, loss = model(ids, labels=ids).loss",
        f"attention: {run.attention} ({'kernel chosen as torch does on sm80+: flash for 16-bit, memory-efficient for fp32, math for fp32 grouped-query' if run.attention == 'sdpa' else 'transformers eager path'})",
        f"device memory = peak x {1 + ALLOCATOR_SLACK:.2f} (caching-allocator slack) + {fmt_bytes(CUDA_CONTEXT_BYTES)} CUDA context" + (" + paged optimizer state" if opt.paged else ""),
    )
    return Estimate(
        model=spec.name, family=spec.model_type, method=method.name, r=run.r if not method.base_trainable else None,
        targets=target_names, batch=run.batch, seq=run.seq, precision=run.precision, optimizer=opt.name,
        grad_checkpointing=run.grad_checkpointing, attention=run.attention, dropout=run.dropout,
        method_options={k: method.option(run, k) for k in method.options}, trainable_params=int(trainable_params),
        total_params=int(total_params), adapted_modules=len(sites) * L + len(head_sites), memory=memory, flops=flops,
        gpu=gpu_fit, warnings=tuple(warnings), assumptions=assumptions)


# key -> (label, formula, what it is); the keys are the JSON names of memory.components
COMPONENTS = {
    "weights": ("frozen weights", "base weights (+ frozen adapter tensors) x storage dtype",
                "parameters that do not train; under QLoRA NF4 linears plus fp32 embeddings, norms and head"),
    "trainable_weights": ("trainable weights", "trainable elements x dtype bytes", "the parameters the optimizer updates"),
    "optimizer_state": ("optimizer state", "AdamW 2 x, SGD 1 x trainable bytes; 8-bit: 2 B + 8 B/256 per element",
                        "optimizer buffers in torch's allocator (paged states are outside it)"),
    "saved_activations": ("saved activations", "sum over ops of the tensors autograd keeps",
                          "what backward needs, kept from forward (those not yet freed at this moment)"),
    "logits": ("logits", "batch x seq x vocab x dtype", "the LM head output, alive until the step ends"),
    "logits_fp32_copy": ("logits fp32 copy", "batch x seq x vocab x 4", "transformers' causal-LM loss calls logits.float()"),
    "loss_gradient_buffers": ("loss gradient buffers", "2 x batch x seq x vocab x log-softmax dtype",
                              "log-softmax backward holds its incoming and outgoing gradient"),
    "gradients": ("gradients", "trainable elements x dtype bytes", "parameter gradients accumulated so far"),
    "recomputed_activations": ("recomputed block activations", "one block's saved tensors",
                               "gradient checkpointing reruns the block inside backward"),
    "activation_gradient_buffers": ("activation gradients", "2 x widest block activation + 2 x residual stream",
                                    "gradients flowing through the block being differentiated"),
    "transient_buffers": ("transient buffers", "largest short-lived buffer of one op",
                          "dequantised 4-bit weight, DoRA's weight-norm inputs, NoLA's bases, attention mask"),
    "optimizer_temporaries": ("optimizer temporaries", "foreach AdamW: one state-sized buffer per dtype group",
                              "torch._foreach_sqrt(exp_avg_sq) for all tensors at once"),
}


def _describe(key: str) -> tuple[str, str]:
    _, formula, explanation = COMPONENTS[key]
    return formula, explanation


def _memory_terms(spec, run, method, opt, base_weight_bytes, frozen_base_bytes, trainable_bytes, trainable_params,
                  frozen_adapter_bytes, state_bytes, opt_temp, saved_total, logits, ls, loss_copy, weight_dtype) -> tuple[Term, ...]:
    n, V = run.tokens, spec.vocab
    if method.quantized_base:
        weights_formula = (f"linear weights in NF4 ({bits_per_weight(bool(method.option(run, 'double_quant'))):.3f} bits each, blocksize 64) "
                           "+ embeddings, norms, biases, LM head in fp32")
    else:
        weights_formula = f"{sum(g.total for g in _param_groups(get_architecture(spec.model_type), spec)):,} parameters x {DTYPE_BYTES[weight_dtype]} B ({weight_dtype})"
    terms = [
        Term("base weights", base_weight_bytes, weights_formula, "the pretrained model as stored during training"),
        Term("trainable weights", trainable_bytes, f"{trainable_params:,} trainable parameters x their dtype",
             "full fine-tuning: all weights; adapters: fp32 (peft autocast_adapter_dtype)"),
        Term("frozen adapter tensors", frozen_adapter_bytes, "frozen A (LoRA-FA), shared projections (VeRA), initial factors (NoLA)",
             "adapter tensors that do not train"),
        Term("gradients", trainable_bytes, "one gradient per trainable tensor, same dtype", "allocated in backward, freed by zero_grad(set_to_none=True)"),
        Term("optimizer state", state_bytes, opt.description, "outside torch's allocator (paged)" if opt.paged else "allocated on the GPU"),
        Term("optimizer temporaries", opt_temp, "foreach AdamW sqrt(exp_avg_sq) buffer" if opt_temp else "in-place update",
             "alive during opt.step()"),
        Term("saved activations", saved_total, "per-op autograd rules over one forward pass" + (" (checkpointed: block inputs only)" if run.grad_checkpointing else ""),
             "tensors kept for backward, as saved_tensors_hooks count them"),
        Term("logits", logits, f"{n:,} tokens x {V:,} vocab x dtype", "the LM head output"),
        Term("logits fp32 copy", loss_copy, "logits.float() in the causal-LM loss", "short-lived during the loss"),
        Term("loss gradient buffers", 2 * ls, f"2 x {n:,} x {V:,} x {ls // max(n * V, 1)} B", "log-softmax backward"),
    ]
    return tuple(terms)


def _flop_terms(rec: StepRecord, reps: dict, run: RunConfig, layer_fwd: int) -> tuple[Term, ...]:
    by_kind: dict[tuple[str, str], int] = {}
    for (scope, kind, phase), v in rec.flops_by_kind.items():
        by_kind[(kind, phase)] = by_kind.get((kind, phase), 0) + v * reps.get(scope, 1)
    explain = {
        "base": "frozen/trainable base linears: 2*n*d_in*d_out forward; backward 2*n*d_in*d_out per needed gradient",
        "adapter": "adapter matmuls (A, B, bases)",
        "attention": "sdpa: 4*b*h*s^2*hd forward, 10*b*h*s^2*hd backward (fused kernels recompute scores)",
        "lm_head": "2*n*d*vocab forward; input gradient (and weight gradient when it trains)",
    }
    terms = [Term(f"{kind} {phase}", int(v), explain.get(kind, ""), "")
             for (kind, phase), v in sorted(by_kind.items()) if v]
    if run.grad_checkpointing:
        terms.append(Term("recomputation bwd", int(layer_fwd), "forward of every block again", "gradient checkpointing"))
    return tuple(terms)
