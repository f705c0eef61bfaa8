"""BitFit (only biases train): trainable counts by hand, against the real model and against the LoRA
paper; saved-activation bytes and FLOPs against PyTorch on tiny models; refusals."""

import pytest
from click.testing import CliRunner

from lora_cost import estimate
from lora_cost.cli import main


@pytest.mark.fast
def test_roberta_base_by_hand_and_the_lora_paper():
    # per block: query, key, value, attention.output.dense (4 x 768) + intermediate.dense 3072 + output.dense 768
    # + two LayerNorm betas (2 x 768) = 8,448; x 12 = 101,376; + embeddings.LayerNorm beta 768 = 102,144
    blocks_and_embeddings = 12 * (4 * 768 + 3072 + 768 + 2 * 768) + 768
    # the masked-LM head: lm_head.dense bias 768 + lm_head.layer_norm beta 768 + decoder bias (vocab) 50,265
    mlm_head = 768 + 768 + 50_265
    assert estimate("roberta-base", "bitfit", seq=128).trainable_params == blocks_and_embeddings + mlm_head == 153_945
    # LoRA paper (Hu et al. 2021, arXiv:2106.09685) Table 2, "RoB_base (BitFit)*: 0.1M" (from Ben Zaken et al.),
    # counted on GLUE classification models: no masked-LM head (the classifier is not counted either)
    assert round(blocks_and_embeddings / 1e6, 1) == 0.1


@pytest.mark.fast
def test_gpt3_and_the_lora_paper_disagree_by_one_hidden_size_per_layer():
    d, L = 12288, 96
    # q, k, v, out_proj (4d) + fc_in (4d) + fc_out (d) + ln_1, ln_2 betas (2d) per block, + ln_f's beta
    ours = L * (4 * d + 4 * d + d + 2 * d) + d
    assert estimate("gpt3-175b", "bitfit", seq=128).trainable_params == ours == 12_988_416
    # LoRA paper Table 4 prints "GPT-3 (BitFit): 14.2M" = 12 d per layer (96 * 12 * 12288 = 14,155,776) with no
    # breakdown; GPT-3's block has 11 d of biases and LayerNorm betas, so we keep 13.0M and record the gap
    assert round(L * 12 * d / 1e6, 1) == 14.2 and round(ours / 1e6, 1) == 13.0


@pytest.mark.fast
def test_bitfit_trains_no_weight_so_saves_no_linear_input():
    e = estimate("gpt2", "bitfit", seq=256, precision="bf16")
    full = estimate("gpt2", "full", seq=256, precision="bf16")
    assert not {t.name: t.value for t in e.memory.saved_by_kind}.get("linear inputs")
    # the gradient reaches block 0 in both; full fine-tuning adds every weight gradient, one matmul as large as
    # the forward's: 2 n (L (3d^2 + d^2 + 4d^2 + 4d^2) + d V), n = 256, d = 768, L = 12, V = 50,257 (tied head)
    weight_grads = 2 * 256 * (12 * 12 * 768 ** 2 + 768 * 50_257)
    assert full.flops.backward - e.flops.backward == weight_grads == 63_248_400_384
    assert e.r is None


def _one_line_exit_2(args, needle):
    out = CliRunner().invoke(main, ["estimate", *args])
    lines = [ln for ln in out.output.splitlines() if ln.strip()]
    assert out.exit_code == 2 and len(lines) == 1 and needle in lines[0], out.output


@pytest.mark.fast
@pytest.mark.parametrize("args,needle", [
    (["--model", "llama-3.2-1b", "--method", "bitfit"], "has none"),
    (["--model", "gpt2", "--method", "bitfit", "--targets", "c_attn"], "--targets does not apply"),
    (["--model", "gpt2", "--method", "bitfit", "--r", "8"], "--r does not apply"),
    (["--model", "gpt2", "--method", "bitfit", "--lora-plus-ratio", "4"], "does not apply"),
])
def test_bad_input(args, needle):
    _one_line_exit_2(args, needle)


# ---- against PyTorch ------------------------------------------------------------------------------
def _bitfit(model):
    for name, p in model.named_parameters():
        p.requires_grad_("bias" in name)
    return model


@pytest.mark.parametrize("family,ckpt,dtype", [
    ("gpt2", False, "fp32"), ("gpt2", True, "fp32"), ("qwen2", False, "fp32"), ("qwen2", True, "fp32"),
    ("roberta", False, "fp32"), ("roberta", True, "fp32"), ("bert", False, "fp32"), ("qwen2", False, "bf16"),
])
def test_saved_bytes_and_flops_equal_torch(tmp_path, family, ckpt, dtype):
    """Llama has no bias (refused above); Qwen2's q/k/v biases make block 0's first RMSNorm save nothing."""
    pytest.importorskip("transformers")
    from tiny_models import B, S, config_file, measure

    e = estimate(config_file(tmp_path, family), "bitfit", batch=B, seq=S, precision=dtype, attention="eager",
                 model_dropout=0.0, grad_checkpointing=ckpt)
    saved, fwd, bwd = measure(family, _bitfit, ckpt, dtype)
    assert (e.memory.saved_activation_bytes, e.flops.forward, e.flops.backward) == (saved, fwd, bwd)


@pytest.mark.parametrize("name", ["gpt2", "roberta-base", "qwen2.5-0.5b", "gpt2-medium"])
def test_trainable_params_match_the_real_model(name):
    pytest.importorskip("transformers")
    from test_peft_counts import build

    model = _bitfit(build(name))
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimate(name, "bitfit", seq=128).trainable_params == real


def test_profiler_recognises_bitfit():
    pytest.importorskip("transformers")
    from lora_cost.profiler.introspect import _method
    from tiny_models import build

    assert _method(_bitfit(build("gpt2")), None) == ("bitfit", "")
    assert _method(build("gpt2"), None)[0] == "full"


def test_profiler_describes_a_bitfit_run():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from lora_cost.analytic.estimator import estimate_run
    from lora_cost.profiler.introspect import Observed, describe
    from tiny_models import build

    model = _bitfit(build("gpt2"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    info, spec, run = describe(model, opt, Observed(input_shape=(2, 24), autocast_dtype=None))
    # 3 blocks x (c_attn 192 + c_proj 64 + c_fc 256 + c_proj 64 + ln_1, ln_2 betas 128) + ln_f beta 64
    assert info.method == "bitfit" and estimate_run(spec, run).trainable_params == info.trainable_params == 2176
