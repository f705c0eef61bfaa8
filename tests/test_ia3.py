"""(IA)3: trainable counts (the paper's formula, peft on the meta device), saved-activation bytes and
FLOPs against PyTorch on tiny models, the serving cost, refusals."""

import pytest
from click.testing import CliRunner

from lora_cost import estimate
from lora_cost.cli import main


@pytest.mark.fast
def test_llama_counts_follow_the_paper_formula():
    # Liu et al. 2022 (arXiv:2205.05638) Sec. 3.3: L (d_k + d_v + d_ff) per decoder; Llama-2-7B with peft's
    # default targets k_proj, v_proj (4096 outputs each) and down_proj (11008 inputs): 32 x 19,200
    assert estimate("llama-2-7b", "ia3", seq=128).trainable_params == 32 * (4096 + 4096 + 11008) == 614_400


@pytest.mark.fast
def test_gpt2_scales_the_fused_qkv_output_and_the_mlp_activation():
    # peft's GPT-2 defaults: c_attn (output 3 x 1024) and mlp.c_proj (feed-forward: its 4096 inputs), 24 blocks
    e = estimate("gpt2-medium", "ia3", seq=128)
    assert e.targets == ("c_attn", "mlp.c_proj") and e.adapted_modules == 48
    assert e.trainable_params == 24 * (3 * 1024 + 4096) == 172_032


@pytest.mark.fast
def test_roberta_output_dense_matches_both_output_layers():
    # "output.dense" is a suffix of attention.output.dense (768 inputs) and of output.dense (3072 inputs): both
    # scale their input; key and value their 768 outputs. 12 x (768 + 768 + 768 + 3072)
    assert estimate("roberta-base", "ia3", seq=128).trainable_params == 12 * (768 + 768 + 768 + 3072) == 64_512


@pytest.mark.fast
def test_serving_cost_by_hand():
    from lora_cost.analytic.architectures import get_architecture
    from lora_cost.analytic.estimator import resolve_targets
    from lora_cost.analytic.methods import get_method
    from lora_cost.profiles import load_model
    from lora_cost.spec import RunConfig

    spec, m = load_model("llama-2-7b"), get_method("ia3")
    _, sites, head = resolve_targets(get_architecture("llama"), spec, m, None)
    cost = m.serving(spec, sites, head, RunConfig(method="ia3"))
    assert cost.mergeable and cost.extra_weight_bytes_merged == 0 and cost.extra_flops_per_token_merged == 0
    assert cost.extra_weight_bytes_unmerged == 614_400 * 4  # fp32 vectors
    assert cost.extra_flops_per_token_unmerged == 614_400  # one multiply per element
    assert cost.extra_sequential_ops_per_block_unmerged == 3


@pytest.mark.fast
@pytest.mark.parametrize("args,needle", [
    (["--model", "gpt2", "--method", "ia3", "--r", "8"], "--r does not apply"),
    (["--model", "gpt2", "--method", "ia3", "--dropout", "0.1"], "does not apply to ia3"),
    (["--model", "gpt2", "--method", "ia3", "--targets", "attn.c_fc"], "matches nothing"),
    (["--model", "gpt2", "--method", "ia3", "--nola-k", "4"], "does not apply"),
])
def test_bad_input(args, needle):
    out = CliRunner().invoke(main, ["estimate", *args])
    lines = [ln for ln in out.output.splitlines() if ln.strip()]
    assert out.exit_code == 2 and len(lines) == 1 and needle in lines[0], out.output


# ---- against PyTorch and peft ---------------------------------------------------------------------
def _ia3(targets):
    def prepare(model):
        import peft

        from lora_cost.analytic.methods.ia3 import DEFAULT_TARGETS, feedforward_targets
        from lora_cost.trace.adapters import fan_in_fan_out

        t = targets or DEFAULT_TARGETS[model.config.model_type]
        return peft.get_peft_model(model, peft.IA3Config(target_modules=list(t), feedforward_modules=feedforward_targets(t),
                                                          fan_in_fan_out=fan_in_fan_out(model, t)))
    return prepare


@pytest.mark.parametrize("family,targets,ckpt,dtype", [
    ("gpt2", None, False, "fp32"), ("gpt2", None, True, "fp32"), ("gpt2", ("c_proj", "c_fc"), False, "fp32"),
    ("llama", None, False, "fp32"), ("llama", None, False, "bf16"), ("llama", ("down_proj", "up_proj", "q_proj"), True, "bf16"),
    ("qwen2", None, True, "fp32"), ("roberta", None, False, "fp32"), ("roberta", ("query", "dense"), False, "fp32"),
    ("bert", None, False, "fp32"),
])
def test_saved_bytes_and_flops_equal_torch(tmp_path, family, targets, ckpt, dtype):
    pytest.importorskip("peft")
    from tiny_models import B, S, config_file, measure

    kw = dict(targets=",".join(targets)) if targets else {}
    e = estimate(config_file(tmp_path, family), "ia3", batch=B, seq=S, precision=dtype, attention="eager",
                 model_dropout=0.0, grad_checkpointing=ckpt, **kw)
    saved, fwd, bwd = measure(family, _ia3(targets), ckpt, dtype)
    assert (e.memory.saved_activation_bytes, e.flops.forward, e.flops.backward) == (saved, fwd, bwd)


@pytest.mark.parametrize("name,targets", [("gpt2", None), ("roberta-base", None), ("qwen2.5-0.5b", None),
                                          ("llama-3.2-1b", None), ("llama-3.2-1b", "all-linear")])
def test_trainable_params_match_peft(name, targets):
    pytest.importorskip("peft")
    from test_peft_counts import build

    from lora_cost.analytic.estimator import resolve_targets
    from lora_cost.analytic.architectures import get_architecture
    from lora_cost.analytic.methods import get_method
    from lora_cost.profiles import load_model

    spec = load_model(name)
    names, _, _ = resolve_targets(get_architecture(spec.model_type), spec, get_method("ia3"),
                                  (targets,) if targets else None)
    model = _ia3(names)(build(name))
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimate(name, "ia3", seq=128, targets=targets).trainable_params == real


def test_profiler_recognises_ia3():
    pytest.importorskip("peft")
    from lora_cost.profiler.introspect import _method, _peft_config
    from tiny_models import build

    model = _ia3(None)(build("llama"))
    assert _method(model, _peft_config(model)[0]) == ("ia3", "")
