"""The estimate command's import budget, machine-independent: what `lora-cost estimate` imports.

Issue 11 asks the analytic estimate (with the allocator model) to cost under a tenth of
`python -c "import torch"`; most of its time is imports (benchmarks/sweep_speed.py --cli times it). A
timing would be flaky, so these tests pin the mechanism instead: the estimate path imports neither torch
nor the other subcommands, renderers or readers, and of the model families only the one asked for (the
architectures registry loads a family's module on the first lookup of its model_type: base.py).
"""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.fast

# run a CLI command in a fresh interpreter and print the modules it imported
_PROBE = (
    "import json, sys\n"
    "from lora_cost.cli import main\n"
    "sys.argv = ['lora-cost'] + json.loads(sys.argv[1])\n"
    "out = sys.stdout\n"
    "sys.stdout = open('/dev/null', 'w') if sys.platform != 'win32' else sys.stdout\n"
    "try:\n"
    "    main()\n"
    "except SystemExit as exc:\n"
    "    code = exc.code\n"
    "out.write(json.dumps({'code': code, 'modules': sorted(sys.modules)}))\n"
)

# heavy third-party packages the estimate never needs (torch: the trace engine and profiler; plotly: HTML;
# yaml: YAML config files)
HEAVY = ("torch", "transformers", "peft", "numpy", "plotly", "yaml", "accelerate", "fvcore")
# lora_cost modules other commands or options need, never a plain estimate
NOT_FOR_ESTIMATE = ("lora_cost.cli.plan", "lora_cost.cli.plan_sharded", "lora_cost.cli.report", "lora_cost.cli.profile",
                    "lora_cost.cli.models", "lora_cost.cli.files", "lora_cost.cli.trace_engine",
                    "lora_cost.analytic.planner", "lora_cost.report.html", "lora_cost.report.html_sharded",
                    "lora_cost.report.plan_terminal", "lora_cost.report.plan_json", "lora_cost.report.profile_terminal",
                    "lora_cost.readers", "lora_cost.trace", "lora_cost.profiler")


def imported(*args: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(list(args))], capture_output=True, text=True,
                          check=True)
    result = json.loads(proc.stdout)
    assert result["code"] in (0, None), proc.stderr
    return set(result["modules"])


def _under(modules: set[str], prefix: str) -> list[str]:
    return sorted(m for m in modules if m == prefix or m.startswith(prefix + "."))


@pytest.mark.parametrize("extra", [(), ("--reserved-model", "replay"), ("--json",)], ids=["table", "replay", "json"])
def test_estimate_imports_only_what_it_uses(extra):
    modules = imported("estimate", "--model", "llama-2-70b", "--r", "8", *extra)
    assert "lora_cost.analytic.estimator" in modules  # the probe ran the estimate
    for name in HEAVY + NOT_FOR_ESTIMATE:
        assert not _under(modules, name), f"`lora-cost estimate` imported {_under(modules, name)}"
    # the Llama family's module, no other family's
    assert _under(modules, "lora_cost.analytic.architectures") == [
        "lora_cost.analytic.architectures", "lora_cost.analytic.architectures.base",
        "lora_cost.analytic.architectures.llama"]
    if "--json" in extra:  # rich renders tables only
        assert not _under(modules, "rich")
    else:
        assert "rich.table" in modules
    # the slack's reserved memory needs no allocator simulator (its constant lives in formulas/blocks.py)
    assert bool(_under(modules, "lora_cost.analytic.allocator")) == ("replay" in extra)


def test_family_index_finds_every_registered_family():
    """The lazy lookup's index (each family module's `model_types=(...)` literal, read from its source)
    names, for every registered model_type, the module that registers it: no family falls back to
    importing every module."""
    from lora_cost.analytic.architectures.base import ARCHITECTURES, family_index, family_modules

    registered = ARCHITECTURES.all()  # imports every family module
    index = family_index()
    assert sorted(index) == sorted(registered)
    for model_type, arch in registered.items():
        assert arch.forward.__module__ == f"lora_cost.analytic.architectures.{index[model_type]}", model_type
    assert set(index.values()) == set(family_modules())  # every family module registers something


def test_unknown_model_type_lists_every_family():
    """A lookup the index cannot place imports every family before refusing, so the error names them all."""
    code = ("from lora_cost.errors import LoraCostError\n"
            "from lora_cost.analytic.architectures import get_architecture\n"
            "try:\n"
            "    get_architecture('gptj')\n"
            "except LoraCostError as exc:\n"
            "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "unsupported architecture 'gptj'" in out
    for model_type in ("bert", "bloom", "deberta-v2", "gemma2", "gpt2", "llama", "mixtral", "phi3", "t5"):
        assert model_type in out
