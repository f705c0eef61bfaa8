"""Where the replay and a real step part: diff a recorded allocator history against the trace replay.

    python benchmarks/replay_diff.py SNAPSHOT.pickle ROW_NAME [path/to/h100-measured.jsonl] [--self-check]

SNAPSHOT.pickle: `torch.cuda.memory._snapshot()` of a GPU process that ran the calibration row as
shared/calibration/README.md describes, with `torch.cuda.memory._record_memory_history("all")`
switched on before the model was built and the snapshot taken (pickled) right after the measured
step (`lora_cost.profiler.alloctrace.record_history(run)` does both around a callable). The row is
traced as measured (`trace(..., calibration=True)`), its event sequence built as the engine replays
it (trace/replay.py `step_events`, the engine's workspace placement), and both histories compared
(`profiler/alloctrace.py segment_diff`): the first request whose size differs, then every segment one
side creates and the other does not, with the trace's op and module for the request behind it.

`--self-check` (no GPU needed): SNAPSHOT is ignored and a history is synthesised from the replay
itself; the diff must be empty.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT = Path(__file__).resolve().parent.parent.parent / "shared" / "calibration" / "h100-measured.jsonl"


def traced_events(row: dict):
    """(event sequence, label function) of the row's calibration trace, as the engine replays it."""
    from score_calibration import row_to_kwargs
    from trace_calibration import kept_simulations

    import lora_cost.trace.engine as engine
    from lora_cost.analytic.allocator.workspaces import cublas_workspace_bytes
    from lora_cost.trace import trace
    from lora_cost.trace.replay import step_events

    kwargs = row_to_kwargs(row)
    with kept_simulations() as sims:
        trace(kwargs.pop("model"), kwargs.pop("method"), calibration=True, **kwargs)
    sim = sims[0]
    events = step_events(sim, workspace=cublas_workspace_bytes((9, 0)), workspace_mode=engine.WORKSPACE_MODE)
    blocks = {id(b): b for b in sim.blocks}

    def label(key) -> str:
        b = blocks.get(key[1]) if len(key) == 2 and not isinstance(key[1], tuple) else None
        if b is None:
            return str(key[0])
        return f"{b.phase} {b.op} {b.module}" + (" (recompute)" if b.recompute else "")

    return events, label


def synthesised_snapshot(history) -> dict:
    """A snapshot-shaped dict from AllocEvents (the self-check)."""
    entries = []
    for e in history:
        if e.action == "alloc":
            entries.append({"action": "alloc", "size": e.size})
        elif e.action == "free":
            entries.append({"action": "free_requested", "size": e.size})
            entries.append({"action": "free_completed", "size": e.size})
        elif e.action == "segment":
            entries.append({"action": "segment_alloc", "size": e.size})
    return {"device_traces": [entries]}


def main(argv: list[str]) -> int:
    from lora_cost.profiler.alloctrace import real_history, segment_diff, simulated_history

    flags = [a for a in argv if a.startswith("--")]
    args = [a for a in argv if not a.startswith("--")]
    if len(args) < 2:
        print(__doc__)
        return 2
    snapshot_path, name = Path(args[0]), args[1]
    path = Path(args[2]) if len(args) > 2 else DEFAULT
    from score_calibration import calibration_rows
    row = next((r for r in calibration_rows(path) if r["name"] == name), None)
    if row is None:
        print(f"no row named {name!r} in {path}")
        return 2
    events, label = traced_events(row)
    replay = simulated_history(events, label=label)
    if "--self-check" in flags:
        snapshot = synthesised_snapshot(replay)
    else:
        with snapshot_path.open("rb") as f:
            snapshot = pickle.load(f)
    diff = segment_diff(real_history(snapshot), replay)
    mib = 1 << 20
    print(f"{name}: allocs real {diff.allocs_real}, replay {diff.allocs_replay}; reserved real "
          f"{diff.reserved_real / mib:.0f} MiB, replay {diff.reserved_replay / mib:.0f} MiB (measured peak_reserved "
          f"{(row.get('peak_reserved') or 0) / mib:.0f} MiB)")
    print("first request whose size differs: " + ("none" if diff.first_size_mismatch is None
                                                  else f"alloc #{diff.first_size_mismatch}"))
    for m in diff.mismatches:
        who = "real only  " if m.side == "real" else "replay only"
        print(f"  {who} segment {m.segment_bytes / mib:9.1f} MiB at alloc #{m.ordinal:7d} "
              f"(request {m.request_bytes / mib:9.2f} MiB) {m.label}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
