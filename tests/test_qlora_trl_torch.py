"""Task "trlmodel": QLoRA as TRL 1.16's SFTTrainer leaves it (lora_cost/readers/trl_model.py) in both engines.

SFTTrainer never calls peft's prepare_model_for_kbit_training and casts every trainable parameter of a quantised model
to bf16 (sft_trainer.py, `_is_quantized_model`); Trainer's bf16=True runs the step under autocast. So a recipe with
dtype bfloat16 is `--precision amp-bf16 --no-kbit-prepare --adapter-dtype bf16` (embeddings, norms and head bf16 as
loaded), and one with ModelConfig's default dtype float32 is `--precision amp-bf16 --kbit-prepare --adapter-dtype bf16`
(those parameters fp32 as loaded; the fp32 compute dtype of its 4-bit layers is not modelled: a warning says so).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402
from grid_support import assert_engines_agree, engines_terms  # noqa: E402
from peft_step import saved_under_amp_bf16  # noqa: E402
from tiny_configs import B, CONFIGS, S  # noqa: E402

TRL_BF16 = {"kbit_prepare": False, "double_quant": False}
TRL_FP32 = {"kbit_prepare": True, "double_quant": False}
AGREE = [
    ("llama", TRL_BF16, dict(attention="sdpa", grad_checkpointing=True)),
    ("qwen2", TRL_BF16, dict(attention="flash-attention-2", packing=True, grad_checkpointing=True, dropout=0.05)),
    ("llama", TRL_FP32, dict(attention="flash-attention-2", grad_checkpointing=True)),
    ("qwen2", TRL_FP32, dict(attention="sdpa")),
]


@pytest.mark.parametrize("family,options,kwargs", AGREE,
                         ids=[f"{f}-{'bf16' if o is TRL_BF16 else 'fp32'}-{k['attention']}" for f, o, k in AGREE])
def test_engines_agree(tmp_path, family, options, kwargs):
    kw = dict(r=4, batch=2, seq=64, precision="amp-bf16", adapter_dtype="bf16", method_options=options, **kwargs)
    terms = engines_terms(tmp_path / family, CONFIGS[family], "qlora", kw)
    assert_engines_agree(terms, peak_tolerance=0.06)
    a, t = terms["saved_activation_bytes"]
    assert abs(t - a) <= 0.01 * t, f"saved: analytic {a} vs trace {t}"


def _trl_model(family: str, ckpt: bool):
    """What SFTTrainer leaves of a model loaded with dtype=bfloat16 and TRL's BitsAndBytesConfig (compute dtype bf16,
    no double quantisation, uint8 storage): get_peft_model, then every trainable parameter cast to bf16."""
    import contextlib

    import peft
    import torch

    from lora_cost.trace.autocast import CudaAutocast
    from lora_cost.trace.qlora import Linear4bitStandIn, cast_unquantised, quantize_linears

    model = tiny_models.build(family, "fp32")
    quantize_linears(model, torch.bfloat16, False, "uint8")
    model.is_loaded_in_4bit = True
    cast_unquantised(model, torch.bfloat16)
    if ckpt:  # SFTTrainer: model.enable_input_require_grads() with gradient checkpointing
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
            "use_reentrant": False,
            "context_fn": lambda: (contextlib.nullcontext(), CudaAutocast(torch.bfloat16))})
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                        target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():  # sft_trainer.py: `if _is_quantized_model:`
        if param.requires_grad and "lora_magnitude_vector" not in name:
            param.data = param.data.to(torch.bfloat16)
    for m in model.modules():  # lora/bnb.py Linear4bit.forward: no input cast under autocast
        if isinstance(m, peft.tuners.lora.LoraLayer) and isinstance(m.get_base_layer(), Linear4bitStandIn):
            m.cast_input_dtype_enabled = False
    model.train()
    return model


@pytest.mark.parametrize("ckpt", [False, True])
def test_saved_bytes_equal_torch(tmp_path, ckpt):
    from lora_cost import estimate

    saved = saved_under_amp_bf16(_trl_model("llama", ckpt), CONFIGS["llama"]["vocab_size"], B, S)
    e = estimate(tiny_models.config_file(tmp_path, "llama"), "qlora", r=4, targets="q_proj,v_proj", batch=B, seq=S,
                 precision="amp-bf16", attention="eager", model_dropout=0.0, grad_checkpointing=ckpt,
                 adapter_dtype="bf16", method_options=TRL_BF16)
    assert e.memory.saved_activation_bytes == saved


def test_trl_source_when_installed():
    """The rules the reader models (trl 1.16.0); skipped where trl is not installed."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("trl not installed")
    root = Path(list(spec.submodule_search_locations)[0])
    sft = (root / "trainer" / "sft_trainer.py").read_text()
    assert "prepare_model_for_kbit_training" not in sft
    cast = sft[sft.index("        if _is_quantized_model:\n            for name, param in model.named_parameters():"):]
    assert "param.data = param.data.to(torch.bfloat16)" in cast[:400]
    utils = (root / "trainer" / "utils.py").read_text()
    assert "bnb_4bit_compute_dtype=model_args.dtype" in utils
    assert "bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant" in utils
    config = (root / "trainer" / "model_config.py").read_text()
    assert 'dtype: str | None = field(\n        default="float32"' in config
    assert "torch_dtype" not in config  # an older recipe's torch_dtype is an unknown key, which `trl sft` drops:
    assert "parse_args_and_config(fail_with_unknown_args=False)" in (root / "scripts" / "sft.py").read_text()
    base = (root / "trainer" / "base_config.py").read_text()
    assert "self.bf16 = not (self.fp16) if self.bf16 is None else self.bf16" in base
