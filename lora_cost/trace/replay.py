"""Replay the traced step's storage allocations and frees through the caching-allocator model.

`AllocatorSim` numbers every allocation and release of a storage (`Block.alloc`, `Block.free`);
sorted by that number they are the sequence of `malloc`/`free` calls the step makes on CUDA (sizes
as requested: the model rounds them itself). The steady state a run measures needs the cache warm,
so the sequence replayed is:

- the storages that exist before the step (weights, buffers, the input ids), in the order adopted;
- the steps: the traced warm-up steps and the measured one when the trace has them
  (`calibration=True`: two warm-ups, as the H100 rows were measured), else the traced step
  `steps` times (a first step, then the measured one with the cache warm);
- the optimizer state (AdamW moments, SGD momentum), which a real run creates lazily inside the
  first `optimizer.step()` (torch/optim/adamw.py `_init_group`, one tensor after another), is
  allocated there rather than before the first step.

Non-tensor allocations of a real run (the cuBLAS/cuBLASLt workspaces, which ATen takes from the same
caching allocator) are not in the trace; `extra` lets a caller add allocations alive for the whole
run.
"""

from __future__ import annotations

from ..analytic.allocator import AllocatorConfig, ReplayResult, replay


def step_events(sim, steps: int = 2, extra: tuple[int, ...] = ()) -> list[tuple]:
    """The allocation/free sequence of the traced run (see the module docstring)."""
    marks = dict(reversed(sim.marks))  # first occurrence of each label
    starts = [e for label, e in sim.marks if label in ("warmup", "forward")]
    step_start = starts[0] if starts else sim.event
    state_at = marks.get("warmup_optimizer", marks.get("optimizer"))
    state = [b for b in sim.blocks if b.kind == "optimizer_state" and b.alloc <= step_start]
    state_ids = {id(b) for b in state}

    timeline: list[tuple[int, bool, object]] = []  # (event number, is_alloc, block)
    for b in sim.blocks:
        if b.size == 0:
            continue
        if id(b) not in state_ids:
            timeline.append((b.alloc, True, b))
        if b.free is not None:
            timeline.append((b.free, False, b))
    timeline.sort(key=lambda t: t[0])

    events: list[tuple] = [(("extra", i), n) for i, n in enumerate(extra)]
    setup = [t for t in timeline if t[0] <= step_start]
    body = [t for t in timeline if t[0] > step_start]
    for _, is_alloc, b in setup:
        events.append((("setup", id(b)), b.raw if is_alloc else None))
    repeats = 1 if "warmup" in marks else steps
    state_events = [(("setup", id(b)), b.raw) for b in state]
    pending = True  # the optimizer state is still to be allocated
    for rep in range(repeats):
        if pending and state_at is None:
            events.extend(state_events)
            pending = False
        for event, is_alloc, b in body:
            if pending and event > state_at:
                events.extend(state_events)
                pending = False
            before_step = b.alloc <= step_start or id(b) in state_ids
            if before_step and not is_alloc and rep < repeats - 1:
                continue  # a storage from before the step (the input ids) is freed once, after the last step
            key = ("setup", id(b)) if before_step else (rep, id(b))
            events.append((key, b.raw if is_alloc else None))
        if pending:
            events.extend(state_events)
            pending = False
    return events


def replay_step(sim, config: AllocatorConfig | None = None, steps: int = 2, extra: tuple[int, ...] = (),
                capacity_bytes: int | None = None) -> ReplayResult:
    return replay(step_events(sim, steps, extra), config, capacity_bytes)
