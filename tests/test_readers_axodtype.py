"""Task "axodtype" (issue 9): the dtypes axolotl and Trainer really give a QLoRA run (lora_cost/readers/qlora_dtypes.py
cites axolotl 0.19.0 loaders/model.py, loaders/adapter.py, core/builders/base.py and TRL 1.16's sft_trainer.py).

axolotl QLoRA + bf16: peft's prepare_model_for_kbit_training, then axolotl's loop returns norms, embed_tokens and lm_head
to bf16 before get_peft_model (fp32 LoRA factors), the 4-bit weights stored in bf16, Trainer bf16=True autocast:
--precision amp-bf16 --no-kbit-prepare --quant-storage bf16. Trainer + peft QLoRA + bf16: amp-bf16 over prepare's fp32.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lora_cost import estimate
from lora_cost.cli import main
from lora_cost.readers import read_files, settings_for

pytestmark = pytest.mark.fast

QLORA = "base_model: llama-3.2-1b\nadapter: qlora\nload_in_4bit: true\nlora_r: 8\nsequence_len: 256\n"


def _found(tmp_path, text, model="llama-3.2-1b"):
    path = tmp_path / "a.yml"
    path.write_text(text)
    reading = read_files(axolotl=str(path))
    return reading, settings_for(model, reading)


@pytest.mark.parametrize("attention", ["", "flash_attention: true\n", "sdp_attention: true\n"])
def test_axolotl_qlora_bf16_is_autocast_over_bf16_non_quantised(tmp_path, attention):
    """needs_fa2_dtype is true for every lora/qlora adapter: the loop runs whatever the attention."""
    reading, found = _found(tmp_path, QLORA + "bf16: true\n" + attention)
    assert found.kwargs["precision"] == "amp-bf16"
    assert found.method_options["kbit_prepare"] is False and found.method_options["quant_storage"] == "bf16"
    assert "adapter_dtype" not in found.kwargs  # get_peft_model's default: fp32 factors
    assert any("--no-kbit-prepare --quant-storage bf16" in n for n in reading.notes)
    assert not any("Autocast over 16-bit weights" in n for n in reading.notes)  # precision_from's note not given


def test_axolotl_qlora_variants(tmp_path):
    _, full = _found(tmp_path, QLORA + "bf16: full\n")  # TrainingArguments bf16_full_eval only: no autocast
    assert full.kwargs["precision"] == "bf16" and full.method_options["kbit_prepare"] is False
    _, half = _found(tmp_path, QLORA + "fp16: true\n")
    assert half.kwargs["precision"] == "fp16" and any("amp-fp16" in w for w in half.warnings)
    _, kept = _found(tmp_path, QLORA + "bf16: true\nbnb_config_kwargs:\n  bnb_4bit_quant_storage: uint8\n")
    assert kept.method_options["quant_storage"] == "uint8"  # bnb_config_kwargs update axolotl's defaults
    _, bf16_factors = _found(tmp_path, QLORA + "bf16: true\npeft_autocast_adapter_dtype: false\n")
    assert bf16_factors.kwargs["adapter_dtype"] == "bf16"  # a Linear4bit's compute_dtype (peft tuners_utils)
    _, fsdp = _found(tmp_path, QLORA + "bf16: true\nfsdp:\n  - full_shard\n")  # task fsdpqlora's path, unchanged
    assert fsdp.kwargs["precision"] == "bf16" and fsdp.origins["kbit_prepare"].endswith("key 'adapter'")


def test_axolotl_lora_and_full(tmp_path):
    _, lora = _found(tmp_path, "base_model: llama-3.2-1b\nadapter: lora\nbf16: true\n")
    assert lora.kwargs["precision"] == "bf16" and lora.method_options == {}  # the loop runs before get_peft_model
    _, full = _found(tmp_path, "base_model: llama-3.2-1b\nbf16: true\nsdp_attention: true\n")
    assert any("leaves norms, embed_tokens and lm_head in fp32" in w for w in full.warnings)
    _, flash = _found(tmp_path, "base_model: llama-3.2-1b\nbf16: true\nflash_attention: true\n")
    assert not any("embed_tokens and lm_head in fp32" in w for w in flash.warnings)


def test_other_families_keep_prepares_fp32_with_a_warning(tmp_path):
    """GPT-2's ln_1/ln_2/ln_f and wpe are no names axolotl's loop matches: not the bf16 mix; prepare's fp32 instead."""
    _, found = _found(tmp_path, QLORA.replace("llama-3.2-1b", "gpt2") + "bf16: true\n", model="gpt2")
    assert "kbit_prepare" not in found.method_options and found.kwargs["precision"] == "amp-bf16"
    assert any("on gpt2 that leaves a mix" in w for w in found.warnings)


def test_axolotl_estimate_against_flags(tmp_path):
    """The file gives the numbers the equivalent flags give, and less memory than prepare's fp32 mix: 2 bytes less
    per embedding and head element (Llama-3.2-1B ties them: one 128256 x 2048 matrix) at least."""
    path = tmp_path / "a.yml"
    path.write_text(QLORA + "bf16: true\nflash_attention: true\n")
    run = CliRunner().invoke(main, ["estimate", "--axolotl", str(path), "--json"])
    assert run.exit_code == 0, run.output
    doc = json.loads(run.output[run.output.index("{"):])
    flags = estimate("llama-3.2-1b", "qlora", r=8, seq=256, precision="amp-bf16", attention="flash-attention-2",
                     optimizer=doc["inputs"]["optimizer"],
                     method_options={"kbit_prepare": False, "quant_storage": "bf16"})
    assert doc["memory"]["peak_bytes"] == flags.memory.peak_bytes
    prepared = estimate("llama-3.2-1b", "qlora", r=8, seq=256, precision="amp-bf16", attention="flash-attention-2",
                        optimizer=doc["inputs"]["optimizer"], method_options={"quant_storage": "bf16"})
    assert prepared.memory.peak_bytes - flags.memory.peak_bytes >= 2 * 128256 * 2048


def test_recast_flag_over_axolotl_file(tmp_path):
    """The note's recipe works over the file: --kbit-prepare typed wins over the file's --no-kbit-prepare."""
    path = tmp_path / "a.yml"
    path.write_text(QLORA + "bf16: true\n")
    run = CliRunner().invoke(main, ["estimate", "--axolotl", str(path), "--qlora-recast", "--kbit-prepare", "--json"])
    assert run.exit_code == 0, run.output
    assert json.loads(run.output[run.output.index("{"):])["inputs"]["method_options"]["qlora_recast"] is True


def test_training_args_bf16_over_qlora(tmp_path):
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"bf16": True, "per_device_train_batch_size": 1}))
    base = ["estimate", "--model", "llama-3.2-1b", "--training-args", str(args), "--json"]
    q = CliRunner().invoke(main, base + ["--method", "qlora"])
    assert q.exit_code == 0, q.output
    assert json.loads(q.output[q.output.index("{"):])["inputs"]["precision"] == "amp-bf16"
    assert "--no-kbit-prepare --adapter-dtype bf16" in q.output  # TRL's SFTTrainer named
    assert "Autocast over 16-bit weights" not in q.output  # the 16-bit-weights note replaced
    lora = CliRunner().invoke(main, base + ["--method", "lora"])
    assert json.loads(lora.output[lora.output.index("{"):])["inputs"]["precision"] == "bf16"
    typed = CliRunner().invoke(main, base + ["--method", "qlora", "--precision", "bf16"])
    assert json.loads(typed.output[typed.output.index("{"):])["inputs"]["precision"] == "bf16"  # a flag wins


def test_files_option_for_a_replaced_method_is_dropped(tmp_path):
    """axolotl says qlora, a later peft config says LoRA: the QLoRA options are not applied (a warning), not an error."""
    ax = tmp_path / "a.yml"
    ax.write_text(QLORA + "bf16: true\n")
    peft = tmp_path / "adapter_config.json"
    peft.write_text(json.dumps({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"]}))
    run = CliRunner().invoke(main, ["estimate", "--axolotl", str(ax), "--peft-config", str(peft), "--json"])
    assert run.exit_code == 0, run.output
    assert "sets kbit_prepare, which method lora does not take" in run.output
