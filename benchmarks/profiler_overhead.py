"""Wall time of a training step with and without lora-cost's instrumentation.

    python benchmarks/profiler_overhead.py [--steps 8] [--hidden 256] [--layers 4] [--seq 128]

Runs the same GPT-2 + LoRA step (built from a config class, random weights) uninstrumented and
under `lora_cost.profile(..., flops=False)`, interleaved, and reports the median step time of the
measured steps. On CUDA the profiler reads the allocator's counters; on CPU two variants are
timed: the live-storage tracker (every aten op passes through a Python dispatch mode: the CPU
stand-in for the allocator's counters) and `track_cpu_memory=False` (the hooks, category walks and
saved-tensor hooks only: the Python work the CUDA path does per step). For context it also times
the same step under torch's FlopCounterMode and (when importable) torch's MemTracker.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(hidden: int, layers: int, device: str, lora: bool = True):
    import peft
    import transformers
    cfg = transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=max(hidden // 64, 1), vocab_size=8192,
                                  n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    if lora:
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))
    model = model.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_steps(model, opt, n: int, batch: int, seq: int, device: str, wrap=None) -> list[float]:
    times = []
    for _ in range(n):
        ids = torch.randint(0, 8192, (batch, seq), device=device)
        sync(device)
        t0 = time.perf_counter()
        ctx = wrap() if wrap is not None else None
        if ctx is not None:
            ctx.__enter__()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ctx is not None:
            ctx.__exit__(None, None, None)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _fresh(tracker):
    tracker.reset_mod_stats()  # MemTracker refuses a second iteration without it
    return tracker


def profiled(model, opt, warmup: int, n: int, batch: int, seq: int, device: str, track: bool):
    from lora_cost import profiler
    with profiler.profile(warmup=warmup, steps=n, flops=False, track_cpu_memory=track) as p:
        times = run_steps(model, opt, warmup + n, batch, seq, device)
    return times[warmup:], p.result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: least sensitive to other load)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, opt = build(args.hidden, args.layers, device)
    run_steps(model, opt, 3, args.batch, args.seq, device)  # warm everything up

    results: dict[str, list[float]] = {}
    variants = [("uninstrumented", None), ("lora-cost profile", True)]
    if device == "cpu":
        variants.append(("lora-cost profile, track_cpu_memory=False", False))
    last = None
    for _ in range(args.rounds):  # interleave to spread machine noise over all variants
        for name, track in variants:
            if track is None:
                t = run_steps(model, opt, args.steps, args.batch, args.seq, device)
            else:
                t, last = profiled(model, opt, 2, args.steps, args.batch, args.seq, device, track)
            results.setdefault(name, []).extend(t)

    from torch.utils.flop_counter import FlopCounterMode
    results["torch FlopCounterMode"] = run_steps(model, opt, args.steps, args.batch, args.seq, device,
                                                 wrap=lambda: FlopCounterMode(display=False))
    try:  # MemTracker registers gradient hooks on every parameter, so it needs an all-trainable model
        from torch.distributed._tools.mem_tracker import MemTracker
        full, full_opt = build(args.hidden, args.layers, device, lora=False)
        run_steps(full, full_opt, 2, args.batch, args.seq, device)
        results["full fine-tuning, uninstrumented"] = run_steps(full, full_opt, args.steps, args.batch, args.seq, device)
        tracker = MemTracker()
        tracker.track_external(full, full_opt)
        results["full fine-tuning, torch MemTracker"] = run_steps(full, full_opt, args.steps, args.batch, args.seq, device,
                                                                  wrap=lambda: _fresh(tracker))
        results["full fine-tuning, lora-cost profile"], _ = profiled(full, full_opt, 2, args.steps, args.batch, args.seq,
                                                                     device, True)
    except Exception as exc:  # noqa: BLE001 - only context
        print(f"(torch MemTracker not timed: {type(exc).__name__}: {exc})")

    def baseline(name: str) -> list[float]:
        return results["full fine-tuning, uninstrumented" if name.startswith("full") else "uninstrumented"]
    print(f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, GPT-2 d={args.hidden} "
          f"L={args.layers} + LoRA r=8, batch {args.batch} x seq {args.seq}, {args.steps} x {args.rounds} steps per variant")
    for name, t in results.items():
        med, low = statistics.median(t), min(t)
        base, base_min = statistics.median(baseline(name)), min(baseline(name))
        print(f"  {name:42s} median {med * 1e3:7.1f} ms ({med / base:4.2f}x)   min {low * 1e3:7.1f} ms ({low / base_min:4.2f}x)")
    if last is not None and last.overhead is not None:
        o = last.overhead
        print(f"  profiler's own report (last variant): {o.instrumentation_s_per_step * 1e3:.2f} ms per step in hooks "
              f"= {100 * o.fraction:.1f}% of its step")


if __name__ == "__main__":
    main()
