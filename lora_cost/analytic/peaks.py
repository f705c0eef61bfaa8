"""Where allocated memory peaks during a steady training step, and what is alive then.

The candidates, per phase (the largest of each phase is its peak):
  forward   - at the loss: everything saved, the logits, and their fp32 copy (causal-LM loss);
              inside a block: what is saved so far plus the block's largest short-lived buffer and
              the two residual-stream tensors Python holds; and (ligeracc) op by op, where the family's and
              the method's forward functions hold tensors as the libraries do, every storage alive
              (tape.forward_live: the block's saves so far, what only Python holds, the op's buffers), inside
              the blocks and, beyond the loss's named terms, at the loss; under checkpointing each recomputed
              block likewise (tape.recompute_live);
  backward  - at the loss gradient: log-softmax backward holds its incoming and outgoing [n, vocab]
              gradients on top of everything saved (the usual peak); in the last and the first
              block (and the first of the layers a repeated block stands for), where saved activations
              are partly freed and parameter gradients partly accumulated, the block's own only for the
              linears its backward has passed (with checkpointing, one block's recomputed activations are
              alive, and its recomputation is a moment of its own at each of those blocks); --loss chunked
              with a trained head: the head's gradient summed over the chunks;
              a classifier (tiny logits): in the final norm's backward, with that norm's gradient
              buffers (ops.rms_norm, ops.layer_norm); at the end, all gradients;
  optimizer - all gradients plus the optimizer's temporaries (foreach AdamW: one state-sized buffer).
The logits stay alive through backward and the optimizer step (the step's output object holds them).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat

from .budget import ParameterBudget
from .record import StepRecord
from ..results import MemoryCategory as C, PhasePeak, Term
from ..spec import RunConfig
from .stack import Stack

_NAME = {category: category.value for category in C}  # JSON names, looked up once (sweeps make many terms)


@dataclass(frozen=True)
class ActivationBudget:
    """Saved-activation bytes per part of the model for one step (blocks expanded to all L)."""

    embeddings: int
    body: tuple[int, ...]  # what each block saves in a plain forward
    kept: tuple[int, ...]  # what each block keeps for backward (its input only, under checkpointing)
    head: int
    loss: int

    @property
    def total(self) -> int:
        return self.embeddings + sum(self.kept) + self.head + self.loss


def activation_budget(rec: StepRecord, run: RunConfig, stack: Stack) -> ActivationBudget:
    scopes = stack.scopes
    body = tuple(map(rec.saved.get, scopes, repeat(0, len(scopes))))
    if run.grad_checkpointing:  # the checkpoint keeps each block's input (and shared positional args once)
        kept = tuple(rec.block_input.get(s, 0) + rec.kept_past_checkpoint.get(s, 0) for s in scopes)
        kept = (kept[0] + rec.checkpoint_extra_bytes,) + kept[1:]
    else:
        kept = body
    return ActivationBudget(rec.saved.get("embeddings", 0), body, kept, rec.saved.get("head", 0), rec.saved.get("loss", 0))


def phase_peaks(rec: StepRecord, acts: ActivationBudget, params: ParameterBudget, run: RunConfig,
                stack: Stack, adapted_blocks: bool, rank=None) -> tuple[PhasePeak, ...]:
    """Each phase's peak: its largest candidate moment (the first of equals), with the terms alive then.
    `rank` (sharding/rank.py RankModel, --gpus): the busiest rank's shards replace the steady terms,
    gradients scale to the rank's share, and each moment gets the data-parallel library's buffers."""
    steady, candidates = _moments(rec, acts, params, run, stack, adapted_blocks, rank)
    phases = []
    for phase, options in candidates.items():
        where, extra = _largest(options)
        terms = tuple(Term(_NAME[category], int(v), "", "", category) for category, v in steady + extra if v)
        phases.append(PhasePeak(phase, sum(t.value for t in terms), where, terms))
    return tuple(phases)


def peak_bytes(rec: StepRecord, acts: ActivationBudget, params: ParameterBudget, run: RunConfig,
               stack: Stack, adapted_blocks: bool, rank=None) -> int:
    """`max(p.peak_bytes for p in phase_peaks(...))` without building the terms (sweeps: fast.py)."""
    steady, candidates = _moments(rec, acts, params, run, stack, adapted_blocks, rank)
    steady_bytes = 0
    for _, v in steady:
        steady_bytes += int(v)
    peak = 0
    for options in candidates.values():
        total = steady_bytes
        for _, v in _largest(options)[1]:
            total += int(v)
        peak = max(peak, total)
    return peak


def _largest(options: list) -> tuple:
    """The moment with the most bytes alive (the first of equals, as max() picks)."""
    best, most = None, None
    for option in options:
        total = 0
        for _, v in option[1]:
            total += v
        if best is None or total > most:
            best, most = option, total
    return best


def _moments(rec: StepRecord, acts: ActivationBudget, params: ParameterBudget, run: RunConfig,
             stack: Stack, adapted_blocks: bool, rank=None) -> tuple[list, dict]:
    """(what is alive all step, {phase: [(where, [(category, bytes), ...]), ...]}): the candidate moments."""
    L = stack.layers
    logits, ls = rec.logits_bytes, rec.log_softmax_bytes
    saved = acts.total
    scopes = stack.scopes
    fwd_transient = max([rec.forward_transient.get(s, 0) for s in ("embeddings", *stack.block_scopes, "head")] + [0])
    # --optimizer-in-backward (optimizer_budget.py): each gradient is freed by its own step inside backward,
    # so no moment holds accumulated gradients; one tensor's gradient and step are alive instead
    grads_total = 0 if params.in_backward else params.trainable_bytes
    grads_blocks = params.per_layer_trainable_bytes * L if adapted_blocks or params.base_trainable else 0
    # trained embeddings without a tied LM head (classifiers) get their gradient after the blocks' backward
    grads_head = max(grads_total - grads_blocks - params.late_gradient_bytes, 0)
    if params.in_backward:
        grads_blocks = grads_head = 0
    # the residual stream's width: the input of the blocks that stand for most of the stack
    residual = rec.block_input.get(stack.block_scopes[-1], 0)
    # issue9b: inputs bitsandbytes' MatMul8bitLt keeps as ctx attributes live while the graph does (autograd
    # releases a node's saved tensors after its backward, not its ctx attributes): with the logits, to the end
    held = sum(rec.kept_past_checkpoint.get(s, 0) for s in scopes)

    def in_block(i: int) -> list[tuple[str, int]]:
        scope = scopes[i]
        # Two moments inside the block's backward; the larger is its peak.
        # (1) At the backward of the op that consumed the widest activation (a product, act(gate) * up):
        # its incoming gradient and two outgoing ones (MulBackward0 returns both factors' gradients),
        # three of the widest, and the residual stream's incoming gradient, which the skip connection
        # passes on unchanged. By then the backward of every op after it has run and released its saved
        # tensors (torch/csrc/autograd/engine.cpp: a node's saved variables are freed once it ran without
        # retain_graph): alive of the block is what it saved before making the widest (tape.widest_moment:
        # the largest of 3 x an activation's bytes + the block's saves when it was made).
        # (2) An op's own backward buffers (a dequantised 4-bit weight, NoLA's regenerated bases), alive
        # while that op runs: the block's last linear has them too, with nearly every save of the block
        # still alive, and the residual gradient in and out.
        # Gradients at (1): blocks i+1.. complete, and of block i those of the linears run after the widest
        # activation was made (their backward ran first; AccumulateGrad makes .grad once backward has passed a
        # parameter's first use): tape.widest_gradients keeps each activation's moment less the trainable bytes
        # of the linears run before it, so the block's trainable bytes + its largest entry is the moment, whose
        # gradient part is `formed` (bytes no linear owns, norms and biases, counted as formed). At (2), the
        # block's last op: every gradient of the block counted, as before.
        largest, transient = rec.largest.get(scope, 0), rec.backward_transient.get(scope, 0)
        per_layer = params.per_layer_trainable_bytes
        widest = rec.widest_moment.get(scope, 3 * largest + acts.body[i])
        # (with every input a ctx attribute holds, bitsandbytes MatMul8bitLt's, those made after the widest too:
        # autograd frees a node's saved variables after it runs, not its ctx attributes; tape.widest_moment
        # leaves them out. Under checkpointing the forward's own are among the kept saves, and the recomputed
        # graph's die with it: saved_tensors_hooks never see a ctx attribute, so none is recomputed)
        held = 0 if run.grad_checkpointing else rec.kept_past_checkpoint.get(scope, 0)
        block = min(max(widest - 3 * largest, 0) + held, acts.body[i])
        grad_buffers = residual + 3 * largest
        formed = min(max(per_layer - widest + rec.widest_gradients.get(scope, widest), 0), per_layer)
        if transient and acts.body[i] + 2 * residual + transient > block + grad_buffers:
            block, grad_buffers, formed = acts.body[i], 2 * residual + transient, per_layer
        grads = grads_head + per_layer * (L - 1 - i) + formed if grads_blocks else grads_head
        # FSDP: the unit's unsharded gradients are those formed so far too (sharding/rank.py gathered)
        dp = _dp(rank, "backward-block", i, unformed=(per_layer - formed, per_layer) if grads_blocks else None)
        if run.grad_checkpointing:
            return [(C.SAVED_ACTIVATIONS, acts.embeddings + sum(acts.kept[: i + 1])),
                    (C.RECOMPUTED_ACTIVATIONS, block + rec.orphaned.get(scope, 0)),
                    (C.GRADIENTS, grads),
                    (C.LOGITS, logits), (C.ACTIVATION_GRADIENT_BUFFERS, grad_buffers),
                    (C.OPTIMIZER_TEMPORARIES, params.block_step_transient)] + dp
        return [(C.SAVED_ACTIVATIONS, acts.embeddings + sum(acts.kept[:i]) + block),
                (C.RECOMPUTED_ACTIVATIONS, 0),
                (C.GRADIENTS, grads),
                (C.LOGITS, logits), (C.ACTIVATION_GRADIENT_BUFFERS, grad_buffers),
                (C.OPTIMIZER_TEMPORARIES, params.block_step_transient)] + dp

    def recompute(i: int) -> list[tuple[str, int]]:
        """Checkpointing reruns the block's forward when its backward starts: its short-lived buffers
        (dequantised 4-bit weights, DoRA's weight norm, NoLA's bases) return, next to the
        activations recomputed so far and the incoming residual gradient."""
        scope = scopes[i]
        # orphaned saves are among those buffers: count them once
        extra = (C.TRANSIENT_BUFFERS, max(rec.forward_transient.get(scope, 0) - rec.orphaned.get(scope, 0), 0))
        # ligeracc: or, op by op, the block's saves so far and what Python holds besides (tape.recompute_live), beyond
        # all of the block's saves
        tracked = rec.recompute_live.get(scope)
        if tracked is not None and tracked - acts.body[i] > extra[1]:
            extra = (C.FORWARD_LIVE, tracked - acts.body[i])
        return [(C.SAVED_ACTIVATIONS, acts.embeddings + sum(acts.kept[: i + 1])),
                (C.RECOMPUTED_ACTIVATIONS, acts.body[i] + rec.orphaned.get(scope, 0)),
                (C.GRADIENTS, grads_head + params.per_layer_trainable_bytes * (L - 1 - i) if grads_blocks else grads_head),
                (C.LOGITS, logits), (C.ACTIVATION_GRADIENT_BUFFERS, residual), extra] + _dp(rank, "recompute", i)

    at_loss = [(C.SAVED_ACTIVATIONS, saved), (C.LOGITS, rec.logits_at_loss_bytes), (C.LOGITS_FP32_COPY, rec.loss_copy_bytes),
               # moments: a fused loss's own buffers beyond its chunk's logits (liger's fp32 path: the chunk's
               # [V, H] weight-gradient product, losses.liger_loss), alive with every save of the step
               (C.TRANSIENT_BUFFERS, max(rec.forward_transient.get("loss", 0) - rec.logits_at_loss_bytes, 0))]
    tracked_blocks, tracked_loss = _tracked_forward_moments(rec, acts, run, stack)
    if tracked_loss is not None:  # ligeracc: what else the forward holds then (the final hidden states, the labels)
        at_loss.append((C.FORWARD_LIVE, max(tracked_loss - sum(v for _, v in at_loss), 0)))
    candidates = {
        "forward": [
            ("computing the loss (logits and their fp32 copy alive)", at_loss + _dp(rank, "forward-loss")),
            # moments: beside the saves and the op's buffer, two residual-stream tensors no op saves are held by
            # Python: the block's input by the model's layer loop (`hidden_states = layer(hidden_states)`
            # rebinds it only when the block returns) and the sublayer's residual by the block
            # (transformers' decoder layers: `residual = hidden_states` across attention and the MLP)
            ("inside a block (largest short-lived buffer)",
             [(C.SAVED_ACTIVATIONS, acts.embeddings + sum(acts.kept)), (C.TRANSIENT_BUFFERS, fwd_transient + 2 * residual)]
             + _dp(rank, "forward-block")),
            *[(where, terms + _dp(rank, "forward-block")) for where, terms in tracked_blocks],
        ],
        "backward": [
            ("start of backward: log-softmax gradient in and out",
             [(C.SAVED_ACTIVATIONS, saved), (C.LOGITS, logits), (C.LOSS_GRADIENT_BUFFERS, 2 * ls),
              (C.GRADIENTS, params.early_gradient_bytes)] + _dp(rank, "backward-start")),
            *block_moments(stack, in_block, recompute if run.grad_checkpointing else None,
                           below_last=rank is not None and bool(rank.unit_reduce_scatter)),
            *_hook_moments(params, stack, acts, rec, run, logits, residual, rank),
            *_reduce_scatter_moments(rank, stack, acts, grads_head, params.per_layer_trainable_bytes if grads_blocks else 0,
                                     logits),
            # a classifier: the final norm's backward with its own saves (accuracy13); the fused loss (liger):
            # every save alive and a block's backward buffers
            *(_head_moment(run, acts.embeddings + sum(acts.kept) + rec.final_norm_saved_bytes, logits, grads_head,
                           rec.norm_backward.get("head", 0)) if run.task in ("seq-cls", "token-cls") else
              _head_moment(run, saved - acts.loss, logits, grads_head,
                           rec.norm_backward.get("head") or 2 * residual + max(2 * rec.largest.get(scopes[-1], 0),
                                                                                rec.backward_transient.get(scopes[-1], 0)))),
            # --loss chunked with a trained LM head: the head's weight gradient summed chunk by chunk, every
            # chunk's cross-entropy backward done (the loss's saves freed), no block's gradient yet
            *([("accumulating the LM head's gradient over the loss chunks",
                [(C.SAVED_ACTIVATIONS, saved - acts.loss), (C.LOGITS, logits),
                 (C.LOSS_GRADIENT_BUFFERS, rec.head_accumulation_bytes), (C.GRADIENTS, params.early_gradient_bytes)]
                + _dp(rank, "backward-start"))] if rec.head_accumulation_bytes else []),
            ("end of backward", [(C.GRADIENTS, grads_total), (C.LOGITS, logits), (C.SAVED_ACTIVATIONS, held),
                                 (C.OPTIMIZER_TEMPORARIES, params.head_step_transient)] + _dp(rank, "backward-end")),
            *_head_step_moment(params, saved - acts.loss, logits, residual),
        ],
        "optimizer": [
            ("optimizer step", [(C.GRADIENTS, grads_total), (C.LOGITS, logits), (C.SAVED_ACTIVATIONS, held),
                                (C.OPTIMIZER_TEMPORARIES, params.optimizer_temporaries if rank is None
                                 else rank.optimizer_temporaries)] + _dp(rank, "optimizer")),
            # the training loop's own update before zero_grad (AdaLoRA's rank allocator); ties go to the step
            ("the training loop's update after the optimizer step",
             [(C.GRADIENTS, grads_total), (C.LOGITS, logits), (C.SAVED_ACTIVATIONS, held), (C.TRANSIENT_BUFFERS, params.loop_temporaries)]),
        ],
    }
    steady = [(C.WEIGHTS, params.frozen_bytes), (C.TRAINABLE_WEIGHTS, params.trainable_bytes),
              (C.OPTIMIZER_STATE, params.allocated_state_bytes), (C.LOOP_STATE, params.loop_state_bytes),
              (C.MASTER_WEIGHTS, params.master_bytes)]
    if rank is not None:
        steady = [(C.WEIGHTS, rank.weights), (C.TRAINABLE_WEIGHTS, rank.trainable),
                  (C.OPTIMIZER_STATE, rank.optimizer_state), (C.LOOP_STATE, params.loop_state_bytes)]
        share = rank.gradients / grads_total if grads_total else 0.0  # the rank's part of each gradient

        def grads(phase: str, c, v: int) -> int:
            if c != C.GRADIENTS:
                return v
            if not rank.exact_gradients:
                return int(v * share)
            return rank.gradients if phase == "optimizer" else 0  # FSDP: gathered() names them per moment

        candidates = {phase: [(where, [(c, grads(phase, c, v)) for c, v in terms])
                              for where, terms in options] for phase, options in candidates.items()}
    return steady, candidates


def _hook_moments(params, stack: Stack, acts: ActivationBudget, rec: StepRecord, run: RunConfig, logits: int,
                  residual: int, rank) -> list:
    """--optimizer-in-backward with a word embedding tied to the LM head (task "galore"): a block tensor stepped from
    its gradient hook while the head's part of the shared weight's gradient waits for the embedding's
    (`held_in_backward_bytes`). At the hook (AccumulateGrad runs as soon as the weight's gradient is made) the block's
    saves are bounded by all of them (its last linears come first in backward), the gradients in flight by the
    residual stream's and the widest activation's: a bound, evaluated on the refresh step only, where an SVD in the
    hook makes this moment the step's peak (tiny models: the trace's refresh peak was up to 8% above the analytic one
    without it, at most 4.5% below with it, tests/test_galore_refresh.py); on a steady step, whose hook holds one
    tensor's update, the bound would exceed what the trace shows (up to 5%) and the start of backward is the peak.
    Without a held gradient the in-block moments, which add the step's temporaries to the widest moment, bound it;
    with several GPUs (the data-parallel buffers of rank.py) it is not evaluated."""
    if not (params.in_backward and params.held_in_backward_bytes and params.refresh_step) or rank is not None:
        return []
    out = []
    for kind, first, last in stack.first_and_last:
        for where, i in (("last", last), ("first", first)):
            scope = stack.scopes[i]
            if run.grad_checkpointing:
                saved, recomputed = acts.embeddings + sum(acts.kept[: i + 1]), acts.body[i] + rec.orphaned.get(scope, 0)
            else:
                saved, recomputed = acts.embeddings + sum(acts.kept[:i]) + acts.body[i], 0
            name = "" if len(stack.kinds) == 1 else f" {kind}"
            out.append((f"a tensor of the {where}{name} block stepped in its gradient hook (tied head's gradient waiting)",
                        [(C.SAVED_ACTIVATIONS, saved), (C.RECOMPUTED_ACTIVATIONS, recomputed),
                         (C.GRADIENTS, params.held_in_backward_bytes), (C.LOGITS, logits),
                         (C.ACTIVATION_GRADIENT_BUFFERS, residual + rec.largest.get(scope, 0)),
                         (C.OPTIMIZER_TEMPORARIES, params.block_step_transient)]))
    return out


def _tracked_forward_moments(rec: StepRecord, acts: ActivationBudget, run: RunConfig, stack: Stack) -> tuple:
    """ligeracc: the forward's fullest moment inside the blocks, op by op (tape.forward_live: the block's saves so far,
    every storage alive that only Python holds, the op's buffers), on top of what the scopes before it keep: the
    embeddings' and earlier blocks' saves (under checkpointing each block's input, its own included: the checkpoint
    stores it, tape.hold). A block that stands for several layers is evaluated at the last of them (the most saves
    below it). And the causal-LM loss's fullest moment, all told (the head's and the blocks' saves below it), or
    None. Python's references follow the forward functions of the families that mirror transformers' (a local
    rebound, a sublayer's function returning: Architecture.forward_lifetimes); none tracked for the others.
    Returns ([(where, terms)] for the blocks, the loss's total or None)."""
    live = rec.forward_live
    if not live:
        return [], None
    ckpt = run.grad_checkpointing
    below = acts.embeddings
    best = None
    for i, scope in enumerate(stack.scopes):
        held = live.get(scope)
        if held is not None:
            kept = below + (acts.kept[i] if ckpt else 0)  # a checkpointed block's own input: stored by the checkpoint
            if best is None or kept + held > best[0] + best[1]:
                best = (kept, held)
        below += acts.kept[i]
    blocks = [] if best is None else [("inside a block (every tensor alive, op by op)",
                                       [(C.SAVED_ACTIVATIONS, best[0]), (C.FORWARD_LIVE, best[1])])]
    loss = below + acts.head + live["loss"] if "loss" in live and run.task in (None, "causal-lm") else None
    return blocks, loss


def _reduce_scatter_moments(rank, stack: Stack, acts: ActivationBudget, grads_head: int, per_layer: int,
                            logits: int) -> list:
    """FSDP: after a unit's backward its gradients are copied into the reduce-scatter input (the block's own
    buffers are gone by then): the last and the first block."""
    if rank is None or not rank.unit_reduce_scatter:
        return []
    L = stack.layers
    return [(f"reduce-scatter after the {'first' if i == 0 else 'last'} block's backward",
             [(C.SAVED_ACTIVATIONS, acts.embeddings + sum(acts.kept[:i])), (C.GRADIENTS, grads_head + per_layer * (L - 1 - i)),
              (C.LOGITS, logits)] + _dp(rank, "reduce-scatter", i)) for i in sorted({0, L - 1})]


def _dp(rank, moment: str, i: int | None = None, unformed=None) -> list:
    """The data-parallel library's buffers alive at a moment (none on one GPU). `unformed`: (the block's
    trainable bytes whose gradients do not exist yet, the block's trainable bytes), at an in-block moment."""
    return [] if rank is None else rank.gathered(moment, i, unformed)


def _head_step_moment(params: ParameterBudget, saved: int, logits: int, residual: int) -> list:
    """--optimizer-in-backward with a trained LM head: its weight's gradient is stepped by the hook that
    fires once the head's backward node is done (the logits' gradient freed, the hidden states' gradient,
    one residual-stream tensor, alive), while every saved activation but the loss's is alive."""
    if not params.in_backward or not params.lm_head_steps_early:
        return []
    return [("the LM head's gradient stepped in backward", [(C.SAVED_ACTIVATIONS, saved), (C.LOGITS, logits),
                                                             (C.ACTIVATION_GRADIENT_BUFFERS, residual),
                                                             (C.OPTIMIZER_TEMPORARIES, params.head_step_transient)])]


def _head_moment(run: RunConfig, saved: int, logits: int, grads_head: int, buffers: int) -> list:
    """A classifier's logits are tiny, so the start of backward no longer dominates the head: backward
    through the final norm. A classifier (--task seq-cls / token-cls): the blocks' saved activations and the
    norm's own still alive (the classifier's and the loss's are freed once their nodes ran) and the gradient
    buffers at the peak of the norm's backward (ops.rms_norm, ops.layer_norm; none where the family has no
    final norm: BERT). --loss liger, whose loss hands on a saved gradient with no [n, vocab] buffer: every
    saved activation but the loss's alive (its node ran and released the gradients it saved: the input's is
    the norm's incoming gradient, the weight's the LM head's .grad), with the norm's backward buffers (a
    block's where the norm records none). A standard language model's moment is the log-softmax gradient's."""
    if run.task not in ("seq-cls", "token-cls") and run.loss_kind != "liger":
        return []
    what = "classifier" if run.task in ("seq-cls", "token-cls") else "fused loss"
    return [(f"backward through the final norm ({what})", [(C.SAVED_ACTIVATIONS, saved), (C.LOGITS, logits),
                                                               (C.GRADIENTS, grads_head),
                                                               (C.ACTIVATION_GRADIENT_BUFFERS, buffers)])]


def block_moments(stack: Stack, in_block, recompute, below_last: bool = False) -> list[tuple[str, list]]:
    """Backward through the last and the first block of each kind (and, under checkpointing, the
    recomputation of each): where saved activations, accumulated gradients and the block's own buffers
    meet. Over the layers one simulated block stands for (a kind's `<kind>1`), each moment is affine in
    the layer index (the saves of the blocks below it, the gradients of those above), so its largest value
    is at the first or the last of them: with the kind's first block, those three bound the rest. Which end
    wins depends on whether a block's saves outweigh its gradients (full fine-tuning: the lower end).
    `below_last` (FSDP: every block but the top one also holds the reduce-scatter input of the unit above,
    sharding/rank.py gathered): the top block's moments drop that term, so the same kind's block just below
    it ends the affine stretch instead, and is evaluated too."""
    single = len(stack.kinds) == 1
    starts: dict[str, int] = {}
    for i, scope in enumerate(stack.scopes):
        starts.setdefault(scope, i)
    moments, recomputes, more = [], [], []
    for kind, first, last in stack.first_and_last:
        name = "" if single else f" {kind}"
        moments.append((f"backward through the last{name} block", in_block(last)))
        if first != last or single:
            moments.append((f"backward through the first{name} block", in_block(first)))
        second = starts.get(f"{kind}1")
        if second is not None and second not in (first, last):
            more.append((f"backward through the second{name} block", in_block(second)))
        if recompute is not None:
            recomputes.append((f"recomputing the last{name} block (checkpointing)", recompute(last)))
            if first != last:
                more.append((f"recomputing the first{name} block (checkpointing)", recompute(first)))
            if second is not None and second not in (first, last):
                more.append((f"recomputing the second{name} block (checkpointing)", recompute(second)))
        if below_last and last == len(stack.scopes) - 1:
            below = max((j for j in range(last) if stack.scopes[j] == stack.scopes[last]), default=None)
            if below is not None and below not in (first, second):
                more.append((f"backward through the{name} block below the last", in_block(below)))
                if recompute is not None:
                    more.append((f"recomputing the{name} block below the last (checkpointing)", recompute(below)))
    return moments + recomputes + more
