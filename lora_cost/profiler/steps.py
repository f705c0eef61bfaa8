"""Step detection: optimizer, module and autograd hooks -> step and phase boundaries.

Found without help from the script:
- optimizer steps: `torch.optim.optimizer.register_optimizer_step_pre_hook` / `..._post_hook`
  (global: fire for every optimizer's `step()`; the first optimizer that steps is the one followed);
- forward: `torch.nn.modules.module.register_module_forward_pre_hook` / `register_module_forward_hook`
  (global, `always_call=True`) until the model is known; then only `model.register_forward_pre_hook`
  on the model (the module whose parameters the optimizer holds), which is far cheaper;
- backward: the autograd engine's Python entry point `torch.autograd.backward` (which
  `Tensor.backward` calls) is wrapped while the profiler runs; nested calls (reentrant checkpointing)
  are not new passes, and modules rerun inside backward (checkpoint recomputation) are not a forward.
A step runs from the first forward (with grad enabled) after an optimizer step to the next optimizer
step; gradient accumulation gives several forward/backward pairs per step. Phases: forward = model
call and loss, up to `backward()`; backward = `backward()` and anything before the optimizer step
(clipping); optimizer = `optimizer.step()`.

The detector measures nothing: it tells a listener (session.StepMonitor) where the loop is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

PHASES = ("forward", "backward", "optimizer")


@dataclass
class StepPosition:
    """Where the loop is inside the open step (mutable: the detector moves it along)."""

    index: int  # 1-based optimizer step this forward/backward work belongs to
    forward_calls: int = 0  # top-level model calls so far (one per micro-batch)
    backward_calls: int = 0  # outermost backward() calls so far
    phase: str | None = None  # one of PHASES


class StepListener(Protocol):
    def model_found(self, model: torch.nn.Module | None, optimizer) -> None: ...
    def step_opened(self, step: StepPosition) -> None: ...
    def forward_started(self, step: StepPosition, args, kwargs) -> None: ...
    def backward_started(self, step: StepPosition) -> None: ...
    def backward_ended(self, step: StepPosition) -> None: ...
    def optimizer_started(self, step: StepPosition) -> None: ...
    def optimizer_ended(self, step: StepPosition | None, steps_detected: int) -> None: ...


class StepDetector:
    """Installs the hooks and turns them into listener calls. Every handler runs through `guard`
    (faults.Guard), so nothing raises into the user's code; `enabled = False` silences all but the
    optimizer post-hook, which keeps counting steps."""

    def __init__(self, listener: StepListener, guard: Callable, warnings: list[str]) -> None:
        self.listener, self._guard, self.warnings = listener, guard, warnings
        self.enabled = False
        self.optimizer = None  # the optimizer followed (the first that steps)
        self.model: torch.nn.Module | None = None  # the module it trains, known at the first step
        self.device: torch.device | None = None  # where the optimizer's parameters live
        self.candidates: dict[int, torch.nn.Module] = {}  # top-level modules called before the first step
        self.steps_detected = 0
        self.step: StepPosition | None = None
        self._handles: list = []
        self._model_handles: list = []
        self._depth = 0  # module-call nesting, while the global hooks are on
        self._bw_depth = 0  # backward() nesting
        self._orig_backward = None

    # ---- install / remove ------------------------------------------------------------------
    def install(self) -> None:
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
        self._handles = [register_optimizer_step_pre_hook(self._opt_pre),
                         register_optimizer_step_post_hook(self._opt_post),
                         register_module_forward_pre_hook(self._global_pre),
                         register_module_forward_hook(self._global_post, always_call=True)]
        self._orig_backward = torch.autograd.backward
        detector = self

        def backward(*args, **kwargs):  # torch.autograd.backward, instrumented
            if not detector.enabled or detector._bw_depth or detector.step is None:
                return detector._orig_backward(*args, **kwargs)
            detector._bw_depth += 1
            detector._guard(detector._backward_start)
            try:
                return detector._orig_backward(*args, **kwargs)
            finally:
                detector._bw_depth -= 1
                detector._guard(detector._backward_end)

        backward.__wrapped__ = self._orig_backward
        torch.autograd.backward = backward

    def keep_only_optimizer_hooks(self) -> None:
        """Drop the module hooks (the two optimizer hooks stay: they count the remaining steps)."""
        for h in self._handles[2:] + self._model_handles:
            h.remove()
        self._handles = self._handles[:2]
        self._model_handles = []

    def remove(self) -> None:
        """Remove every hook and restore `torch.autograd.backward`."""
        self.enabled = False
        for h in self._handles + self._model_handles:
            h.remove()
        self._handles, self._model_handles = [], []
        if self._orig_backward is not None and torch.autograd.backward is not self._orig_backward:
            torch.autograd.backward = self._orig_backward

    # ---- hooks -----------------------------------------------------------------------------
    def _global_pre(self, module, args):
        if self.enabled and self._depth == 0 and torch.is_grad_enabled():
            self.candidates.setdefault(id(module), module)
            self._guard(self._forward_start, module, args, None)
        self._depth += 1

    def _global_post(self, module, args, output):
        self._depth = max(self._depth - 1, 0)

    def _model_pre(self, module, args, kwargs):
        if self.enabled and torch.is_grad_enabled():
            self._guard(self._forward_start, module, args, kwargs)

    def _opt_pre(self, optimizer, args, kwargs):
        if self.enabled:
            self._guard(self._optimizer_start, optimizer)

    def _opt_post(self, optimizer, args, kwargs):
        if optimizer is self.optimizer or self.optimizer is None:
            self._guard(self._optimizer_end, optimizer)

    # ---- events (the guard's warning names these methods) ------------------------------------
    def _forward_start(self, module, args, kwargs) -> None:
        if self._bw_depth:
            return  # modules rerun inside backward (gradient checkpointing) are not a new forward
        if self.step is None:
            self.step = StepPosition(index=self.steps_detected + 1)
            self.listener.step_opened(self.step)
        step = self.step
        if step.phase == "forward":
            return  # a second top-level call inside the same forward (e.g. a loss module)
        step.forward_calls += 1
        step.phase = "forward"
        self.listener.forward_started(step, args, kwargs)

    def _backward_start(self) -> None:
        step = self.step
        step.backward_calls += 1
        step.phase = "backward"
        self.listener.backward_started(step)

    def _backward_end(self) -> None:
        if self.enabled and self.step is not None:  # not after a failure in _backward_start
            self.listener.backward_ended(self.step)

    def _optimizer_start(self, optimizer) -> None:
        if self.optimizer is None:
            self.optimizer = optimizer
        elif optimizer is not self.optimizer:
            msg = f"several optimizers step; following the first ({type(self.optimizer).__name__})"
            if msg not in self.warnings:
                self.warnings.append(msg)
            return
        if self.model is None:
            self._identify_model()
        step = self.step
        if step is None:  # a step without a forward seen (e.g. the model ran under no_grad)
            return
        step.phase = "optimizer"
        self.listener.optimizer_started(step)

    def _optimizer_end(self, optimizer) -> None:
        if self.optimizer is None:
            self.optimizer = optimizer
        self.steps_detected += 1
        step, self.step = self.step, None
        if self.enabled:
            self.listener.optimizer_ended(step, self.steps_detected)

    def _identify_model(self) -> None:
        from .introspect import pick_model
        self.model = pick_model(list(self.candidates.values()), [self.optimizer])
        self.candidates.clear()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.device = params[0].device if params else torch.device("cpu")
        if self.model is None:
            self.warnings.append("could not tell which module the optimizer trains: categories use the optimizer's parameters")
        else:  # from now on only the model's own pre-hook marks a forward
            self.keep_only_optimizer_hooks()
            self._model_handles = [self.model.register_forward_pre_hook(self._model_pre, with_kwargs=True)]
        self.listener.model_found(self.model, self.optimizer)
