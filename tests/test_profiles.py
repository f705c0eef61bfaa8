"""Every bundled description loads and validates; aliases resolve."""

import json

import pytest

from lora_cost.profiles import bundled_gpus, bundled_models, load_gpu, load_model, profiles_dir

pytestmark = pytest.mark.fast


def test_all_model_profiles_load():
    files = sorted((profiles_dir() / "models").rglob("*.json"))
    assert len(files) == 17 == len(bundled_models())
    for path in files:
        name = json.loads(path.read_text())["name"]
        spec = load_model(name)
        assert spec.layers > 0 and spec.hidden % spec.heads == 0 or spec.head_dim > 0


def test_all_gpu_profiles_load():
    files = sorted((profiles_dir() / "gpus").rglob("*.json"))
    assert len(files) == 11 == len(bundled_gpus())
    for path in files:
        gpu = load_gpu(json.loads(path.read_text())["name"])
        assert gpu.memory_bytes > 10**9 and gpu.bf16_tflops_dense > 0


def test_hub_ids_are_aliases():
    assert load_model("meta-llama/Llama-2-7b-hf") == load_model("llama-2-7b")
    assert load_model("openai-community/gpt2").hidden == 768
    assert load_model("mistralai/Mistral-7B-v0.1").sliding_window == 4096
