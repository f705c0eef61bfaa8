"""The trace engine on tiny CPU models, checked against numbers derived independently of it.

Independent references: a direct `saved_tensors_hooks` count and a FlopCounterMode run on a real
(data-holding) tiny model built with transformers + peft on the CPU; parameter counts computed by
hand from the config; allocator rounding and optimizer-state sizes from their definitions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_cost.errors import LoraCostError  # noqa: E402

LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 256,
         "tie_word_embeddings": False}
GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 200, "n_positions": 256}


@pytest.fixture()
def llama(config_file) -> str:
    return config_file(LLAMA, "llama")


@pytest.fixture()
def gpt2(config_file) -> str:
    return config_file(GPT2, "gpt2")


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=300)


# ---- no torch unless asked -------------------------------------------------------------------
def test_analytic_path_never_imports_torch():
    res = _run("import sys, lora_cost, lora_cost.trace; lora_cost.estimate('gpt2', 'lora');"
               "print('torch' in sys.modules, 'transformers' in sys.modules)")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "False"]


def test_missing_torch_is_one_actionable_error():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from lora_cost.trace import trace\n"
            "from lora_cost.errors import LoraCostError\n"
            "try:\n    trace('gpt2', 'lora')\nexcept LoraCostError as e:\n    print('ERR', e)\n")
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ERR") and "pip install 'lora-cost[trace]'" in res.stdout


def test_cli_missing_torch_exits_2():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from lora_cost.cli import main\n"
            "main(['estimate', '--engine', 'trace', '--model', 'gpt2'])\n")
    res = _run(code)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "lora-cost[trace]" in res.stderr


# ---- allocator ----------------------------------------------------------------------------
def test_allocator_rounds_like_cuda():
    pytest.importorskip("torch")
    from lora_cost.trace.allocator import rounded

    assert [rounded(n) for n in (0, 1, 511, 512, 513, 1 << 20)] == [0, 512, 512, 512, 1024, 1 << 20]


# ---- against a real tiny model --------------------------------------------------------------
def _real_model(cfg: dict, method: str, r: int = 4, targets=("q_proj", "v_proj")):
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    c = dict(cfg)
    config = transformers.AutoConfig.for_model(c.pop("model_type"), **c)
    config.use_cache = False
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.train()
    if method == "full":
        return model
    lcfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), use_dora=method == "dora")
    model = peft.get_peft_model(model, lcfg)
    if method == "lora-fa":
        for n, p in model.named_parameters():
            if ".lora_A." in n:
                p.requires_grad_(False)
    return model


def _direct_count(model, vocab: int, batch: int, seq: int):
    """saved_tensors_hooks over a real forward: distinct storages, parameters and buffers excluded;
    FlopCounterMode over forward and backward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from peft_step import SavedBytes

    saved = SavedBytes(model, keep_alive=True)

    ids = torch.randint(0, vocab, (batch, seq))
    with FlopCounterMode(display=False) as fwd:
        with saved:
            out = model(input_ids=ids, labels=ids)
    with FlopCounterMode(display=False) as bwd:
        out.loss.backward()
    return saved.bytes, fwd.get_total_flops(), bwd.get_total_flops()


@pytest.mark.parametrize("method", ["full", "lora", "lora-fa", "dora"])
def test_saved_bytes_and_flops_match_a_real_step(llama, method):
    """fp32 + eager attention run the same kernels on CPU and CUDA, so a real CPU step is the reference."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from lora_cost.trace import trace

    kw = dict(batch=2, seq=32, precision="fp32", attention="eager")
    if method != "full":
        kw["r"] = 4
    t = trace(llama, method, **kw)
    saved, fwd, bwd = _direct_count(_real_model(LLAMA, method), LLAMA["vocab_size"], 2, 32)
    assert t.saved_activation_bytes == saved
    assert (t.flops_forward, t.flops_backward) == (fwd, bwd)


def test_parameter_counts_by_hand(llama):
    pytest.importorskip("torch")
    from lora_cost.trace import trace

    d, i, L, V, kv = 64, 160, 2, 256, 2 * 16
    block = d * d + d * kv + d * kv + d * d + 3 * d * i + 2 * d
    total = V * d + L * block + d + V * d  # embeddings, blocks, final norm, untied head
    full = trace(llama, "full", batch=1, seq=16, precision="fp32")
    assert full.total_params == full.trainable_params == total
    lora = trace(llama, "lora", r=4, batch=1, seq=16, precision="fp32")
    assert lora.trainable_params == L * (4 * (d + d) + 4 * (d + kv))  # q_proj and v_proj
    fa = trace(llama, "lora-fa", r=4, batch=1, seq=16, precision="fp32")
    assert fa.trainable_params == L * 4 * (d + kv)  # lora_B only
    dora = trace(llama, "dora", r=4, batch=1, seq=16, precision="fp32")
    assert dora.trainable_params == lora.trainable_params + L * (d + kv)  # + magnitude vectors
    nola = trace(llama, "nola", r=4, batch=1, seq=16, precision="fp32", method_options={"k": 32, "l": 16})
    assert nola.trainable_params == L * 2 * (32 + 16)
    vera = trace(llama, "vera", r=8, batch=1, seq=16, precision="fp32")
    assert vera.trainable_params == L * ((d + 8) + (kv + 8))  # lambda_b (d_out) + lambda_d (r) per module


def test_steady_memory_is_rounded_weights_and_state(llama):
    pytest.importorskip("torch")
    from lora_cost.trace import trace
    from lora_cost.trace.allocator import rounded

    t = trace(llama, "full", batch=1, seq=16, precision="bf16")
    model = _real_model(LLAMA, "full")
    weights = sum(rounded(2 * p.numel()) for p in model.parameters())
    buffers = sum(rounded(b.untyped_storage().nbytes()) for b in model.buffers())
    # AdamW: two bf16 moments per parameter; ids are one int64 [1, 16] tensor
    assert t.steady_bytes == weights + buffers + 2 * weights + rounded(16 * 8)
    top = next(p for p in t.phases if p.phase == t.peak_phase)
    assert sum(c.bytes for c in top.categories) == t.peak_bytes


# ---- CUDA behaviour on CPU ---------------------------------------------------------------
def test_attention_kernel_is_what_cuda_picks(llama, gpt2):
    pytest.importorskip("torch")
    from lora_cost.trace import trace

    assert trace(llama, "lora", batch=1, seq=64, precision="bf16").attention_kernel == "flash"
    assert trace(llama, "lora", batch=1, seq=64, precision="fp32").attention_kernel == "math"  # fp32 + GQA
    assert trace(gpt2, "lora", batch=1, seq=64, precision="fp32", model_dropout=0.0).attention_kernel == "efficient"


def test_flash_saves_what_the_cuda_kernel_saves(gpt2):
    """Flash saves q, k, v, out and a [b, h, s] fp32 log-sum-exp; efficient pads it to 32 along seq."""
    pytest.importorskip("torch")
    from lora_cost.trace import trace

    b, s, h = 2, 40, 4
    flash = trace(gpt2, "full", batch=b, seq=s, precision="bf16", model_dropout=0.0)
    eff = trace(gpt2, "full", batch=b, seq=s, precision="fp32", model_dropout=0.0)
    lse_flash = dict((c.name, c.bytes) for c in flash.saved_by_kind)["_scaled_dot_product_flash_attention"]
    lse_eff = dict((c.name, c.bytes) for c in eff.saved_by_kind)["_scaled_dot_product_efficient_attention"]
    layers, out_bytes = 2, b * s * 64
    # out + lse + the RNG state flash returns on the device ([2] uint64 seed, uint64 offset)
    assert lse_flash == layers * (out_bytes * 2 + b * h * s * 4 + 16 + 8)
    assert lse_eff == layers * (out_bytes * 4 + b * h * 64 * 4 + 8 + 8)  # lse padded 40 -> 64; int64 seed, offset


def test_qlora_stand_in_saves_no_activation_and_counts_its_gemm(llama):
    pytest.importorskip("torch")
    from lora_cost.trace import trace

    n, d, i, kv = 2 * 32, 64, 160, 32
    t = trace(llama, "qlora", r=4, batch=2, seq=32, precision="bf16")
    per_block = 2 * n * (d * d + 2 * d * kv + d * d + 3 * d * i)
    assert t.flops_forward_uncounted == 2 * per_block
    assert "gemm_4bit" in {o.op for o in t.flops_by_op}
    assert "dequantize_4bit" in t.zero_flop_ops


def test_bad_input_raises_lora_cost_error(llama):
    pytest.importorskip("torch")
    from lora_cost.trace import trace

    with pytest.raises(LoraCostError):
        trace("no-such-model", "lora")
    with pytest.raises(LoraCostError):
        trace(llama, "lora", r=1000)
    with pytest.raises(LoraCostError):
        trace(llama, "lora", optimizer="adagrad")
    with pytest.raises(LoraCostError):
        trace(llama, "full", r=8)
    with pytest.raises(LoraCostError):
        trace(llama, "lora", targets="nope")


def test_cli_json_carries_the_estimate_contract(llama):
    pytest.importorskip("torch")
    from click.testing import CliRunner

    from lora_cost.cli import main

    res = CliRunner().invoke(main, ["estimate", "--engine", "trace", "--model", llama, "--method", "dora", "--r", "4",
                                    "--seq", "32", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    for key in ("trainable_params", "inputs", "memory", "flops", "trace"):
        assert key in doc
    for key in ("peak_bytes", "components", "device_bytes", "phases", "saved_activation_bytes"):
        assert key in doc["memory"]
    assert doc["flops"]["forward"] > 0 and doc["flops"]["backward"] > 0
    assert doc["trace"]["saved_by_module"] and doc["trace"]["zero_flop_ops"]
    both = CliRunner().invoke(main, ["estimate", "--engine", "both", "--model", llama, "--seq", "32", "--json"])
    assert both.exit_code == 0, both.output
    doc = json.loads(both.output)
    assert {"analytic", "trace", "differences"} <= set(doc)
    terms = {d["term"]: d for d in doc["differences"]}
    assert terms["trainable_params"]["diff"] == 0


def test_bitsandbytes_optimizer_state(llama):
    """AdamW8bit: uint8 moments + fp32 absmax per 256 for tensors of >= 4096 elements, fp32 moments
    below; paged variants keep the state outside the allocator (reported apart)."""
    pytest.importorskip("torch")
    from lora_cost.trace import trace
    from lora_cost.trace.allocator import rounded

    r, d, kv, L = 16, 64, 32, 2
    shapes = [r * d, d * r, r * d, kv * r] * L  # lora_A/B of q_proj and v_proj per layer
    eight = trace(llama, "lora", r=r, batch=1, seq=16, optimizer="adamw-8bit")
    plain = trace(llama, "lora", r=r, batch=1, seq=16, optimizer="adamw")

    def state(n: int) -> int:
        if n >= 4096:
            return 2 * rounded(n) + 2 * rounded(4 * -(-n // 256))
        return 2 * rounded(4 * n)

    assert plain.steady_bytes - eight.steady_bytes == sum(2 * rounded(4 * n) for n in shapes) - sum(state(n) for n in shapes)
    paged = trace(llama, "lora", r=r, batch=1, seq=16, optimizer="paged-adamw-32bit")
    assert paged.paged_optimizer_bytes == sum(2 * 4 * n for n in shapes)
    assert plain.steady_bytes - paged.steady_bytes == sum(2 * rounded(4 * n) for n in shapes)


def test_calibration_mode_reproduces_the_measuring_hook_leak(gpt2):
    """peft's transpose() makes Parameter(W.T) (requires grad) for GPT-2's Conv1D, so DoRA's weight
    norm saves its [d_out, d_in] input; an identity pack hook makes the saved norm output hold its
    own grad_fn (a cycle), so that graph outlives the step. Checked on a real model, then counted
    by hand in the trace: per layer one [3d, d] fp32 input + one [3d] fp32 output, per step."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import weakref

    import transformers

    from lora_cost.trace import trace
    from lora_cost.trace.allocator import rounded

    c = dict(GPT2)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(c.pop("model_type"), **c))
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True))
    refs = []
    norm = torch.linalg.norm

    def spy(x, *args, **kwargs):
        refs.append(weakref.ref(x.untyped_storage()))
        return norm(x, *args, **kwargs)

    ids = torch.randint(0, 200, (1, 8))
    for hooked in (False, True):
        refs.clear()
        torch.linalg.norm = spy
        try:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t) if hooked else _null():
                model(input_ids=ids, labels=ids).loss.backward()
        finally:
            torch.linalg.norm = norm
        assert any(r() is not None for r in refs) == hooked

    d, L = 64, 2
    leak_per_step = L * (rounded(3 * d * d * 4) + rounded(3 * d * 4))
    plain = trace(gpt2, "dora", r=4, batch=1, seq=16, precision="fp32", model_dropout=0.0)
    measured_like = trace(gpt2, "dora", r=4, batch=1, seq=16, precision="fp32", model_dropout=0.0, calibration=True)
    cats = {p.phase: dict((c.name, c.bytes) for c in p.categories) for p in measured_like.phases}
    assert cats["optimizer"]["earlier_steps"] == 2 * leak_per_step  # two warm-up steps
    assert cats["optimizer"]["saved_activations"] == leak_per_step  # this step's
    assert "saved_activations" not in {c.name for c in next(p for p in plain.phases if p.phase == "optimizer").categories}


def _null():
    import contextlib
    return contextlib.nullcontext()


def test_cli_both_renders_the_two_engines_and_their_differences(llama):
    pytest.importorskip("torch")
    from click.testing import CliRunner

    from lora_cost.cli import main

    res = CliRunner().invoke(main, ["estimate", "--engine", "both", "--model", llama, "--method", "qlora", "--seq", "32",
                                    "--explain"])
    assert res.exit_code == 0, res.output
    for text in ("analytic engine", "trace engine", "analytic vs trace", "ops counted as 0 FLOPs", "gemm_4bit"):
        assert text in res.output
