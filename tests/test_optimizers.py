"""Optimizers (issue 9): names, state bytes, master weights and stepping in backward, against hand arithmetic
and a published number. Torch-free (`-m fast`); the real optimizers are measured in test_optimizers_vs_torch.py."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lora_cost import estimate
from lora_cost.analytic.methods.base import TensorGroup
from lora_cost.analytic.optimizers import DEVICE_SCALAR_BYTES, canonical_optimizers, get_optimizer
from lora_cost.cli import main
from lora_cost.errors import LoraCostError
from lora_cost.spec import ModelSpec

pytestmark = pytest.mark.fast

TRAINER_NAMES = ("adamw_torch", "adamw_torch_fused", "adafactor", "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit",
                 "paged_adamw_32bit", "lion_8bit", "lion_32bit", "paged_lion_8bit", "paged_lion_32bit", "sgd")


@pytest.mark.parametrize("name", TRAINER_NAMES)
def test_trainer_spellings_resolve(name):
    """transformers training_args.py OptimizerNames values, underscores and all."""
    expected = "adamw-bnb-8bit" if name == "adamw_8bit" else name.replace("_", "-")
    assert get_optimizer(name).name == expected


def test_adamw_is_adamw_torch():
    assert get_optimizer("adamw") is get_optimizer("adamw-torch")
    assert estimate("gpt2", optimizer="adamw") == estimate("gpt2", optimizer="adamw-torch")


def test_state_bytes_by_hand():
    g = TensorGroup("w", 8192, 3, "bf16", shape=(64, 128))  # 3 tensors of 64 x 128 in bf16
    assert get_optimizer("adamw-torch").state_bytes(g) == 2 * 3 * 8192 * 2
    # fused: + one 4-byte device `step` per tensor, a 512-byte allocator block
    assert get_optimizer("adamw-torch-fused").state_bytes(g) == 2 * 3 * 8192 * 2 + 3 * 512
    # Lion: one state; 8-bit: 1 B + 4 B per block of 256 (8192 / 256 = 32 blocks)
    assert get_optimizer("lion-8bit").state_bytes(g) == 3 * (8192 + 4 * 32)
    assert get_optimizer("lion-32bit").state_bytes(g) == 3 * 8192 * 4
    assert get_optimizer("paged-lion-32bit").paged and not get_optimizer("lion-32bit").paged
    # Adafactor: fp32 rows (64) and columns (128), each rounded up to a 512-byte block, + the RMS scalar
    assert get_optimizer("adafactor").state_bytes(g) == 3 * (512 + 512 + 512)
    big = TensorGroup("w", 4096 * 1024, 1, "bf16", shape=(4096, 1024))
    assert get_optimizer("adafactor").state_bytes(big) == 4096 * 4 + 1024 * 4 + DEVICE_SCALAR_BYTES
    vec = TensorGroup("b", 1000, 1, "bf16", shape=(1000,))
    assert get_optimizer("adafactor").state_bytes(vec) == 4096 + 512  # 4000 B rounded to 4096


def test_step_temporaries_by_hand():
    a = TensorGroup("a", 1000, 4, "bf16", shape=(10, 100))
    b = TensorGroup("b", 50_000, 1, "bf16", shape=(100, 500))
    # foreach AdamW: sqrt of every bf16 exp_avg_sq at once
    assert get_optimizer("adamw-torch").step_temporaries([a, b]) == (4 * 1000 + 50_000) * 2
    assert get_optimizer("adamw-torch-fused").step_temporaries([a, b]) == 0
    # Adafactor on b (16-bit): fp32 grad and param copies (2 x 4n), two fp32 n-buffers, + a's last update (4 x 1000)
    assert get_optimizer("adafactor").step_temporaries([a, b]) == 4 * 50_000 * 4 + 1000 * 4


def test_torchao_low_bit_by_hand():
    """torchao AdamW8bit / AdamW4bit: per state, codes + one fp32 scale per block + the qmap, each storage at least
    512 B (the caching allocator's smallest block)."""
    g = TensorGroup("w", 64 * 1024, 1, "bf16", shape=(64, 1024))
    # 8-bit: 65536 B codes, 256 scales (1024 B), 256-entry qmap (1024 B)
    assert get_optimizer("adamw-torch-8bit").state_bytes(g) == 2 * (65536 + 1024 + 1024)
    # 4-bit: 32768 B codes, 512 scales (2048 B), 16-entry qmap (64 B -> 512 B)
    assert get_optimizer("adamw-torch-4bit").state_bytes(g) == 2 * (32768 + 2048 + 512)
    # below 4096 elements, or not a multiple of the block: zeros_like(p) in the parameter dtype
    small = TensorGroup("a", 8 * 256, 1, "fp32", shape=(8, 256))
    assert get_optimizer("adamw-torch-8bit").state_bytes(small) == 2 * 8 * 256 * 4
    odd = TensorGroup("b", 4097 * 2, 1, "bf16", shape=(4097, 2))
    assert get_optimizer("adamw-torch-4bit").state_bytes(odd) == 2 * 16896  # 16388 B rounded to 33 blocks of 512


def test_galore_by_hand():
    """A [4096, 1024] nn.Linear weight in bf16: projected gradient 128 x 4096 (m >= n: Vh[:128] is the projector,
    128 x 1024); exp_avg and exp_avg_sq 128 x 4096 in bf16."""
    g = TensorGroup("w", 4096 * 1024, 2, "bf16", shape=(4096, 1024), linear_weight=True)
    opt = get_optimizer("galore-adamw")
    assert opt.state_bytes(g) == 2 * (2 * 128 * 4096 * 2 + 128 * 1024 * 2)
    # fp32: the projector is a view of the reduced SVD's Vh (1024 x 1024), which stays alive whole
    assert opt.state_bytes(TensorGroup("w", 4096 * 1024, 1, "fp32", shape=(4096, 1024), linear_weight=True)) == \
        2 * 128 * 4096 * 4 + 1024 * 1024 * 4
    # steady step: projected gradient, denom, norm_grad (128 x 4096 each), project_back and its * scale (2 x m x n)
    assert opt.step_temporaries([g]) == (3 * 128 * 4096 + 2 * 4096 * 1024) * 2
    # not a linear weight (an embedding, a norm): AdamW states like the parameter
    assert opt.state_bytes(TensorGroup("e", 1000, 1, "bf16", shape=(1000,))) == 2 * 1000 * 2
    # on a model: llama-3.2-1b's block linears are projected; its LM head is tied (the embedding): not projected
    full = estimate("llama-3.2-1b", "full", optimizer="galore-adamw", seq=64)
    plain = estimate("llama-3.2-1b", "full", seq=64)
    galore_state, adamw_state = (next(t.value for t in e.memory.terms if t.name == "optimizer state") for e in (full, plain))
    assert galore_state < 0.3 * adamw_state
    with pytest.raises(LoraCostError, match="galore-adamw"):
        estimate("gpt2", "lora", optimizer="galore-adamw")


def test_adafactor_refuses_unknown_shapes():
    with pytest.raises(LoraCostError, match="adafactor"):
        get_optimizer("adafactor").state_bytes(TensorGroup("x", 100, 1, "fp32"))


def test_master_weights_sixteen_bytes_per_parameter():
    """bf16 weights (2) + fp32 master (4) + fp32 AdamW states (8) between steps; + bf16 gradients (2) = 16 B."""
    plain = estimate("llama-3.2-1b", "full", batch=1, seq=64)
    master = estimate("llama-3.2-1b", "full", batch=1, seq=64, master_weights="fp32")
    n = master.trainable_params
    assert master.memory.steady_bytes == 14 * n  # llama-3.2-1b trains only bf16 tensors
    assert plain.memory.steady_bytes == 6 * n  # Trainer's bf16 full fine-tuning: bf16 AdamW states
    opt = next(p for p in master.memory.phases if p.phase == "optimizer")
    terms = {t.name: t.value for t in opt.terms}
    # at the step: bf16 gradients, their fp32 copies, and foreach sqrt over the fp32 exp_avg_sq
    assert terms["gradients"] == 2 * n and terms["optimizer_temporaries"] == 4 * n + 4 * n


def test_master_weights_refused_when_nothing_is_16_bit():
    with pytest.raises(LoraCostError, match="already fp32"):
        estimate("gpt2", "lora", master_weights="fp32")  # peft's adapters are fp32
    with pytest.raises(LoraCostError, match="already fp32"):
        estimate("gpt2", "full", precision="fp32", master_weights="fp32")


def llama_65b() -> ModelSpec:
    """LLaMA-65B as Touvron et al. 2023 (arXiv:2302.13971) Table 2 give it: d 8192, 80 layers, 64 heads;
    SwiGLU width 22016 and vocabulary 32000 from the released config."""
    return ModelSpec(name="llama-65b", family="llama", model_type="llama", hidden=8192, layers=80, heads=64, kv_heads=64,
                     head_dim=128, intermediate=22016, vocab=32000, max_positions=2048, tie_embeddings=False)


def test_qlora_paper_780_gb_for_65b_16_bit_full_finetuning():
    """Dettmers et al. 2023 (arXiv:2305.14314), Sec. 1: "regular 16-bit finetuning of a LLaMA 65B parameter
    model requires more than 780 GB of GPU memory": 16-bit weights (2 B) and gradients (2 B) with 32-bit Adam
    (two fp32 states, 8 B). Independently: 65,285,660,672 parameters x 12 B = 783.4 GB."""
    # embeddings + head 2 x 32000 x 8192, per layer 4 x 8192^2 + 3 x 8192 x 22016 + 2 x 8192 norms, final norm
    params = 2 * 32000 * 8192 + 80 * (4 * 8192 ** 2 + 3 * 8192 * 22016 + 2 * 8192) + 8192
    assert params == 65_285_660_672
    e = estimate(llama_65b(), "full", optimizer="paged-adamw-32bit", precision="bf16", batch=1, seq=512)
    assert e.trainable_params == params
    model_states = 2 * params + 2 * params + 8 * params
    assert model_states / 1e9 > 780
    weights = next(t.value for t in e.memory.terms if t.name == "trainable weights")
    state = next(t.value for t in e.memory.terms if t.name == "optimizer state")
    assert weights + weights + state == model_states  # weights, gradients (same bytes), fp32 Adam states
    # with an fp32 master copy as well (Megatron / DeepSpeed mixed precision): 16 B per parameter
    m = estimate(llama_65b(), "full", precision="bf16", batch=1, seq=512, master_weights="fp32")
    assert m.memory.steady_bytes + 2 * params == 16 * params


def test_in_backward_moves_the_peak_and_frees_gradients():
    kw = dict(batch=1, seq=256)
    plain = estimate("llama-3.2-1b", "full", **kw)
    inbwd = estimate("llama-3.2-1b", "full", optimizer_in_backward=True, **kw)
    assert plain.memory.peak_phase == "optimizer" and inbwd.memory.peak_phase == "backward"
    opt = next(p for p in inbwd.memory.phases if p.phase == "optimizer")
    assert "gradients" not in {t.name for t in opt.terms}
    # the peak drops by (about) the gradients: all 2 B/param at once become one tensor's at a time
    assert plain.memory.peak_bytes - inbwd.memory.peak_bytes > 1.5 * inbwd.trainable_params


def test_in_backward_refused_with_adalora():
    with pytest.raises(LoraCostError, match="optimizer-in-backward"):
        estimate("gpt2", "adalora", optimizer_in_backward=True)


def test_cli_flags_and_listing():
    r = CliRunner().invoke(main, ["estimate", "--model", "gpt2", "--method", "full", "--optimizer", "adamw_torch_fused",
                                  "--master-weights", "fp32", "--optimizer-in-backward", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["inputs"]["optimizer"] == "adamw-torch-fused"
    assert any("master weights" in a for a in doc["assumptions"]) and any("in backward" in a for a in doc["assumptions"])
    r = CliRunner().invoke(main, ["estimate", "--model", "gpt2", "--master-weights", "fp32"])
    assert r.exit_code == 2 and "already fp32" in r.output
    r = CliRunner().invoke(main, ["estimate", "--model", "gpt2", "--optimizer", "adagrad"])
    assert r.exit_code == 2
    r = CliRunner().invoke(main, ["optimizers", "--json"])
    listed = json.loads(r.output)
    assert [o["name"] for o in listed] == list(canonical_optimizers())
    assert {"adamw", "adamw-8bit"} <= {a for o in listed for a in o["aliases"]}
