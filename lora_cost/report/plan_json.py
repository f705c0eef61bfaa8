"""The JSON contract of `lora-cost plan --json`: the Plan's fields, nested as they are."""

from __future__ import annotations

from dataclasses import asdict

from ..analytic.planner import Plan


def plan_to_json(p: Plan) -> dict:
    return asdict(p)
