"""Bottleneck adapters (Houlsby, Pfeiffer): saved bytes and FLOPs against PyTorch on real tiny models,
parameter counts against the LoRA paper's formula and tables, serving counts, and bad input.

The `adapters` library pins transformers 4.57, so the real-model checks run the project's reference of
its layer (lora_cost/trace/bottleneck.py, which follows the library's code line by line) on real CPU
transformers models, eager attention, fp32, as tests/test_saved_vs_torch.py does for peft."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lora_cost import LoraCostError, estimate
from lora_cost.analytic.methods.bottleneck import adapter_params
from lora_cost.cli import main

B, S = 2, 24
CONFIGS = {
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=3, n_head=4, vocab_size=512, n_positions=64),
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=64),
    "roberta": dict(model_type="roberta", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, vocab_size=512, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1),
    "bert": dict(model_type="bert", hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 vocab_size=512, max_position_embeddings=64, type_vocab_size=2),
}
DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob")
METHODS = {"adapter-houlsby": (("attention", "ffn"), "swish", False), "adapter-pfeiffer": (("ffn",), "relu", True)}


def measure(cfg: dict, method: str, factor: int, ckpt: bool, dtype: str = "fp32") -> tuple[int, int, int]:
    """(saved bytes, FlopCounterMode FLOPs of forward + backward, trainable parameters) of one real step."""
    import torch
    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    from lora_cost.trace.bottleneck import attach_bottleneck

    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    kwargs.update({k: 0.0 for k in DROPOUT_KEYS})
    config = transformers.AutoConfig.for_model(cfg["model_type"], **kwargs)
    config.use_cache = False
    torch.manual_seed(0)
    cls = transformers.AutoModelForMaskedLM if cfg["model_type"] in ("roberta", "bert") else transformers.AutoModelForCausalLM
    model = cls.from_config(config, attn_implementation="eager", dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    points, act, ln_before = METHODS[method]
    attach_bottleneck(model, points=points, non_linearity=act, original_ln_before=ln_before, reduction_factor=factor,
                      dropout=0.0)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    from peft_step import SavedBytes

    saved = SavedBytes(model)

    ids = torch.randint(2, 512, (B, S))
    counter = FlopCounterMode(display=False)
    with counter, saved:
        model(input_ids=ids, labels=ids).loss.backward()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return saved.bytes, counter.get_total_flops(), trainable


CASES = [(family, method, factor, ckpt)
         for family in ("gpt2", "llama", "roberta", "bert")
         for method in METHODS
         for factor, ckpt in ((16, False), (4, False), (8, True))]


@pytest.mark.parametrize("family,method,factor,ckpt", CASES)
def test_saved_bytes_and_flops_equal_torch(tmp_path, family, method, factor, ckpt):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    cfg = CONFIGS[family]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    e = estimate(str(path), method, batch=B, seq=S, precision="fp32", attention="eager", model_dropout=0.0,
                 grad_checkpointing=ckpt, method_options={"reduction_factor": factor})
    saved, flops, trainable = measure(cfg, method, factor, ckpt)
    assert e.memory.saved_activation_bytes == saved
    assert e.flops.forward + e.flops.backward == flops
    assert e.trainable_params == trainable


# bf16 (adapters in the model's dtype, RMSNorm's fp32 upcast); layer_norm's statistics are bf16 on the CPU
# but fp32 on CUDA, so only the RMSNorm family compares exactly here (as in tests/test_saved_vs_torch.py)
@pytest.mark.parametrize("method,ckpt", [("adapter-houlsby", False), ("adapter-pfeiffer", False),
                                         ("adapter-houlsby", True)])
def test_saved_bytes_and_flops_equal_torch_bf16(tmp_path, method, ckpt):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    cfg = CONFIGS["llama"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    e = estimate(str(path), method, batch=B, seq=S, precision="bf16", attention="eager", model_dropout=0.0,
                 grad_checkpointing=ckpt, method_options={"reduction_factor": 8})
    saved, flops, trainable = measure(cfg, method, 8, ckpt, "bf16")
    assert (e.memory.saved_activation_bytes, e.flops.forward + e.flops.backward, e.trainable_params) == \
        (saved, flops, trainable)


# --- parameter counts ------------------------------------------------------------------------------

def lora_paper_formula(adapter_layers: int, d_model: int, r: int, trainable_layernorms: int = 0) -> int:
    """Hu et al. 2021 (arXiv:2106.09685), Sec. 5.1 "Adapter tuning": |Theta| = L_Adpt x (2 x d_model x r
    + r + d_model) + 2 x L_LN x d_model (L_Adpt adapter layers, L_LN trainable LayerNorms)."""
    return adapter_layers * (2 * d_model * r + r + d_model) + 2 * trainable_layernorms * d_model


@pytest.mark.parametrize("d,m", [(64, 4), (768, 48), (1024, 16), (4096, 256)])
def test_reference_layer_counts_follow_the_lora_paper_formula(d, m):
    pytest.importorskip("torch")
    from lora_cost.trace.bottleneck import adapter_parameter_count

    # one adapter layer, no trainable LayerNorm (the library freezes them): 2dm + m + d
    assert adapter_parameter_count(d, m) == lora_paper_formula(1, d, m) == adapter_params(d, m)


@pytest.mark.fast
@pytest.mark.parametrize("method,adapters_per_block", [("adapter-houlsby", 2), ("adapter-pfeiffer", 1)])
def test_estimate_counts_follow_the_lora_paper_formula(method, adapters_per_block):
    # GPT-2 small: d = 768, 12 blocks, default reduction factor 16 -> bottleneck 48
    e = estimate("gpt2", method, seq=128)
    assert e.trainable_params == lora_paper_formula(12 * adapters_per_block, 768, 48)
    assert e.adapted_modules == 12 * adapters_per_block
    assert lora_paper_formula(24, 768, 48) == 24 * (2 * 768 * 48 + 48 + 768) == 1_789_056


@pytest.mark.fast
def test_lora_paper_table2_roberta_large_adapters():
    # LoRA paper Table 2, RoBERTa large (d = 1024, 24 layers), rows marked † (from the adapters' papers):
    # Adpt^P 0.8M: one adapter per layer, bottleneck 16 (reduction factor 64): 24 x 33,808 = 811,392 -> 0.8M
    p = estimate("roberta-large", "adapter-pfeiffer", seq=128, method_options={"reduction_factor": 64})
    assert p.trainable_params == 24 * (2 * 1024 * 16 + 16 + 1024) == 811_392
    # Adpt^H 0.8M: two adapters per layer, bottleneck 8 (factor 128): 48 x 17,416 = 835,968 -> 0.8M
    h = estimate("roberta-large", "adapter-houlsby", seq=128, method_options={"reduction_factor": 128})
    assert h.trainable_params == 48 * (2 * 1024 * 8 + 8 + 1024) == 835_968
    # Not reproduced: the same table's Adpt^P 3.0M and Adpt^H 6.0M. With bottleneck 64 (the library's
    # default factor 16) the formula gives 3.17M and 6.34M; only a bottleneck of 60-61, which neither the
    # paper nor the adapters' papers state, rounds to 3.0M / 6.0M. The formula is not bent to them.
    p64 = estimate("roberta-large", "adapter-pfeiffer", seq=128)
    assert p64.trainable_params == 3_171_840 and round(p64.trainable_params / 1e6, 1) == 3.2


@pytest.mark.fast
def test_lora_paper_table3_gpt2_medium_adapter_h_count_is_adapter_l():
    # LoRA paper Table 3 lists GPT-2 M (Adapter^H) with 11.09M, the same as its Adapter^L row. Adapter^L
    # (one adapter per layer plus a trainable LayerNorm, Lin et al. 2020) with bottleneck 224 gives exactly
    # 24 x (2 x 1024 x 224 + 224 + 1024) + 2 x 24 x 1024 = 11,089,152 -> 11.09M, but no integer Adapter^H
    # bottleneck does (48 adapters of 2049m + 1024: m = 112 gives 11.06M, m = 113 11.16M): the Adapter^H
    # row repeats the Adapter^L count. The estimate at factor 8 (bottleneck 128) follows the formula:
    # 48 x (2 x 1024 x 128 + 128 + 1024) = 48 x 263,296 = 12,638,208.
    assert lora_paper_formula(24, 1024, 224, trainable_layernorms=24) == 11_089_152
    assert all(round(lora_paper_formula(48, 1024, m) / 1e6, 2) != 11.09 for m in range(1, 1025))
    e = estimate("gpt2-medium", "adapter-houlsby", seq=128, method_options={"reduction_factor": 8})
    assert e.trainable_params == lora_paper_formula(48, 1024, 128) == 12_638_208


# --- serving ------------------------------------------------------------------------------------

@pytest.mark.fast
def test_serving_cost_is_not_mergeable():
    from lora_cost.analytic.methods import get_method
    from lora_cost.profiles import load_model
    from lora_cost.spec import RunConfig

    spec = load_model("gpt2")
    run = RunConfig(method="adapter-houlsby", precision="bf16")
    cost = get_method("adapter-houlsby").serving(spec, [], [], run)
    # 24 adapters of 2 x 768 x 48 + 48 + 768 = 74,544 parameters, 2 bytes each in bf16
    assert not cost.mergeable and cost.extra_weight_bytes_merged == cost.extra_weight_bytes_unmerged == 24 * 74_544 * 2
    # per token: 24 adapters x 2 x (768 x 48 + 48 x 768) = 24 x 147,456 = 3,538,944 FLOPs
    assert cost.extra_flops_per_token_unmerged == cost.extra_flops_per_token_merged == 3_538_944
    # per block: 2 adapters x (down, act, up, scale, add) = 10 kernels
    assert cost.extra_sequential_ops_per_block_unmerged == 10
    pf = get_method("adapter-pfeiffer").serving(spec, [], [], RunConfig(method="adapter-pfeiffer"))
    assert pf.extra_sequential_ops_per_block_merged == 6  # the stream add, then down, act, up, scale, add
    bert = get_method("adapter-pfeiffer").serving(load_model("roberta-base"), [], [], RunConfig(method="adapter-pfeiffer"))
    assert bert.extra_sequential_ops_per_block_merged == 7  # and the post-norm LayerNorm once more


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.fast
@pytest.mark.parametrize("args,message", [
    (["--method", "adapter-houlsby", "--reduction-factor", "5"], "--reduction-factor 5 does not divide the hidden size 768"),
    (["--method", "adapter-pfeiffer", "--reduction-factor", "0"], "--reduction-factor must be at least 1"),
    (["--method", "adapter-pfeiffer", "--reduction-factor", "-16"], "--reduction-factor must be at least 1"),
    (["--method", "lora", "--reduction-factor", "16"], "--reduction-factor does not apply to method lora"),
    (["--method", "adapter-houlsby", "--r", "8"], "--r does not apply to adapter-houlsby"),
    (["--method", "adapter-pfeiffer", "--targets", "c_attn"], "--targets does not apply to adapter-pfeiffer"),
    (["--method", "adapter-houlsby", "--nola-k", "8"], "--nola-k does not apply to method adapter-houlsby"),
])
def test_bad_input_exits_2_with_one_line(args, message):
    out = CliRunner().invoke(main, ["estimate", "--model", "gpt2", *args])
    assert out.exit_code == 2, out.output
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], out.output


@pytest.mark.fast
def test_api_refuses_a_factor_that_does_not_divide():
    with pytest.raises(LoraCostError, match="does not divide the hidden size 4096"):
        estimate("llama-2-7b", "adapter-pfeiffer", method_options={"reduction_factor": 3})


@pytest.mark.fast
def test_plan_lists_adapters_without_a_rank():
    out = CliRunner().invoke(main, ["plan", "--model", "gpt2", "--budget", "80GiB", "--methods",
                                    "lora,adapter-houlsby,adapter-pfeiffer", "--r", "8-8", "--batch", "1-2",
                                    "--seq", "256", "--json"])
    assert out.exit_code == 0, out.output
    plans = [p for p in json.loads(out.output)["methods"] if not p["grad_checkpointing"]]
    by = {p["method"]: p for p in plans}
    assert by["adapter-houlsby"]["max_batch"]["r"] is None
    assert by["adapter-houlsby"]["max_batch"]["trainable_params"] == 1_789_056
    assert by["adapter-pfeiffer"]["max_batch"]["trainable_params"] == 12 * 74_544


# --- profiler recognition -------------------------------------------------------------------------

@pytest.mark.parametrize("method,factor", [("adapter-houlsby", 16), ("adapter-pfeiffer", 8)])
def test_profiler_recognises_the_adapters(method, factor):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from lora_cost.analytic.methods.base import recognisers
    from lora_cost.trace.bottleneck import attach_bottleneck

    cfg = CONFIGS["llama"]
    config = transformers.AutoConfig.for_model("llama", **{k: v for k, v in cfg.items() if k != "model_type"})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
        points, act, ln_before = METHODS[method]
        attach_bottleneck(model, points=points, non_linearity=act, original_ln_before=ln_before,
                          reduction_factor=factor, dropout=0.0)
    found = next(m for m in recognisers() if m.recognise(model, None))
    assert found.name == method
    assert found.observed_options(model) == {"reduction_factor": factor}
    for p in model.parameters():  # the base training as well is not an adapter run
        p.requires_grad_(True)
    assert not any(m.recognise(model, None) for m in recognisers() if m.name.startswith("adapter-"))


@pytest.mark.fast
def test_methods_lists_the_adapters_with_their_papers():
    out = CliRunner().invoke(main, ["methods", "--json"])
    listed = {m["name"]: m for m in json.loads(out.output)}
    assert listed["adapter-houlsby"]["paper"].startswith("Houlsby et al. 2019, arXiv:1902.00751")
    assert listed["adapter-pfeiffer"]["paper"].startswith("Pfeiffer et al. 2021, arXiv:2005.00247")
    assert listed["adapter-houlsby"]["options"] == ["reduction_factor"] and listed["adapter-houlsby"]["default_r"] is None


@pytest.mark.parametrize("targets", [("v_proj",), ("gate_proj", "up_proj")])
def test_rope_tables_kept_once_when_the_first_block_saves_none(tmp_path, targets):
    """The tape fix the adapters needed (tape.py `repeated_scopes`), seen with peft LoRA: when no adapted
    module feeds q or k, block 0 saves nothing of the shared RoPE tables, and their first save in the block
    that stands for layers 1..L-1 was counted L-1 times (3,072 B too many on this 3-layer model)."""
    pytest.importorskip("peft")
    from test_saved_vs_torch import CONFIGS as PEFT_CONFIGS, measure as peft_measure

    cfg = PEFT_CONFIGS["llama"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    e = estimate(str(path), "lora", r=4, targets=",".join(targets), batch=2, seq=24, precision="fp32",
                 attention="eager", model_dropout=0.0)
    assert e.memory.saved_activation_bytes == peft_measure(cfg, "lora", targets, 4, False)
