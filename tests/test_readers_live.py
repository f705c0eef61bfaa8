"""`lora_cost.estimate_from(model)` on tiny meta-device models equals the estimate of the same recipe given
by flags; a regex target_modules (peft's re.fullmatch on module keys) resolves against the real model;
the profiler reads a Trainer's TrainingArguments through the --training-args reader."""

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from click.testing import CliRunner  # noqa: E402

import lora_cost  # noqa: E402
from lora_cost.cli import main  # noqa: E402
from tiny_models import CONFIGS  # noqa: E402

B, S = 2, 32


def meta_model(family, dtype=torch.bfloat16, cls=None):
    cfg = CONFIGS[family]
    config = transformers.AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    cls = cls or (transformers.AutoModelForMaskedLM if family in ("bert", "roberta") else transformers.AutoModelForCausalLM)
    with torch.device("meta"):
        return cls.from_config(config, dtype=dtype)


def config_file(tmp_path, family):
    path = tmp_path / f"{family}.json"
    path.write_text(json.dumps(CONFIGS[family]))
    return str(path)


def same(a, b):
    assert (a.method, a.r, a.targets, a.precision, a.grad_checkpointing) == (b.method, b.r, b.targets, b.precision,
                                                                             b.grad_checkpointing)
    assert a.trainable_params == b.trainable_params and a.total_params == b.total_params
    assert a.memory.peak_bytes == b.memory.peak_bytes and a.memory.saved_activation_bytes == b.memory.saved_activation_bytes
    assert (a.flops.forward, a.flops.backward) == (b.flops.forward, b.flops.backward)


CASES = [  # family, peft config (None: full fine-tuning), the equivalent flags, weight dtype
    ("llama", dict(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1),
     dict(method="lora", r=4, targets=("q_proj", "v_proj"), dropout=0.1), torch.bfloat16),
    ("llama", dict(r=8, target_modules="all-linear", use_dora=True),
     dict(method="dora", r=8, targets=("all-linear",)), torch.bfloat16),
    ("gpt2", dict(r=2, target_modules=["c_attn"]), dict(method="lora", r=2, targets=("c_attn",)), torch.float32),
    ("qwen2", dict(r=4, target_modules=["q_proj", "k_proj"]), dict(method="lora", r=4, targets=("q_proj", "k_proj")),
     torch.float16),
    ("llama", None, dict(method="full"), torch.bfloat16),
]


@pytest.mark.parametrize("family, lora, flags, dtype", CASES)
def test_estimate_from_meta_model_equals_flags(tmp_path, family, lora, flags, dtype):
    model = meta_model(family, dtype)
    if lora is not None:
        model = peft.get_peft_model(model, peft.LoraConfig(**lora))
    got = lora_cost.estimate_from(model, batch=B, seq=S)
    precision = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[dtype]
    want = lora_cost.estimate(config_file(tmp_path, family), batch=B, seq=S, precision=precision,
                              attention=got.attention, **flags)
    same(got, want)
    assert got.warnings == want.warnings


def test_estimate_from_reads_checkpointing_task_and_overrides(tmp_path):
    model = meta_model("llama")
    model.gradient_checkpointing_enable()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    got = lora_cost.estimate_from(pm, batch=B, seq=S, precision="amp-bf16")  # a keyword overrides what was read
    assert got.grad_checkpointing and got.precision == "amp-bf16"
    same(got, lora_cost.estimate(config_file(tmp_path, "llama"), "lora", r=4, targets=("q_proj", "v_proj"), batch=B,
                                 seq=S, precision="amp-bf16", grad_checkpointing=True, attention=got.attention))
    cls_model = meta_model("llama", cls=transformers.AutoModelForSequenceClassification)
    cls_peft = peft.get_peft_model(cls_model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))
    got = lora_cost.estimate_from(cls_peft, batch=B, seq=S)
    same(got, lora_cost.estimate(config_file(tmp_path, "llama"), "lora", r=4, targets=("q_proj", "v_proj"), batch=B,
                                 seq=S, task="seq-cls", num_labels=2, attention=got.attention))


def test_estimate_from_regex_subset_of_layers_warns():
    # peft: re.fullmatch on each module key; layers 0 and 1 of 3 adapted
    pm = peft.get_peft_model(meta_model("llama"), peft.LoraConfig(r=4, target_modules=r".*\.(0|1)\.self_attn\.q_proj"))
    got = lora_cost.estimate_from(pm, batch=B, seq=S)
    assert got.targets == ("q_proj",)
    assert any("2 of the 3 q_proj modules" in w for w in got.warnings)


def test_estimate_from_refuses_what_it_cannot_read():
    with pytest.raises(lora_cost.LoraCostError, match="no Hugging Face config"):
        lora_cost.estimate_from(torch.nn.Linear(4, 4, device="meta"))


def run(*args):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("family, regex, names", [
    ("llama", r".*\.(q_proj|v_proj)", ["q_proj", "v_proj"]),
    ("llama", r"model\.layers\.\d+\.mlp\.(gate|up)_proj", ["gate_proj", "up_proj"]),
    ("gpt2", r".*attn\.c_proj", ["attn.c_proj"]),  # GPT-2's c_proj is also the MLP's: named by its parent
])
def test_peft_config_regex_resolves_against_module_keys(tmp_path, family, regex, names):
    cfg = config_file(tmp_path, family)
    adapter = tmp_path / "adapter_config.json"
    adapter.write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": regex}))
    out = run("estimate", "--model", cfg, "--peft-config", str(adapter), "--json", "--engine", "analytic")
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output[out.output.index("{"):])
    assert doc["inputs"]["targets"] == names
    flags = run("estimate", "--model", cfg, "--r", "4", "--targets", ",".join(names), "--json", "--engine", "analytic")
    assert json.loads(flags.output[flags.output.index("{"):])["memory"] == doc["memory"]


def test_peft_config_regex_errors(tmp_path):
    cfg = config_file(tmp_path, "llama")
    for regex, what in ((r".*\.nothing", "matches no module"), (r"(", "not a valid regular expression"),
                        (r".*\.layers\.0", "not a linear layer")):
        adapter = tmp_path / "a.json"
        adapter.write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": regex}))
        out = run("estimate", "--model", cfg, "--peft-config", str(adapter))
        assert out.exit_code == 2 and out.output.count("\n") == 1 and what in out.output, out.output
        assert f"{adapter}: key 'target_modules'" in out.output


def test_profiler_reads_training_arguments(tmp_path):
    from lora_cost.profiler.introspect import _from_training_args

    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, report_to="none",
                                          torch_compile=False, use_liger_kernel=True,
                                          gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    extra, notes = _from_training_args(args, ("batch", "optimizer", "precision", "grad_checkpointing"))
    assert "batch" not in extra  # the live run's input shape wins
    text = "\n".join(notes)
    assert "use_reentrant" in text
    assert extra.get("loss") == "liger" or "loss" in text
