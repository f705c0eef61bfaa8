"""The exact lines in the batch behind the numbers path's sweeps (analytic/batchlines.py, task "speed"): `Lin`
arithmetic, comparisons decided over a range of batches or split where their outcome changes, what is refused
as not exact, and the upper envelope a peak is read from, each against brute force over the batches."""

from __future__ import annotations

import random

import pytest

from lora_cost.analytic import batchlines
from lora_cost.analytic.batchlines import Lin, NotAffine, Split, peak_of, upper_envelope

pytestmark = pytest.mark.fast


@pytest.fixture
def batches():
    """Decide comparisons over batches 2..100 (moment_lines sets the range this way)."""
    old = list(batchlines._RANGE)
    batchlines._RANGE[:] = [2, 100]
    yield range(2, 101)
    batchlines._RANGE[:] = old


def test_arithmetic_is_exact_at_every_batch(batches):
    a, b = Lin(7, 3), Lin(-5, 11)  # 7 + 3b and -5 + 11b
    for expr, f in ((a + b, lambda x: 2 + 14 * x), (a - b, lambda x: 12 - 8 * x), (3 * a + 4, lambda x: 25 + 9 * x),
                    (sum([a, b, 6]), lambda x: 8 + 14 * x), (10 - a, lambda x: 3 - 3 * x), (a * Lin(2, 0), lambda x: 14 + 6 * x)):
        assert all(expr.at(x) == f(x) for x in batches)


def test_comparisons_decided_over_the_range_or_split_where_they_change(batches):
    assert Lin(1000, 1) > Lin(0, 2)  # 1000 + b > 2b for b <= 100 (they meet at 1000)
    assert max(Lin(0, 5), Lin(3, 5), 2).at(7) == 38  # the larger on every batch
    with pytest.raises(Split) as split:
        Lin(40, 1) > Lin(0, 2)  # 40 + b > 2b while b < 40
    assert split.value.at == 40  # the first batch where the outcome differs from batch 2's
    with pytest.raises(Split) as split:
        bool(Lin(-30, 1))  # zero at batch 30 only
    assert split.value.at == 30
    assert Lin(-31, 2) != 0 and Lin(4, 0) == 4  # -31 + 2b is odd: never zero

def test_comparisons_split_exactly_at_the_change():
    random.seed(3)
    for _ in range(500):
        lo, hi = random.randint(2, 50), random.randint(50, 5000)
        batchlines._RANGE[:] = [lo, hi]
        try:
            d = Lin(random.randint(-10**6, 10**6), random.randint(-3000, 3000))
            try:
                outcome = d > 0
                assert all((d.c + d.s * x > 0) == outcome for x in (lo, hi, (lo + hi) // 2))
            except Split as split:
                first = d.c + d.s * lo > 0
                assert (d.c + d.s * (split.at - 1) > 0) == first != (d.c + d.s * split.at > 0)
        finally:
            batchlines._RANGE[:] = [batchlines.FIRST, batchlines.MAX_BATCH]


def test_what_is_not_an_exact_line_is_refused(batches):
    for op in (lambda v: v * 0.5, lambda v: int(v), lambda v: v / 2, lambda v: v // 2, lambda v: v * v,
               lambda v: v + 1.0):
        with pytest.raises(NotAffine):
            op(Lin(3, 4))


def test_a_line_constant_in_the_batch_is_a_number():
    """A line with no slope (a gradient's bytes that peaks.py computes from activation lines) is the same number
    at every batch, so what a number allows is exact for it: a float share, int(), float(), floor division."""
    c = Lin(1000, 0)
    assert c * 0.25 == 250.0 and 0.25 * c == 250.0
    assert int(c) == 1000 and float(c) == 1000.0
    q = c // 3
    assert type(q) is Lin and (q.c, q.s) == (333, 0)
    for op in (lambda v: v * 0.5, lambda v: int(v), lambda v: float(v), lambda v: v // 3):  # with a slope: refused
        with pytest.raises(NotAffine):
            op(Lin(1000, 1))


def test_upper_envelope_is_the_largest_line_at_every_batch():
    random.seed(7)
    for _ in range(2000):
        lines = [(random.randint(-10**6, 10**7), random.randint(-1000, 10**5)) for _ in range(random.randint(1, 9))]
        lo = random.randint(2, 40)
        hi = lo + random.randint(0, 2000)
        pieces = upper_envelope(lines, lo, hi)
        assert [p[0] for p in pieces] == sorted({p[0] for p in pieces}) and pieces[0][0] == lo
        for b in {lo, hi, *random.sample(range(lo, hi + 1), min(60, hi - lo + 1))}:
            assert peak_of(pieces, b) == max(0, max(c + s * b for c, s in lines))


def test_sharded_plan_reports_progress_per_point():
    """`plan --gpus`'s sweep tells the CLI's bar (cli/plan.py LazyProgress) of every method x GPU count x strategy,
    planned or skipped."""
    from lora_cost.analytic.sharding.plan import plan_sharded
    from lora_cost.cli.plan import LazyProgress
    calls = []
    with LazyProgress(total=2 * (1 + 2 * 2), after=0.0) as bar:  # no terminal here: counts, draws nothing
        p = plan_sharded("gpt2", gpus=(1, 2, 4), strategies=("ddp", "zero3"), methods=("lora", "qlora"), gpu="t4-16gb",
                         seq=256, batch=1, progress=lambda k: calls.append(k) or bar(k))
    assert sum(calls) == len(p.points) + len(p.skipped) == 2 * (1 + 2 * 2) == bar.done and bar.bar is None
