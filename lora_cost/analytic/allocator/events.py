"""The analytic forward as a log of storage events: what the tape creates, saves, drops and uses (torch-free).

`EventTape` is the symbolic tape (analytic/tape.py) that also writes, in order, one entry per thing the
caching allocator sees or autograd decides:

    ("a", sid, nbytes, rg, scope)   a new storage (every `Tape.new`: an op's output)
    ("s", sid, scope)               autograd saves the storage for backward (`Tape.save`)
    ("d", sid, scope)               the last Python reference to the storage died
    ("t", sizes, scope)             buffers alive together inside one op (`Tape.transient`): allocated, freed
    ("tb", sizes, scope)            the same inside the op's backward
    ("w", nbytes, scope)            the op uses a trainable weight: its backward creates that gradient
    ("m", scope)                    the op runs a matmul (cuBLAS: where the workspaces are taken)

When a storage dies follows Python's reference counting of the tape's tensors: the analytic forward
functions mirror transformers' forward op by op (a local reassigned, a function returning), so a
stand-in dies where the real tensor's last reference dies (CPython frees at refcount zero, as torch
frees a storage when its last tensor goes). Each new storage gets a `_Storage` object that every view
shares; its `__del__` writes "d". A few modules build a plain `tape.Tensor` view of a storage (phi3's
fused qkv split, heads.py, losses.py): such a view does not keep the storage alive in this log (the
storage's other tensors do in those places).

Whether a dead storage is freed or kept for backward is decided later (compose.py): a saved storage
stays until its node's backward, unless its block is checkpointed.
"""

from __future__ import annotations

from ..tape import Tape, Tensor

# ligeracc: the tape's own storages (tape.py _Storage, LiveTensor) report their death; this log writes it


class EventTape(Tape):
    """The tape, writing the storage event log described in the module docstring."""

    def __init__(self, tokens: int, autocast: str | None = None) -> None:
        super().__init__(tokens, autocast)
        self.log: list[tuple] = []
        self.block_inputs: dict[str, int] = {}  # block scope -> sid of its input (the residual stream)
        self.block_outputs: dict[str, int] = {}  # block scope -> sid of what it hands on

    def new(self, numel: int, dtype: str, rg: bool, gradient_buffers: int = 3) -> Tensor:
        t = super().new(numel, dtype, rg, gradient_buffers)
        self.log.append(("a", t.sid, t.nbytes, rg, self.scope))
        return t

    def _died(self, sid: int, nbytes: int) -> None:
        super()._died(sid, nbytes)
        self.log.append(("d", sid, self.scope))

    def save(self, t: Tensor, kind: str) -> None:
        super().save(t, kind)
        self.log.append(("s", t.sid, self.scope))

    def transient(self, nbytes: int, backward: bool = False, pieces: int = 1) -> None:
        super().transient(nbytes, backward)
        self.log.append(("tb" if backward else "t", tuple([nbytes // pieces] * pieces), self.scope))

    def weight_gradient(self, nbytes: int) -> None:
        self.log.append(("w", nbytes, self.scope))

    def matmul(self, kind: str, m: int, k: int, n: int, *, grad_a: bool, grad_b: bool, counted: bool = True) -> None:
        super().matmul(kind, m, k, n, grad_a=grad_a, grad_b=grad_b, counted=counted)
        self.log.append(("m", self.scope))


def record_forward(spec, run, method, arch, targets, stack):
    """Run the architecture's forward on an EventTape: (tape, context). Every stand-in the forward made
    has died when this returns (the context is dropped), so the log ends with their "d" entries."""
    from ..context import make_context

    tape = EventTape(run.tokens, autocast=run.autocast_dtype)
    ctx = make_context(tape, spec, run, method, targets, stack)
    _watch_blocks(ctx, tape)
    arch.forward(ctx)
    tape.scope = "end"
    ctx._input_ids = None
    del ctx
    return tape


def _watch_blocks(ctx, tape: EventTape) -> None:
    """Note each simulated block's input and output storage (the residual stream it receives and hands on),
    by wrapping the context's `blocks` (context.py) for this one forward."""
    run_blocks = ctx.blocks

    def blocks(x, builders, kinds=None):
        wrapped = {}
        for kind, build in builders.items():
            def one(x, build=build):
                tape.block_inputs[tape.scope] = x.sid
                out = build(x)
                tape.block_outputs[tape.scope] = out.sid
                return out
            wrapped[kind] = one
        return run_blocks(x, wrapped, kinds)

    ctx.blocks = blocks
