"""A method is one module: its options are typed and checked in one place, the CLI flags come from
them, the profiler asks the registry, and a new method needs no edit anywhere else."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_cost import LoraCostError, estimate
from lora_cost.analytic.methods import base
from lora_cost.analytic.methods.options import MethodOption
from lora_cost.cli import main
from lora_cost.registry import Registry, dashed

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("method, options, flag", [
    ("nola", {"k": "32"}, "--nola-k"),  # wrong type: a string for an int
    ("nola", {"l": True}, "--nola-l"),  # a bool is not an int
    ("nola", {"k": 0}, "--nola-k"),  # below the minimum of 1
    ("qlora", {"quant_type": "nf5"}, "--quant-type"),  # not one of the choices
    ("qlora", {"double_quant": 1}, "--double-quant"),  # an int is not a bool
    ("lora", {"quant_type": "nf4"}, "--quant-type"),  # another method's option
    ("full", {"k": 8}, "--nola-k"),
])
def test_bad_option_names_its_flag(method, options, flag):
    with pytest.raises(LoraCostError, match=flag):
        estimate("gpt2", method, method_options=options)


def test_option_of_no_method_is_named_as_given():
    with pytest.raises(LoraCostError, match="shift does not apply to method lora"):
        estimate("gpt2", "lora", method_options={"shift": 1})


def test_cli_option_for_another_method_exits_2():
    out = CliRunner().invoke(main, ["estimate", "--model", "gpt2", "--method", "lora", "--no-double-quant"])
    assert out.exit_code == 2 and "--double-quant does not apply to method lora" in out.output


def test_generated_flags_reach_the_estimate():
    out = CliRunner().invoke(main, ["estimate", "--model", "gpt2", "--method", "nola", "--nola-k", "64", "--nola-l", "32",
                                    "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["inputs"]["method_options"] == {"k": 64, "l": 32}
    # NoLA trains k + l coefficients per adapted matrix: 12 blocks x c_attn x (64 + 32) = 1,152
    assert doc["trainable_params"] == 12 * (64 + 32)


def test_double_quant_saves_what_the_block_constants_cost():
    # GPT-2's four block linears (768x2304, 768x768, 768x3072, 3072x768) have 27,648, 9,216, 36,864 and
    # 36,864 blocks of 64. Without double quantisation each block keeps an fp32 absmax (4 B); with it a
    # uint8 absmax (1 B), an fp32 absmax per 256 blocks and the 1,024 B code table + 4 B offset per matrix:
    # 3 x blocks - 4 x ceil(blocks / 256) - 1,028 bytes more without it.
    per_matrix = [3 * 27_648 - 4 * 108 - 1028, 3 * 9_216 - 4 * 36 - 1028, 3 * 36_864 - 4 * 144 - 1028,
                  3 * 36_864 - 4 * 144 - 1028]  # 81,484 + 26,476 + 108,988 + 108,988 = 325,936
    on = estimate("gpt2", "qlora", method_options={"double_quant": True})
    off = estimate("gpt2", "qlora", method_options={"double_quant": False})

    def weights(e):
        return next(t.value for t in e.memory.terms if t.name == "base weights")

    assert weights(off) - weights(on) == 12 * sum(per_matrix) == 3_911_232


def test_options_must_agree_across_methods(monkeypatch):
    monkeypatch.setattr(base, "METHODS", Registry("method", dashed))
    k = MethodOption("k", "--nola-k", int, 1024, "bases", minimum=1)
    kwargs = dict(title="t", paper="p", recipe="r", default_r=8, trainable=lambda s, r: [], frozen=lambda s, r: [],
                  adapted_linear=lambda ctx, x, site: ctx.base_linear(x, site))
    base.register_method(base.Method(name="one", options=(k,), **kwargs))
    base.register_method(base.Method(name="two", options=(k,), **kwargs))  # the same option: shared
    assert base.all_options() == {k: ("one", "two")}
    with pytest.raises(ValueError, match="clashes"):  # same name, another flag
        base.register_method(base.Method(name="three", options=(MethodOption("k", "--k3", int, 1, "x"),), **kwargs))


# --- profiler recognition, on stand-ins for a live model (no torch needed) -----------------------

class _Param:
    def __init__(self, requires_grad: bool) -> None:
        self.requires_grad = requires_grad


class _Model:
    def __init__(self, params: dict, modules=()) -> None:
        self._params, self._modules = params, list(modules)

    def named_parameters(self):
        return iter(self._params.items())

    def parameters(self):
        return iter(self._params.values())

    def modules(self):
        return iter(self._modules)


class LoraConfig:  # the profiler matches peft's config classes by name
    def __init__(self, use_dora: bool = False) -> None:
        self.use_dora = use_dora


class VeraConfig:
    pass


def _recognised(model, cfg):
    return next((m.name for m in base.recognisers() if m.recognise(model, cfg)), None)


def test_recognition_order(monkeypatch):
    linear4 = type("Linear4bit", (), {})
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(nn=types.SimpleNamespace(Linear4bit=linear4)))
    lora = {"q.lora_A.default.weight": _Param(True), "q.lora_B.default.weight": _Param(True), "q.weight": _Param(False)}
    frozen_a = {**lora, "q.lora_A.default.weight": _Param(False)}
    assert _recognised(_Model(lora), LoraConfig()) == "lora"
    assert _recognised(_Model(frozen_a), LoraConfig()) == "lora-fa"
    assert _recognised(_Model(lora), LoraConfig(use_dora=True)) == "dora"
    # a 4-bit base claims the model before DoRA and LoRA-FA do
    assert _recognised(_Model(frozen_a, [linear4()]), LoraConfig(use_dora=True)) == "qlora"
    assert _recognised(_Model(lora), VeraConfig()) == "vera"
    assert _recognised(_Model({"w": _Param(True)}), None) == "full"
    assert _recognised(_Model({"w": _Param(True), "v": _Param(False)}), None) is None


# --- a new method is one new module ------------------------------------------------------------

NEW_METHOD = '''
"""A test-only method: a trainable per-output scale of `width` columns on each adapted matrix."""
from .base import Method, TensorGroup, register_method
from .options import MethodOption

WIDTH = MethodOption("width", "--scale-width", int, 2, "columns of the scale", minimum=1)

register_method(Method(
    name="scale-test", title="Scale (test)", paper="-", recipe="-", default_r=1,
    trainable=lambda site, run: [TensorGroup(f"{site.name}.scale", WIDTH.value(run) * site.d_out, 1, "fp32")],
    frozen=lambda site, run: [],
    adapted_linear=lambda ctx, x, site: ctx.base_linear(x, site),
    options=(WIDTH,),
))
'''


def test_a_new_method_is_one_module(tmp_path):
    """Copy the package, add one module to methods/, change nothing else: the method is listed, its
    option is a CLI flag, and it estimates."""
    shutil.copytree(ROOT / "lora_cost", tmp_path / "lora_cost", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "lora_cost" / "analytic" / "methods" / "scale_test.py").write_text(NEW_METHOD)

    def cli(*args):
        code = "import sys; from lora_cost.cli import main; main(sys.argv[1:], prog_name='lora-cost')"
        return subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True)

    helped = cli("estimate", "--help")
    assert helped.returncode == 0 and "--scale-width" in helped.stdout and "scale-test" in helped.stdout
    listed = json.loads(cli("methods", "--json").stdout)
    assert {"name": "scale-test", "options": ["width"]}.items() <= next(m for m in listed if m["name"] == "scale-test").items()
    out = cli("estimate", "--model", "gpt2", "--method", "scale-test", "--scale-width", "3", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["inputs"]["method_options"] == {"width": 3}
    assert doc["trainable_params"] == 12 * 3 * 2304  # 12 blocks x c_attn (d_out 2304) x 3 columns = 82,944
    bad = cli("estimate", "--model", "gpt2", "--method", "scale-test", "--scale-width", "0")
    assert bad.returncode == 2 and "--scale-width must be at least 1" in bad.stderr


def test_plan_passes_method_options_to_the_methods_declaring_them():
    args = ["plan", "--model", "gpt2", "--budget", "80GiB", "--methods", "lora,qlora", "--r", "8-8", "--batch", "1-2",
            "--seq", "256", "--json"]
    on, off = (CliRunner().invoke(main, args + extra) for extra in ([], ["--no-double-quant"]))
    assert on.exit_code == 0 and off.exit_code == 0, off.output
    plans = [{p["method"]: p for p in json.loads(out.output)["methods"] if not p["grad_checkpointing"]} for out in (on, off)]
    assert json.loads(off.output)["method_options"] == {"double_quant": False}
    # qlora's peak grows by the block constants (3,911,232 B, hand arithmetic above); lora ignores the flag
    assert plans[1]["qlora"]["max_batch"]["peak_bytes"] - plans[0]["qlora"]["max_batch"]["peak_bytes"] == 3_911_232
    assert plans[1]["lora"]["max_batch"]["peak_bytes"] == plans[0]["lora"]["max_batch"]["peak_bytes"]
    bad = CliRunner().invoke(main, args + ["--nola-k", "4"])
    assert bad.exit_code == 2 and "--nola-k does not apply to any method planned (lora, qlora)" in bad.output
