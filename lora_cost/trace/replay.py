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

Non-tensor allocations: the cuBLAS/cuBLASLt workspaces (`workspace` bytes each, ATen takes them from
the same caching allocator: lora_cost/analytic/allocator/workspaces.py), one per thread that runs
cuBLAS (the Python thread's forward, autograd's device thread's backward and recomputation). Where
they are placed (`workspace_mode`):

- "before" (the default, `WORKSPACE_MODES`): allocated before everything else and never freed, each
  in a segment of its own (32 MiB >= kMinLargeAlloc: a segment of exactly the request, not split).
  This is what the H100 calibration rows show: on every LoRA row the allocated memory at the start
  of the measured step is the weights plus the optimizer state plus the input ids, to the byte
  (`mem_steady_before_step - mem_model_ready - opt_state_bytes` = 16 KiB = the int64 ids of
  batch 4 x 512), so no workspace was allocated inside the measured process's steps, while the
  rows' counters are relative to the allocated memory before the model was built (the workspaces
  may exist from before). Placed in the step instead ("cached") the backward thread's workspace
  is carved from a freed logits block and costs a logits-sized segment the GPT-2 LoRA rows do not
  have (+9-10%, see docs/allocator.md); placed here, the nine GPT-2 rows at batch 4 x 512 without
  checkpointing land within +0.25% to +0.83% of their measured peak reserved.
- "cached": right after the output of the first cuBLAS op (mm, addmm, bmm...) of the first forward
  and of the first backward, never freed: the CublasHandlePool.cpp revision workspaces.py follows
  (`setWorkspaceForHandle` on a thread's first call), which the rows above contradict.
- "per_call": allocated and freed around every cuBLAS op (TORCH_CUBLAS_WORKSPACE_CACHE off in the
  newest revision, `getCurrentCUDABlasHandleWithWorkspace`).
- "none": outside the caching allocator (cuBLAS's own default workspace: then part of the context).

`extra` lets a caller add other allocations alive for the whole run (allocated before everything).
"""

from __future__ import annotations

from ..analytic.allocator import AllocatorConfig, ReplayResult, replay
from ..analytic.allocator.workspaces import CUBLAS_OPS, CUBLAS_THREADS, WORKSPACE_MODES



def workspace_points(sim) -> list[int]:
    """Event numbers after which a cuBLAS workspace is allocated: the first cuBLAS op's output in the
    first forward and in the first backward (one handle per thread, see workspaces.py)."""
    order = sorted(sim.marks, key=lambda m: m[1])
    windows = []  # (start, end, thread)
    for i, (label, start) in enumerate(order):
        end = order[i + 1][1] if i + 1 < len(order) else sim.event
        if label in ("warmup", "forward"):
            windows.append((start, end, "main"))
        elif label in ("warmup_backward", "backward"):
            windows.append((start, end, "autograd"))
    first: dict[str, int] = {}
    for b in sorted(sim.blocks, key=lambda b: b.alloc):
        if getattr(b, "op", None) not in CUBLAS_OPS:
            continue
        for start, end, thread in windows:
            if start < b.alloc <= end and thread not in first:
                first[thread] = b.alloc
        if len(first) == 2:
            break
    return sorted(first.values())


def cublas_points(sim) -> set[int]:
    """Event numbers of every cuBLAS op's output allocation."""
    return {b.alloc for b in sim.blocks if getattr(b, "op", None) in CUBLAS_OPS}


def step_events(sim, steps: int = 2, extra: tuple[int, ...] = (), workspace: int = 0,
                workspace_mode: str = "cached") -> list[tuple]:
    """The allocation/free sequence of the traced run (see the module docstring). `workspace_mode`:
    "before" (one workspace per cuBLAS thread, allocated first, kept), "cached" (one per thread's
    handle after its first cuBLAS op, kept), "per_call" (allocated and freed around every cuBLAS
    call: TORCH_CUBLAS_WORKSPACE_CACHE off), "none"."""
    if workspace_mode not in WORKSPACE_MODES:
        raise ValueError(f"workspace_mode must be one of {WORKSPACE_MODES}, got {workspace_mode!r}")
    marks = dict(reversed(sim.marks))  # first occurrence of each label
    before: list[int] = []
    if workspace > 0 and workspace_mode == "before":
        before = [workspace] * CUBLAS_THREADS
    if workspace <= 0 or workspace_mode in ("none", "before"):
        ws_after, per_call = set(), set()
    elif workspace_mode == "per_call":
        ws_after, per_call = set(), cublas_points(sim)
    else:
        ws_after, per_call = set(workspace_points(sim)), set()
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

    events: list[tuple] = [(("cublas_workspace", i), n) for i, n in enumerate(before)]
    events += [(("extra", i), n) for i, n in enumerate(extra)]
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
            if rep == 0 and is_alloc and event in ws_after:
                events.append((("cublas_workspace", event), workspace))
            if is_alloc and event in per_call:
                events.append((("cublas_call", rep, event), workspace))
                events.append((("cublas_call", rep, event), None))
        if pending:
            events.extend(state_events)
            pending = False
    return events


def replay_step(sim, config: AllocatorConfig | None = None, steps: int = 2, extra: tuple[int, ...] = (),
                capacity_bytes: int | None = None, workspace: int = 0, workspace_mode: str = "cached") -> ReplayResult:
    return replay(step_events(sim, steps, extra, workspace, workspace_mode), config, capacity_bytes)


def allocated_at_marks(sim, labels: tuple[str, ...] = ("forward", "backward", "optimizer", "end"),
                       config: AllocatorConfig | None = None, steps: int = 2, extra: tuple[int, ...] = (),
                       workspace: int = 0, workspace_mode: str = "cached") -> dict[str, int]:
    """`torch.cuda.memory_allocated()` of the replay where the last (measured) step crosses each mark
    of `labels` (e.g. "backward": right after the forward returned). The allocator's own count:
    a block handed out whole (not split: <= 1 MiB would remain in the large pool) counts whole, as
    the real counter does, so where blocks land shows in it. Compared with a measured row's
    mem_steady_before_step / mem_after_forward / mem_after_backward it checks the replay's
    placement, not only its sizes (benchmarks/reserved_calibration.py)."""
    from ..analytic.allocator import CachingAllocator

    events = step_events(sim, steps, extra, workspace, workspace_mode)
    blocks = {id(b): b for b in sim.blocks}
    marks = {label: e for label, e in reversed(sim.marks) if label in labels}  # first occurrence
    last_rep = 0 if any(label == "warmup" for label, _ in sim.marks) else steps - 1
    allocator = CachingAllocator(config)
    live: dict = {}
    out: dict[str, int] = {}
    for key, nbytes in events:
        b = blocks.get(key[1]) if len(key) == 2 and key[0] in ("setup", last_rep) else None
        if b is not None:
            number = b.alloc if nbytes is not None else b.free
            for label, mark in marks.items():
                if label not in out and number > mark:
                    out[label] = allocator.allocated
        if nbytes is None:
            if key in live:
                allocator.free(live.pop(key))
        elif nbytes > 0:
            live[key] = allocator.malloc(nbytes)
    for label in marks:
        out.setdefault(label, allocator.allocated)
    return out
