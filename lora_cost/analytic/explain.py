"""Names, formulas and one-line explanations of every estimated term (what `--explain` prints)."""

from __future__ import annotations

from .budget import ParameterBudget
from .methods.base import Method
from .optimizers import Optimizer
from .record import StepRecord
from ..results import MemoryCategory, Term
from ..spec import ModelSpec, RunConfig

# the analytic formula of each memory category at a peak (labels and meanings: results.MemoryCategory)
COMPONENTS = {
    MemoryCategory.WEIGHTS: "base weights (+ frozen adapter tensors) x storage dtype",
    MemoryCategory.TRAINABLE_WEIGHTS: "trainable elements x dtype bytes",
    MemoryCategory.OPTIMIZER_STATE: "AdamW 2 x, SGD 1 x trainable bytes; 8-bit: 2 B + 8 B/256 per element; Lion one "
                                     "state; Adafactor fp32 rows + columns (optimizers.py)",
    MemoryCategory.MASTER_WEIGHTS: "4 B x every 16-bit trainable element (--master-weights fp32)",
    MemoryCategory.SAVED_ACTIVATIONS: "sum over ops of the tensors autograd keeps",
    MemoryCategory.LOGITS: "batch x seq x vocab x dtype",
    MemoryCategory.LOGITS_FP32_COPY: "batch x seq x vocab x 4",
    MemoryCategory.LOSS_GRADIENT_BUFFERS: "2 x batch x seq x vocab x log-softmax dtype; --loss chunked with a trained "
                                           "head: 3 x its weight gradient + waiting chunks' logits gradients",
    MemoryCategory.GRADIENTS: "trainable elements x dtype bytes",
    MemoryCategory.RECOMPUTED_ACTIVATIONS: "one block's saved tensors",
    MemoryCategory.ACTIVATION_GRADIENT_BUFFERS: "2 x widest block activation + 2 x residual stream",
    MemoryCategory.TRANSIENT_BUFFERS: "largest short-lived buffer of one op; inside a block's forward + 2 x residual "
                                       "stream (held by the layer loop and by the block across a sublayer)",
    MemoryCategory.FORWARD_LIVE: "max over the scope's ops of: its saves so far (none in a checkpointed block) + "
                                  "storages alive and not kept for backward (reference counts of the forward's "
                                  "tensors) + the op's buffers",
    MemoryCategory.OPTIMIZER_TEMPORARIES: "foreach AdamW: one state-sized buffer per dtype group; Adafactor: fp32 "
                                           "copies of the largest tensor; master weights: fp32 gradients; in backward: "
                                           "one tensor's gradient and step",
    MemoryCategory.LOOP_STATE: "AdaLoRA: 3 x the adapter tensors (importance, its average, its uncertainty)",
    MemoryCategory.GATHERED_PARAMETERS: "root unit + units in use: shards x padded dim-0 chunk x world, param dtype",
    MemoryCategory.PREFETCHED_PARAMETERS: "one decoder-layer unit, all-gathered ahead (FSDP2 backward prefetch)",
    MemoryCategory.UNSHARDED_GRADIENTS: "trainable elements of the gathered units x param dtype",
    MemoryCategory.REDUCE_SCATTER_BUFFERS: "world x padded shard of a unit's trainable params x reduce dtype",
    MemoryCategory.PROJECTOR_REFRESH: "GaLore refresh: max over projected m x n weights of 4mn copy (16-bit) + U, S, Vh + "
                                       "info + 4mn column-major copy, or the r x long product + diag / cast; + the "
                                       "previous tensor's denom and norm_grad (optimizers.py _galore_refresh_temporaries)",
    MemoryCategory.GRADIENT_BUCKETS: "DDP: trainable bytes (bucket_cap_mb buckets); ZeRO: reduce_bucket_size x dtype (x2 overlap_comm)",
}

C_LOGITS = MemoryCategory.LOGITS

_FLOP_KINDS = {
    "base": "frozen/trainable base linears: 2*n*d_in*d_out forward; backward 2*n*d_in*d_out per needed gradient",
    "adapter": "adapter matmuls (A, B, bases)",
    "attention": "sdpa: 4*b*h*s^2*hd forward, 10*b*h*s^2*hd backward (fused kernels recompute scores)",
    "lm_head": "2*n*d*vocab forward; input gradient (and weight gradient when it trains)",
    "orthogonal regulariser": "AdaLoRA: 2*r^2*d forward per lora_A (d = d_in) and lora_B (d = d_out), twice that backward",
}


def describe(key: str) -> tuple[str, str]:
    """(formula, what it is) of a memory category at a peak."""
    category = MemoryCategory(key)
    return COMPONENTS[category], category.meaning


def memory_terms(spec: ModelSpec, run: RunConfig, method: Method, opt: Optimizer, params: ParameterBudget,
                 saved_total: int, rec: StepRecord) -> tuple[Term, ...]:
    n, V, ls = run.tokens, spec.vocab, rec.log_softmax_bytes
    C = MemoryCategory
    return (
        # under full fine-tuning the base weights are the trainable weights: filed there, not twice
        Term("base weights", params.base_weight_bytes, method.storage(run).formula(params.total_params),
             "the pretrained model as stored during training", None if method.base_trainable else C.WEIGHTS),
        Term("trainable weights", params.trainable_bytes, f"{params.trainable_params:,} trainable parameters x their dtype",
             "full fine-tuning: all weights; peft adapters: fp32 (peft autocast_adapter_dtype) unless --adapter-dtype "
             "(or --qlora-recast: bf16); "
             "bottleneck adapters: the model's weight dtype", C.TRAINABLE_WEIGHTS),
        Term("frozen adapter tensors", params.frozen_adapter_bytes,
             "frozen A (LoRA-FA), shared projections (VeRA), initial factors (NoLA)", "adapter tensors that do not train",
             C.WEIGHTS),
        Term("gradients", params.trainable_bytes, "one gradient per trainable tensor, same dtype",
             "allocated in backward, freed by zero_grad(set_to_none=True)", C.GRADIENTS),
        Term("optimizer state", params.state_bytes, opt.description,
             "outside torch's allocator (paged)" if opt.paged else "allocated on the GPU", C.OPTIMIZER_STATE),
        Term("optimizer temporaries", params.optimizer_temporaries,
             COMPONENTS[C.OPTIMIZER_TEMPORARIES] if params.optimizer_temporaries else "in-place update",
             "alive during opt.step()", C.OPTIMIZER_TEMPORARIES),
        Term("saved activations", saved_total, "per-op autograd rules over one forward pass"
             + (" (checkpointed: block inputs only)" if run.grad_checkpointing else ""),
             "tensors kept for backward, as saved_tensors_hooks count them", C.SAVED_ACTIVATIONS),
        Term("logits", rec.logits_bytes, f"{n:,} tokens x {V:,} vocab x dtype" if run.task not in ("seq-cls", "token-cls")
             else f"{run.task} logits: {'rows' if run.task == 'seq-cls' else 'tokens'} x {run.labels} labels x dtype",
             "the LM head output" if run.task not in ("seq-cls", "token-cls") else "the classifier output", C.LOGITS),
        Term("logits fp32 copy", rec.loss_copy_bytes, "logits.float() in the causal-LM loss", "short-lived during the loss",
             C.LOGITS_FP32_COPY),
        Term("loss gradient buffers", 2 * ls, f"2 x {n:,} x {V:,} x {ls // max(n * V, 1)} B", "log-softmax backward",
             C.LOSS_GRADIENT_BUFFERS),
    ) + _optimizer_option_terms(params) + _loss_terms(run, rec) + ((Term("rank allocator state", params.loop_state_bytes, COMPONENTS[C.LOOP_STATE],
               "peft RankAllocator's ipt, exp_avg_ipt and exp_avg_unc, kept outside the optimizer", C.LOOP_STATE),)
         if params.loop_state_bytes else ())


def _loss_terms(run: RunConfig, rec: StepRecord) -> tuple[Term, ...]:
    """--loss liger | chunked: what the loss holds while it runs, in place of the logits above (losses.py)."""
    if run.loss_kind == "liger":
        return (Term("fused loss logits chunk", rec.logits_at_loss_bytes, "chunk rows x vocab x compute dtype (liger_chunk_size)",
                     "Liger's per-chunk logits, overwritten by their gradient; no tokens x vocab logits", C_LOGITS),)
    if run.loss_kind == "chunked":
        return (Term("chunked logits", rec.logits_at_loss_bytes, f"{run.loss_chunks} chunks x rows x vocab x dtype",
                     "every chunk's logits while the loss runs (deleted before backward); the fp32 copy and the "
                     "log-softmax gradients above are one chunk's", C_LOGITS),)
    return ()


def flop_terms(rec: StepRecord, run: RunConfig, recomputed: int) -> tuple[Term, ...]:
    terms = [Term(f"{kind} {phase}", int(v), _FLOP_KINDS.get(kind, ""), "")
             for (kind, phase), v in sorted(rec.flop_totals.items()) if v]
    if run.grad_checkpointing:
        terms.append(Term("recomputation bwd", int(recomputed), "forward of every block again, up to its last save",
                          "gradient checkpointing"))
    return tuple(terms)


def saved_by_kind(rec: StepRecord, run: RunConfig, kept: tuple[int, ...]) -> tuple[Term, ...]:
    totals = dict(rec.kind_totals)
    if run.grad_checkpointing:
        totals["checkpointed block inputs"] = sum(kept)
    return tuple(Term(k, int(v), "", "") for k, v in sorted(totals.items(), key=lambda kv: -kv[1]))


def _optimizer_option_terms(params: ParameterBudget) -> tuple[Term, ...]:
    """--master-weights fp32 and --optimizer-in-backward (optimizer_budget.py); absent without them."""
    C = MemoryCategory
    out = ()
    if params.master_bytes:
        out += (Term("fp32 master weights", params.master_bytes, COMPONENTS[C.MASTER_WEIGHTS],
                     "the optimizer updates fp32 copies and writes them back to the 16-bit weights (Megatron-LM "
                     "Float16OptimizerWithFloat16Params, DeepSpeed bf16/fp16 optimizers)", C.MASTER_WEIGHTS),)
    if params.refresh_every:
        out += (Term("projector refresh temporaries", max(params.refresh.step_temporaries,
                                                            params.refresh.block_transient,
                                                            params.refresh.head_transient),
                     COMPONENTS[C.PROJECTOR_REFRESH],
                     f"GaLore's refresh step (the first and every {params.refresh_every}th): get_orthogonal_matrix's "
                     "SVD of one gradient at a time inside optimizer.step (with --optimizer-in-backward: with that "
                     "tensor's gradient, in backward); cuSOLVER's run-time workspace not counted", C.PROJECTOR_REFRESH),)
    if params.in_backward:
        out += (Term("one tensor's step in backward", max(params.block_step_transient, params.head_step_transient),
                     "its gradient + fp32 copy (master weights) + the optimizer's temporaries for it alone",
                     "torchtune optimizer_in_bwd: register_post_accumulate_grad_hook steps and frees each gradient",
                     C.OPTIMIZER_TEMPORARIES),)
    return out
