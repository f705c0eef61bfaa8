"""Names, formulas and one-line explanations of every estimated term (what `--explain` prints)."""

from __future__ import annotations

from .budget import ParameterBudget
from .methods.base import Method
from .optimizers import Optimizer
from .record import StepRecord
from ..results import Term
from ..spec import ModelSpec, RunConfig

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

_FLOP_KINDS = {
    "base": "frozen/trainable base linears: 2*n*d_in*d_out forward; backward 2*n*d_in*d_out per needed gradient",
    "adapter": "adapter matmuls (A, B, bases)",
    "attention": "sdpa: 4*b*h*s^2*hd forward, 10*b*h*s^2*hd backward (fused kernels recompute scores)",
    "lm_head": "2*n*d*vocab forward; input gradient (and weight gradient when it trains)",
}


def describe(key: str) -> tuple[str, str]:
    _, formula, explanation = COMPONENTS[key]
    return formula, explanation


def memory_terms(spec: ModelSpec, run: RunConfig, method: Method, opt: Optimizer, params: ParameterBudget,
                 saved_total: int, rec: StepRecord) -> tuple[Term, ...]:
    n, V, ls = run.tokens, spec.vocab, rec.log_softmax_bytes
    return (
        Term("base weights", params.base_weight_bytes, method.storage(run).formula(params.total_params),
             "the pretrained model as stored during training"),
        Term("trainable weights", params.trainable_bytes, f"{params.trainable_params:,} trainable parameters x their dtype",
             "full fine-tuning: all weights; adapters: fp32 (peft autocast_adapter_dtype)"),
        Term("frozen adapter tensors", params.frozen_adapter_bytes,
             "frozen A (LoRA-FA), shared projections (VeRA), initial factors (NoLA)", "adapter tensors that do not train"),
        Term("gradients", params.trainable_bytes, "one gradient per trainable tensor, same dtype",
             "allocated in backward, freed by zero_grad(set_to_none=True)"),
        Term("optimizer state", params.state_bytes, opt.description,
             "outside torch's allocator (paged)" if opt.paged else "allocated on the GPU"),
        Term("optimizer temporaries", params.optimizer_temporaries,
             "foreach AdamW sqrt(exp_avg_sq) buffer" if params.optimizer_temporaries else "in-place update",
             "alive during opt.step()"),
        Term("saved activations", saved_total, "per-op autograd rules over one forward pass"
             + (" (checkpointed: block inputs only)" if run.grad_checkpointing else ""),
             "tensors kept for backward, as saved_tensors_hooks count them"),
        Term("logits", rec.logits_bytes, f"{n:,} tokens x {V:,} vocab x dtype", "the LM head output"),
        Term("logits fp32 copy", rec.loss_copy_bytes, "logits.float() in the causal-LM loss", "short-lived during the loss"),
        Term("loss gradient buffers", 2 * ls, f"2 x {n:,} x {V:,} x {ls // max(n * V, 1)} B", "log-softmax backward"),
    )


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
