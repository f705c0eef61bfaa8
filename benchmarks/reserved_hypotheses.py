"""Issue 11: which mechanism could make the real step reserve more than the trace replay? Each candidate
is replayed on every calibration row's trace and scored against the measured peak reserved.

    python benchmarks/reserved_hypotheses.py [path/to/h100-measured.jsonl] [--only SUBSTRING] [--cache DIR]

Each row is traced once as measured (`trace(..., calibration=True)`: two warm-ups and the measured
step), its allocation sequence built as the engine replays it (trace/replay.py `step_events`, cuBLAS
workspaces "before"), then transformed by each candidate below and replayed through the allocator model
(lora_cost/analytic/allocator). `--cache DIR` keeps the traced sequences (pickles) so a rerun takes
seconds. Nothing here is fitted: each candidate is a rule read from a source (cited), or a what-if whose
size is stated, and each is scored on every row.

Candidates (column names):
- `base`: the engine's replay as it is (benchmarks/reserved_calibration.py's 'peak rsv' column).
- `effbwd`: memory-efficient attention backward's internal buffers, the fp32 rows' kernel
  (aten/src/ATen/native/transformers/cuda/attention_backward.cu `_efficient_attention_backward`:
  `delta` = empty({B, nH, M}, float) and `workspace` = empty({p.workspace_size()}, uint8), allocated after
  grad_q/k/v and freed when the op returns; mem_eff_attention/kernel_backward.h `workspace_size()` =
  B x nH x workspace_strideBH() floats, of which `workspace_elements_gq()` = ceil(M/kBlockSizeI) x
  ceil(D/kN) x sizeof(GradQTempStorage)/4, i.e. about M x D floats per (batch, head): the size of grad_q
  in fp32). Also grad_q/k/v as one [B, M, 3, nH, D] chunk when q, k, v are views of one tensor
  (`chunk_grad_outputs`, GPT-2's split c_attn output).
- `flashbwd`: flash attention backward's internal buffers, the bf16 rows' kernel
  (aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp `mha_bwd`: softmax_d
  [b, h, s_r] fp32, dq_accum [b, s_r, h, d_r] fp32 with s_r = round_multiple(s, 128), d_r =
  round_multiple(d, 32); with fewer k/v heads dk_expanded, dv_expanded [b, s, h, d]; allocated after
  dq/dk/dv, freed when the call returns).
- `addrdown`: new segments at decreasing addresses instead of increasing ones. Best fit breaks size ties
  by address (CUDACachingAllocator.cpp `BlockComparatorSize`) and cudaMalloc's addresses are the
  driver's choice, so the model cannot know them: this measures how much the rows depend on it.
- `cached`: the cuBLAS workspaces where CublasHandlePool.cpp allocates them in a fresh process (after each
  thread's first cuBLAS call, kept), instead of before the model.
- `history`: the process history the rows' counters point to (docs/allocator.md): the first row of the
  file (`gpt2/full/qv/b4s512/fp32`, the only row whose steady state holds the two 32 MiB workspaces:
  `mem_steady_before_step - mem_model_ready - opt_state_bytes` = 65.8 MiB) replayed first with the
  workspaces "cached"; then every tensor freed and `empty_cache()` (release_cached_blocks frees only
  unsplit segments, so the workspaces' segments stay), then the row itself. The first row is scored as
  "cached" alone.
- `extra1`, `extra2`: one or two more fp32-logits-sized blocks (batch x seq x vocab x 4 B) held at once
  once before the steps and freed (any earlier pass of the harness that held more logits at once): a
  what-if for leftover cached segments.

Result on the 29 H100 rows and its reading: docs/allocator.md, "Mechanisms checked against the torch 2.11
source (rsvhunt)".
"""

from __future__ import annotations

import json
import pickle
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT = Path(__file__).resolve().parent.parent.parent / "shared" / "calibration" / "h100-measured.jsonl"
MIB = 1 << 20
FIRST_ROW = "gpt2/full/qv/b4s512/fp32"
EFFICIENT_BWD = "_scaled_dot_product_efficient_attention_backward"
FLASH_BWD = "_scaled_dot_product_flash_attention_backward"
CANDIDATES = ("base", "effbwd", "flashbwd", "addrdown", "cached", "history", "extra1", "extra2")


def traced(row: dict, cache: Path | None) -> SimpleNamespace:
    """The row's calibration trace reduced to what the replay reads (blocks, marks, event count)."""
    path = cache / (row["name"].replace("/", "_") + ".pkl") if cache else None
    if path is not None and path.exists():
        data = pickle.loads(path.read_bytes())
    else:
        from score_calibration import row_to_kwargs

        from trace_calibration import kept_simulations

        from lora_cost.trace import trace

        kwargs = row_to_kwargs(row)
        model, method = kwargs.pop("model"), kwargs.pop("method")
        with kept_simulations() as sims:
            trace(model, method, calibration=True, **kwargs)
        sim = sims[-1]
        fields = ("raw", "size", "alloc", "free", "kind", "op", "module", "phase", "recompute")
        data = {"blocks": [{f: getattr(b, f) for f in fields} for b in sim.blocks], "marks": list(sim.marks),
                "event": sim.event}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(pickle.dumps(data))
    return SimpleNamespace(blocks=[SimpleNamespace(**b) for b in data["blocks"]], marks=data["marks"],
                           event=data["event"])


def _block_of(sim):
    by_id = {id(b): b for b in sim.blocks}

    def block(key):
        return by_id.get(key[1]) if isinstance(key, tuple) and len(key) == 2 else None
    return block


def _after_op(sim, events, op: str, extra) -> list[tuple]:
    """Insert `extra(outputs_bytes)` (a list of transient sizes) after the three gradient outputs of each
    call of `op`: allocated in order, then freed in order (the op returns)."""
    block = _block_of(sim)
    out, i, n, calls = [], 0, len(events), 0
    while i < n:
        key, nbytes = events[i]
        out.append(events[i])
        b = block(key)
        if b is None or nbytes is None or b.op != op:
            i += 1
            continue
        grads, j = [nbytes], i + 1
        while j < n and len(grads) < 3:
            k2, n2 = events[j]
            b2 = block(k2)
            if b2 is None or n2 is None or b2.op != op:
                break
            out.append(events[j])
            grads.append(n2)
            j += 1
        sizes = [s for s in extra(grads) if s > 0]
        keys = [(("transient", op, calls), t) for t in range(len(sizes))]
        out += list(zip(keys, sizes)) + [(k, None) for k in keys]
        calls += 1
        i = j
    return out


def efficient_backward(sim, events, head_dim: int) -> list[tuple]:
    """`effbwd`: delta [B, nH, M] fp32 and the grad_q accumulation workspace (about grad_q's size in fp32)."""
    def extra(grads):
        gq = grads[0]  # fp32 grad_q: B x M x nH x D x 4 bytes
        return [gq // head_dim, gq]
    return _after_op(sim, events, EFFICIENT_BWD, extra)


def efficient_chunk(sim, events) -> list[tuple]:
    """grad_q/k/v as one allocation of their summed size (freed when the last of the three is freed)."""
    block = _block_of(sim)
    out, pending = [], {}
    i, n = 0, len(events)
    while i < n:
        key, nbytes = events[i]
        b = block(key)
        if b is not None and nbytes is not None and b.op == EFFICIENT_BWD and i + 2 < n:
            keys = [events[i + t][0] for t in range(3)]
            if all(block(k) is not None and block(k).op == EFFICIENT_BWD and events[i + t][1] is not None
                   for t, k in enumerate(keys)):
                chunk = ("chunk",) + tuple(keys)
                out.append((chunk, sum(events[i + t][1] for t in range(3))))
                for k in keys:
                    pending[k] = [chunk, set(keys)]
                i += 3
                continue
        if nbytes is None and key in pending:
            chunk, alive = pending.pop(key)
            alive.discard(key)
            if not alive:
                out.append((chunk, None))
            else:
                for k in alive:
                    pending[k][1] = alive
            i += 1
            continue
        out.append(events[i])
        i += 1
    return out


def flash_backward(sim, events, head_dim: int) -> list[tuple]:
    """`flashbwd`: softmax_d, dq_accum and, with grouped k/v heads, dk/dv expanded (seq lengths of the
    calibration rows are multiples of 128 and head_dim of 32, so the rounding is exact)."""
    def extra(grads):
        dq, dk = grads[0], grads[1] if len(grads) > 1 else grads[0]
        elem = 2  # bf16/fp16: flash runs only in half precision
        out = [dq // elem * 4 // head_dim, dq // elem * 4]  # softmax_d [b, h, s] fp32, dq_accum [b, s, h, d] fp32
        if dk < dq:  # fewer k/v heads: dk_expanded, dv_expanded [b, s, h, d]
            out += [dq, dq]
        return out
    return _after_op(sim, events, FLASH_BWD, extra)


def _allocator(down: bool = False):
    from lora_cost.analytic.allocator import CachingAllocator

    if not down:
        return CachingAllocator()

    class Down(CachingAllocator):
        """New segments at decreasing addresses (ties in best fit then go the other way)."""

        def __init__(self) -> None:
            super().__init__()
            self._next_address = 1 << 60

        def _alloc_block(self, pool, size, alloc_size, retry):
            before = self._next_address
            block = super()._alloc_block(pool, size, alloc_size, retry)
            if block is not None:
                gap = self._next_address - before
                self._next_address = block.ptr = before - gap
            return block
    return Down()


def _feed(allocator, events, live: dict, tag) -> None:
    for key, nbytes in events:
        key = (tag, key)
        if nbytes is None:
            if key in live:
                allocator.free(live.pop(key))
        elif nbytes > 0:
            live[key] = allocator.malloc(nbytes)


def peak(events, down: bool = False) -> int:
    allocator = _allocator(down)
    _feed(allocator, events, {}, "row")
    return allocator.reserved_peak


def after_history(first, events) -> int:
    """Peak reserved of `events` replayed after the first row's run, its tensors freed and empty_cache()."""
    from lora_cost.analytic.allocator.workspaces import cublas_workspace_bytes
    from lora_cost.trace.replay import step_events

    allocator, live = _allocator(), {}
    _feed(allocator, step_events(first, workspace=cublas_workspace_bytes((9, 0)), workspace_mode="cached"), live,
          "first")
    for key in [k for k in live if k[1][0] != "cublas_workspace"]:
        allocator.free(live.pop(key))
    allocator.empty_cache()
    allocator.reset_peak_stats()
    _feed(allocator, events, live, "row")
    return allocator.reserved_peak


def _head_dim(config: dict) -> int:
    hidden = config.get("hidden_size", config.get("n_embd"))
    heads = config.get("num_attention_heads", config.get("n_head"))
    return config.get("head_dim") or hidden // heads


def score(path: Path, only: str | None = None, cache: Path | None = None) -> list[dict]:
    from score_calibration import calibration_rows

    from lora_cost.analytic.allocator.workspaces import cublas_workspace_bytes
    from lora_cost.trace.replay import step_events

    models = json.loads((path.parent / "models.json").read_text())
    ws = cublas_workspace_bytes((9, 0))
    rows = list(calibration_rows(path))
    first_row = next(r for r in rows if r["name"] == FIRST_ROW)
    first = traced(first_row, cache)
    out = []
    for row in rows:
        if only and only not in row["name"]:
            continue
        sim = first if row is first_row else traced(row, cache)
        config = models[row["model"]]
        head_dim = _head_dim(config)
        events = step_events(sim, workspace=ws, workspace_mode="before")
        setup = 1 + max(i for i, (k, _) in enumerate(events) if k[0] in ("setup", "cublas_workspace"))
        logits = row["batch"] * row["seq"] * config.get("vocab_size", 0) * 4
        sims = {
            "base": peak(events),
            "effbwd": peak(efficient_chunk(sim, efficient_backward(sim, events, head_dim))),
            "flashbwd": peak(flash_backward(sim, events, head_dim)),
            "addrdown": peak(events, down=True),
            "cached": peak(step_events(sim, workspace=ws, workspace_mode="cached")),
        }
        # the row's own workspaces are the first row's (same process): none of its own
        sims["history"] = sims["cached"] if row is first_row else after_history(
            first, step_events(sim, workspace=ws, workspace_mode="none"))
        for k in (1, 2):
            extra = [(("extra", i), logits) for i in range(k)] + [(("extra", i), None) for i in range(k)]
            sims[f"extra{k}"] = peak(events[:setup] + extra + events[setup:])
        measured = row["peak_reserved"]
        out.append({"name": row["name"], "measured": measured, "simulated": sims,
                    "errors": {k: v / measured - 1 for k, v in sims.items()}})
    return out


def summary(rows: list[dict], key: str) -> str:
    errs = sorted(abs(r["errors"][key]) for r in rows)
    p90 = errs[min(len(errs) - 1, round(0.9 * (len(errs) - 1)))]
    return (f"{key:9s} |error| over {len(errs)} rows: median {100 * statistics.median(errs):5.2f}%, "
            f"p90 {100 * p90:5.2f}%, worst {100 * errs[-1]:5.2f}%, within 3%: {sum(e <= 0.03 for e in errs)}")


def main(argv: list[str]) -> int:
    args = [a for a in argv]
    only = cache = None
    if "--only" in args:
        i = args.index("--only")
        only = args[i + 1]
        del args[i:i + 2]
    if "--cache" in args:
        i = args.index("--cache")
        cache = Path(args[i + 1])
        del args[i:i + 2]
    path = Path(args[0]) if args else DEFAULT
    rows = score(path, only, cache)
    print(f"{'case':46s} {'meas MiB':>8s} " + " ".join(f"{k:>8s}" for k in CANDIDATES))
    for r in rows:
        print(f"{r['name']:46s} {r['measured'] / MIB:8.0f} "
              + " ".join(f"{100 * r['errors'][k]:+7.2f}%" for k in CANDIDATES))
    for key in CANDIDATES:
        print(summary(rows, key))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
