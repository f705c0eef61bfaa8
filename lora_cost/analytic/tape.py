"""A symbolic record of one training step: which tensors autograd keeps, and the matmul FLOPs.

The estimator "runs" a model's forward pass on `Tensor` stand-ins that carry only an element
count, a dtype, whether they require grad, and a storage identity. Each op in `ops.py` applies
PyTorch's rule for what its backward needs (autograd saves an input only when the gradient that
uses it will be computed; several views of one storage are kept once). The result is the same
number `torch.autograd.graph.saved_tensors_hooks` reports, computed without torch.

FLOP convention: 2 FLOPs per multiply-add, and only matrix products and attention kernels count,
exactly as `torch.utils.flop_counter.FlopCounterMode` counts (fvcore counts one multiply-add as
one FLOP, i.e. half of these numbers).
"""

from __future__ import annotations

from collections import defaultdict
from itertools import count

from ..units import DTYPE_BYTES

_storage_ids = count()


class Tensor:
    """A tensor stand-in: no data, just what memory accounting needs."""

    __slots__ = ("numel", "dtype", "rg", "sid")

    def __init__(self, numel: int, dtype: str, rg: bool, sid: int | None = None) -> None:
        self.numel = numel
        self.dtype = dtype
        self.rg = rg
        self.sid = next(_storage_ids) if sid is None else sid

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]

    def view(self, rg: bool | None = None) -> "Tensor":
        """Same storage (a reshape, transpose or split), possibly with a different grad flag."""
        return Tensor(self.numel, self.dtype, self.rg if rg is None else rg, self.sid)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Tensor({self.numel}, {self.dtype}, rg={self.rg})"


class _Storage:
    """One storage made by `Tape.new`: tells the tape when the last tensor viewing it dies (CPython frees an
    object at reference count zero, as torch frees a storage when its last tensor goes), so the tape knows
    what the forward's Python code still holds at every op (ligeracc: `Tape.forward_live`)."""

    __slots__ = ("sid", "nbytes", "tape")

    def __init__(self, sid: int, nbytes: int, tape: "Tape") -> None:
        self.sid, self.nbytes, self.tape = sid, nbytes, tape

    def __del__(self) -> None:
        self.tape._died(self.sid, self.nbytes)


class LiveTensor(Tensor):
    """A tape tensor that holds its storage (views share it): a storage is alive while any of them is.
    (A plain `Tensor` built on a storage's sid, as a few modules do for a split, does not hold it.)"""

    __slots__ = ("storage",)

    def view(self, rg: bool | None = None) -> "LiveTensor":
        t = LiveTensor(self.numel, self.dtype, self.rg if rg is None else rg, self.sid)
        t.storage = self.storage
        return t


class Tape:
    """Accumulates saved-activation bytes and FLOPs, attributed to a scope and a kind."""

    def __init__(self, tokens: int, autocast: str | None = None, track_live: bool = True) -> None:
        self.tokens = tokens
        self.track_live = track_live  # ligeracc: whether storages report their death (forward_live); False: plain
        self.autocast = autocast
        self.scope = "embeddings"
        self._saved_ids: set[int] = set()
        self.saved: dict[tuple[str, str], int] = defaultdict(int)
        self.saved_by_scope: dict[str, int] = defaultdict(int)
        self.flops_by_scope: dict[tuple[str, str], int] = defaultdict(int)  # (scope, fwd|bwd)
        self.flops: dict[tuple[str, str, str], int] = defaultdict(int)  # (scope, kind, fwd|bwd)
        self.uncounted_flops: dict[str, int] = defaultdict(int)  # scope -> forward FLOPs FlopCounterMode misses
        self.created: dict[str, list[int]] = defaultdict(list)  # scope -> bytes of every activation created
        # FLOPs run after the scope's last save: non-reentrant checkpointing stops recomputing there
        self.flops_after_last_save: dict[str, int] = defaultdict(int)
        self.uncounted_after_last_save: dict[str, int] = defaultdict(int)
        self.orphaned: dict[str, int] = defaultdict(int)  # scope -> bytes saved for graphs dropped before backward
        # issue9b: scope -> bytes an autograd Function keeps as plain ctx attributes (bitsandbytes MatMul8bitLt's
        # ctx.tensors): saved_tensors_hooks never see them, so non-reentrant checkpointing cannot drop them
        self.kept_past_checkpoint: dict[str, int] = defaultdict(int)
        self._kept_ids: set[int] = set()
        self.forward_transient: dict[str, list[int]] = defaultdict(list)  # scope -> short-lived buffers
        self.backward_transient: dict[str, list[int]] = defaultdict(list)
        # scope -> the gradient buffers alive at the peak of each norm's backward (ops.rms_norm, ops.layer_norm)
        self.norm_backward: dict[str, list[int]] = defaultdict(list)
        # scope -> per activation created: three times its bytes (its gradient in, two out: peaks.py in_block)
        # plus what the scope had saved when it was made (alive when that gradient forms)
        self.widest_moment: dict[str, list[int]] = defaultdict(list)
        # moments: scope -> trainable bytes of the linears run so far in it (trainable_used), and per activation
        # created its widest_moment entry less those bytes. A parameter's gradient is complete (AccumulateGrad
        # runs, torch/csrc/autograd/engine.cpp) once backward has passed its first use in the forward: when an
        # activation's gradient forms, the linears run after it have theirs, those run before it do not
        # (peaks.py in_block: the block's trainable bytes + the largest of these entries)
        self.gradients_before: dict[str, int] = defaultdict(int)
        self.widest_gradients: dict[str, list[int]] = defaultdict(list)
        self.notes: list[str] = []
        # scopes that stand for several layers (stack.py), set by the context when blocks are not
        # checkpointed: a tensor made outside the blocks (RoPE tables) and first saved inside such a
        # scope (the first block saved nothing of it: its inputs needed no gradient, as under
        # bottleneck adapters) is one storage for all those layers, so it is counted where it was made
        self.repeated_scopes: frozenset[str] = frozenset()
        self.block_scopes: frozenset[str] = frozenset()
        self._made_in: dict[int, str] = {}
        self._made_at: dict[int, tuple] = {}  # sid -> (saves, gradients_before, scope) when made, for gradient_summed
        # ligeracc: what the forward holds at each op. A storage is alive from its op until its last tensor dies
        # (_Storage); it persists past that when autograd keeps it: saved outside a checkpointed block, held by
        # a ctx attribute, or a checkpointed block's input (torch.utils.checkpoint keeps it; `hold`). Per scope,
        # at every new storage and every op buffer: the scope's saves so far (none in a checkpointed block: the
        # checkpoint drops them) + every storage alive and not persisting (held by Python only: the block's
        # input and the layer loop's, a sublayer's output waiting for the next op, the logits at the loss) + the
        # op's buffers (peaks.py: the forward's tracked moments; the saves of the scopes before are added there)
        self.checkpointed_scopes: frozenset[str] = frozenset()
        self.forward_live: dict[str, list[int]] = defaultdict(list)
        self._alive: dict[int, int] = {}  # sid -> bytes of every storage alive
        self._persist: set[int] = set()  # sids kept for backward whatever Python does
        self._held = 0  # bytes alive and not persisting
        self._pending: str | None = None  # the scope of the latest new storage, pending a moment (flush_live)
        # under checkpointing, the recomputation reruns a block's forward with its saves kept (stashed until their
        # backward): per block scope, the same count with the block's saves persisting (recompute_live)
        self.recompute_live: dict[str, list[int]] = defaultdict(list)
        self._ckpt_saved: set[int] = set()  # sids saved inside a checkpointed block
        self._ckpt_saved_alive = 0  # bytes of those alive and not persisting
        self._resaved: dict[str, int] = defaultdict(int)  # scope -> its saves of storages the checkpoint keeps

    # -- bookkeeping -------------------------------------------------------------------------
    def new(self, numel: int, dtype: str, rg: bool, gradient_buffers: int = 3) -> Tensor:
        """A new activation. `gradient_buffers`: how many buffers of its size its consumer's backward holds at once
        (3: the incoming gradient and two outgoing ones, a product's; Liger's SwiGLU output: 1, its kernel writes
        the two outgoing gradients into its saved inputs, analytic/liger.py)."""
        nbytes = numel * DTYPE_BYTES[dtype]
        scope = self.scope
        if self.track_live:
            t = LiveTensor(numel, dtype, rg)
            sid = t.sid
            t.storage = _Storage(sid, nbytes, self)
            self._alive[sid] = nbytes
            self._held += nbytes
            self._pending = scope  # its moment is recorded before what is held next decreases (flush_live)
        else:
            t = Tensor(numel, dtype, rg)
            sid = t.sid
        self.created[scope].append(nbytes)
        # (saves a ctx attribute holds are left out: they outlive their node's backward, so peaks.py in_block
        # adds all of the block's, those made after this activation too)
        base = self.saved_by_scope.get(scope, 0) - self.kept_past_checkpoint.get(scope, 0)
        moment = gradient_buffers * nbytes + base
        self.widest_moment[scope].append(moment)
        before = self.gradients_before.get(scope, 0)
        self.widest_gradients[scope].append(moment - before)
        self._made_in[sid] = scope
        if gradient_buffers < 3:  # ligeracc: its consumer may still hold more (gradient_summed)
            self._made_at[sid] = (base, before, scope)
        return t

    def gradient_summed(self, t: Tensor) -> None:
        """`t`'s gradient is the sum of two paths of its consumer (a LoRA layer: the base layer's and the adapter's
        input gradients, autograd's InputBuffer adding them out of place, torch/csrc/autograd/input_buffer.cpp
        `accumulate`): the two and their sum, three buffers of t's size, when its gradient forms, whatever t's
        maker needs then (Liger's SwiGLU output: one, analytic/liger.py). A widest-moment entry as `new` makes one."""
        made = self._made_at.get(t.sid)
        if made is None:
            return
        base, gradients, scope = made
        moment = 3 * t.nbytes + base
        self.widest_moment[scope].append(moment)
        self.widest_gradients[scope].append(moment - gradients)

    def buffer_alive(self, nbytes: int) -> None:
        """An op's buffer of `nbytes` is still alive as its output is made (gemm_4bit's dequantised weight): a
        forward moment of its own (forward_live only; the buffer is already among the op's transients)."""
        self._live_moment(nbytes)

    def _live_values(self, buffers: int, scope: str) -> tuple:
        """(scope, what the forward holds now + `buffers`, the same in a recomputation or None)."""
        if scope in self.checkpointed_scopes:
            return (scope, self._held + buffers,
                    self.saved_by_scope.get(scope, 0) - self._resaved[scope] + self._held - self._ckpt_saved_alive + buffers)
        return scope, self.saved_by_scope.get(scope, 0) + self._held + buffers, None

    def _record(self, values: tuple) -> None:
        scope, live, again = values
        self.forward_live[scope].append(live)
        if again is not None:
            self.recompute_live[scope].append(again)

    def _live_moment(self, buffers: int) -> None:
        """A moment with an op's buffers alive: a candidate of its own (it dominates a pending one)."""
        if self.track_live:
            self._pending = None
            self._record(self._live_values(buffers, self.scope))

    def flush_live(self) -> None:
        """Record the pending moment. Only local maxima are kept, for speed: a new storage only adds to the
        previous moment (which it replaces as the pending one), so a moment is recorded just before what is held
        decreases (a death, a storage that starts to persist) or at the end. Which moments are kept depends on
        the order of events only, never on sizes, so every simulation of one structure keeps the same ones (the
        rank and batch lines pair them entry by entry: record.py)."""
        if self._pending is not None:
            self._record(self._live_values(0, self._pending))
            self._pending = None

    def _persists(self, sid: int) -> None:
        """The storage `sid` is kept for backward from now on: no longer held by Python alone. (A caller whose
        bytes do not move to the scope's saves, so that what is held decreases, records the pending moment first.)"""
        if sid not in self._persist:
            self._persist.add(sid)
            if sid in self._alive:
                self._held -= self._alive[sid]
                if sid in self._ckpt_saved:
                    self._ckpt_saved_alive -= self._alive[sid]

    def _died(self, sid: int, nbytes: int) -> None:
        """The last tensor of storage `sid` died (_Storage.__del__)."""
        if self._alive.pop(sid, None) is not None and sid not in self._persist:
            if self._pending is not None:
                self.flush_live()
            self._held -= nbytes
            if sid in self._ckpt_saved:
                self._ckpt_saved_alive -= nbytes

    def hold(self, t: Tensor) -> None:
        """`t` is kept for backward by something other than a save this tape counts in the scope (a checkpointed
        block's input, stored by torch.utils.checkpoint): counted elsewhere (peaks.py), not as held by Python."""
        if self._pending is not None:
            self.flush_live()
        self._persists(t.sid)

    def parameter(self, numel: int, dtype: str, rg: bool) -> Tensor:
        """A parameter used as an activation (DeBERTa's rel_embeddings.weight fed to a linear): autograd
        may keep it, but a parameter is never an activation (saved_tensors_hooks counts exclude them)."""
        t = Tensor(numel, dtype, rg)
        self._saved_ids.add(t.sid)  # saving it later adds nothing
        return t

    def mark_saved(self) -> None:
        """A save event with no activation bytes (autograd keeps a parameter): still ends a stretch
        of recomputation under non-reentrant checkpointing."""
        self.flops_after_last_save[self.scope] = 0
        self.uncounted_after_last_save[self.scope] = 0

    def save(self, t: Tensor, kind: str) -> None:
        """autograd keeps `t` for backward; a storage is counted once however many views are saved."""
        self.mark_saved()
        if t.sid in self._saved_ids:
            return
        self._saved_ids.add(t.sid)
        if self.track_live:
            if self.scope not in self.checkpointed_scopes:
                if self._pending is not None and self.scope in self.repeated_scopes:
                    self.flush_live()  # its bytes may go to the scope it was made in (below): what is held decreases
                self._persists(t.sid)
            elif t.sid in self._persist:  # the checkpoint's own input (tape.hold), saved again: one storage
                self._resaved[self.scope] += t.nbytes
            elif t.sid in self._alive:
                self._ckpt_saved.add(t.sid)
                self._ckpt_saved_alive += t.nbytes
        nbytes = t.nbytes
        scope = self.scope
        made_in = self._made_in.get(t.sid, scope)
        if scope in self.repeated_scopes and made_in not in self.block_scopes:
            scope = made_in  # shared by the layers this scope stands for: kept once
        self.saved[(scope, kind)] += nbytes
        self.saved_by_scope[scope] += nbytes

    def keep_past_checkpoint(self, t: Tensor) -> None:
        """`t` is held by a ctx attribute until its op's backward, checkpointed or not (counted once per storage)."""
        if t.sid not in self._kept_ids:
            self._kept_ids.add(t.sid)
            if self._pending is not None:
                self.flush_live()
            self._persists(t.sid)
            self.kept_past_checkpoint[self.scope] += t.nbytes

    def matmul(self, kind: str, m: int, k: int, n: int, *, grad_a: bool, grad_b: bool, counted: bool = True) -> None:
        """[m, k] @ [k, n]: 2mkn forward; backward 2mkn for each operand that needs a gradient."""
        fwd = 2 * m * k * n
        bwd = fwd * (int(grad_a) + int(grad_b))
        self.add_flops(kind, fwd, bwd)
        if not counted:
            self.uncounted_flops[self.scope] += fwd
            self.uncounted_after_last_save[self.scope] += fwd

    def add_flops(self, kind: str, fwd: int, bwd: int) -> None:
        scope = self.scope
        self.flops[(scope, kind, "fwd")] += fwd
        self.flops[(scope, kind, "bwd")] += bwd
        self.flops_by_scope[(scope, "fwd")] += fwd
        self.flops_by_scope[(scope, "bwd")] += bwd
        self.flops_after_last_save[scope] += fwd

    def weight_gradient(self, nbytes: int) -> None:
        """The op uses a trainable weight of `nbytes`: its backward creates that gradient. Only the event
        log of the allocator replay uses it (allocator/events.py)."""

    def orphaned_save(self, nbytes: int) -> None:
        """Tensors autograd saves for a graph that is dropped before backward (it dies with its
        module in a plain step). Under non-reentrant checkpointing the recomputed copies are stashed
        until the block's backward ends."""
        self.mark_saved()
        self.orphaned[self.scope] += nbytes

    def transient(self, nbytes: int, backward: bool = False, pieces: int = 1) -> None:
        """A buffer that lives only inside one op (dequantised weight, weight-norm input, ...). `pieces`: it is
        that many equal tensors alive together (only the allocation replay tells them apart: allocator/events.py)."""
        table = self.backward_transient if backward else self.forward_transient
        table[self.scope].append(nbytes)
        if not backward:
            self._live_moment(nbytes)

    def norm_backward_buffers(self, nbytes: int) -> None:
        """The activation gradients alive at the peak of a norm's backward (the final norm's decides a
        classifier's backward: peaks.py)."""
        self.norm_backward[self.scope].append(nbytes)

    def trainable_used(self, nbytes: int) -> None:
        """A linear whose trainable tensors hold `nbytes` (budget.site_gradient_bytes) runs now, before it makes
        its output: the gradients of those tensors form in backward after the gradient of everything made from
        here on."""
        self.gradients_before[self.scope] += nbytes

    # -- summaries ---------------------------------------------------------------------------
    def saved_in(self, scope: str) -> int:
        return self.saved_by_scope.get(scope, 0)

    def flops_in(self, scope: str, phase: str) -> int:
        return self.flops_by_scope.get((scope, phase), 0)
