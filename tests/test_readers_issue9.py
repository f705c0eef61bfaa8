"""The files' keys that issue 9's options now model map to the real estimate() keywords and method options
(no "not modelled" warning), and the estimate runs end to end from them (torch-free)."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_cost.cli import main
from lora_cost.readers import model_of, read_files, settings_for

pytestmark = pytest.mark.fast

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "configs"

AXOLOTL_8BIT = """base_model: meta-llama/Llama-3.2-1B
adapter: lora
load_in_8bit: true
lora_r: 16
lora_target_linear: true
sequence_len: 1024
micro_batch_size: 2
gradient_checkpointing: true
optimizer: adamw_torch_fused
flash_attention: true
bf16: true
liger_fused_linear_cross_entropy: true
"""
AXOLOTL_QLORA = """base_model: meta-llama/Llama-3.2-1B
adapter: qlora
load_in_4bit: true
lora_r: 8
lora_target_linear: true
lora_modules_to_save: [embed_tokens]
bnb_config_kwargs:
  bnb_4bit_quant_storage: bfloat16
optimizer: paged_adamw_8bit
sequence_len: 512
micro_batch_size: 1
bf16: true
chunked_cross_entropy: true
chunked_cross_entropy_num_chunks: 8
"""
TRAINING_ARGS = ('{"per_device_train_batch_size": 2, "bf16": true, "optim": "adamw_torch_fused", "use_liger_kernel": true,'
                 ' "max_length": 1024, "gradient_checkpointing": true, "packing": true}')
PEFT = ('{"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"],'
        ' "modules_to_save": ["lm_head"], "task_type": "CAUSAL_LM"}')


def found(peft=None, args=None, axolotl=None):
    reading = read_files(peft, args, axolotl)
    return settings_for(model_of(reading, "llama-3.2-1b"), reading)


def test_axolotl_8bit_and_issue9_keys(tmp_path):
    p = tmp_path / "a.yml"
    p.write_text(AXOLOTL_8BIT)
    f = found(axolotl=str(p))
    assert f.warnings == ()
    assert f.kwargs["method"] == "lora-8bit" and f.kwargs["optimizer"] == "adamw-torch-fused"
    assert f.kwargs["loss"] == "liger" and f.kwargs["attention"] == "flash-attention-2"
    r = CliRunner().invoke(main, ["estimate", "--axolotl", str(p)])
    assert r.exit_code == 0 and "lora-8bit" in r.output and "lora-cost: warning" not in r.output


def test_axolotl_qlora_storage_modules_chunked(tmp_path):
    p = tmp_path / "q.yml"
    p.write_text(AXOLOTL_QLORA)
    f = found(axolotl=str(p))
    assert f.warnings == ()
    assert f.kwargs["method"] == "qlora" and f.method_options["quant_storage"] == "bf16"  # a qlora option
    assert f.kwargs["modules_to_save"] == ("embed_tokens",) and f.kwargs["loss"] == "chunked:8"
    assert f.kwargs["optimizer"] == "paged-adamw-8bit"


def test_training_args_and_peft_config(tmp_path):
    t, p = tmp_path / "t.json", tmp_path / "p.json"
    t.write_text(TRAINING_ARGS)
    p.write_text(PEFT)
    f = found(peft=str(p), args=str(t))
    assert f.warnings == ()
    assert f.kwargs["loss"] == "liger" and f.kwargs["optimizer"] == "adamw-torch-fused" and f.kwargs["packing"] is True
    assert f.kwargs["modules_to_save"] == ("lm_head",)


@pytest.mark.parametrize("path", sorted(glob.glob(str(EXAMPLES / "*"))), ids=lambda p: Path(p).name)
def test_examples_give_no_not_modelled_warning(path):
    kind = "--axolotl" if "axolotl" in path else "--peft-config" if "adapter" in path else "--training-args"
    r = CliRunner().invoke(main, ["estimate", kind, path, "--model", "llama-3.2-1b"] if kind != "--axolotl"
                           else ["estimate", kind, path])
    assert r.exit_code == 0, r.output
    assert "lora-cost: warning" not in r.output  # a key read but not modelled is a warning line
