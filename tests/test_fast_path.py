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


# --- task "speed": the numbers of batch >= 2 from lines in the batch (analytic/batchlines.py) ---------------------
LINE_BATCHES = (2, 3, 4, 5, 7, 16, 33, 64, 1000)  # 2-4 sample the forward's batch line; from 5 on the lines answer
LINE_MODELS = ("gpt2", "llama-3.2-1b", "qwen3-30b-a3b", "phi-3-mini-4k", "t5-base", "roberta-base", "gemma-2-2b")


def _line_configs(model):
    spec = load_model(model)
    for method in all_methods():
        m = get_method(method)
        no_targets = (not m.takes_targets or m.trains_biases
                      or (m.default_targets is not None and not m.default_targets(spec)))
        for ckpt, opt in ((False, "adamw"), (True, "adamw"), (True, "paged-adamw-8bit")):
            yield dict(model=model, method=method, r=8 if m.takes_rank else None, seq=128, grad_checkpointing=ckpt,
                       optimizer=opt, gpu="h100-80gb", targets=None if no_targets or spec.moe is not None else "all-linear")


def _compare_over_batches(kw) -> int:
    """Every batch of LINE_BATCHES through both paths (numbers first: the lines are built from what the
    forward's batch line has verified by then); the number of batches compared (0: refused by both alike)."""
    compared = 0
    for b in LINE_BATCHES:
        try:
            fast = estimate(**kw, batch=b, numbers_only=True)
        except LoraCostError as exc:
            with pytest.raises(LoraCostError) as refused:
                estimate(**kw, batch=b)
            assert str(refused.value) == str(exc)
            continue
        assert fast == numbers_of(estimate(**kw, batch=b)), (kw, b)
        compared += 1
    return compared


def _lines_used() -> tuple[int, int]:
    """(lines that answered, lines whose batch range was split by a comparison) in the caches now."""
    import gc

    from lora_cost.analytic.batchlines import NumbersLine
    lines = [o for o in gc.get_objects() if isinstance(o, NumbersLine) and o.state == "built"]
    return len(lines), sum(len(line.segments) > 1 for line in lines)


@pytest.mark.parametrize("model", LINE_MODELS)
def test_numbers_from_batch_lines_equal_the_full_estimate(model):
    compared = sum(_compare_over_batches(kw) for kw in _line_configs(model))
    assert compared >= 150, compared
    assert _lines_used()[0] >= 10


def test_batch_lines_with_sharding_and_splits_equal_the_full_estimate():
    """--gpus strategies (the busiest rank's buffers and gradients at every moment), no GPU (no step time), fp32,
    QLoRA's dequantised weights (a comparison that changes with the batch: the range is split), an optimizer
    whose state is paged and evictable."""
    compared = 0
    for (sharding, gpus), method, ckpt in itertools.product((("ddp", 2), ("fsdp", 8), ("zero2", 4), ("zero3", 8)),
                                                            ("lora", "full", "dora"), (False, True)):
        compared += _compare_over_batches(dict(model="llama-3.2-1b", method=method, r=None if method == "full" else 16,
                                               seq=256, grad_checkpointing=ckpt, gpu="h100-80gb", gpus=gpus,
                                               sharding=sharding))
    for model, method, ckpt, prec in itertools.product(("llama-3.2-1b", "mixtral-8x7b", "gpt2"), ("qlora", "lora"),
                                                       (False, True), ("bf16", "fp32")):
        if method == "qlora" and prec == "fp32":
            continue
        compared += _compare_over_batches(dict(model=model, method=method, r=64, seq=512, grad_checkpointing=ckpt,
                                               precision=prec))
    compared += _compare_over_batches(dict(model="llama-3.2-1b", method="lora", r=8, seq=256,
                                           optimizer="paged-adamw-8bit", paged_evictable=True, gpu="rtx-4090-24gb"))
    assert compared >= 300, compared
    built, split = _lines_used()
    assert built >= 20 and split >= 1, (built, split)


def test_batch_sweep_gives_each_batch_s_numbers():
    """fast.batch_sweep: one checked run, its batches from the lines; the same numbers as estimate at each
    batch, the same refusal for a batch out of range, and a run with a setting the numbers path does not know
    (a fused loss) through the full estimate."""
    from dataclasses import replace

    from lora_cost.analytic.estimator import sharding_spec
    from lora_cost.analytic.fast import batch_sweep
    from lora_cost.spec import RunConfig
    spec = load_model("llama-3.2-1b")
    for run in (RunConfig(method="lora", r=8, seq=256, grad_checkpointing=True),
                RunConfig(method="full", seq=256, sharding=sharding_spec(4, 1, "zero3")),
                RunConfig(method="lora", r=8, seq=256, loss="liger")):
        batches = (1, 2, 3, 4, 6, 9, 64, 3, 2)
        got = batch_sweep(spec, run, batches, gpu="h100-80gb")
        kw = dict(method=run.method, r=run.r, seq=256, grad_checkpointing=run.grad_checkpointing, gpu="h100-80gb",
                  loss=run.loss, **({} if run.sharding is None else dict(gpus=4, sharding="zero3")))
        assert got == tuple(numbers_of(estimate(spec, batch=b, **kw)) for b in batches)
        with pytest.raises(LoraCostError) as refused:
            batch_sweep(spec, run, (4, 0))
        with pytest.raises(LoraCostError) as direct:
            replace(run, batch=0)
        assert str(refused.value) == str(direct.value)


def test_checking_a_run_reads_no_batch():
    """The lines check a run once for all its batches (fast._validated_at, batchlines.NumbersLine): no check of
    `validated_run` may read the batch. Every read of `batch` or `tokens` by the checks is traced (a dataclass
    copying or hashing the run, and RunConfig's own range check, are not checks of the batch)."""
    import sys
    from dataclasses import replace

    from lora_cost.analytic.estimator import sharding_spec, validated_run
    from lora_cost.spec import RunConfig

    reads = []
    copying = {"__post_init__", "__hash__", "__eq__", "__repr__", "__init__", "replace", "_replace", "revalued"}

    class Traced(RunConfig):
        def __getattribute__(self, name):
            if name in ("batch", "tokens") and sys._getframe(1).f_code.co_name not in copying:
                frame = sys._getframe(1)
                reads.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
            return super().__getattribute__(name)

    checked = 0
    for model in ("llama-3.2-1b", "gpt2", "t5-base", "qwen3-30b-a3b", "roberta-base"):
        spec = load_model(model)
        for kw in _line_configs(model):
            run = Traced(method=kw["method"], r=kw["r"], seq=kw["seq"], batch=5, optimizer=kw["optimizer"],
                         grad_checkpointing=kw["grad_checkpointing"],
                         targets=tuple(kw["targets"].split(",")) if kw["targets"] else None)
            for variant in (run, replace(run, sharding=sharding_spec(4, 1, "zero3")), replace(run, packing=True),
                            replace(run, task="seq-cls", num_labels=3), replace(run, attention="eager")):
                try:
                    validated_run(spec, variant)
                    checked += 1
                except LoraCostError:
                    pass
    assert not reads, sorted(set(reads))[:5]
    assert checked >= 300, checked
