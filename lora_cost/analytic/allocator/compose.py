"""The analytic engine's allocation/free sequence of a training run, composed over the stack, and its replay.

The forward is simulated once per structure on an `EventTape` (events.py): the embeddings, the
simulated blocks of the stack (stack.py: the first and the second block of each kind) and the head and
loss, each a *segment* of the log. The run's sequence is built from those segments:

1. **Weights** in construction order: the base model's parameter groups (embeddings, then block by
   block every group repeated per block, then the rest), as the method stores them (4-bit under QLoRA),
   then the adapters peft adds (trainable and frozen tensors).
2. **Steps** (a first step, then the measured one with the cache warm, as trace/replay.py):
   - *forward*: the pre-block segments, then for each layer of the stack (`Stack.scopes`) the segment of
     the simulated block that stands for it, with fresh keys, its input being the previous layer's
     output; then the head and loss. A storage is freed when its last reference dies unless autograd
     saved it (held until backward); inside a checkpointed block saves are not kept
     (torch.utils.checkpoint drops them) and the block's input is held instead. The model's output
     (the logits, the head's last storage) stays referenced until the step ends, as lora-cost's
     reference step keeps it (context.py `logits_bytes`).
   - *backward*, segment by segment in reverse (a checkpointed block is first recomputed: its forward
     again with saves kept). Within a segment the ops (each op = the entries up to its output's "a")
     run in reverse. For an op whose output requires grad: its trainable weights' gradients are created
     (kept until zero_grad), the gradient of its input is allocated (the size of the previous op's
     output in the segment that requires grad, or of the segment's input), its backward-only buffers
     come and go, the gradient of its output is freed (except the segment's incoming gradient, the
     residual stream's, which lives through the segment), and the storages whose first save was this op
     are freed (autograd releases a node's saved variables after its backward; a storage saved by
     several nodes goes with the earliest one, the last to run). At the segment's end its incoming
     gradient goes; the gradient of its input flows to the segment before.
   - gradients not made by a logged linear (embeddings, norms, biases under full fine-tuning) are
     created together at the end of backward, where the embeddings' arrives;
   - *optimizer*: the state is created lazily in the first `optimizer.step()` (torch/optim/adamw.py
     `_init_group`, tensor by tensor); the step's temporaries come and go as the implementation makes
     them (reserved_events._temporaries); `zero_grad(set_to_none=True)` frees every gradient.
3. **cuBLAS workspaces** (workspaces.py WORKSPACE_MODE, as trace/replay.py places them): "before" (the
   default), one per cuBLAS thread ahead of the weights, each in a segment of its own; "cached", one after
   the first matmul's output of the first forward (the Python thread's handle) and one after the first
   matmul backward of the first backward (autograd's device thread). Kept for the run either way.

**Assumption of the composition** (stack.py): from its second occurrence on, every block of a kind
allocates, saves and frees exactly what the simulated second block does, in the same order and sizes:
same shapes, dtypes and gradient flags, and the same code. The per-layer pattern is therefore
repeated, not re-simulated: `tests/test_allocevents.py` checks it against a forward simulated with
every layer (the event sequence of the composed stack is identical, key for key in shape).

What the event model leaves out, with the reason: the exact op graph of backward (an op's gradient is
taken to flow to the previous op's output in the segment, a chain; a branch's accumulation buffer is
not modelled), a few tensors the tape does not create (an attention kernel's internal workspace), and
QLoRA's load-time quantisation (as the trace replay). Runs it does not model (several GPUs, master
weights, stepping in backward, a forward whose blocks are interleaved with other scopes) raise
`Unmodelled` and the estimate keeps the slack.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import count

from .caching import SimulatedOutOfMemory
from .replay import Replayer, ReplayResult
from .workspaces import CUBLAS_THREADS, WORKSPACE_MODE


class Unmodelled(Exception):
    """The event model does not cover this run (the reason is the message)."""


@dataclass
class Segment:
    scope: str
    entries: list  # the log entries of this scope, in order
    block: bool = False


def segments(tape, block_scopes) -> tuple[list[Segment], dict[str, Segment], list[Segment]]:
    """(segments before the blocks, block scope -> its segment, segments after) of a forward log."""
    runs: list[Segment] = []
    for e in tape.log:
        scope = e[-1]
        if not runs or runs[-1].scope != scope:
            runs.append(Segment(scope, [], scope in block_scopes))
        runs[-1].entries.append(e)
    first = next((i for i, s in enumerate(runs) if s.block), None)
    if first is None:
        raise Unmodelled("the forward ran no block")
    last = max(i for i, s in enumerate(runs) if s.block)
    blocks: dict[str, Segment] = {}
    for s in runs[first:last + 1]:
        if not s.block:
            raise Unmodelled(f"scope {s.scope!r} runs between the blocks (an encoder-decoder's stack)")
        if s.scope in blocks:
            raise Unmodelled(f"block {s.scope!r} ran twice")
        blocks[s.scope] = s
    return runs[:first], blocks, runs[last + 1:]


@dataclass
class Instance:
    """One segment placed in the run: its entries with keys, and the input it reads."""

    scope: str
    entries: list  # ("a", key, nbytes, rg) ("s", key) ("d", key) ("t", sizes) ("tb", sizes) ("w", n) ("m",)
    checkpointed: bool
    input_key: object = None
    block: bool = False


def forward_program(tape, stack, checkpointing: bool) -> tuple[list[Instance], dict]:
    """The forward of the whole stack as instances (keys (position, sid)) and the byte size of every key."""
    pre, blocks, post = segments(tape, set(stack.block_scopes))
    current: dict[int, tuple] = {}  # sid -> key of its latest instance
    sizes: dict = {}
    out: list[Instance] = []
    deferred: list = []  # frees of shared tensors inside repeated blocks: done after the last block

    def place(seg: Segment, pos: int, input_sid: int | None, prev_out, repeated: bool) -> Instance:
        made = {e[1] for e in seg.entries if e[0] == "a"}
        entries = []
        for e in seg.entries:
            tag = e[0]
            if tag == "a":
                key = (pos, e[1])
                current[e[1]] = key
                sizes[key] = e[2]
                entries.append(("a", key, e[2], e[3]))
            elif tag in ("s", "d"):
                sid = e[1]
                if sid in made:
                    key = (pos, sid)
                elif input_sid is not None and sid == input_sid:
                    key = prev_out
                else:
                    key = current.get(sid)
                    if key is None:
                        continue  # a storage from before the forward (never allocated in this log)
                    if tag == "d" and repeated:
                        deferred.append(("d", key))
                        continue
                entries.append((tag, key))
            elif tag == "m":
                entries.append(("m",))
            else:
                entries.append((tag, e[1]))
        return Instance(seg.scope, entries, checkpointing and seg.block, prev_out if seg.block else None, seg.block)

    pos = 0
    for seg in pre:
        out.append(place(seg, pos, None, None, False))
        pos += 1
    first_input = tape.block_inputs[stack.block_scopes[0]]
    prev_out = current.get(first_input)
    reps = stack.repetitions
    for scope in stack.scopes:
        seg = blocks[scope]
        out.append(place(seg, pos, tape.block_inputs[scope], prev_out, reps[scope] > 1))
        prev_out = (pos, tape.block_outputs[scope])
        pos += 1
    if deferred:
        out.append(Instance("after blocks", list(dict.fromkeys(deferred)), False))
    for seg in post:
        out.append(place(seg, pos, None, None, False))
        pos += 1
    return out, sizes


@dataclass(frozen=True)
class RunParts:
    """What the sequence needs besides the forward: the stored tensors and the optimizer (compose_run)."""

    weights: tuple[int, ...]  # bytes of every stored tensor, in construction order
    states: tuple[int, ...]  # bytes of every optimizer state tensor, in creation order (paged: none)
    optimizer_temporaries: tuple[tuple[int, ...], ...]  # lists of tensors alive together, one list after another
    trainable_bytes: int  # every gradient of a step together
    workspace: int  # one cuBLAS workspace (0: none)


class _Emitter:
    """Writes alloc/free events, keeping the set of live keys (a free of a dead key is dropped)."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.live: set = set()

    def alloc(self, key, nbytes: int) -> None:
        if nbytes > 0:
            self.events.append((key, nbytes))
            self.live.add(key)

    def free(self, key) -> None:
        live = self.live
        if key in live:
            live.remove(key)
            self.events.append((key, None))


class _Replaying(_Emitter):
    """An emitter whose events go straight to a `Replayer`, in the same order, instead of into a list."""

    def __init__(self, replayer: Replayer) -> None:
        super().__init__()
        self._alloc, self._free = replayer.alloc, replayer.free

    def alloc(self, key, nbytes: int) -> None:
        if nbytes > 0:
            self.live.add(key)
            self._alloc(key, nbytes)

    def free(self, key) -> None:
        live = self.live
        if key in live:
            live.remove(key)
            self._free(key)


def _ops(entries: list) -> list[tuple]:
    """Group a segment's entries into ops: (the output's "a" entry, the entries before it since the last one).

    The tape's ops save their inputs before they make their output and their own output right after it
    (ops.py: log_softmax, tanh, relu). A save of the storage just made, with nothing in between, is taken as
    the op saving its own output; when it is in fact the next op saving its input, the storage is freed one
    node later in backward (held slightly longer, never shorter)."""
    ops, pending = [], []
    for e in entries:
        if e[0] == "a":
            ops.append((e, pending))
            pending = []
        elif e[0] == "s" and ops and not pending and e[1] == ops[-1][0][1]:
            ops[-1][1].append(e)  # an op saving its own output (log_softmax, tanh, relu): its node holds it
        elif e[0] != "d":
            pending.append(e)
    if pending and ops:
        ops[-1] = (ops[-1][0], ops[-1][1] + pending)
    return ops


@dataclass
class _Analysis:
    """What every step of a program shares: computed once (run_events)."""

    held: set  # keys kept for backward (saved outside checkpointed blocks)
    ckpt_inputs: set  # inputs of checkpointed blocks (torch.utils.checkpoint keeps them)
    output: object  # the model output's key (the logits), kept until the step ends
    ops: list  # per instance: its ops (_ops)
    frees: list  # per instance: op index -> keys whose earliest save was that op (recomputed ones, if checkpointed)
    made: list  # per instance: keys its entries allocate
    prev_rg: list  # per instance, per op: the size of the previous op output requiring grad in it (None: none)
    input_size: list  # per instance: the size of what it reads (its first op's input gradient)


def analyse(program: list[Instance], sizes: dict) -> _Analysis:
    held = set()
    for inst in program:
        if not inst.checkpointed:
            held.update(e[1] for e in inst.entries if e[0] == "s")
    # the model's output (the logits: the last storage the head makes) stays referenced by the output object
    # until the step ends, as lora-cost's reference step keeps it (context.py logits_bytes)
    output = next((e[1] for inst in reversed(program) if inst.scope == "head"
                   for e in reversed(inst.entries) if e[0] == "a"), None)
    ops = [_ops(inst.entries) for inst in program]
    frees: list[dict] = [{} for _ in program]
    seen: set = set()
    made = [{e[1] for e in inst.entries if e[0] == "a"} for inst in program]
    for i, inst in enumerate(program):
        local: set = set()
        for j, (a, pre) in enumerate(ops[i]):
            for e in pre:
                if e[0] != "s":
                    continue
                if inst.checkpointed:  # recomputed storages, freed by the recomputation's own nodes
                    if e[1] in made[i] and e[1] not in local:
                        local.add(e[1])
                        frees[i].setdefault(j, []).append(e[1])
                elif e[1] not in seen:  # a storage saved by several nodes goes with the earliest
                    seen.add(e[1])
                    frees[i].setdefault(j, []).append(e[1])
    prev_rg, input_size = [], []
    last = None  # the last output requiring grad so far (what a segment outside the blocks reads)
    for i, inst in enumerate(program):
        row, before = [], None
        for a, _ in ops[i]:
            row.append(before)
            if a[3]:
                before = a[2]
        prev_rg.append(row)
        input_size.append(sizes.get(inst.input_key) if inst.input_key is not None else last)
        last = before if before is not None else last
    return _Analysis(held, {inst.input_key for inst in program if inst.checkpointed}, output, ops, frees, made,
                     prev_rg, input_size)


def step_events(program: list[Instance], an: _Analysis, parts: RunParts, out: _Emitter, step: int,
                first: bool, ws_keys: list) -> None:
    """One training step's events (see the module docstring), keys prefixed with `step`."""
    K = lambda key: (step, key)  # noqa: E731  (inline as (step, key) in the loops: ~10^4 events per step)
    held, ckpt_inputs, output = an.held, an.ckpt_inputs, an.output
    alloc, free = out.alloc, out.free
    # ---- forward
    matmul_seen = False
    for i, inst in enumerate(program):
        for e in inst.entries:
            tag = e[0]
            if tag == "a":
                alloc((step, e[1]), e[2])
                if matmul_seen and first and not ws_keys:
                    ws_keys.append(("workspace", "forward"))
                    alloc(ws_keys[-1], parts.workspace)
                matmul_seen = False
            elif tag == "m":
                matmul_seen = True
            elif tag == "d":
                if e[1] not in held and e[1] not in ckpt_inputs and e[1] != output:
                    free((step, e[1]))
            elif tag == "t":
                _transient(out, (step, ("t", i)), e[1])
    # ---- backward
    grads = count()
    param_grads: list = []
    param_grad_keys: set = set()  # the same keys, for membership
    cur = None  # (key, nbytes) of the gradient flowing back
    ws_backward = first and len(ws_keys) < 2
    for i in range(len(program) - 1, -1, -1):
        inst = program[i]
        made = an.made[i]
        if inst.checkpointed:  # torch.utils.checkpoint: the block's forward again, saves kept this time
            key_of = lambda key, i=i: (step, ("rc", i, key))  # noqa: E731
            saved = {k for keys in an.frees[i].values() for k in keys}
            for e in inst.entries:
                if e[0] == "a":
                    alloc(key_of(e[1]), e[2])
                elif e[0] == "d" and e[1] in made and e[1] not in saved:
                    free(key_of(e[1]))
                elif e[0] == "t":
                    _transient(out, K(("rt", i)), e[1])
            for key in made - saved:  # the recomputed outputs nobody keeps
                free(key_of(key))
        else:
            key_of = K
        ops, frees, prev_rg = an.ops[i], an.frees[i], an.prev_rg[i]
        resid = cur
        for j in range(len(ops) - 1, -1, -1):
            a, pre = ops[j]
            if a[3]:
                for e in pre:
                    if e[0] == "w":
                        key = (step, ("pg", next(grads)))
                        alloc(key, e[1])
                        param_grads.append(key)
                        param_grad_keys.add(key)
                size_in = prev_rg[j] if prev_rg[j] is not None else an.input_size[i]
                g_in = None
                if size_in:
                    g_in = ((step, ("g", next(grads))), size_in)
                    alloc(*g_in)
                if ws_backward and any(e[0] == "m" for e in pre):
                    ws_keys.append(("workspace", "backward"))
                    alloc(ws_keys[-1], parts.workspace)
                    ws_backward = False
                for e in pre:
                    if e[0] == "tb":
                        _transient(out, (step, ("tb", i, j)), e[1])
                if cur is not None and cur is not resid:
                    free(cur[0])
                cur = g_in  # None: nothing flows further back (an input that needs no gradient)
            if j in frees:
                for k in frees[j]:  # the storages whose earliest save was this op
                    free(key_of(k))
        if resid is not None and cur is not resid:
            free(resid[0])
        if inst.checkpointed:
            for key in made:
                free(key_of(key))
            free(K(inst.input_key))
    if cur is not None:
        free(cur[0])
    rest = parts.trainable_bytes - _param_grad_bytes(an)
    if rest > 0:
        key = K(("pg", "rest"))
        alloc(key, rest)
        param_grads.append(key)
        param_grad_keys.add(key)
    for key in [k for k in out.live if k[0] == step and k not in param_grad_keys]:
        free(key)  # whatever backward left (storages saved by a node that never ran, the model output)
    # ---- optimizer.step(), zero_grad(set_to_none=True)
    if first:
        for n, nbytes in enumerate(parts.states):
            out.alloc(("state", n), nbytes)
    for n, together in enumerate(parts.optimizer_temporaries):
        for m, nbytes in enumerate(together):
            out.alloc(K(("optimizer temporaries", n, m)), nbytes)
        for m in range(len(together)):
            out.free(K(("optimizer temporaries", n, m)))
    for key in param_grads:
        out.free(key)


def _transient(out: _Emitter, key, sizes: tuple[int, ...]) -> None:
    """Buffers alive together inside one op: allocated, then freed."""
    for n, nbytes in enumerate(sizes):
        out.alloc((key, n), nbytes)
    for n in range(len(sizes)):
        out.free((key, n))


def _param_grad_bytes(an: _Analysis) -> int:
    """Bytes of the weight gradients the logged linears make in one backward (ops that require grad)."""
    return sum(e[1] for ops in an.ops for a, pre in ops if a[3] for e in pre if e[0] == "w")


def run_events(program: list[Instance], sizes: dict, parts: RunParts, steps: int = 2,
               workspace_mode: str = WORKSPACE_MODE) -> list[tuple]:
    """The whole run's sequence: the weights, then `steps` steps (the first creates the optimizer state);
    the cuBLAS workspaces "before" everything or "cached" at each thread's first matmul (workspaces.py)."""
    out = _Emitter()
    _compose(out, program, sizes, parts, steps, workspace_mode)
    return out.events


def _compose(out: _Emitter, program: list[Instance], sizes: dict, parts: RunParts, steps: int,
             workspace_mode: str) -> None:
    ws_keys: list = []
    if workspace_mode == "before":  # workspaces.py: one per cuBLAS thread, ahead of everything (as trace/replay.py)
        for thread in range(CUBLAS_THREADS):
            ws_keys.append(("workspace", thread))
            out.alloc(ws_keys[-1], parts.workspace)
    for n, nbytes in enumerate(parts.weights):
        out.alloc(("weight", n), nbytes)
    an = analyse(program, sizes)
    for step in range(steps):
        step_events(program, an, parts, out, step, step == 0, ws_keys)


def replay_run(program, sizes, parts: RunParts, config=None, capacity_bytes: int | None = None,
               steps: int = 2) -> ReplayResult:
    """`replay(run_events(...))`, each event replayed as it is composed."""
    replayer = Replayer(config, capacity_bytes)
    try:
        _compose(_Replaying(replayer), program, sizes, parts, steps, WORKSPACE_MODE)
    except SimulatedOutOfMemory as exc:
        replayer.oom = exc.request_bytes
    return replayer.result()
