"""peft target_parameters in an adapter_config.json (lora_cost/readers/peft_config.py): the expert parameters join
the targets, and the estimate equals the one from the same names given as --targets."""

import json

import pytest

from lora_cost import estimate
from lora_cost.readers import read_files, settings_for

pytestmark = pytest.mark.fast


def _found(tmp_path, data):
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(data))
    return settings_for("qwen3-30b-a3b", read_files(peft_config=str(path)))


def test_target_parameters_join_target_modules(tmp_path):
    found = _found(tmp_path, {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"],
                              "target_parameters": ["experts.gate_up_proj", "experts.down_proj", "gate.weight"]})
    assert found.kwargs["targets"] == ("q_proj", "v_proj", "experts.gate_up_proj", "experts.down_proj", "gate")
    assert found.warnings == ()


def test_target_parameters_alone_and_next_to_all_linear(tmp_path):
    assert _found(tmp_path, {"peft_type": "LORA", "r": 8, "target_parameters": ["experts.down_proj"]}
                  ).kwargs["targets"] == ("experts.down_proj",)
    found = _found(tmp_path, {"peft_type": "LORA", "r": 8, "target_modules": "all-linear",
                              "target_parameters": ["experts.gate_up_proj"]})
    assert found.kwargs["targets"] == ("all-linear",) and any("target_parameters" in w for w in found.warnings)


def test_qwen3_30b_expert_parameters_hand_count():
    """Qwen3-30B-A3B, r = 8: d = 2048, 48 layers, 128 experts of I = 768, q 32 x 128 = 4096, kv 4 x 128 = 512.
    Per layer q 8 (2048 + 4096) = 49,152; v 8 (2048 + 512) = 20,480; gate_up_proj (rank r: target_parameters) 128 x 8
    x (2048 + 1536) = 3,670,016; down_proj 128 x 8 x (768 + 2048) = 2,883,584: 48 x 6,623,232 = 317,915,136.
    Through the v4 names (gate_proj, up_proj: peft fuses them at rank 2r) gate_up_proj counts twice that."""
    direct = estimate("qwen3-30b-a3b", "lora", r=8, targets="q_proj,v_proj,experts.gate_up_proj,experts.down_proj",
                      seq=16)
    assert direct.trainable_params == 48 * (49_152 + 20_480 + 3_670_016 + 2_883_584) == 317_915_136
    v4 = estimate("qwen3-30b-a3b", "lora", r=8, targets="q_proj,v_proj,gate_proj,up_proj,down_proj", seq=16)
    assert v4.trainable_params - direct.trainable_params == 48 * 3_670_016
