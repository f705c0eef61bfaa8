"""The trace on the Mistral QLoRA recipe, against a real CPU step and hand arithmetic.

A Mistral-like model small enough for seconds, with the structure of `mistral-7b`, QLoRA r=16 on all
linear layers, bf16 compute, gradient checkpointing: grouped-query attention (8 query heads, 2 key/value
heads), a sliding window longer than the sequence (so no mask), every linear a 4-bit stand-in, and
prepare_model_for_kbit_training's fp32 cast of everything else, so q, k, v reach sdpa in fp32 and the
math path runs (memory-efficient attention cannot broadcast grouped key/value heads).

The reference is the same model on real CPU tensors (the stand-in has real kernels too), with the
math sdpa backend, foreach AdamW and optimizer state created by a first step, measured from torch's
profiler memory records. Python, autograd, torch.utils.checkpoint, transformers and peft behave the
same on CPU and CUDA tensors; the kernels of this step are composites or single allocations on both
devices, so a real CPU step allocates what a CUDA step allocates, and what the trace must reproduce.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

B, S, H, KV, D = 2, 256, 8, 2, 256
CFG = {"model_type": "mistral", "hidden_size": D, "intermediate_size": 640, "num_hidden_layers": 2,
       "num_attention_heads": H, "num_key_value_heads": KV, "vocab_size": 512, "max_position_embeddings": 1024,
       "sliding_window": 4096, "tie_word_embeddings": False}
RUN = dict(r=16, targets="all-linear", batch=B, seq=S, precision="bf16", grad_checkpointing=True)


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("mistral") / "config.json"
    path.write_text(json.dumps(CFG))
    return str(path)


def _built(config_path):
    import transformers

    from lora_cost.trace.build import build
    from lora_cost.trace.engine import plan

    spec, run, method, names = plan(config_path, "qlora", **RUN)
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return spec, run, build(spec, CFG, run, method, names).model


@pytest.fixture(scope="module")
def traced(config_path):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from lora_cost.trace.step import run_step

    spec, run, model = _built(config_path)
    rec, _ = run_step(model, run, run.optimizer, spec.vocab)
    return rec


def test_math_softmax_allocates_its_mask_in_forward_and_recomputation(traced):
    """aten._safe_softmax's composite body (attention.cpp) computes the probabilities, then a bool
    `isneginf` mask of the scores, then writes the masked rows into the probabilities: 2 x 8 x 256 x 256 x 1 B = 1,048,576 B, beside [b, h, s, s] fp32
    scores and probabilities of 2 x 8 x 256 x 256 x 4 B = 4,194,304 B each. Two layers, each run in
    the forward and again in its checkpoint recomputation: four masks, four probability tensors."""
    assert traced.backends == {"math": 4}
    masks = [b for b in traced.sim.blocks if b.op == "isneginf"]
    probs = [b for b in traced.sim.blocks if b.op == "_safe_softmax"]
    assert [b.size for b in masks] == [1_048_576] * 4
    assert [b.size for b in probs] == [4_194_304] * 4
    assert [b.phase for b in masks] == ["forward", "forward", "backward", "backward"]
    assert all(b.recompute for b in masks[2:])
    for mask in masks:  # made after the probabilities, alive beside them until the softmax returns
        prob = max((p for p in probs if p.alloc < mask.alloc), key=lambda p: p.alloc)
        assert mask.free is not None and (prob.free is None or prob.free > mask.free)


def _real_step_peaks(config_path) -> dict[str, int]:
    """Peak allocated bytes above the step's start, per phase, of a real CPU step."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile, record_function

    from lora_cost.trace.allocator import rounded
    from lora_cost.trace.step import make_optimizer

    spec, run, model = _built(config_path)
    model = model.to_empty(device="cpu")
    torch.manual_seed(0)
    for p in model.parameters():
        if p.is_floating_point():
            torch.nn.init.normal_(p, std=0.02)
    opt = make_optimizer("adamw", [p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, CFG["vocab_size"], (B, S))
    with sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(input_ids=ids, labels=ids)  # a first step creates the optimizer state (steady state)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del out
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with record_function("phase:forward"):
                out = model(input_ids=ids, labels=ids)
            with record_function("phase:backward"):
                out.loss.backward()
            with record_function("phase:optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
            del out
    events = prof.profiler.kineto_results.events()
    phases = [(e.name().split(":")[1], e.start_ns(), e.end_ns()) for e in events if e.name().startswith("phase:")]
    records = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    current, peaks = 0, {}
    for e in records:  # signed sizes, rounded as the CUDA caching allocator rounds them
        n = e.nbytes()
        current += rounded(n) if n > 0 else -rounded(-n)
        for name, start, end in phases:
            if start <= e.start_ns() <= end:
                peaks[name] = max(peaks.get(name, 0), current)
    return peaks


def test_phase_peaks_match_a_real_cpu_step(traced, config_path):
    """Every phase's peak as the real step's, to a few kilobytes (0-d scalars the trace rounds to
    512 B, the optimizer's CPU step counters); before the composite replay the trace's forward was
    one mask (1,048,576 B, 7.6%) short."""
    real = _real_step_peaks(config_path)
    start = traced.sim.starts["forward"]
    for phase in ("forward", "backward", "optimizer"):
        assert abs((traced.sim.peaks[phase][0] - start) - real[phase]) <= 32 * 1024, (phase, real)
