"""Task "axodtype": QLoRA as axolotl leaves it (amp-bf16 over bf16 embeddings, norms, head and bf16-stored 4-bit
weights, fp32 LoRA factors: `--precision amp-bf16 --no-kbit-prepare --quant-storage bf16`) in both engines.

Two trace rules this rests on, checked against the installed peft source: peft wraps bitsandbytes' Linear4bit in
lora/bnb.py `Linear4bit`, which casts the input to the factors' dtype only outside autocast (the trace's stand-in gets
peft's generic `Linear`, so the hook sets `cast_input_dtype_enabled = False` under autocast); a model loaded in 4 bits
with dtype=bf16 holds its other parameters in bf16 (trace/qlora.py cast_unquantised). With the bnb rule the 16-bit
input reaches lora_A as it is: one saved tensor per layer input, shared by its adapted modules.

Measured (`python tests/test_qlora_axodtype_torch.py`: 24 seeded rows of (llama, qwen2) x attention x optimizer x
loss x checkpointing of tests/test_grid_issue9.py with the axolotl mix): saved activations within 0.003% and FLOPs
exact on all 24; peak |analytic - trace| / trace median 2.16%, 17 rows within 3%, and the 7 rows of chunked:4 with
checkpointing 5.8% to 7.3% low, at the chunked loss's forward: the trace's forward temporaries exceed the analytic
ones by a fixed ~0.04-0.18 MB on these tiny models in every mix (qwen2, standard loss: plain LoRA bf16 36/61 KB
without/with checkpointing, prepare's fp32 QLoRA 73/182 KB, this mix 40/124 KB), which the mix's smaller total makes
relatively larger; not this task's mechanism. With task "ligeracc" merged (the analytic forward's tracked moments;
checked on `git merge-tree` of main and this branch) the same sample gives median 1.11%, worst 5.17%. The trace's bnb input-cast rule
moves no row of task "recast"'s sample (median 1.05%, worst 5.37% before and after).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402
from grid_support import assert_engines_agree, engines_terms  # noqa: E402
from peft_step import saved_under_amp_bf16  # noqa: E402
from tiny_configs import B, CONFIGS, S  # noqa: E402
from lora_cost import estimate  # noqa: E402
from lora_cost.trace.autocast import CudaAutocast  # noqa: E402
from lora_cost.trace.qlora import Linear4bitStandIn, cast_unquantised, quantize_linears  # noqa: E402

AXOLOTL = {"kbit_prepare": False, "quant_storage": "bf16"}
TARGETS = {"llama": ["q_proj", "v_proj"], "qwen3": ["q_proj", "o_proj", "down_proj"]}


def _axolotl_model(family: str, ckpt: bool):
    """What axolotl's loader leaves (readers/qlora_dtypes.py): 4-bit linears stored in bf16, everything else bf16,
    fp32 LoRA factors (get_peft_model's default), checkpointing non-reentrant here (the engines' convention)."""
    model = tiny_models.build(family, "fp32")
    quantize_linears(model, torch.bfloat16, True, "bf16")
    model.is_loaded_in_4bit = True
    cast_unquantised(model, torch.bfloat16)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
            "use_reentrant": False,
            "context_fn": lambda: (contextlib.nullcontext(), CudaAutocast(torch.bfloat16))})
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                        target_modules=TARGETS[family]))
    for m in model.modules():  # lora/bnb.py Linear4bit.forward: no input cast under autocast
        if isinstance(m, peft.tuners.lora.LoraLayer) and isinstance(m.get_base_layer(), Linear4bitStandIn):
            m.cast_input_dtype_enabled = False
    model.train()
    return model


def test_dtypes_axolotl_leaves():
    from lora_cost.analytic.methods.qlora import observed_options

    model = _axolotl_model("llama", False)
    assert observed_options(model)["kbit_prepare"] is False  # what estimate_from and the profiler read
    kinds = {}
    for name, p in model.named_parameters():
        kind = "lora" if "lora_" in name else "packed" if name.endswith(".weight") and p.ndim == 2 and p.shape[1] == 1 \
            else "other"
        kinds.setdefault(kind, set()).add(p.dtype)
    assert kinds == {"lora": {torch.float32}, "packed": {torch.bfloat16}, "other": {torch.bfloat16}}
    buffers = {b.dtype for m in model.modules() if isinstance(m, Linear4bitStandIn) for b in m.buffers(recurse=False)}
    assert buffers == {torch.uint8, torch.float32}  # the quantisation state is not cast


@pytest.mark.parametrize("family,ckpt", [("llama", False), ("llama", True), ("qwen3", False)])
def test_saved_bytes_equal_torch(tmp_path, family, ckpt):
    model = _axolotl_model(family, ckpt)
    saved = saved_under_amp_bf16(model, CONFIGS[family]["vocab_size"], B, S)
    e = estimate(tiny_models.config_file(tmp_path, family), "qlora", r=4, targets=",".join(TARGETS[family]), batch=B,
                 seq=S, precision="amp-bf16", attention="eager", model_dropout=0.0, grad_checkpointing=ckpt,
                 method_options=AXOLOTL)
    assert e.memory.saved_activation_bytes == saved


AGREE = [
    ("llama", dict(attention="sdpa")),
    ("llama", dict(attention="flash-attention-2", targets="all-linear", grad_checkpointing=True)),
    ("qwen3", dict(attention="sdpa", grad_checkpointing=True, optimizer="paged-adamw-8bit")),
    ("qwen3", dict(attention="flash-attention-2", packing=True, adapter_dtype="bf16")),
]


@pytest.mark.parametrize("family,kwargs", AGREE, ids=[f"{f}-{'-'.join(map(str, k.values()))}" for f, k in AGREE])
def test_engines_agree(tmp_path, family, kwargs):
    kw = dict(r=4, batch=2, seq=64, precision="amp-bf16", method_options=AXOLOTL, **kwargs)
    terms = engines_terms(tmp_path / family, CONFIGS[family], "qlora", kw)
    assert_engines_agree(terms, peak_tolerance=0.06)
    a, t = terms["saved_activation_bytes"]
    assert abs(t - a) <= 0.01 * t, f"saved: analytic {a} vs trace {t}"


def test_peft_rules_the_trace_follows():
    from peft.tuners import tuners_utils

    # tuners/lora/bnb.py imports bitsandbytes (GPU only): its text, from the installed package
    text = (Path(importlib.util.find_spec("peft").submodule_search_locations[0]) / "tuners/lora/bnb.py").read_text()
    forward = text[text.index("    class Linear4bit("):]
    forward = forward[forward.index("        def forward("):]
    guard = forward.index("requires_conversion = not torch.is_autocast_enabled()")
    assert guard < forward.index("x = self._cast_input_dtype(x, lora_A.weight.dtype)")
    assert "if (not cast_input_dtype_enabled) or (x.dtype == dtype):" in inspect.getsource(
        peft.tuners.lora.LoraLayer._cast_input_dtype)
    # autocast_adapter_dtype=False leaves a Linear4bit's factors in its compute dtype (peft_autocast_adapter_dtype)
    assert "if hasattr(base_layer, \"compute_dtype\"):" in inspect.getsource(
        tuners_utils.BaseTunerLayer._get_base_layer_device_and_dtype)


def test_axolotl_source_when_installed():
    """The loader order the reader models (axolotl 0.19.0 loaders/model.py); skipped where axolotl is not installed."""
    spec = importlib.util.find_spec("axolotl")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("axolotl not installed")
    text = (Path(list(spec.submodule_search_locations)[0]) / "loaders" / "model.py").read_text()
    load = text[text.index("    def load(self)"):text.index("    def _apply_pre_model_load_setup")]
    assert load.index("self._apply_post_model_load_setup()") < load.index("self._load_adapters()")
    dtypes = text[text.index("    def _configure_embedding_dtypes"):text.index("    def _configure_qat")]
    assert dtypes.index("self._prepare_model_for_quantization()") < dtypes.index("dist_dtype=self.cfg.torch_dtype")
    assert 'if self.cfg.adapter in ["lora", "qlora"]:\n            needs_fa2_dtype = True' in dtypes
    assert '"bnb_4bit_quant_storage": torch.bfloat16' in text


def _sample(size: int = 24) -> list:
    """The seeded sample behind the docstring's figures (tests/test_grid_issue9.py's options, the axolotl mix)."""
    import itertools
    import random

    import test_grid_issue9 as grid
    from lora_cost.errors import LoraCostError

    product = list(itertools.product(("llama", "qwen2"), grid.ATTENTION, grid.OPTIMIZERS, grid.LOSSES, (False, True)))
    random.Random(13).shuffle(product)
    out = []
    for family, attention, optimizer, loss, ckpt in product:
        kw = grid.kwargs_for("qlora", attention, optimizer, loss, ("amp-bf16", ckpt, None))
        kw["method_options"] = dict(AXOLOTL)
        try:
            estimate(grid._config(family), "qlora", **kw)
        except LoraCostError:
            continue
        out.append((grid._config(family), kw))
        if len(out) == size:
            break
    return out


if __name__ == "__main__":
    import statistics

    from lora_cost.trace import trace
    from lora_cost.trace.compare import differences

    peaks = []
    for path, kw in _sample():
        terms = {d.term: (d.analytic, d.trace) for d in differences(estimate(path, "qlora", **kw),
                                                                     trace(path, "qlora", **kw))}
        a, t = terms["peak_bytes"]
        peaks.append(abs(a - t) / t)
        print(f"{(a - t) / t:+.2%}", kw["loss"], kw["grad_checkpointing"], kw["attention"], kw["optimizer"], path)
    print(f"peak median {statistics.median(peaks):.2%}, worst {max(peaks):.2%}")
