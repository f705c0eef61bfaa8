"""FLOPs of one sampled step with `torch.utils.flop_counter.FlopCounterMode`, per module, plus
fvcore's forward count as a cross-check and fvcore's per-module parameter table.

FlopCounterMode is silent or wrong on some attention kernels, so formulas are registered through
its `custom_mapping` argument (values are wrapped by `flop_counter.shape_wrapper`, which passes
shapes instead of tensors):
- `aten._scaled_dot_product_flash_attention_for_cpu` (+ backward): the CPU sdpa kernel has no
  formula (torch 2.13 counts 0);
- grouped-query attention: before torch 2.13, `sdpa_flop_count` asserted equal query and key/value
  heads and raised; lora_cost/analytic/formulas/attention.py (the formulas the analytic and trace
  engines use too) broadcasts key/value heads as the kernels do.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..analytic.formulas.attention import sdpa_backward_from_shapes, sdpa_forward_from_shapes
from .results import FlopMeasurement, ModuleFlops, ParamRow

aten = torch.ops.aten


def _torch_handles_gqa() -> bool:
    from torch.utils import flop_counter
    try:
        flop_counter.sdpa_flop_count((1, 4, 2, 8), (1, 2, 2, 8), (1, 2, 2, 8))
        return True
    except (AssertionError, RuntimeError, ValueError):
        return False


def extra_formulas() -> dict:
    """The ops this torch's FlopCounterMode needs taught."""
    mapping = {}
    for fwd, bwd in (("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"),):
        if hasattr(aten, fwd):
            mapping[getattr(aten, fwd)] = sdpa_forward_from_shapes
        if hasattr(aten, bwd):
            mapping[getattr(aten, bwd)] = sdpa_backward_from_shapes
    if not _torch_handles_gqa():
        for name in ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
                     "_scaled_dot_product_cudnn_attention"):
            if hasattr(aten, name):
                mapping[getattr(aten, name)] = sdpa_forward_from_shapes
            if hasattr(aten, name + "_backward"):
                mapping[getattr(aten, name + "_backward")] = sdpa_backward_from_shapes
    return mapping


def new_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=extra_formulas())


class FlopSampler:
    """Counts one step: per micro-batch a fresh FlopCounterMode (entering one resets its counts)
    spans the forward and the backward, so its ModuleTracker can attribute backward ops to the
    modules that ran forward; the counts are snapshotted at backward start to split the passes.
    Entered and exited from the profiler's hooks."""

    def __init__(self) -> None:
        self.totals = {"forward": 0, "backward": 0}
        self.by_module: dict[str, dict[str, int]] = defaultdict(lambda: {"forward": 0, "backward": 0})
        self._counter: FlopCounterMode | None = None
        self._at_backward: dict[str, int] | None = None  # per-module totals when backward began
        self.micro_batches = 0
        self.formulas = tuple(sorted(str(op) for op in extra_formulas()))

    @property
    def phase(self) -> str | None:
        if self._counter is None:
            return None
        return "forward" if self._at_backward is None else "backward"

    @staticmethod
    def _per_module(counter: FlopCounterMode) -> dict[str, int]:
        return {module: sum(ops.values()) for module, ops in counter.get_flop_counts().items()}

    def start(self, phase: str) -> None:
        if phase == "forward":
            self.stop()
            self._counter = new_counter()
            self._counter.__enter__()
            self.micro_batches += 1
        elif self._counter is not None and self._at_backward is None:
            self._at_backward = self._per_module(self._counter)

    def stop(self) -> None:
        if self._counter is None:
            return
        counter, at_backward = self._counter, self._at_backward
        self._counter, self._at_backward = None, None
        counter.__exit__(None, None, None)
        final = self._per_module(counter)
        forward = at_backward if at_backward is not None else final
        for module, total in final.items():
            f = forward.get(module, 0)
            self.by_module[module]["forward"] += f
            self.by_module[module]["backward"] += total - f
        self.totals["forward"] += forward.get("Global", 0)
        self.totals["backward"] += final.get("Global", 0) - forward.get("Global", 0)

    def result(self, step_index: int, fvcore_forward: int | None, fvcore_note: str, max_depth: int = 4) -> FlopMeasurement:
        rows = []
        for module, v in self.by_module.items():
            depth = 0 if module == "Global" else module.count(".") + 1
            if depth <= max_depth and (v["forward"] or v["backward"]):
                rows.append(ModuleFlops(module, v["forward"], v["backward"]))
        rows.sort(key=lambda row: (row.module != "Global", row.module))
        return FlopMeasurement(step_index=step_index, micro_batches=self.micro_batches, forward=self.totals["forward"],
                               backward=self.totals["backward"], registered_formulas=self.formulas,
                               fvcore_forward=fvcore_forward, fvcore_note=fvcore_note, by_module=tuple(rows))

class _KwargsModule(torch.nn.Module):
    """fvcore traces `module(*inputs)` with torch.jit; Hugging Face models take keyword arguments and
    return dict-like outputs, so call them by name and return the first tensor."""

    def __init__(self, model, names, static_kwargs) -> None:
        super().__init__()
        self.model = model
        self.names = names
        self.static_kwargs = static_kwargs

    def forward(self, *tensors):
        out = self.model(**dict(zip(self.names, tensors)), **self.static_kwargs)
        if isinstance(out, torch.Tensor):
            return out
        values = out.values() if hasattr(out, "values") else out
        for v in values:
            if isinstance(v, torch.Tensor):
                return v
        raise RuntimeError("model returned no tensor")


def fvcore_forward(model, args: tuple, kwargs: dict) -> tuple[int | None, str]:
    """fvcore.nn.FlopCountAnalysis of one forward (1 multiply-add = 1 FLOP). Never raises: its jit
    tracing breaks on some models, which must not break the profile."""
    try:
        from fvcore.nn import FlopCountAnalysis
    except ImportError:
        return None, "fvcore is not installed"
    names, tensors, static = [], [], {}
    for name, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            names.append(name)
            tensors.append(v)
        elif v is not None:
            static[name] = v
    if args:
        return None, "skipped: positional model inputs"
    quiet = [logging.getLogger(n) for n in ("fvcore", "fvcore.nn.jit_analysis")]
    levels = [lg.level for lg in quiet]
    was_training = model.training
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        import warnings
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            analysis = FlopCountAnalysis(_KwargsModule(model, names, static), tuple(tensors))
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            total = int(analysis.total())
        return total, "fvcore FlopCountAnalysis, one micro-batch forward, 1 multiply-add = 1 FLOP (x2 to compare)"
    except Exception as exc:  # noqa: BLE001 - any tracing failure is a note, never a crash
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return None, f"fvcore failed: {type(exc).__name__}: {msg}"
    finally:
        model.train(was_training)
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)


def parameter_table(model, max_depth: int = 3) -> tuple[ParamRow, ...]:
    """Parameters per module prefix (fvcore.nn.parameter_count), with the trainable share."""
    trainable: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    try:
        from fvcore.nn import parameter_count
        counts.update(parameter_count(model))
    except Exception:  # noqa: BLE001 - fvcore missing or failing: count ourselves
        counts.clear()
    own_count = not counts
    for name, p in model.named_parameters():
        parts = name.split(".")
        for i in range(len(parts)):
            prefix = ".".join(parts[:i])
            if own_count:
                counts[prefix] += p.numel()
            if p.requires_grad:
                trainable[prefix] += p.numel()
    rows = []
    for prefix, n in counts.items():
        depth = 0 if prefix == "" else prefix.count(".") + 1
        if depth <= max_depth:
            rows.append(ParamRow(prefix or "(model)", int(n), int(trainable.get(prefix, 0))))
    return tuple(rows)
