"""`lora-cost methods` and `plan --methods` read the one registry: every registered method is listed,
with its paper, whoever added it."""

import json

import pytest
from click.testing import CliRunner

from lora_cost.analytic.methods import all_methods
from lora_cost.cli import main

pytestmark = pytest.mark.fast


def test_methods_listing_has_every_registered_method_and_its_paper():
    out = CliRunner().invoke(main, ["methods", "--json"])
    assert out.exit_code == 0, out.output
    listed = {m["name"]: m for m in json.loads(out.output)}
    assert set(listed) == set(all_methods()) and len(listed) >= 7
    for name, method in all_methods().items():
        assert listed[name]["paper"] == method.paper and method.paper


def test_plan_help_names_every_registered_method():
    out = CliRunner().invoke(main, ["plan", "--help"])
    assert out.exit_code == 0
    assert f"any of {', '.join(all_methods())} (lora-cost methods" in " ".join(out.output.split())
