"""A transformers `TrainerCallback` that profiles a `Trainer` run:

    from lora_cost.profiler import ProfilerCallback
    cb = ProfilerCallback(warmup=2, steps=3)
    Trainer(..., callbacks=[cb]).train()
    cb.result  # ProfileResult

The step boundaries still come from the optimizer, module and autograd hooks (Trainer calls
`optimizer.step()` of the torch optimizer inside accelerate's wrapper, so the global optimizer
hooks fire); the callback only opens the profiler at `on_train_begin` and closes it at
`on_train_end`.
"""

from __future__ import annotations

from transformers import TrainerCallback

from .api import Profiler
from .results import ProfileResult


class ProfilerCallback(TrainerCallback):
    def __init__(self, warmup: int = 1, steps: int = 3, flops: bool = True) -> None:
        self.profiler = Profiler(warmup=warmup, steps=steps, flops=flops)
        self.result: ProfileResult | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.profiler.training_args = args  # the recipe the live objects do not show (lora_cost/readers)
        self.profiler.monitor.install()

    def on_train_end(self, args, state, control, **kwargs):
        self.result = self.profiler.finish("ok", 0)

    def __del__(self):  # a Trainer that died mid-run: never leave hooks behind
        try:
            self.profiler.monitor.remove()
        except Exception:  # noqa: BLE001
            pass
