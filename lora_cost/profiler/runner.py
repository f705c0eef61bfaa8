"""Run a training script as `python train.py args...` would, inside the profiler.

`runpy.run_path(path, run_name="__main__")` executes the file as the main module (its
`if __name__ == "__main__":` block runs), with `sys.argv = [path, *args]` and the script's folder
first on `sys.path`, exactly as the interpreter sets them up. Nothing in the script changes.
"""

from __future__ import annotations

import os
import runpy
import sys
import traceback

from ..errors import LoraCostError
from .api import Profiler
from .faults import exit_status
from .results import ProfileResult


def check_script(path: str) -> str:
    if not os.path.exists(path):
        raise LoraCostError(f"script not found: {path}")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "__main__.py")):
        raise LoraCostError(f"{path} is a directory without __main__.py")
    return os.path.abspath(path)


def _print_script_traceback(exc: BaseException, script: str) -> None:
    """The script's own traceback, as the interpreter would print it (without runpy's and
    lora-cost's frames)."""
    tb = exc.__traceback__
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) != script:
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb if tb is not None else exc.__traceback__, file=sys.stderr)


def run_script(path: str, args: tuple[str, ...] = (), *, warmup: int = 1, steps: int = 3,
               flops: bool = True) -> ProfileResult:
    """Run the script under the profiler; returns the profile even when the script fails (its exit
    code is `result.exit_code`). Raises LoraCostError for a missing script or bad settings."""
    script = check_script(path)
    profiler = Profiler(warmup=warmup, steps=steps, flops=flops, script=path, argv=tuple(args))
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [path, *args]
    sys.path.insert(0, os.path.dirname(script))
    exc: BaseException | None = None
    try:
        profiler.start()
        try:
            runpy.run_path(script, run_name="__main__")
        except BaseException as e:  # noqa: BLE001 - the script's fault, reported as python would
            exc = e
        status, code = exit_status(exc)
        if exc is not None and not isinstance(exc, (SystemExit, KeyboardInterrupt)):
            _print_script_traceback(exc, script)
        elif isinstance(exc, SystemExit) and exc.code not in (None, 0) and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
        return profiler.finish(status, code, exc)
    finally:
        profiler.monitor.remove()
        sys.argv[:] = saved_argv
        sys.path[:] = saved_path
        exc = None  # drop the traceback (and the tensors its frames hold)

