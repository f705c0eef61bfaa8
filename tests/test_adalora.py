"""AdaLoRA (lora_cost/analytic/methods/adalora.py) against peft itself.

Saved-activation bytes against a real CPU step counted with `saved_tensors_hooks` (distinct storages,
parameters and buffers excluded, as tests/test_saved_vs_torch.py counts), FLOPs against
FlopCounterMode, trainable parameters against peft on the meta device and hand arithmetic, and the
bad input the CLI refuses with one line and exit code 2.

peft 0.21 leaves `ranknum` trainable whenever it moves the adapter to the base layer's device or dtype
(on a GPU always; on the CPU for 16-bit models only). The CPU fp32 runs here set it trainable, which
is what the same run on a GPU gets (test_ranknum_trains_after_a_move checks the mechanism)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lora_cost import LoraCostError, estimate
from lora_cost.cli import main

from tiny_configs import B, DROPOUT_KEYS, S  # noqa: E402
from tiny_configs import CONFIGS as _ALL  # noqa: E402

CONFIGS = {k: _ALL[k] for k in ("gpt2", "llama", "roberta")}
MASKED_LM = ("roberta", "bert")


def build(family: str, init_r: int, target_r: int, targets, ckpt: bool = False, device=None, dtype: str = "fp32"):
    """The model as a user builds it: transformers from a config, peft AdaLoraConfig, the causal-LM task
    model (masked-LM families: the AdaLoraModel, whose forward is the same), ranknum trainable."""
    import peft
    import torch
    import transformers

    cfg = CONFIGS[family]
    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    kwargs.update({k: 0.0 for k in DROPOUT_KEYS})
    config = transformers.AutoConfig.for_model(cfg["model_type"], **kwargs)
    config.use_cache = False
    torch.manual_seed(0)
    cls = transformers.AutoModelForMaskedLM if family in MASKED_LM else transformers.AutoModelForCausalLM
    import contextlib
    with torch.device(device) if device else contextlib.nullcontext():
        model = cls.from_config(config, attn_implementation="eager",
                                dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
        conf = peft.AdaLoraConfig(init_r=init_r, target_r=target_r, total_step=100, lora_dropout=0.0,
                                  target_modules="all-linear" if targets == "all-linear" else list(targets),
                                  task_type=None if family in MASKED_LM else "CAUSAL_LM")
        model = peft.get_peft_model(model, conf)
    for name, p in model.named_parameters():
        if ".ranknum." in name:
            p.requires_grad_(True)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model.base_model if family in MASKED_LM else model


def measure(family: str, r: int, targets, ckpt: bool, dtype: str = "fp32") -> tuple[int, int, int]:
    """(saved-activation bytes, forward FLOPs, backward FLOPs) of one real CPU step."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = build(family, r, max(1, r // 2), targets, ckpt, dtype=dtype)
    model.train()
    from peft_step import SavedBytes

    saved = SavedBytes(model)

    ids = torch.randint(2, 512, (B, S))
    counter = FlopCounterMode(display=False)
    with saved:
        with counter:
            loss = model(input_ids=ids, labels=ids).loss
        fwd = counter.get_total_flops()
        with counter:
            loss.backward()
        bwd = counter.get_total_flops()
    return saved.bytes, fwd, bwd


def analytic(tmp_path, family: str, r: int, targets, ckpt: bool, dtype: str = "fp32"):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIGS[family]))
    return estimate(str(path), "adalora", r=r, method_options={"target_r": max(1, r // 2)},
                    targets=targets if targets == "all-linear" else ",".join(targets), batch=B, seq=S,
                    precision=dtype, attention="eager", model_dropout=0.0, grad_checkpointing=ckpt)


CASES = [
    ("gpt2", 4, ("c_attn",), False), ("gpt2", 6, "all-linear", False), ("gpt2", 4, ("c_attn", "c_fc"), True),
    ("llama", 4, ("q_proj", "v_proj"), False), ("llama", 8, "all-linear", False), ("llama", 4, "all-linear", True),
    ("roberta", 4, ("query", "value"), False), ("roberta", 6, "all-linear", False), ("roberta", 4, ("query", "value"), True),
]


@pytest.mark.parametrize("family,r,targets,ckpt", CASES)
def test_saved_bytes_and_flops_equal_torch(tmp_path, family, r, targets, ckpt):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    e = analytic(tmp_path, family, r, targets, ckpt)
    saved, fwd, bwd = measure(family, r, targets, ckpt)
    assert e.memory.saved_activation_bytes == saved
    assert e.flops.forward == fwd
    assert e.flops.backward == bwd


@pytest.mark.parametrize("targets,ckpt", [(("q_proj", "v_proj"), False), ("all-linear", False), ("all-linear", True)])
def test_saved_bytes_equal_torch_bf16(tmp_path, targets, ckpt):
    # bf16 base, fp32 adapters: each adapted module casts its input to fp32; RMSNorm's statistics are fp32
    # on the CPU as on CUDA (layer_norm's are not, so only the llama family compares exactly in bf16)
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    e = analytic(tmp_path, "llama", 4, targets, ckpt, dtype="bf16")
    saved, fwd, bwd = measure("llama", 4, targets, ckpt, dtype="bf16")
    assert (e.memory.saved_activation_bytes, e.flops.forward, e.flops.backward) == (saved, fwd, bwd)


def test_ranknum_trains_after_a_move():
    """The mechanism behind the trainable ranknum: peft creates it with requires_grad=False on the CPU
    and re-registers it after moving it to the base layer's dtype (here bf16 -> a new Parameter). An
    fp32 model on the CPU needs no move and keeps it frozen; a CUDA model always moves it."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = {k: v for k, v in CONFIGS["llama"].items() if k != "model_type"}
    for dtype, trains in ((torch.bfloat16, True), (torch.float32, False)):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model("llama", **cfg),
                                                              dtype=dtype)
        model = peft.get_peft_model(model, peft.AdaLoraConfig(init_r=4, total_step=10, target_modules=["q_proj"]))
        flags = {p.requires_grad for n, p in model.named_parameters() if ".ranknum." in n}
        assert flags == {trains}


@pytest.mark.parametrize("name,init_r,targets", [
    ("gpt2", 12, "c_attn"), ("gpt2", 8, "all-linear"), ("roberta-base", 12, "query,value"),
    ("llama-3.2-1b", 16, "all-linear"), ("qwen2.5-0.5b", 8, "q_proj,v_proj"),
])
def test_trainable_params_match_peft_on_meta(name, init_r, targets):
    """peft on the meta device counts lora_A, lora_E and lora_B (it skips the device move there, so
    ranknum stays frozen); on a GPU ranknum trains too: one more parameter per adapted matrix."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from lora_cost.profiles import bundled_models

    cfg = dict(bundled_models()[name].config)
    model_type = cfg.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    cls = transformers.AutoModelForMaskedLM if model_type in MASKED_LM else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = peft.get_peft_model(cls.from_config(config), peft.AdaLoraConfig(
            init_r=init_r, target_r=4, total_step=10,
            target_modules="all-linear" if targets == "all-linear" else targets.split(",")))
    on_meta = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ranknums = sum(1 for n, _ in model.named_parameters() if ".ranknum." in n)
    e = estimate(name, "adalora", r=init_r, method_options={"target_r": 4}, targets=targets)
    assert e.adapted_modules == ranknums
    assert e.trainable_params == on_meta + ranknums


# --- torch-free: hand arithmetic, options, the CLI -----------------------------------------------

@pytest.mark.fast
def test_gpt2_counts_by_hand():
    # GPT-2 c_attn (768 -> 2304) in 12 blocks, init_r 12: A 12 x 768, E 12, B 2304 x 12, ranknum 1
    # = 9,216 + 12 + 27,648 + 1 = 36,877 per block, 442,524 in all; the rank allocator keeps three fp32
    # copies of A, E, B: 3 x 4 x 12 x 36,876 = 5,310,144 B
    e = estimate("gpt2", "adalora")
    assert (e.r, e.method_options) == (12, {"init_r": 12, "target_r": 8})
    assert e.trainable_params == 12 * 36_877 == 442_524
    state = next(t.value for t in e.memory.terms if t.name == "rank allocator state")
    assert state == 3 * 4 * 12 * 36_876 == 5_310_144
    assert e.memory.steady_bytes - estimate("gpt2", "adalora", r=12).memory.steady_bytes == 0
    assert any("about 295,008 effective trainable parameters" in a for a in e.assumptions)  # 12 x 8 x 3,073


@pytest.mark.fast
def test_regulariser_flops_and_saves_beside_lora():
    """AdaLoRA's branch runs LoRA's two products; what it adds in FLOPs is the regulariser alone:
    per block, 2 r^2 (768 + 2304) forward for A A^T and B^T B, twice that backward. In bytes (fp32,
    batch 2 x 128 = 256 tokens): A * E ([8, 768], saved where the input needs a gradient: blocks 2-12),
    the division's numerator ([256, 2304]) and divisor (4 B) in every block, and per A and B the
    regulariser's 8 x 8 difference and its norm (260 B)."""
    kw = dict(r=8, batch=2, seq=128, precision="fp32")
    ada, lora = estimate("gpt2", "adalora", **kw), estimate("gpt2", "lora", **kw)
    assert ada.flops.forward - lora.flops.forward == 12 * 2 * 64 * (768 + 2304) == 4_718_592
    assert ada.flops.backward - lora.flops.backward == 2 * 4_718_592
    extra = 11 * 8 * 768 * 4 + 12 * (256 * 2304 * 4 + 4) + 12 * 2 * (64 * 4 + 4)
    assert ada.memory.saved_activation_bytes - lora.memory.saved_activation_bytes == extra == 28_588_176


@pytest.mark.fast
def test_r_and_init_r_name_one_number():
    assert estimate("gpt2", "adalora", r=16).method_options == {"init_r": 16, "target_r": 8}
    assert estimate("gpt2", "adalora", method_options={"init_r": 16}).r == 16
    assert estimate("gpt2", "adalora", r=4).method_options["target_r"] == 4  # the default, capped at init_r
    same = estimate("gpt2", "adalora", r=16, method_options={"init_r": 16})
    assert same.memory.peak_bytes == estimate("gpt2", "adalora", r=16).memory.peak_bytes


@pytest.mark.fast
def test_sizes_follow_the_rank_they_are_simulated_at():
    # not affine in r (the regulariser's r x r products): each rank simulated at itself, so r = 3 sits
    # off the line through r = 2 and r = 4 by the curvature of 2 r^2 d, 12 x 2 x 3,072 x (9 + 9 - 4 - 16)/2
    f = {r: estimate("gpt2", "adalora", r=r, method_options={"target_r": 1}).flops.forward for r in (2, 3, 4)}
    assert (f[2] + f[4]) / 2 - f[3] == 12 * 2 * 3072 * ((4 + 16) / 2 - 9) == 73_728


@pytest.mark.fast
def test_serving_merges_away():
    from lora_cost.analytic.estimator import validated_run
    from lora_cost.analytic.methods import get_method
    from lora_cost.profiles import load_model
    from lora_cost.spec import RunConfig

    spec = load_model("gpt2")
    run, method, _, sites, head = validated_run(spec, RunConfig(method="adalora", precision="bf16"))
    cost = get_method("adalora").serving(spec, sites, head, run)
    # 12 blocks x (12 x (768 + 2304 + 1) + 1) fp32 values; 2 x 12 x (768 + 2304) FLOPs per token
    assert cost.mergeable and cost.extra_weight_bytes_merged == cost.extra_flops_per_token_merged == 0
    assert cost.extra_weight_bytes_unmerged == 4 * 442_524
    assert cost.extra_flops_per_token_unmerged == 12 * 2 * 12 * 3072
    assert cost.extra_sequential_ops_per_block_unmerged == 8  # 7 kernels + the fp32 input cast, one module
    assert cost.extra_sequential_ops_per_block_merged == 0


@pytest.mark.fast
@pytest.mark.parametrize("args, message", [
    (["--init-r", "8", "--target-r", "16"], "--target-r 16 is above the initial rank 8"),
    (["--target-r", "13"], "--target-r 13 is above the initial rank 12"),
    (["--r", "8", "--init-r", "12"], "--r 8 and --init-r 12 disagree"),
    (["--target-r", "0"], "--target-r must be at least 1"),
    (["--init-r", "-2"], "--init-r must be at least 1"),
    (["--init-r", "800"], "rank 800 is larger than c_attn allows"),
])
def test_bad_input_is_one_line_exit_2(args, message):
    out = CliRunner().invoke(main, ["estimate", "--model", "gpt2", "--method", "adalora", *args])
    assert out.exit_code == 2
    assert message in out.output and len(out.output.strip().splitlines()) == 1


@pytest.mark.fast
def test_options_belong_to_adalora():
    out = CliRunner().invoke(main, ["estimate", "--model", "gpt2", "--method", "lora", "--target-r", "4"])
    assert out.exit_code == 2 and "--target-r does not apply to method lora" in out.output
    with pytest.raises(LoraCostError, match="--init-r does not apply to method dora"):
        estimate("gpt2", "dora", method_options={"init_r": 4})


@pytest.mark.fast
def test_json_names_the_rank_and_the_allocator_state():
    out = CliRunner().invoke(main, ["estimate", "--model", "gpt2", "--method", "adalora", "--init-r", "16",
                                    "--target-r", "4", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["inputs"]["method_options"] == {"init_r": 16, "target_r": 4}
    assert doc["inputs"]["r"] == 16
    assert doc["memory"]["components"]["loop_state"] == 3 * 4 * 12 * 16 * (768 + 2304 + 1)
    terms = {t["name"]: t["bytes"] for t in doc["memory"]["terms"]}
    assert terms["rank allocator state"] == 3 * 4 * 12 * 16 * (768 + 2304 + 1) == 7_080_192


@pytest.mark.fast
def test_profiler_recognises_an_adalora_config():
    from lora_cost.analytic.methods.base import recognisers

    class AdaLoraConfig:  # matched by class name, as peft's
        init_r, target_r = 12, 8

    class LoraConfig:
        use_dora = False

    model = type("M", (), {"peft_config": {"default": AdaLoraConfig()}})()
    found = next(m for m in recognisers() if m.recognise(model, AdaLoraConfig()))
    assert found.name == "adalora" and found.observed_options(model) == {"init_r": 12, "target_r": 8}
    assert not found.recognise(model, LoraConfig())
