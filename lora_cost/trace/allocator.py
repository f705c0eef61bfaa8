"""A simulated CUDA caching allocator: every storage's life, rounded as PyTorch rounds it.

`AllocatorSim` is a TorchDispatchMode that sees every aten op below autograd (forward, backward,
optimizer). Each fake output storage it has not seen is an allocation; a weak reference to the
storage's Python object (PyTorch preserves one per StorageImpl) reports its release. Sizes are
rounded as c10/cuda/CUDACachingAllocator.cpp `round_size` does for `memory_allocated()`: at least
512 bytes and a multiple of 512 (an empty tensor allocates nothing). The running sum is what
`torch.cuda.memory_allocated()` would show; its maximum per phase is `max_memory_allocated()`.

Saved activations come from `torch.autograd.graph.saved_tensors_hooks`: a storage packed by
autograd is counted once however many views of it are saved, and parameter and buffer storages are
excluded (the calibration's definition).
"""

from __future__ import annotations

import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import composite

BLOCK = 512


def rounded(nbytes: int) -> int:
    if nbytes <= 0:
        return 0
    return -(-nbytes // BLOCK) * BLOCK


class Block:
    __slots__ = ("raw", "size", "alloc", "free", "kind", "op", "module", "phase", "saved", "recompute", "__weakref__")

    def __init__(self, raw: int, alloc: int, kind: str | None, op: str, module: str, phase: str) -> None:
        self.raw, self.size, self.alloc, self.free = raw, rounded(raw), alloc, None
        self.kind, self.op, self.module, self.phase = kind, op, module, phase
        self.saved = False
        self.recompute = False


class AllocatorSim(TorchDispatchMode):
    def __init__(self, where, identity_pack: bool = False) -> None:
        super().__init__()
        self.where = where
        self.identity_pack = identity_pack  # () -> innermost module name, and whether a forward runs inside backward
        self.live: dict[int, Block] = {}
        self.blocks: list[Block] = []
        self._refs: list = []
        self.event = 0
        self.current = 0
        self.phase = "setup"
        self.peaks: dict[str, tuple[int, int, str, str]] = {}  # phase -> (bytes, event, op, module)
        self.saved_blocks: list[Block] = []
        self.saved_module: dict[str, list[int]] = {}
        self.ops_seen: dict[str, int] = {}
        self.starts: dict[str, int] = {}
        self.marks: list[tuple[str, int]] = []  # (phase or label, last event before it): for the allocator replay

    # -- storages ---------------------------------------------------------------------------
    def _register(self, t: torch.Tensor, kind: str | None, op: str) -> Block | None:
        local = getattr(t, "_local_tensor", None)  # a DTensor (FSDP2's sharded parameters): its rank's local shard
        if local is not None:
            t = local
        if not isinstance(t, FakeTensor):
            return None
        st = t.untyped_storage()
        key = st._cdata
        blk = self.live.get(key)
        if blk is not None:
            if kind is not None and blk.kind is None:
                blk.kind = kind
            return blk
        self.event += 1
        module, recompute = self.where()
        blk = Block(st.nbytes(), self.event, kind, op, module, self.phase)
        blk.recompute = recompute and self.phase == "backward"
        self.live[key] = blk
        self.blocks.append(blk)
        self._refs.append(weakref.ref(st, lambda _w, k=key, b=blk: self._release(k, b)))
        self.current += blk.size
        peak = self.peaks.get(self.phase)
        if peak is None or self.current > peak[0]:
            self.peaks[self.phase] = (self.current, self.event, op, module)
        return blk

    def _release(self, key: int, blk: Block) -> None:
        if self.live.get(key) is blk:
            del self.live[key]
            self.event += 1
            blk.free = self.event
            self.current -= blk.size

    def storage_freed(self, t: torch.Tensor) -> None:
        """`storage.resize_(0)` (FSDP2's `free_storage`): the storage object lives on, its memory is freed."""
        key = t.untyped_storage()._cdata
        blk = self.live.get(key)
        if blk is not None:
            self._release(key, blk)

    def storage_resized(self, t: torch.Tensor, op: str) -> None:
        """`storage.resize_(n)` back to its size (FSDP2's `alloc_storage`): an allocation of the same object."""
        self._register(t, None, op)

    def adopt(self, t: torch.Tensor, kind: str) -> None:
        """A storage that exists before tracking starts (a parameter, buffer or optimizer state)."""
        self._register(t, kind, "(existing)")

    def mark(self, label: str) -> None:
        """Note a point of the step (e.g. a warm-up's optimizer step) for the allocator replay."""
        self.marks.append((label, self.event))

    def start_phase(self, phase: str) -> None:
        self.mark(phase)
        self.phase = phase
        self.starts[phase] = self.current
        self.peaks[phase] = (self.current, self.event, "(phase start)", "")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func)
        self.ops_seen[name] = self.ops_seen.get(name, 0) + 1
        if composite.replays(func):
            # CUDA runs this op's composite body: replay it through this mode (composite.py)
            start = self.event
            out = composite.replay(self, func, args, kwargs or {})
            for t in tree_leaves(out):
                blk = self._register(t, None, name) if isinstance(t, torch.Tensor) else None
                if blk is not None and blk.alloc > start:
                    blk.op = name  # the storage it returns is its output, whichever inner op made it
            return out
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._register(t, None, name)
        return out

    # -- saved tensors ----------------------------------------------------------------------
    def pack(self, t: torch.Tensor):
        blk = self._register(t, None, "(saved)") if isinstance(t, FakeTensor) else None
        if blk is not None and blk.kind is None and not blk.saved and self.phase != "warmup":
            blk.saved = True
            self.saved_blocks.append(blk)
            module, _ = self.where()
            entry = self.saved_module.setdefault(module, [0, 0])
            entry[0] += blk.raw
            entry[1] += 1
        if self.identity_pack:
            # What a measuring hook `pack=lambda t: t` does: a saved *output* then holds its own
            # grad_fn, a reference cycle that keeps graphs backward never consumes (DoRA's detached
            # weight norm) alive for good. Used only to reproduce how the calibration was measured.
            return t
        # An alias without autograd history: same storage, no cycle (what autograd keeps unhooked).
        return t.detach()

    @staticmethod
    def unpack(t):
        return t

    # -- queries ----------------------------------------------------------------------------
    def alive_at(self, event: int) -> list[Block]:
        return [b for b in self.blocks if b.alloc <= event and (b.free is None or b.free > event)]
