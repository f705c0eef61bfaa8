"""Live memory: the allocator's counters on CUDA, a live-storage tracker on CPU, and the split of
what is alive into categories.

torch APIs relied on:
- `torch.cuda.memory_allocated / max_memory_allocated / reset_peak_memory_stats / memory_reserved /
  max_memory_reserved / mem_get_info`: the caching allocator's host-side counters (no device sync).
- `torch.utils._python_dispatch.TorchDispatchMode`: sees every aten op, including those the
  autograd engine runs in backward (the mode stack is part of the thread-local state the engine
  propagates), so the tracker sees every tensor allocated by an op.
- Storage PyObject preservation: the Python `UntypedStorage` returned by `Tensor.untyped_storage()`
  lives exactly as long as the C++ storage, so a `weakref.ref(storage, callback)` fires when the
  memory is freed (the mechanism torch.distributed._tools.mem_tracker uses).
"""

from __future__ import annotations

import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .results import Categories


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's sharded parameters, their gradients and optimizer state) stands for the whole
    tensor; the rank stores only its local shard (`DTensor._local_tensor`, torch/distributed/tensor/_api.py),
    which is what this rank's memory holds."""
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else t


def storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    """(identity, nbytes) of a tensor's storage; None for tensors without real storage (meta, fake)."""
    t = local_shard(t)
    try:
        st = t.untyped_storage()
        return st._cdata, st.nbytes()
    except (RuntimeError, NotImplementedError, AttributeError):
        return None


class LiveStorageTracker(TorchDispatchMode):
    """Bytes of the distinct storages alive on one device, with a resettable peak: what the CUDA
    caching allocator's `memory_allocated` / `max_memory_allocated` give, built for the CPU.

    Storages allocated before the tracker started are invisible until `adopt`ed (the profiler adopts
    parameters, gradients, optimizer state and saved tensors, so every named category is inside
    the live total)."""

    def __init__(self, device_type: str = "cpu") -> None:
        super().__init__()
        self.device_type = device_type
        self._live: dict[int, tuple[weakref.ref, int]] = {}
        self.current = 0
        self.peak = 0
        self.bookkeeping_s = 0.0

    # -- lifetime ------------------------------------------------------------------------------
    def _freed(self, key: int):
        def callback(_ref) -> None:
            entry = self._live.pop(key, None)
            if entry is not None:
                self.current -= entry[1]
        return callback

    def adopt(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = st._cdata
        if key in self._live:
            return
        n = st.nbytes()
        try:
            ref = weakref.ref(st, self._freed(key))
        except TypeError:
            return
        self._live[key] = (ref, n)
        self.current += n
        if self.current > self.peak:
            self.peak = self.current

    def reset_peak(self) -> None:
        self.peak = self.current

    # -- every aten op ---------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        t0 = time.perf_counter()
        flat, _ = tree_flatten(out)
        for t in flat:
            if isinstance(t, torch.Tensor):
                self.adopt(t)
        self.bookkeeping_s += time.perf_counter() - t0
        return out


class CudaCounters:
    """The caching allocator's own counters for one CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @property
    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    @property
    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def reserved(self) -> int:
        return torch.cuda.memory_reserved(self.device)

    def peak_reserved(self) -> int:
        return torch.cuda.max_memory_reserved(self.device)

    def context_bytes(self) -> int | None:
        """Device memory in use that the allocator does not hold: the CUDA context, cuBLAS/cuDNN
        handles and kernels (assumes no other process shares the GPU)."""
        try:
            free, total = torch.cuda.mem_get_info(self.device)
        except RuntimeError:
            return None
        return max(total - free - self.reserved(), 0)


class CategoryWalker:
    """Splits live memory into parameters, buffers, gradients, optimizer state and saved
    activations by walking the live objects; each storage is counted once, in the first category
    that holds it (in that order).

    Kept cheap for the CUDA overhead budget: the model's parameter and buffer lists are taken once;
    parameters, buffers and optimizer state (updated in place) are re-walked only on a `fresh`
    split (the start of each step) or when the optimizer gained state entries; gradients
    and saved activations are walked every time."""

    _STATIC = ("trainable_params", "frozen_params", "buffers")

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self._model_id: int | None = None
        self._params: list = []
        self._buffers: list = []
        self._static: tuple[dict, set] | None = None
        self._state: tuple[int, int, set] | None = None  # (state entries, bytes, keys)

    def _lists(self, model, optimizers) -> None:
        if model is None:
            params = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
            self._params, self._buffers, self._model_id = params, [], None
        elif id(model) != self._model_id:
            self._params, self._buffers, self._model_id = list(model.parameters()), list(model.buffers()), id(model)

    def _count(self, tensors, seen: set, tracker) -> int:
        total = 0
        for t in tensors:
            t = local_shard(t)
            if t.device.type != self.device_type:
                continue
            key = storage_key(t)
            if key is None or key[0] in seen:
                continue
            seen.add(key[0])
            total += key[1]
            if tracker is not None:
                tracker.adopt(t)
        return total

    def split(self, model, optimizers, saved: "SavedRegistry", live_total: int,
              tracker: LiveStorageTracker | None = None, fresh: bool = True) -> Categories:
        if fresh or self._static is None:
            self._lists(model, optimizers)
            seen: set[int] = set()
            sizes = {"trainable_params": self._count((p for p in self._params if p.requires_grad), seen, tracker),
                     "frozen_params": self._count((p for p in self._params if not p.requires_grad), seen, tracker),
                     "buffers": self._count(self._buffers, seen, tracker)}
            self._static = (sizes, seen)
            self._state = None
        sizes, seen = dict(self._static[0]), set(self._static[1])
        grads = self._params if self._params else [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
        sizes["gradients"] = self._count((p.grad for p in grads if p.grad is not None), seen, tracker)
        entries = sum(len(opt.state) for opt in optimizers)
        if self._state is None or self._state[0] != entries or fresh:
            state_seen: set[int] = set()
            n = self._count((v for opt in optimizers for st in opt.state.values() if isinstance(st, dict)
                             for v in st.values() if isinstance(v, torch.Tensor)), state_seen, tracker)
            self._state = (entries, n, state_seen)
        sizes["optimizer_state"] = self._state[1]
        seen |= self._state[2]
        sizes["saved_activations"] = saved.live_bytes(exclude=seen)
        if tracker is not None:  # adopting may have grown the live set
            live_total = tracker.current
        named = sum(sizes.values())
        return Categories(temporaries=max(live_total - named, 0), live_total=max(live_total, named), **sizes)


class SavedRegistry:
    """The storages autograd saved for backward, as `torch.autograd.graph.saved_tensors_hooks`'s
    pack hook sees them, minus parameter and buffer storages. Holds weak references only, so it
    never keeps an activation alive."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, int]] = {}
        self.excluded: set[int] = set()  # parameter and buffer storages

    def add(self, t: torch.Tensor) -> None:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = st._cdata
        if key in self.excluded:
            return
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is not None:
            return  # this storage is already saved
        try:
            ref = weakref.ref(st)
        except TypeError:
            return
        n = st.nbytes()
        self._entries[key] = (ref, n)

    def live_bytes(self, exclude: set[int] = frozenset()) -> int:
        total = 0
        dead = []
        for key, (ref, n) in self._entries.items():
            if ref() is None:
                dead.append(key)
            elif key not in exclude:
                total += n
        for key in dead:
            del self._entries[key]
        return total

    def clear(self) -> None:
        self._entries.clear()
