"""The profiler's parts on their own: step detection (steps.py) against a hand-written event log,
fault handling (faults.py) against how `python script.py` ends. A one-layer model, no transformers."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from lora_cost.profiler.faults import Guard, exit_status, oom_event  # noqa: E402
from lora_cost.profiler.steps import StepDetector  # noqa: E402


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x).pow(2).mean()


class Log:
    """A listener that writes down what the detector reports."""

    def __init__(self, fail_at: tuple[str, int] | None = None) -> None:
        self.events: list[tuple] = []
        self.fail_at = fail_at

    def _note(self, *event) -> None:
        self.events.append(event)
        if self.fail_at == event[:2]:
            raise RuntimeError("boom")

    def model_found(self, model, optimizer):
        self._note("model", type(model).__name__)

    def step_opened(self, s):
        self._note("open", s.index)

    def forward_started(self, s, args, kwargs):
        self._note("fwd", s.index, s.forward_calls)

    def backward_started(self, s):
        self._note("bwd", s.index, s.backward_calls)

    def backward_ended(self, s):
        self._note("bwd_end", s.index, s.backward_calls)

    def optimizer_started(self, s):
        self._note("opt", s.index)

    def optimizer_ended(self, s, steps_detected):
        self._note("opt_end", s.index if s else None, steps_detected)


def detect(listener, loop):
    warnings: list[str] = []
    spent: list[float] = []
    holder = {}
    guard = Guard(warnings, lambda: setattr(holder["d"], "enabled", False), spent.append)
    detector = holder["d"] = StepDetector(listener, guard, warnings)
    detector.install()
    detector.enabled = True
    try:
        loop()
    finally:
        detector.remove()
    assert not hasattr(torch.autograd.backward, "__wrapped__")  # restored
    return detector, warnings, spent


def training(model, optimizers, steps: int, accum: int):
    def loop():
        for _ in range(steps):
            for _ in range(accum):
                model(torch.randn(4, 8)).backward()
            with torch.no_grad():  # an evaluation call between steps is not a forward
                model(torch.randn(4, 8))
            for opt in optimizers:
                opt.step()
                opt.zero_grad()
    return loop


def test_detector_reports_steps_micro_batches_and_phases():
    model = Tiny()
    log = Log()
    detector, warnings, spent = detect(log, training(model, [torch.optim.SGD(model.parameters(), lr=0.1)], 2, 2))
    micro = lambda i, k: [("fwd", i, k), ("bwd", i, k), ("bwd_end", i, k)]  # noqa: E731
    assert log.events == [("open", 1), *micro(1, 1), *micro(1, 2), ("model", "Tiny"), ("opt", 1), ("opt_end", 1, 1),
                          ("open", 2), *micro(2, 1), *micro(2, 2), ("opt", 2), ("opt_end", 2, 2)]
    assert detector.steps_detected == 2 and detector.model is model and warnings == []
    # every handler call is timed: 2 steps x (2 forwards + 2 x backward start and end + optimizer pre and post)
    assert len(spent) == 16 and min(spent) >= 0


def test_detector_follows_the_first_optimizer():
    model = Tiny()
    first, second = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.AdamW(model.parameters())
    detector, warnings, _ = detect(Log(), training(model, [first, second], 3, 1))
    assert detector.optimizer is first and detector.steps_detected == 3  # AdamW's 3 steps are not counted
    assert warnings == ["several optimizers step; following the first (SGD)"]


def test_failing_handler_switches_off_and_training_goes_on():
    model = Tiny()
    before = model.lin.weight.detach().clone()
    log = Log(fail_at=("bwd", 2))
    detector, warnings, _ = detect(log, training(model, [torch.optim.SGD(model.parameters(), lr=0.1)], 3, 1))
    assert warnings == ["profiler switched off after an internal error in _backward_start: RuntimeError: boom"]
    assert log.events[-1] == ("bwd", 2, 1)  # nothing reported after the failure ...
    assert detector.steps_detected == 3  # ... but the optimizer post-hook still counts steps
    assert not torch.equal(model.lin.weight, before)  # the real backward and steps ran


@pytest.mark.parametrize("exc, expected", [
    (None, ("ok", 0)),
    (SystemExit(None), ("ok", 0)),
    (SystemExit(0), ("ok", 0)),
    (SystemExit(3), ("error", 3)),
    (SystemExit("bad input"), ("error", 1)),  # python prints the message and exits 1
    (KeyboardInterrupt(), ("interrupted", 130)),  # 128 + SIGINT, as a shell reports it
    (MemoryError(), ("oom", 1)),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), ("oom", 1)),
    (RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory"), ("oom", 1)),
    (ValueError("boom"), ("error", 1)),
])
def test_exit_status_as_python_would_end(exc, expected):
    assert exit_status(exc) == expected


def test_oom_event_keeps_the_first_line():
    event = oom_event("CUDA out of memory.\nsee the docs", 3, "backward", (None, 1024, 2048), requested=512)
    assert (event.step_index, event.phase, event.message) == (3, "backward", "CUDA out of memory.")
    assert (event.allocated_bytes, event.reserved_bytes, event.requested_bytes, event.memory) == (1024, 2048, 512, None)
    assert len(oom_event("x" * 1000, 1, "forward", (None, None, None)).message) == 300
