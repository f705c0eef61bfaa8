"""Task "trlmodel" (issue 9): a TRL recipe (`trl sft --config recipe.yaml`: ScriptArguments, SFTConfig and ModelConfig
keys in one YAML) read whole by --training-args (lora_cost/readers/trl_model.py cites TRL 1.16's model_config.py,
utils.py get_peft_config / get_quantization_config, scripts/sft.py and sft_trainer.py)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lora_cost.cli import main
from lora_cost.errors import LoraCostError
from lora_cost.readers import model_of, read_files, settings_for

pytestmark = pytest.mark.fast

RECIPE = """model_name_or_path: Qwen/Qwen2.5-7B
dtype: bfloat16
attn_implementation: flash_attention_2
use_peft: true
lora_r: 32
lora_alpha: 16
lora_target_modules: all-linear
load_in_4bit: true
per_device_train_batch_size: 2
gradient_checkpointing: true
max_length: 2048
bf16: true
packing: true
dataset_name: trl-lib/Capybara
learning_rate: 2.0e-4
"""


def _read(tmp_path, text):
    path = tmp_path / "recipe.yml"
    path.write_text(text)
    reading = read_files(training_args=str(path))
    model = model_of(reading, None)
    return reading, model, settings_for(model, reading)


def test_qlora_recipe_is_trls_dtype_mix(tmp_path):
    """4-bit + bf16 weights: no prepare_model_for_kbit_training, adapters cast to bf16, Trainer's bf16 autocast."""
    reading, model, found = _read(tmp_path, RECIPE)
    assert model == "Qwen/Qwen2.5-7B" and reading.model.origin.endswith("key 'model_name_or_path'")
    assert found.kwargs["method"] == "qlora" and found.kwargs["precision"] == "amp-bf16"
    assert found.kwargs["adapter_dtype"] == "bf16" and found.kwargs["attention"] == "flash-attention-2"
    assert found.kwargs["r"] == 32 and found.kwargs["targets"] == ("all-linear",) and found.kwargs["dropout"] == 0.05
    assert found.kwargs["packing"] is True and found.kwargs["seq"] == 2048 and found.kwargs["batch"] == 2
    assert found.method_options == {"kbit_prepare": False, "quant_type": "nf4", "double_quant": False}
    assert not found.warnings, found.warnings  # every key read
    assert any("--no-kbit-prepare --adapter-dtype bf16" in n for n in reading.notes)


def test_trl_defaults_full_fine_tuning_in_fp32_under_autocast(tmp_path):
    """No use_peft: full fine-tuning; no dtype: ModelConfig's float32; no bf16: _BaseConfig's not fp16; checkpointing
    on by default (TRL's, not TrainingArguments')."""
    reading, _, found = _read(tmp_path, "model_name_or_path: meta-llama/Llama-3.1-8B\nlora_r: 8\n")
    assert found.kwargs["method"] == "full" and found.kwargs["precision"] == "amp-bf16"
    assert found.kwargs["grad_checkpointing"] is True and "r" not in found.kwargs
    assert any("loads the model in float32" in n for n in reading.notes)
    assert any("lora_r have no effect" in n for n in reading.notes)
    _, _, off = _read(tmp_path, "model_name_or_path: meta-llama/Llama-3.1-8B\ndtype: bfloat16\nbf16: false\n"
                      "gradient_checkpointing: false\n")
    assert off.kwargs["precision"] == "bf16" and off.kwargs["grad_checkpointing"] is False


def test_lora_fields_and_init_kwargs(tmp_path):
    _, _, found = _read(tmp_path, "model_name_or_path: meta-llama/Llama-3.1-8B\ndtype: float32\nuse_peft: true\n"
                        "use_dora: true\nlora_target_modules: [q_proj, v_proj]\nlora_dropout: 0.0\n"
                        "lora_modules_to_save: [lm_head]\nmodel_init_kwargs:\n  dtype: bfloat16\n"
                        "  attn_implementation: eager\nenv:\n  PYTORCH_CUDA_ALLOC_CONF: expandable_segments:True\n")
    assert found.kwargs["method"] == "dora" and found.kwargs["targets"] == ("q_proj", "v_proj")
    assert found.kwargs["precision"] == "bf16"  # model_init_kwargs' dtype updates ModelConfig's (sft.py)
    assert found.kwargs["attention"] == "eager" and found.kwargs["r"] == 16 and found.kwargs["dropout"] == 0.0
    assert found.kwargs["modules_to_save"] == ("lm_head",)
    assert found.kwargs["alloc_conf"] == "expandable_segments:True"
    assert not found.warnings, found.warnings


def test_fp32_qlora_and_8bit_say_what_is_not_modelled(tmp_path):
    _, _, fp32 = _read(tmp_path, "model_name_or_path: Qwen/Qwen2.5-7B\nuse_peft: true\nload_in_4bit: true\n"
                       "use_bnb_nested_quant: true\nbnb_4bit_quant_storage: bfloat16\n")
    assert fp32.kwargs["precision"] == "amp-bf16" and fp32.kwargs["adapter_dtype"] == "bf16"
    assert fp32.method_options["kbit_prepare"] is True  # fp32 non-quantised parameters, as loaded
    assert fp32.method_options["double_quant"] is True and fp32.method_options["quant_storage"] == "bf16"
    assert [w for w in fp32.warnings if "bnb_4bit_compute_dtype" in w]
    _, _, eight = _read(tmp_path, "model_name_or_path: Qwen/Qwen2.5-7B\ndtype: bfloat16\nuse_peft: true\n"
                        "load_in_8bit: true\n")
    assert eight.kwargs["method"] == "lora-8bit" and eight.kwargs["precision"] == "bf16"
    assert [w for w in eight.warnings if "TRL skips prepare_model_for_kbit_training" in w]


@pytest.mark.parametrize("text,where", [
    ("dtype: bf16x\n", "key 'dtype' must be one of"),
    ("dtype: auto\nuse_peft: true\nload_in_4bit: true\n", "key 'dtype' must name a dtype with load_in_4bit"),
    ("use_peft: true\nload_in_4bit: true\nload_in_8bit: true\n", "key 'load_in_4bit' and load_in_8bit"),
    ("load_in_4bit: true\n", "key 'use_peft' must be true with load_in_4bit"),
    ("use_peft: true\nlora_r: 0\n", "key 'lora_r' must be an integer"),
    ("use_peft: true\nload_in_4bit: true\nbnb_4bit_quant_type: int4\n", "key 'bnb_4bit_quant_type' must be one of"),
    ("model_init_kwargs: 5\n", "key 'model_init_kwargs' must be a mapping"),
])
def test_invalid_values_name_file_and_key(tmp_path, text, where):
    path = tmp_path / "recipe.yml"
    path.write_text("model_name_or_path: Qwen/Qwen2.5-7B\n" + text)
    with pytest.raises(LoraCostError, match=where):
        read_files(training_args=str(path))
    run = CliRunner().invoke(main, ["estimate", "--training-args", str(path)])
    assert run.exit_code == 2 and str(path) in run.output and "Traceback" not in run.output


def test_cli_reads_the_model_from_the_recipe(tmp_path):
    path = tmp_path / "recipe.yml"
    path.write_text(RECIPE)
    run = CliRunner().invoke(main, ["estimate", "--training-args", str(path), "--json"])
    assert run.exit_code == 0, run.output
    doc = json.loads(run.output[run.output.index("{"):])
    inputs = doc["inputs"]
    assert inputs["method"] == "qlora" and inputs["precision"] == "amp-bf16"
    assert inputs["method_options"]["kbit_prepare"] is False and inputs["attention"] == "flash-attention-2"
    assert "does not read" not in run.output
    from lora_cost import estimate
    flags = estimate("qwen2.5-7b", "qlora", r=32, targets="all-linear", batch=2, seq=2048, grad_checkpointing=True,
                     precision="amp-bf16", adapter_dtype="bf16", attention="flash-attention-2", packing=True,
                     dropout=0.05, optimizer=inputs["optimizer"],
                     method_options={"kbit_prepare": False, "double_quant": False})
    assert doc["memory"]["peak_bytes"] == flags.memory.peak_bytes
    fp32_factors = estimate("qwen2.5-7b", "qlora", r=32, targets="all-linear", batch=2, seq=2048,
                            grad_checkpointing=True, precision="amp-bf16", attention="flash-attention-2", packing=True,
                            dropout=0.05, optimizer=inputs["optimizer"],
                            method_options={"kbit_prepare": False, "double_quant": False})
    assert fp32_factors.memory.peak_bytes > flags.memory.peak_bytes  # the bf16 adapters reached the estimate


def test_old_torch_dtype_key_is_ignored_by_trl(tmp_path):
    """An older recipe's torch_dtype: no ModelConfig field in TRL 1.16 and `trl sft` drops unknown keys: float32."""
    reading, _, found = _read(tmp_path, "model_name_or_path: meta-llama/Llama-3.1-8B\ntorch_dtype: bfloat16\n"
                              "use_peft: true\n")
    assert found.kwargs["precision"] == "amp-bf16"
    assert [w for w in found.warnings if "key 'torch_dtype'" in w and "loads in float32" in w]


def test_no_autocast_recipe_is_not_turned_into_amp_by_the_trainer_rule(tmp_path):
    """bf16: false over bf16 weights: no autocast; files.py's Trainer-over-QLoRA rule (amp-bf16) does not apply when
    the recipe itself names the quantised method."""
    path = tmp_path / "recipe.yml"
    path.write_text("model_name_or_path: meta-llama/Llama-3.2-1B\ndtype: bfloat16\nbf16: false\nuse_peft: true\n"
                    "load_in_4bit: true\n")
    run = CliRunner().invoke(main, ["estimate", "--training-args", str(path), "--json"])
    assert run.exit_code == 0, run.output
    inputs = json.loads(run.output[run.output.index("{"):])["inputs"]
    assert inputs["precision"] == "bf16" and inputs["method_options"]["kbit_prepare"] is False
    assert "lora-cost: warning" not in run.output


def test_batch_and_length_left_out_take_the_trainers_defaults(tmp_path):
    """A file without per_device_train_batch_size runs Trainer's 8 (transformers TrainingArguments); a TRL recipe
    without max_length truncates to SFTConfig's 1024; each said in a note, and a typed flag still wins."""
    reading, _, found = _read(tmp_path, "model_name_or_path: meta-llama/Llama-3.1-8B\ndtype: bfloat16\n")
    assert found.kwargs["batch"] == 8 and found.kwargs["seq"] == 1024
    assert any("per_device_train_batch_size" in n and "default, 8" in n for n in reading.notes)
    assert any("'max_length'" in n and "1024" in n for n in reading.notes)
    plain = tmp_path / "args.json"
    plain.write_text(json.dumps({"learning_rate": 1e-4, "bf16": True}))  # TrainingArguments: no length to read
    found = settings_for("gpt2", read_files(training_args=str(plain)))
    assert found.kwargs["batch"] == 8 and "seq" not in found.kwargs
    run = CliRunner().invoke(main, ["estimate", "--model", "gpt2", "--training-args", str(plain), "--batch", "2",
                                    "--json"])
    assert run.exit_code == 0, run.output
    assert json.loads(run.output[run.output.index("{"):])["inputs"]["batch"] == 2
