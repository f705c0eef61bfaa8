"""LoRA+: LoRA's memory and FLOPs exactly (a learning rate changes no tensor), its option, its plan row
and note, and the profiler telling it from LoRA by the optimizer's parameter groups."""

import pytest
from click.testing import CliRunner

from lora_cost import estimate
from lora_cost.cli import main


@pytest.mark.fast
@pytest.mark.parametrize("model,kw", [("gpt2", dict(seq=256)), ("llama-3.2-1b", dict(r=16, targets="all-linear", seq=512)),
                                      ("roberta-base", dict(grad_checkpointing=True, precision="fp32", seq=128))])
def test_costs_equal_lora(model, kw):
    plus, lora = estimate(model, "lora-plus", **kw), estimate(model, "lora", **kw)
    assert plus.memory == lora.memory and plus.flops == lora.flops
    assert plus.trainable_params == lora.trainable_params and plus.r == lora.r
    assert plus.method_options == {"lora_plus_ratio": 16.0}
    assert any("equal LoRA's" in a for a in plus.assumptions) and not any("equal LoRA's" in a for a in lora.assumptions)


@pytest.mark.fast
def test_ratio_option_and_json():
    import json

    out = CliRunner().invoke(main, ["estimate", "--model", "gpt2", "--method", "lora-plus", "--lora-plus-ratio", "4",
                                    "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["inputs"]["method_options"] == {"lora_plus_ratio": 4.0}
    assert any("equal LoRA's" in a for a in doc["assumptions"])


@pytest.mark.fast
@pytest.mark.parametrize("args,needle", [
    (["--lora-plus-ratio", "0"], "greater than 0"),
    (["--lora-plus-ratio", "-2"], "greater than 0"),
    (["--lora-plus-ratio", "nan"], "finite"),
])
def test_bad_ratio(args, needle):
    out = CliRunner().invoke(main, ["estimate", "--model", "gpt2", "--method", "lora-plus", *args])
    lines = [ln for ln in out.output.splitlines() if ln.strip()]
    assert out.exit_code == 2 and len(lines) == 1 and needle in lines[0], out.output


@pytest.mark.fast
def test_ratio_given_to_lora_is_refused():
    out = CliRunner().invoke(main, ["estimate", "--model", "gpt2", "--method", "lora", "--lora-plus-ratio", "4"])
    assert out.exit_code == 2 and "does not apply to method lora" in out.output


@pytest.mark.fast
def test_plan_row_and_note():
    from lora_cost.analytic.planner import plan

    p = plan("gpt2", budget_bytes=8 * 2**30, methods=("lora", "lora-plus"), seq=512, batch_range=(1, 8),
             rank_range=(4, 16))
    rows = {(m.method, m.grad_checkpointing): m for m in p.methods}
    assert ("lora-plus", False) in rows and ("lora", False) in rows
    assert rows["lora-plus", False].max_batch.batch == rows["lora", False].max_batch.batch
    assert any(a.startswith("lora-plus:") and "learning rate" in a for a in p.assumptions)


# ---- against PyTorch, peft and its optimizer --------------------------------------------------------
def _lora(targets):
    def prepare(model):
        import peft

        from lora_cost.trace.adapters import fan_in_fan_out

        return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                                          fan_in_fan_out=fan_in_fan_out(model, targets)))
    return prepare


@pytest.mark.parametrize("family,targets", [("gpt2", ("c_attn", "c_fc")), ("llama", ("q_proj", "v_proj", "down_proj")),
                                            ("roberta", ("query", "value"))])
def test_saved_bytes_and_flops_equal_torch(tmp_path, family, targets):
    """The step LoRA+ runs is peft LoRA's; the optimizer's groups only scale B's update."""
    pytest.importorskip("peft")
    from tiny_models import B, S, config_file, measure

    e = estimate(config_file(tmp_path, family), "lora-plus", r=4, targets=",".join(targets), batch=B, seq=S,
                 precision="fp32", attention="eager", model_dropout=0.0)
    assert (e.memory.saved_activation_bytes, e.flops.forward, e.flops.backward) == measure(family, _lora(targets))


def test_profiler_tells_lora_plus_from_lora():
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    from lora_cost.profiler.introspect import _method, _peft_config
    from tiny_models import build

    model = _lora(("q_proj", "v_proj"))(build("llama"))
    cfg = _peft_config(model)[0]
    plus = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=8.0)
    assert _method(model, cfg, plus) == ("lora-plus", "")
    from lora_cost.analytic.methods import get_method
    assert get_method("lora-plus").recognise_optimizer(model, cfg, plus) == {"lora_plus_ratio": 8.0}
    plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    assert _method(model, cfg, plain) == ("lora", "")
    assert _method(model, cfg) == ("lora", "")


def test_trainable_params_match_peft():
    pytest.importorskip("peft")
    from test_peft_counts import build

    model = _lora(("c_attn",))(build("gpt2"))
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimate("gpt2", "lora-plus", r=4, targets="c_attn").trainable_params == real


def test_profiler_describe_carries_the_ratio():
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    from lora_cost.profiler.introspect import Observed, describe
    from tiny_models import build

    model = _lora(("q_proj", "v_proj"))(build("llama"))
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=8.0)
    info, spec, run = describe(model, opt, Observed(input_shape=(2, 24), autocast_dtype=None))
    assert info.method == "lora-plus" and info.estimable and run.method_options == (("lora_plus_ratio", 8.0),)
