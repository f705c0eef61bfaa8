"""The numbers-only path (analytic/fast.py) gives exactly the full estimate's numbers, on a grid of
families, methods, ranks, batches, lengths, checkpointing, optimizers and precisions; the planner that
uses it finds what it found with full estimates."""

from __future__ import annotations

import itertools

import pytest

from lora_cost import estimate
from lora_cost.analytic.fast import StepNumbers, numbers_of
from lora_cost.analytic.methods import all_methods, get_method
from lora_cost.errors import LoraCostError
from lora_cost.profiles import load_model

MODELS = ("gpt2", "llama-3.2-1b", "qwen3-30b-a3b", "gemma-2-2b", "t5-base", "bloom-560m", "roberta-base", "phi-3-mini-4k", "mixtral-8x7b", "gemma-3-1b")


def _configs(model):
    spec = load_model(model)
    for method in all_methods():
        m = get_method(method)
        no_targets = (not m.takes_targets or m.trains_biases
                      or (m.default_targets is not None and not m.default_targets(spec)))
        for r, batch, seq, ckpt, opt, prec in itertools.product(
                (1, 8, 64) if m.takes_rank else (None,), (1, 3), (128, 512), (False, True),
                ("adamw", "paged-adamw-8bit"), ("bf16", "fp32")):
            if r == 64 and (batch, seq, opt, prec) != (3, 512, "adamw", "bf16"):
                continue  # one large rank per method is enough
            yield dict(model=model, method=method, r=r, batch=batch, seq=seq, grad_checkpointing=ckpt,
                       optimizer=opt, precision=prec, gpu="h100-80gb",
                       targets=None if no_targets or spec.moe is not None else "all-linear")  # MoE: experts refused


EXTRA = (  # the options the grid does not vary
    dict(model="llama-3.2-1b", method="lora", r=8, task="seq-cls", num_labels=5),
    dict(model="roberta-base", method="lora", r=8, task="token-cls"),
    dict(model="qwen3-30b-a3b", method="lora", r=8, moe_imbalance=2.5),
    dict(model="t5-base", method="lora", r=8, seq=256, target_seq=64, dropout=0.1),
    dict(model="gpt2", method="lora", r=8, attention="eager", model_dropout=0.0, precision="amp-fp16"),
    dict(model="llama-3.2-1b", method="vera", r=256, optimizer="sgd"),
    dict(model="llama-3.2-1b", method="nola", r=8, method_options={"k": 64, "l": 32}),
)


@pytest.mark.parametrize("kw", EXTRA, ids=lambda kw: f"{kw['model']}-{kw['method']}")
def test_numbers_equal_with_other_options(kw):
    assert estimate(**kw, gpu="h100-80gb", numbers_only=True) == numbers_of(estimate(**kw, gpu="h100-80gb"))


@pytest.mark.parametrize("model", MODELS)
def test_numbers_equal_the_full_estimate(model):
    compared = 0
    for kw in _configs(model):
        try:
            full = estimate(**kw)
        except LoraCostError as exc:
            with pytest.raises(LoraCostError) as refused:
                estimate(**kw, numbers_only=True)
            assert str(refused.value) == str(exc)
            continue
        fast = estimate(**kw, numbers_only=True)
        assert isinstance(fast, StepNumbers)
        assert fast == numbers_of(full), kw
        compared += 1
    assert compared >= 40, compared


@pytest.mark.fast
def test_numbers_without_gpu_have_no_step_time():
    n = estimate("gpt2", "lora", r=8, numbers_only=True)
    assert n.step_time_s is None and n == numbers_of(estimate("gpt2", "lora", r=8))


@pytest.mark.fast
def test_an_unknown_run_setting_takes_the_full_path(monkeypatch):
    """A RunConfig field added after fast.py was written sends the run through estimate_run."""
    from lora_cost.analytic import fast
    from lora_cost.spec import RunConfig
    calls = []
    monkeypatch.setattr(fast, "_OTHERS", (("seq", 512),))  # pretend `seq` were such a field
    monkeypatch.setattr(fast, "_full", lambda *a: calls.append(a) or estimate("gpt2", "lora", r=8, seq=1024))
    n = fast.step_numbers(load_model("gpt2"), RunConfig(method="lora", r=8, seq=1024))
    assert calls and n == numbers_of(estimate("gpt2", "lora", r=8, seq=1024))


def test_plan_with_the_numbers_path_finds_the_same_limits():
    """The planner decides fits from the numbers; the largest rank and batch it reports must be what
    full estimates give (checked here by full estimates at the limit and one step past it)."""
    from lora_cost.analytic.planner import plan
    p = plan("llama-3.2-1b", budget_bytes=12 << 30, seq=1024, batch_range=(1, 64), rank_range=(1, 1024),
             methods=("lora", "dora", "full"))
    for mp in p.methods:
        if mp.max_batch is None:
            continue
        b = mp.max_batch.batch
        kw = dict(r=mp.reference_r, seq=1024, grad_checkpointing=mp.grad_checkpointing)
        assert estimate("llama-3.2-1b", mp.method, batch=b, **kw).memory.device_bytes <= p.usable_bytes
        if b < 64:
            assert estimate("llama-3.2-1b", mp.method, batch=b + 1, **kw).memory.device_bytes > p.usable_bytes


@pytest.mark.fast
def test_every_estimate_option_is_known_to_the_numbers_path():
    """`estimate(..., numbers_only=True)` hands the run to fast.step_numbers with `gpu` and `utilisation`
    only. A new option of estimate() that is not a RunConfig field (those are guarded in fast._OTHERS)
    would be silently dropped there: whoever adds one teaches fast.py about it and adds it here."""
    import inspect
    from dataclasses import fields

    from lora_cost.spec import RunConfig
    guarded = {f.name for f in fields(RunConfig)}  # a set RunConfig field unknown to fast.py takes the full path
    handed_over = {"model", "gpu", "utilisation", "serving", "numbers_only",
                   "gpus", "nodes", "sharding_options",  # these three become RunConfig.sharding (guarded)
                   "reserved_model"}  # allocevents: replay/auto take the full path (estimator.estimate)
    assert set(inspect.signature(estimate).parameters) - guarded == handed_over


@pytest.mark.fast
def test_flops_at_the_rank_itself_when_not_integers(monkeypatch):
    """When a FLOP sum is not an integer `_flop_lines` gives None and the FLOPs are evaluated at the run's
    rank from the record's FLOP fields (the record of the peak path has none of them)."""
    from lora_cost.analytic import fast
    monkeypatch.setattr(fast, "_flop_lines", lambda *a: None)
    fast._numbers.cache_clear()
    try:
        kw = dict(model="llama-3.2-1b", method="lora", r=8, batch=2, seq=256, gpu="h100-80gb")
        assert estimate(**kw, numbers_only=True) == numbers_of(estimate(**kw))
    finally:
        fast._numbers.cache_clear()


@pytest.mark.fast
def test_the_sweep_pauses_the_collector_and_restores_it():
    import gc

    from lora_cost.analytic.fast import without_cyclic_gc
    seen = []
    sweep = without_cyclic_gc(lambda fail: seen.append(gc.isenabled()) or (1 / 0 if fail else 7))
    assert gc.isenabled() and sweep(False) == 7 and gc.isenabled()
    with pytest.raises(ZeroDivisionError):
        sweep(True)
    assert gc.isenabled() and seen == [False, False]
    gc.disable()
    try:
        sweep(False)
        assert not gc.isenabled()  # left as it was found
    finally:
        gc.enable()
