"""`profile(...)`: measure the training steps run inside a `with` block.

    from lora_cost import profile
    with profile(warmup=2, steps=3) as p:
        train()
    p.result  # ProfileResult (frozen dataclasses), p.result.to_json()
"""

from __future__ import annotations

import torch

from ..errors import LoraCostError
from ..results import Estimate
from .comm import CommRecorder, distributed_rank
from .compare import compare
from .env import environment
from .faults import exit_status
from .flops import fvcore_forward, parameter_table
from .memory import CudaCounters
from .results import SCHEMA, Overhead, ProfileResult
from .session import StepMonitor


class Profiler:
    """Context manager: installs the instrumentation on enter, removes it and builds `result` on exit.
    Exceptions from the block propagate unchanged; the profile of the steps so far is kept."""

    def __init__(self, warmup: int = 1, steps: int = 3, flops: bool = True, *, script: str | None = None,
                 argv: tuple[str, ...] = (), track_cpu_memory: bool = True) -> None:
        if not isinstance(warmup, int) or warmup < 1:
            raise LoraCostError(f"warmup must be at least 1 step (the first step allocates the optimizer state and "
                                f"tells which model trains), got {warmup}")
        if not isinstance(steps, int) or steps < 1:
            raise LoraCostError(f"steps must be a positive integer, got {steps}")
        self.warmup, self.steps, self.flops = warmup, steps, flops
        self.script, self.argv = script, tuple(argv)
        self.track_cpu_memory = track_cpu_memory
        self.monitor = StepMonitor(warmup, steps, flops, track_cpu_memory)
        self.result: ProfileResult | None = None
        # a Trainer's TrainingArguments (ProfilerCallback sets it): what the live objects do not tell
        # (use_liger_kernel, packing, sharding) is read from it as --training-args reads a file
        self.training_args = None
        # a rank of a distributed run: its place, and the collectives it runs (comm.py)
        self.distributed = distributed_rank()
        self.comm = CommRecorder(self.monitor.warnings) if self.distributed and self.distributed[1] > 1 else None
        self.merged = None  # rank 0 of a run that ended normally: every rank's profile merged (merge.py)

    def start(self) -> None:
        self.monitor.install()
        if self.comm is not None:
            self.comm.start()

    def __enter__(self) -> "Profiler":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        status, code = exit_status(exc)
        self.finish(status, code, exc)
        if status == "ok" and self.distributed and self.distributed[1] > 1:
            from dataclasses import replace
            from .merge import gather_to_rank0
            problems: list[str] = []
            self.merged = gather_to_rank0(self.result, problems)
            if problems:
                self.result = replace(self.result, warnings=self.result.warnings + tuple(problems))
        return False

    def finish(self, status: str, exit_code: int, exc: BaseException | None = None) -> ProfileResult:
        m = self.monitor
        communication = self.comm.stop(m.steps_detected) if self.comm is not None else None
        if status == "oom":
            m.record_oom(str(exc) if exc is not None else "out of memory")
        m.remove()
        warnings = list(m.warnings)
        if m.steps_detected == 0 and status == "ok":
            status = "no-optimizer-step"
        elif m.steps_detected < self.warmup + self.steps:
            warnings.append(f"only {m.steps_detected} optimizer steps ran; {self.warmup} warm-up + {self.steps} "
                            f"measured were asked for, so {len(m.measured)} were measured")
        device = m.device or torch.device("cpu")
        context = CudaCounters(device).context_bytes() if device.type == "cuda" else None
        flops = None
        if m.flops is not None and m.flops.micro_batches:
            fv, note = None, "not run: the script did not end normally"
            if status == "ok" and m.model is not None and m.sample_inputs is not None:
                fv, note = fvcore_forward(m.model, *m.sample_inputs)
            elif status == "ok":
                note = "not run: no measured forward to trace"
            flops = m.flops.result(m.flop_step_index, fv, note)
        elif self.flops and m.steps_detected >= self.warmup:
            warnings.append("FLOPs not counted: no forward/backward seen in the sampled step")
        info = estimate = None
        params = ()
        if m.model is not None and m.optimizer is not None:
            from .introspect import Observed, describe
            params = parameter_table(m.model)
            info, spec, run = describe(m.model, m.optimizer, Observed(m.input_shape, m.autocast_dtype),
                                          self.training_args)
            if spec is not None:
                estimate = _estimate(spec, run, warnings)
                if estimate is not None and any(hasattr(p, "_local_tensor") for p in m.model.parameters()):
                    warnings.append("the parameters are sharded (DTensor: FSDP2); the estimate beside them is for "
                                    "one unsharded GPU, so its weights, gradients and optimizer state are not this "
                                    "rank's")
        last = m.measured[-1] if m.measured else None
        device_bytes = None
        if last is not None and last.peak_reserved_bytes is not None and context is not None:
            device_bytes = last.peak_reserved_bytes + context
        overhead = None
        if m.measured:
            wall = sum(s.wall_s for s in m.measured) / len(m.measured)
            instr = sum(s.instrumentation_s for s in m.measured) / len(m.measured)
            note = ("time inside the profiler's hooks" + (" and the CPU live-storage tracker's bookkeeping"
                    if device.type != "cuda" else "") + " / step wall time; benchmarks/profiler_overhead.py measures end to end")
            overhead = Overhead(instr, wall, instr / wall if wall else 0.0, note)
        self.result = ProfileResult(
            schema=SCHEMA, status=status, exit_code=exit_code, script=self.script, argv=self.argv, warmup=self.warmup,
            steps_requested=self.steps, steps_detected=m.steps_detected, device_type=device.type,
            memory_source=("cuda-allocator" if device.type == "cuda" else
                           "live-storage-tracker" if self.track_cpu_memory else "none (categories only)"),
            measured=tuple(m.measured), flops=flops, params=params, model=info, estimate=estimate,
            comparison=compare(last, flops, estimate, device_bytes), environment=environment(device, context),
            oom=m.oom, overhead=overhead, warnings=tuple(warnings),
            rank=self.distributed[0] if self.distributed else None,
            world_size=self.distributed[1] if self.distributed else None, communication=communication,
            error=_error_line(exc))
        return self.result


def _error_line(exc: BaseException | None) -> str | None:
    if exc is None or (isinstance(exc, SystemExit) and exc.code in (None, 0)):
        return None
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _estimate(spec, run, warnings: list[str]) -> Estimate | None:
    from ..analytic.estimator import estimate_run
    try:
        return estimate_run(spec, run)
    except LoraCostError as exc:
        warnings.append(f"no estimate for this configuration: {exc}")
        return None


def profile(warmup: int = 1, steps: int = 3, flops: bool = True, track_cpu_memory: bool = True) -> Profiler:
    """Measure `steps` optimizer steps after `warmup` of them, run inside the `with` block.

    flops: count FLOPs with FlopCounterMode on the last warm-up step (and fvcore at the end).
    track_cpu_memory: on CPU, follow every allocation (live totals and peaks; slow: every aten op
    goes through Python); False keeps only the categories counted at the phase boundaries."""
    return Profiler(warmup=warmup, steps=steps, flops=flops, track_cpu_memory=track_cpu_memory)
