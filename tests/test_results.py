"""The shared vocabulary (results.py): memory categories, the run header, and an estimate's JSON read
back. Torch-free."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

import lora_cost
from lora_cost.profiler.compare import compare
from lora_cost.profiler.results import MEASURED, Boundary, Categories, StepMeasurement
from lora_cost.report.jsonout import estimate_from_json, estimate_to_json, run_header
from lora_cost.results import Estimate, MemoryCategory, RunHeader
from lora_cost.trace.results import TraceResult

pytestmark = pytest.mark.fast


def test_category_values_are_the_json_names_of_the_components():
    e = lora_cost.estimate("llama-3.2-1b", "qlora", targets="all-linear", batch=2, seq=512, grad_checkpointing=True)
    doc = estimate_to_json(e)
    names = set(doc["memory"]["components"]) | {k for p in doc["memory"]["phases"].values() for k in p["terms"]}
    assert names and all(MemoryCategory(n).value == n for n in names)
    assert json.dumps({MemoryCategory.LOGITS: [MemoryCategory.GRADIENTS]}) == '{"logits": ["gradients"]}'
    assert f"{MemoryCategory.WEIGHTS}" == "weights" and MemoryCategory.label_of("weights") == "frozen weights"
    assert MemoryCategory.label_of("attention output") == "attention output"  # not a category: itself
    assert len({c.label for c in MemoryCategory}) == len(MemoryCategory)


def test_both_results_carry_one_run_header():
    header = [f.name for f in fields(RunHeader)]
    assert len(header) == 16
    for result in (Estimate, TraceResult):
        assert [f.name for f in fields(result)][: len(header)] == header
    e = lora_cost.estimate("gpt2", "lora", r=8)
    assert run_header(e)["inputs"]["r"] == 8 and run_header(e)["trainable_params"] == 294_912


@pytest.mark.parametrize("kwargs", [dict(model="gpt2", method="lora", gpu="h100-80gb"),
                                    dict(model="llama-3.1-8b", method="qlora", targets="all-linear", seq=2048,
                                         grad_checkpointing=True, optimizer="paged-adamw-8bit"),
                                    dict(model="roberta-base", method="full", batch=4)])
def test_estimate_json_reads_back(kwargs):
    doc = estimate_to_json(lora_cost.estimate(**kwargs))
    back = estimate_from_json(json.loads(json.dumps(doc)))
    assert isinstance(back, Estimate) and estimate_to_json(back) == doc


def _step(start: Categories, backward_end: Categories) -> StepMeasurement:
    return StepMeasurement(index=2, micro_batches=1, forward_calls=1, backward_calls=1, wall_s=0.1, peak_bytes=10**9,
                           peak_reserved_bytes=None, saved_activation_bytes=10**8, instrumentation_s=0.0, phases=(),
                           boundaries=(Boundary("step_start", 0, start, None), Boundary("backward_end", 0, backward_end, None)))


def test_profiler_compares_by_category():
    # gpt2 (124,439,808 parameters) with LoRA r=8 on c_attn: 12 x (768 x 8 + 8 x 2304) = 294,912 fp32 adapter
    # elements = 1,179,648 B trainable; frozen: 124,439,808 x 2 B (bf16) = 248,879,616 B
    e = lora_cost.estimate("gpt2", "lora", r=8)
    measured = dict.fromkeys(MEASURED.values(), 0)
    start = Categories(**{**measured, "trainable_params": 1_000_000, "frozen_params": 250_000_000}, live_total=0)
    bwd = Categories(**{**measured, "gradients": 1_100_000}, live_total=0)
    rows = {r.term: r for r in compare(_step(start, bwd), None, e, None)}
    assert (rows["trainable weights"].measured, rows["trainable weights"].estimated) == (1_000_000, 1_179_648)
    assert (rows["frozen weights"].measured, rows["frozen weights"].estimated) == (250_000_000, 248_879_616)
    assert (rows["gradients"].measured, rows["gradients"].estimated) == (1_100_000, 1_179_648)
    assert rows["optimizer state"].estimated == 2 * 1_179_648  # AdamW: two fp32 moments
    assert start.bytes_of(MemoryCategory.WEIGHTS) == 250_000_000 and start.bytes_of(MemoryCategory.LOGITS) is None


def test_full_fine_tuning_has_no_frozen_weights():
    e = lora_cost.estimate("gpt2", "full")
    assert e.memory.stored_bytes(MemoryCategory.WEIGHTS) == 0
    assert e.memory.stored_bytes(MemoryCategory.TRAINABLE_WEIGHTS) == 124_439_808 * 2  # bf16 weights train in bf16
