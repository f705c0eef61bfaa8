"""Fault handling: what the profiler does when something goes wrong, in its own code or the script's.

- A hook handler that raises records a warning and switches the profiler off (`Guard`); the
  training goes on.
- Out of memory: on CUDA the allocator's OOM observer (`torch._C._cuda_attach_out_of_memory_observer`,
  the hook `torch.cuda.memory._record_memory_history`'s OOM dumps use) reports the requested bytes
  and free device memory; on the exception path the same is recorded while the failed step's frames
  still hold their tensors (`oom_event`).
- How the script ended -> (status, exit code), as `python script.py` would end (`exit_status`):
  Ctrl-C is "interrupted" with 130, `sys.exit(n)` is n.
"""

from __future__ import annotations

import time
import weakref
from typing import Callable

import torch

from .results import Categories, OomEvent


class Guard:
    """Runs a hook handler so that it never raises into the user's code, and accounts the time spent
    in it as instrumentation."""

    def __init__(self, warnings: list[str], switch_off: Callable[[], None], spent: Callable[[float], None]) -> None:
        self.warnings, self.switch_off, self.spent = warnings, switch_off, spent

    def __call__(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - the user's training must go on
            self.warnings.append(f"profiler switched off after an internal error in {fn.__name__}: "
                                 f"{type(exc).__name__}: {exc}")
            self.switch_off()
        finally:
            self.spent(time.perf_counter() - t0)


def oom_event(message: str, step_index: int, phase: str, alive: tuple[Categories | None, int | None, int | None],
              requested: int | None = None, device_free: int | None = None) -> OomEvent:
    """The OOM record: where the loop was, what was alive (measure.Measurement.alive_now)."""
    cats, allocated, reserved = alive
    return OomEvent(step_index=step_index, phase=phase,
                    message=message.strip().splitlines()[0][:300] if message else "out of memory",
                    requested_bytes=requested, allocated_bytes=allocated, reserved_bytes=reserved,
                    device_free_bytes=device_free, memory=cats)


def is_oom(exc: BaseException | None) -> bool:
    if exc is None:
        return False
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type) or isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def exit_status(exc: BaseException | None) -> tuple[str, int]:
    """(status, exit code) as `python script.py` would end."""
    if exc is None:
        return "ok", 0
    if isinstance(exc, SystemExit):
        code = exc.code
        if code is None:
            return "ok", 0
        if isinstance(code, int):
            return ("ok" if code == 0 else "error"), code
        return "error", 1  # sys.exit("message") prints the message and exits 1
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", 130
    if is_oom(exc):
        return "oom", 1
    return "error", 1


# ---- CUDA out-of-memory observer: it cannot be detached, so one observer forwards to whichever
# monitor is active (anything with `record_oom(message, requested, device_free)`).
_ACTIVE: list = []
_OBSERVER_ATTACHED = False


def attach_oom_observer(monitor) -> None:
    global _OBSERVER_ATTACHED
    _ACTIVE.append(weakref.ref(monitor))
    attach = getattr(torch._C, "_cuda_attach_out_of_memory_observer", None)
    if _OBSERVER_ATTACHED or attach is None or not torch.cuda.is_available():
        return

    def observer(device, alloc, device_allocated, device_free):
        for ref in reversed(_ACTIVE):
            m = ref()
            if m is not None:
                m.record_oom(f"CUDA out of memory: tried to allocate {alloc} bytes", alloc, device_free)
                return

    try:
        attach(observer)
        _OBSERVER_ATTACHED = True
    except RuntimeError:
        pass


def detach_oom_observer(monitor) -> None:
    _ACTIVE[:] = [r for r in _ACTIVE if r() is not None and r() is not monitor]
