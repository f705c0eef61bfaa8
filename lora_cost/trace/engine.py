"""`trace(...)`: validate like the analytic engine, build, run the step, summarise (imports torch)."""

from __future__ import annotations

import os

import resource
import time
import warnings
from dataclasses import replace

from ..analytic.device import device_memory
from ..attention_kernels import is_fused
from ..analytic.estimator import validated_run
from ..analytic.optimizers import get_optimizer
from ..errors import LoraCostError
from ..profiles import load_model
from ..spec import ModelSpec, RunConfig
from ..results import MemoryCategory
from ..analytic.allocator.workspaces import WORKSPACE_MODE  # noqa: F401 (benchmarks read it here too)
from .replay import replay_step
from .results import Category, ModuleSaved, OpBytes, OpFlops, Peak, TraceResult




def plan(model, method: str, **kwargs):
    """The analytic engine's own validation and target resolution (same flags, same errors)."""
    spec = model if isinstance(model, ModelSpec) else load_model(model)
    targets = kwargs.pop("targets", None)
    if isinstance(targets, str):
        targets = tuple(targets.split(","))
    options = kwargs.pop("method_options", None) or {}
    run = RunConfig(method=method, targets=tuple(targets) if targets is not None else None,
                    method_options=tuple(sorted(options.items())), **kwargs)
    run, m, names, sites, head_sites = validated_run(spec, run)
    run = replace(run, optimizer=get_optimizer(run.optimizer).name)
    return spec, run, m, names


def trace(model, method: str = "lora", *, r=None, targets=None, batch: int = 1, seq: int = 512, precision: str = "bf16",
          optimizer: str = "adamw", grad_checkpointing: bool = False, attention: str = "sdpa", dropout: float = 0.0,
          model_dropout=None, method_options=None, gpu=None, utilisation=None, calibration: bool = False,
          target_seq: int | None = None, moe_imbalance=None, task=None, num_labels=None,
          packing: bool = False, alloc_conf=None, paged_evictable: bool = False, sharding=None,
          master_weights: str | None = None, optimizer_in_backward: bool = False,
          loss: str = "standard", adapter_dtype: str | None = None, modules_to_save=None,
          liger_kernels=None) -> TraceResult:
    """Trace one training step of `model` on fake tensors. Raises LoraCostError on bad input.

    `calibration=True` reproduces the calibration's measuring setup (see step.run_step); leave it
    off to describe an ordinary training step."""
    from .deps import require

    if liger_kernels is not None:  # ligerkernels: the fused loss among them is --loss liger
        from ..analytic.liger import resolve
        liger_kernels, loss = resolve(liger_kernels, loss)
    if isinstance(model, str):
        from ..profiles import analytic_knows, find_config
        name, cfg, _ = find_config(model)
        if not analytic_knows(cfg) and sharding is not None:
            raise LoraCostError(f"--gpus with the trace engine needs a family the analytic engine knows; {name} is "
                                f"model_type {cfg.get('model_type')!r}")
        if not analytic_knows(cfg):  # the real model is the only description (anymodel.py)
            if packing:
                raise LoraCostError(f"--packing is modelled for the analytic engine's families only; {name} is "
                                    f"model_type {cfg.get('model_type')!r}")
            if loss != "standard" or adapter_dtype is not None or modules_to_save or liger_kernels:
                from ..errors import LoraCostError
                raise LoraCostError("--loss, --adapter-dtype and Liger's kernels are modelled for the families the "
                                    "analytic engine knows")
            from .anymodel import trace_any
            return trace_any(name, cfg, method, r=r, targets=targets, batch=batch, seq=seq, precision=precision,
                             optimizer=optimizer, grad_checkpointing=grad_checkpointing, attention=attention,
                             dropout=dropout, model_dropout=model_dropout, method_options=method_options,
                             task=task, num_labels=num_labels, calibration=calibration, alloc_conf=alloc_conf,
                             paged_evictable=paged_evictable, master_weights=master_weights,
                             optimizer_in_backward=optimizer_in_backward)
    spec, run, m, names = plan(model, method, r=r, targets=targets, batch=batch, seq=seq, precision=precision,
                               optimizer=optimizer, grad_checkpointing=grad_checkpointing, attention=attention,
                               dropout=dropout, model_dropout=model_dropout, method_options=method_options,
                               target_seq=target_seq, moe_imbalance=moe_imbalance, task=task, num_labels=num_labels,
                               packing=packing, alloc_conf=alloc_conf, paged_evictable=paged_evictable,
                               sharding=sharding, master_weights=master_weights,
                               optimizer_in_backward=optimizer_in_backward,
                               loss=loss, adapter_dtype=adapter_dtype,
                               modules_to_save=tuple(modules_to_save.split(",")) if isinstance(modules_to_save, str)
                               else modules_to_save, liger_kernels=liger_kernels or ())
    require()
    import torch  # noqa: F401
    from .build import build, raw_config
    from .liger import liger_swaps
    from .step import run_step

    import transformers

    t0 = time.perf_counter()
    cfg = raw_config(model if isinstance(model, str) else spec.name)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            def traced(refresh: bool = False):
                """(the built model, the step's record) on a model of its own (a fresh fake mode and optimizer)."""
                built = build(spec, cfg, run, m, names)
                if run.loss != "standard":  # lossdtype: the loss replaces the CausalLM forward's tail
                    from .losses import install_loss
                    install_loss(built.model, run)
                with liger_swaps(built, spec, run):  # ligerkernels: Liger's RMSNorm, RoPE, SwiGLU (liger.py)
                    rec, _ = run_step(built.model, run, run.optimizer, spec.vocab, calibration=calibration,
                                      loop=m.trace_loop, refresh=refresh)
                return built, rec

            built, rec = traced()
            if run.loss != "standard" or run.adapter_dtype not in (None, "fp32"):
                from ..analytic.losses import notes as lossdtype_notes
                built.notes.extend(lossdtype_notes(spec, run))
            total_params = sum(p.numel() for p in built.model.parameters())
            trainable_params = sum(p.numel() for p in built.model.parameters() if p.requires_grad)
            refresh = None
            if get_optimizer(run.optimizer).refresh_every and run.sharding is None:
                # task "galore": the refresh step traced as well
                _, refreshed = traced(refresh=True)
                refresh = max((refreshed.sim.peaks[phase][0], phase) for phase in ("forward", "backward", "optimizer"))
    finally:
        transformers.logging.set_verbosity(verbosity)
    elapsed = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = summarise(spec, run, m, names, built, rec, total_params, trainable_params, elapsed, rss, gpu=gpu)
    if refresh is None:
        return result
    from ..analytic.svd import SVD_WARNING
    return replace(result, refresh_peak_bytes=int(refresh[0]), refresh_peak_phase=refresh[1],
                   warnings=result.warnings + (f"{run.optimizer}: the projector refresh step (the first, then every "
                                               f"{get_optimizer(run.optimizer).refresh_every}) traced as a second step: "
                                               f"refresh_peak_bytes; {SVD_WARNING}",))


def _category(blk, rec) -> MemoryCategory:
    if blk.kind is not None:  # parameters and optimizer state, named when the step adopted them
        return MemoryCategory(blk.kind)
    if blk.phase == "warmup":
        return MemoryCategory.EARLIER_STEPS
    if id(blk) in rec.grad_blocks:
        return MemoryCategory.GRADIENTS
    if blk.saved:
        return MemoryCategory.SAVED_ACTIVATIONS
    if blk.recompute:
        return MemoryCategory.RECOMPUTED_ACTIVATIONS
    return MemoryCategory.TEMPORARIES


def summarise(spec, run, m, names, built, rec, total_params, trainable_params, elapsed, rss, gpu=None) -> TraceResult:
    sim = rec.sim
    phases = []
    for phase in ("forward", "backward", "optimizer"):
        peak_bytes, event, op, module = sim.peaks[phase]
        alive = sim.alive_at(event)
        cats: dict[MemoryCategory, int] = {}
        temps = []
        for b in alive:
            c = _category(b, rec)
            cats[c] = cats.get(c, 0) + b.size
            if c is MemoryCategory.TEMPORARIES:
                temps.append((b.op, b.module, b.size))
        temps.sort(key=lambda t: -t[2])
        phases.append(Peak(phase, int(peak_bytes), op, module,
                           tuple(Category(k, cats[k]) for k in MemoryCategory if cats.get(k)), tuple(temps[:5])))
    top = max(phases, key=lambda p: p.peak_bytes)
    steady = sim.starts["forward"]  # allocated when the measured step starts
    saved = sum(b.raw for b in sim.saved_blocks)
    by_module: dict[str, list[int]] = {}
    for mod, (nbytes, count) in sim.saved_module.items():
        key = _pattern(mod)
        e = by_module.setdefault(key, [0, 0])
        e[0] += nbytes
        e[1] += count
    saved_by_module = tuple(ModuleSaved(k, v[0], v[1]) for k, v in sorted(by_module.items(), key=lambda kv: -kv[1][0]))
    saved_by_op: dict[str, int] = {}
    for b in sim.saved_blocks:
        saved_by_op[b.op] = saved_by_op.get(b.op, 0) + b.raw
    fwd, bwd = sum(rec.flops_fwd.values()), sum(rec.flops_bwd.values())
    uncounted_fwd = rec.flops_fwd.get("gemm_4bit", 0) + rec.flops_fwd.get("int8_linear_matmul", 0)
    uncounted_bwd = rec.flops_bwd.get("gemm_4bit", 0) + rec.flops_bwd.get("int8_linear_matmul", 0)
    ops = tuple(OpFlops(k, "forward", v) for k, v in sorted(rec.flops_fwd.items())) + \
        tuple(OpFlops(k, "backward", v) for k, v in sorted(rec.flops_bwd.items()))
    zero = tuple(sorted(op for op in sim.ops_seen if op not in rec.counted_ops))
    kernel = "eager" if run.attention == "eager" else "+".join(sorted(rec.backends)) or "none"
    notes = list(built.notes)
    if is_fused(run.attention):
        notes.append(f"attention: {run.attention}, run by transformers' own integration code down to the kernel "
                     "call; the kernel is a stand-in (trace/kernels.py) saving what the library's autograd Function "
                     "saves (flash-attn and compiled flex cannot run on a CPU)")
    else:
        notes.append(f"attention: {kernel} (the kernel an sm80+ GPU picks for these tensors; sdpa and dropout are "
                     "redirected from their CPU kernels to the CUDA ops, whose meta kernels give the saved shapes)")
    notes.append("not simulated: cuDNN attention and other kernels a library selects only on a real GPU, "
                 "torch.compile, cuBLAS workspaces; CPU-side tensors of the real run (AdamW step counters) are "
                 "excluded")
    from ..analytic.allocator import parse_alloc_conf
    from ..analytic.allocator.workspaces import cublas_workspace_bytes
    from ..analytic.cuda_context import context_for
    capability, capacity = (9, 0), None
    if gpu is not None:  # replay against what the allocator may reserve there: the GPU less its context
        from ..profiles import load_gpu
        profile = load_gpu(gpu)
        capability = profile.compute_capability or capability
        capacity = max(profile.memory_bytes - context_for(profile.name, spec.model_type).bytes
                       - (0 if run.paged_evictable else rec.paged_bytes), 0)
    # sized for the GPU's compute capability (sm90, the calibration's, without --gpu), or CUBLAS_WORKSPACE_CONFIG
    reserved = replay_step(sim, parse_alloc_conf(run.alloc_conf),
                           workspace=cublas_workspace_bytes(capability, os.environ.get("CUBLAS_WORKSPACE_CONFIG")),
                           workspace_mode=WORKSPACE_MODE, capacity_bytes=capacity)
    oom = reserved.out_of_memory
    if oom:  # the sequence stopped at the failing request: its numbers come from the unbounded replay
        reserved = replay_step(sim, parse_alloc_conf(run.alloc_conf),
                               workspace=cublas_workspace_bytes(capability, os.environ.get("CUBLAS_WORKSPACE_CONFIG")),
                               workspace_mode=WORKSPACE_MODE)
    notes.append("reserved memory: the step's allocations and frees replayed through a model of PyTorch's caching "
                 f"allocator (lora_cost/analytic/allocator), {'settings ' + run.alloc_conf if run.alloc_conf else 'default settings'}, "
                 "one stream, cache warm, cuBLAS workspaces included")
    if run.autocast_dtype:
        notes.append("autocast: CUDA's op lists emulated at the function level (lora_cost/trace/autocast.py); ops "
                     "called inside other ops' C++ implementations are cast as their caller was")
    warnings = []
    if oom:
        warnings.append(f"the allocator replay runs out of memory on {gpu}: a request finds no room even after the "
                        "cache is emptied (CUDA out of memory)")
    elif reserved.alloc_retries:
        warnings.append(f"on {gpu} the step fits only because the allocator empties its cache and retries "
                        f"({reserved.alloc_retries} allocation retries: cudaFree of cached segments, a slow step)")
    if run.seq > spec.max_positions:
        warnings.append(f"sequence length {run.seq} exceeds the model's maximum of {spec.max_positions} positions")
    dev = device_memory(reserved.reserved_peak_bytes, peak_bytes=top.peak_bytes, family=spec.model_type, gpu=gpu,
                        paged_bytes=rec.paged_bytes, paged_evictable=run.paged_evictable, replayed=True,
                        fragmentation_bytes=reserved.fragmentation_at_peak_bytes,
                        libraries=("bitsandbytes",) if m.name in ("qlora", "lora-8bit") or rec.paged_bytes or "8bit" in run.optimizer else ())
    device = dev.device_bytes
    if rec.paged_bytes:
        notes.append(f"bitsandbytes {run.optimizer}: a stand-in with the same state storage (lora_cost/trace/optim8bit.py); "
                     f"its {rec.paged_bytes} B of paged state live in CUDA managed memory, outside the allocated peak")
    elif run.optimizer in ("adamw-torch-8bit", "adamw-torch-4bit", "galore-adamw"):
        notes.append(f"{run.optimizer}: a stand-in with the library's state storage (lora_cost/trace/"
                     f"{'galore.py' if run.optimizer == 'galore-adamw' else 'optim_torchao.py'})")
    elif run.optimizer not in ("adamw-torch", "adamw-torch-fused", "sgd", "adafactor"):
        notes.append(f"bitsandbytes {run.optimizer}: a stand-in with the same state storage and an in-place update "
                     "(lora_cost/trace/optim8bit.py)")
    if run.master_weights or run.optimizer_in_backward:
        notes.append("optimizer wrappers (lora_cost/trace/optimizers.py):"
                     + (" fp32 master weights (Megatron-LM mixed precision)" if run.master_weights else "")
                     + (" stepped in backward from gradient hooks (torchtune optimizer_in_bwd)" if run.optimizer_in_backward else ""))
    return TraceResult(
        model=spec.name, family=spec.model_type, method=m.name, r=None if m.base_trainable else run.r, targets=names,
        batch=run.batch, seq=run.seq, precision=run.precision, optimizer=run.optimizer,
        grad_checkpointing=run.grad_checkpointing, attention=run.attention, dropout=run.dropout,
        method_options=m.option_values(run), trainable_params=int(trainable_params),
        total_params=int(total_params), adapted_modules=built.adapted, peak_bytes=top.peak_bytes, peak_phase=top.phase,
        phases=tuple(phases), steady_bytes=int(steady), device_bytes=device, saved_activation_bytes=int(saved),
        saved_by_module=saved_by_module,
        saved_by_kind=tuple(OpBytes(k, v) for k, v in sorted(saved_by_op.items(), key=lambda kv: -kv[1])),
        flops_forward=int(fwd), flops_backward=int(bwd), flops_forward_uncounted=int(uncounted_fwd),
        flops_backward_uncounted=int(uncounted_bwd), flops_by_op=ops, zero_flop_ops=zero, attention_kernel=kernel,
        notes=tuple(notes), warnings=tuple(warnings), trace_seconds=round(elapsed, 3), trace_max_rss_bytes=int(rss),
        paged_optimizer_bytes=int(rec.paged_bytes), reserved_peak_bytes=reserved.reserved_peak_bytes,
        reserved_after_step_bytes=reserved.reserved_after_bytes, fragmentation_bytes=reserved.fragmentation_at_peak_bytes,
        allocator_retries=reserved.alloc_retries, device=dev)


def _pattern(module: str) -> str:
    """'LlamaForCausalLM.model.layers.7.mlp' -> 'LlamaForCausalLM.model.layers.*.mlp'."""
    return ".".join("*" if part.isdigit() else part for part in module.split(".")) if module else "(outside modules)"
