"""The forward at batch >= 2 as an exact line in the batch (record.py's `BatchLine`): what it returns is
what direct simulation returns, at sampled, interpolated and extrapolated batches, for every family
with its batch-dependent branches; batch 1 is simulated; a forward that is not affine is refused."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lora_cost.analytic import record
from lora_cost.analytic.estimator import _forward_key, validated_run
from lora_cost.errors import LoraCostError
from lora_cost.profiles import load_model
from lora_cost.spec import RunConfig

pytestmark = pytest.mark.fast

CASES = (  # (model, method, attention, checkpointing): every family, the batch == 1 branches (phi-3, bloom eager)
    ("gpt2", "lora", "eager", False), ("llama-3.2-1b", "dora", "sdpa", True), ("bloom-560m", "lora", "eager", False),
    ("phi-3-mini-4k", "lora", "eager", False), ("phi-3-mini-4k", "full", "sdpa", True),
    ("t5-base", "lora", "sdpa", False), ("qwen3-30b-a3b", "lora", "sdpa", False), ("roberta-base", "ia3", "sdpa", False),
    ("gemma-2-2b", "prefix-tuning", "eager", False), ("mixtral-8x7b", "full", "sdpa", True),
    ("deberta-v3-base", "lora", "eager", False), ("gemma-3-1b", "lora", "sdpa", False),
)
BATCHES = (2, 5, 3, 9, 4, 64, 2, 5)  # two samples, the check, then interpolated, extrapolated and sampled again


def _key(model, method, attention, ckpt, seq=64):
    spec = load_model(model)
    run, _, names, _, _ = validated_run(spec, RunConfig(method=method, seq=seq, attention=attention,
                                                        grad_checkpointing=ckpt))
    return spec, _forward_key(run), frozenset(names)


def _direct(spec, key, targets):
    return record._affine_of(*record._simulate_ranks(spec, key, targets))


def _fresh():
    record.affine_record.cache_clear()
    record._batch_line.cache_clear()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}{'-ckpt' if c[3] else ''}")
def test_the_line_gives_what_simulation_gives(case):
    spec, key, targets = _key(*case)
    _fresh()
    for b in BATCHES:
        at = replace(key, batch=b)
        assert record.affine_record(spec, at, targets) == _direct(spec, at, targets), b
    assert record._batch_line(spec, replace(key, batch=2), targets).state == "affine"


def test_batch_one_is_simulated():
    """Phi-3's eager attention keeps a view of the fused qkv only at batch 1: the line through batches 2
    and 3 would be wrong there, so batch 1 never uses it."""
    spec, key, targets = _key("phi-3-mini-4k", "lora", "eager", False)
    raw = {b: record._simulate_ranks(spec, replace(key, batch=b), targets) for b in (1, 2, 3)}
    line = record._line_through(2, raw[2], 3, raw[3])
    assert record._line_value(line, 1) != raw[1]
    _fresh()
    for b in (2, 3, 4, 1):
        record.affine_record(spec, replace(key, batch=b), targets)
    assert record.affine_record(spec, replace(key, batch=1), targets) == record._affine_of(*raw[1])


def test_a_forward_not_affine_in_the_batch_is_simulated_at_every_batch(monkeypatch):
    spec, key, targets = _key("gpt2", "lora", "sdpa", False)
    real = record._simulate_ranks

    def curved(spec, run, targets):  # a stand-in for a data-dependent branch: one entry quadratic in the batch
        s1, l1, s2, l2 = real(spec, run, targets)
        s1 = {**s1, ("saved", "curved"): run.batch ** 2}
        return s1, l1, s2, l2

    monkeypatch.setattr(record, "_simulate_ranks", curved)
    _fresh()
    for b in (2, 3, 4, 7):
        assert record.affine_record(spec, replace(key, batch=b), targets) == record._affine_of(*curved(spec, replace(key, batch=b), targets))
    assert record._batch_line(spec, replace(key, batch=2), targets).state == "simulate"
    _fresh()


def test_a_line_needs_whole_integer_slopes_and_equal_structure():
    assert record._line_through(2, ({"a": 4},), 4, ({"a": 7},)) is None  # slope 1.5: not a whole number of bytes
    assert record._line_through(2, ({"a": 4.0},), 3, ({"a": 5.0},)) is None  # floats are not interpolated
    assert record._line_through(2, ({"a": 4},), 3, ({"b": 5},)) is None  # an entry in one sample only
    assert record._line_through(2, ({"x": [1, 2]},), 3, ({"x": [1]},)) is None  # a candidate list that grew
    line = record._line_through(2, ({"a": 4}, {"x": [1, 10]}), 4, ({"a": 8}, {"x": [1, 16]}))
    assert record._line_value(line, 10) == ({"a": 20}, {"x": [1, 34]})


def test_an_error_is_raised_at_every_batch_and_never_cached():
    spec = load_model("t5-base")
    key = replace(RunConfig(method="prefix-tuning", seq=64), batch=2)
    _fresh()
    for b in (2, 3, 4, 5):
        with pytest.raises(LoraCostError):
            record.affine_record(spec, replace(key, batch=b), frozenset())


def test_revalued_equals_replace():
    from lora_cost.analytic.record import revalued
    run = RunConfig(method="lora", r=8, targets=("q_proj",), batch=4, seq=256, optimizer="sgd", attention="flash_attention_2")
    for changes in (dict(r=1, optimizer="adamw"), dict(batch=2), dict(r=2), {}):
        new = revalued(run, **changes)
        assert new == replace(run, **changes) and hash(new) == hash(replace(run, **changes))
        assert type(new) is RunConfig and new.tokens == replace(run, **changes).tokens
    with pytest.raises(TypeError):
        revalued(run, rank=2)
