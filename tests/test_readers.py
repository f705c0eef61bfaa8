"""--peft-config, --training-args, --axolotl (lora_cost/readers): each key's mapping, the warnings for
what lora-cost does not model, one-line errors naming the file and the key, explicit flags overriding
the files, and the example files end to end through the CLI (the same numbers as the equivalent flags)."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_cost.cli import main
from lora_cost.errors import LoraCostError
from lora_cost.readers import read_files, settings_for
from lora_cost.readers.base import estimate_keywords

pytestmark = pytest.mark.fast

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "configs"
AXOLOTL = str(EXAMPLES / "qlora-llama-3.1-8b.axolotl.yml")
SFT_ARGS = str(EXAMPLES / "sft_training_args.json")
ADAPTER = str(EXAMPLES / "adapter_config.json")


def run(*args):
    return CliRunner().invoke(main, list(args))


def write(tmp_path, name, data) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else data)
    return str(path)


def read(model="llama-3.2-1b", **files):
    reading = read_files(**files)
    return reading, settings_for(model, reading)


def modelled_or_warned(found, target, value):
    """A target another option adds (attention kernels, --packing, --loss, ...): mapped once this lora-cost
    has the field and accepts the value, else a warning naming it."""
    if target in found.kwargs:
        assert found.kwargs[target] == value
    else:
        assert any(target in w or str(value) in w for w in found.warnings), found.warnings


# --- peft adapter_config.json ------------------------------------------------------------------
def test_peft_lora_fields(tmp_path):
    path = write(tmp_path, "adapter_config.json", {
        "peft_type": "LORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.1, "use_rslora": True,
        "target_modules": ["q_proj", "v_proj"], "init_lora_weights": "pissa_niter_4", "fan_in_fan_out": False,
        "task_type": "CAUSAL_LM", "bias": "none", "alpha_pattern": {}, "rank_pattern": {}})
    reading, found = read(peft_config=path)
    assert found.kwargs == {"method": "lora", "r": 16, "dropout": 0.1, "targets": ("q_proj", "v_proj")}
    assert found.warnings == ()  # every key understood: alpha, rsLoRA, PiSSA init change no byte and no FLOP


def test_peft_dora_all_linear_and_methods(tmp_path):
    found = read(peft_config=write(tmp_path, "a.json", {"peft_type": "LORA", "r": 8, "use_dora": True,
                                                        "target_modules": "all-linear"}))[1]
    assert found.kwargs["method"] == "dora" and found.kwargs["targets"] == ("all-linear",)
    cases = [({"peft_type": "VERA", "r": 256, "vera_dropout": 0.0, "target_modules": ["q_proj"]},
              {"method": "vera", "r": 256, "dropout": 0.0, "targets": ("q_proj",)}, {}),
             ({"peft_type": "ADALORA", "init_r": 12, "target_r": 4, "r": 8, "target_modules": ["q_proj"]},
              {"method": "adalora", "targets": ("q_proj",)}, {"init_r": 12, "target_r": 4}),
             ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 30}, {"method": "prompt-tuning"}, {"virtual_tokens": 30}),
             ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 10, "prefix_projection": True,
               "encoder_hidden_size": 64}, {"method": "prefix-tuning"}, {"virtual_tokens": 10, "prefix_projection": 64}),
             ({"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"],
               "feedforward_modules": ["down_proj"]}, {"method": "ia3", "targets": ("k_proj", "v_proj", "down_proj")}, {})]
    for data, kwargs, options in cases:
        found = read(peft_config=write(tmp_path, "c.json", data))[1]
        assert found.kwargs == kwargs and found.method_options == options and not found.warnings, (data, found)
    odd = read(peft_config=write(tmp_path, "d.json", {"peft_type": "IA3", "target_modules": ["k_proj", "up_proj"],
                                                      "feedforward_modules": ["up_proj"]}))[1]
    assert any("feedforward_modules" in w for w in odd.warnings)


def test_peft_unmodelled_fields_warn(tmp_path):
    path = write(tmp_path, "adapter_config.json", {
        "peft_type": "LORA", "r": 8, "target_modules": ["q_proj"], "layers_to_transform": [0, 1],
        "rank_pattern": {"q_proj": 4}, "bias": "all", "modules_to_save": ["lm_head"], "brand_new_field": 1})
    found = read(peft_config=path)[1]
    text = "\n".join(found.warnings)
    for key in ("layers_to_transform", "rank_pattern", "'bias'", "brand_new_field"):
        assert key in text and path in text, (key, text)
    modelled_or_warned(found, "modules_to_save", ("lm_head",))
    # the task's own classification head is peft's modules_to_save too, counted by --task: not repeated
    cls = read(peft_config=write(tmp_path, "cls.json", {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"],
                                                        "task_type": "SEQ_CLS", "modules_to_save": ["score"]}))[1]
    assert cls.kwargs["task"] == "seq-cls" and "modules_to_save" not in cls.kwargs
    assert not any("modules_to_save" in w for w in cls.warnings)


@pytest.mark.parametrize("data, key", [
    ({"peft_type": "LOHA", "r": 8}, "peft_type"),
    ({"peft_type": "LORA", "r": "16"}, "r"),
    ({"peft_type": "LORA", "r": 0}, "r"),
    ({"peft_type": "LORA", "r": 8, "lora_dropout": 1.5}, "lora_dropout"),
    ({"peft_type": "LORA", "r": 8, "target_modules": [1, 2]}, "target_modules"),
    ({"peft_type": "LORA", "r": 8, "init_lora_weights": "magic"}, "init_lora_weights"),
    ({"peft_type": "LORA", "r": 8, "use_dora": "yes"}, "use_dora"),
    ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": -3}, "num_virtual_tokens"),
])
def test_peft_invalid_values_name_file_and_key(tmp_path, data, key):
    path = write(tmp_path, "adapter_config.json", data)
    with pytest.raises(LoraCostError) as err:
        read(peft_config=path)
    assert str(err.value).startswith(f"{path}: key {key!r}") and "\n" not in str(err.value)
    out = run("estimate", "--model", "llama-3.2-1b", "--peft-config", path)
    assert out.exit_code == 2 and out.output.count("\n") == 1 and f"key {key!r}" in out.output


# --- TrainingArguments / SFTConfig ---------------------------------------------------------------
def test_training_args_fields(tmp_path):
    args = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 8, "gradient_checkpointing": True,
            "bf16": True, "optim": "paged_adamw_8bit", "max_length": 1024, "learning_rate": 2e-4,
            "output_dir": "out", "report_to": "none"}
    reading, found = read(training_args=write(tmp_path, "args.json", args))
    assert found.kwargs == {"batch": 4, "seq": 1024, "grad_checkpointing": True, "precision": "bf16",
                            "optimizer": "paged-adamw-8bit"}
    assert found.warnings == ()
    notes = "\n".join(reading.notes)
    assert "gradient_accumulation_steps" in notes and "change no memory" in notes and "amp-bf16" in notes
    # YAML says the same
    yml = write(tmp_path, "args.yaml", "\n".join(f"{k}: {json.dumps(v)}" for k, v in args.items()))
    assert read(training_args=yml)[1].kwargs == found.kwargs


def test_training_args_precision_and_optimizer(tmp_path):
    def kw(**args):
        return read(training_args=write(tmp_path, "a.json", args))[1]
    # Trainer's bf16 over fp32 weights (SFTTrainer model_init_kwargs) is autocast: amp-bf16
    assert kw(bf16=True, model_init_kwargs={"dtype": "float32"}, optim="sgd").kwargs["precision"] == "amp-bf16"
    assert kw(fp16=True, model_init_kwargs={"torch_dtype": "float16"}, optim="sgd").kwargs["precision"] == "fp16"
    assert "precision" not in kw(optim="sgd").kwargs  # neither flag, dtype unknown: --precision decides
    # adamw_torch is torch.optim.AdamW (foreach): today's "adamw", or its own name once registered
    assert kw(optim="adamw_torch").kwargs["optimizer"] in ("adamw", "adamw-torch")
    assert kw(optim="adamw_bnb_8bit").kwargs["optimizer"] in ("adamw-8bit", "adamw-bnb-8bit")
    # absent: Trainer's default adamw_torch_fused, modelled or named in a warning
    modelled_or_warned(kw(), "optimizer", "adamw-torch-fused")
    sgd = kw(optim="sgd")
    assert sgd.kwargs["optimizer"] == "sgd" and any("momentum" in w for w in sgd.warnings)
    with pytest.raises(LoraCostError, match="key 'bf16'"):
        kw(bf16=True, fp16=True)


def test_training_args_unmodelled_warn(tmp_path):
    path = write(tmp_path, "a.json", {
        "optim": "adamw_torch", "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True},
        "torch_compile": True, "use_liger_kernel": True, "packing": True, "fsdp": "full_shard offload auto_wrap",
        "some_future_flag": 3})
    found = read(training_args=path)[1]
    text = "\n".join(found.warnings)
    for key in ("use_reentrant", "torch_compile", "some_future_flag"):
        assert key in text, key
    modelled_or_warned(found, "loss", "liger")
    modelled_or_warned(found, "packing", True)
    modelled_or_warned(found, "sharding", "fsdp")
    assert "sharding_options" in found.kwargs or "cpu_offload" in text


def test_deepspeed_stage_read_from_its_file(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": "auto"}))
    path = write(tmp_path, "a.json", {"deepspeed": "ds.json", "optim": "sgd"})  # found beside the training args
    found = read(training_args=path)[1]
    modelled_or_warned(found, "sharding", "zero3")
    out = run("estimate", "--model", "gpt2", "--training-args", path)
    assert out.exit_code == 0 and ("--gpus N" in out.output or "does not model" in out.output), out.output
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 5}}))
    with pytest.raises(LoraCostError, match="key 'deepspeed'.*stage"):
        read(training_args=path)
    missing = write(tmp_path, "b.json", {"deepspeed": "elsewhere/ds.json", "optim": "sgd"})
    assert any("not found" in w for w in read(training_args=missing)[1].warnings)


def test_targets_other_options_add_are_used_once_they_exist(tmp_path, monkeypatch):
    """After the attention/optimizer/loss/sharding options merge, the same files map to them: simulated
    here by widening the keyword list the readers check against (the real list is estimate()'s signature)."""
    import lora_cost.readers.base as base

    wider = estimate_keywords() | {"packing", "loss", "gpus", "sharding", "sharding_options", "modules_to_save",
                                   "load_in_8bit", "quant_storage"}
    monkeypatch.setattr(base, "estimate_keywords", lambda: wider)
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    found = read(training_args=write(tmp_path, "a.json", {"use_liger_kernel": True, "packing": True, "optim": "sgd",
                                                           "deepspeed": "ds.json", "ddp_bucket_cap_mb": 50}))[1]
    assert found.kwargs["loss"] == "liger" and found.kwargs["packing"] is True and found.kwargs["sharding"] == "zero2"
    assert found.kwargs["sharding_options"] == {"deepspeed_config": str(tmp_path / "ds.json"), "bucket_cap_mb": 50}
    axo = read(axolotl=write(tmp_path, "a.yml", "adapter: lora\nload_in_8bit: true\nlora_modules_to_save: [embed_tokens]\n"
                                                "chunked_cross_entropy: true\nchunked_cross_entropy_num_chunks: 4\n"))[1]
    assert (axo.kwargs["method"], axo.kwargs["modules_to_save"], axo.kwargs["loss"]) == (
        "lora-8bit", ("embed_tokens",), "chunked:4")  # issue9b: load_in_8bit is the lora-8bit method
    assert not any("does not model" in w for w in found.warnings + axo.warnings)


@pytest.mark.parametrize("data, key", [
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
    ({"max_length": "long"}, "max_length"),
    ({"gradient_checkpointing": "true"}, "gradient_checkpointing"),
    ({"optim": 3}, "optim"),
    ({"model_init_kwargs": {"dtype": "float8"}}, "model_init_kwargs"),
])
def test_training_args_errors(tmp_path, data, key):
    path = write(tmp_path, "args.json", data)
    out = run("estimate", "--model", "gpt2", "--training-args", path)
    assert out.exit_code == 2 and out.output.count("\n") == 1, out.output
    assert out.output.startswith(f"lora-cost: error: {path}: key {key!r}")


def test_unreadable_files_are_one_line(tmp_path):
    bad_yaml = write(tmp_path, "a.yml", "micro_batch_size: [1, 2\n")
    not_mapping = write(tmp_path, "b.yml", "- 1\n- 2\n")
    for flag, path in (("--axolotl", bad_yaml), ("--axolotl", not_mapping), ("--training-args", str(tmp_path / "none.json"))):
        out = run("estimate", "--model", "gpt2", flag, path)
        assert out.exit_code == 2 and out.output.count("\n") == 1 and "error" in out.output, out.output


# --- axolotl ----------------------------------------------------------------------------------
def test_axolotl_example_fields():
    reading, found = read(axolotl=AXOLOTL)
    assert reading.model.value == "meta-llama/Llama-3.1-8B"
    want = {"method": "qlora", "seq": 4096, "batch": 2, "r": 32, "dropout": 0.05, "targets": ("all-linear",),
            "grad_checkpointing": True, "precision": "amp-bf16", "optimizer": "paged-adamw-32bit"}
    assert {k: found.kwargs[k] for k in want} == want
    # task "axodtype": axolotl's loader returns norms, embeddings and head to bf16 after kbit preparation and stores
    # the 4-bit weights in bf16 (tests/test_readers_axodtype.py)
    assert found.method_options["kbit_prepare"] is False and found.method_options["quant_storage"] == "bf16"
    modelled_or_warned(found, "attention", "flash-attention-2")
    assert not any("keys lora-cost does not read" in w for w in found.warnings)  # every key of the example known


def test_axolotl_keys(tmp_path):
    def kw(text):
        return read(axolotl=write(tmp_path, "a.yml", "base_model: gpt2\n" + text))[1]
    assert kw("adapter: lora\nlora_r: 4\nlora_target_modules:\n  - c_attn\nsdp_attention: true\n").kwargs == {
        "method": "lora", "r": 4, "targets": ("c_attn",), "attention": "sdpa"}
    assert kw("micro_batch_size: 2\n").kwargs == {"method": "full", "batch": 2}  # no adapter: full fine-tuning
    assert kw("adapter: lora\npeft_use_dora: true\n").kwargs["method"] == "dora"
    plus = kw("adapter: lora\nloraplus_lr_ratio: 8\n")
    assert plus.kwargs["method"] == "lora-plus" and plus.method_options == {"lora_plus_ratio": 8.0}
    q = kw("adapter: qlora\nload_in_4bit: true\nbnb_config_kwargs:\n  bnb_4bit_quant_type: fp4\n"
           "  bnb_4bit_use_double_quant: false\n")
    assert q.kwargs["method"] == "qlora" and q.method_options == {"quant_type": "fp4", "double_quant": False}
    assert kw("adapter: lora\nload_in_8bit: true\n").kwargs["method"] == "lora-8bit"  # issue9b
    modelled_or_warned(kw("adapter: lora\nsample_packing: true\n"), "packing", True)
    modelled_or_warned(kw("adapter: lora\nchunked_cross_entropy: true\n"), "loss", "chunked")
    modelled_or_warned(kw("adapter: lora\nlora_modules_to_save: [lm_head]\n"), "modules_to_save", ("lm_head",))
    off = kw("adapter: lora\ngradient_checkpointing: offload\n")
    assert off.kwargs["grad_checkpointing"] is True and any("offload" in w for w in off.warnings)


@pytest.mark.parametrize("text, key", [
    ("adapter: ia3\n", "adapter"),
    ("adapter: lora\nmicro_batch_size: two\n", "micro_batch_size"),
    ("adapter: lora\nlora_r: 8.5\n", "lora_r"),
    ("adapter: qlora\nload_in_8bit: true\n", "adapter"),
    ("adapter: lora\nbf16: maybe\n", "bf16"),
    ("adapter: lora\nflash_attention: true\nsdp_attention: true\n", "sdp_attention"),
    ("adapter: lora\nlora_dropout: 2\n", "lora_dropout"),
    ("adapter: qlora\nbnb_config_kwargs:\n  bnb_4bit_quant_type: int3\n", "bnb_config_kwargs"),
])
def test_axolotl_errors(tmp_path, text, key):
    path = write(tmp_path, "a.yml", "base_model: gpt2\n" + text)
    out = run("estimate", "--axolotl", path)
    assert out.exit_code == 2 and out.output.count("\n") == 1, out.output
    assert out.output.startswith(f"lora-cost: error: {path}: key {key!r}")


def test_axolotl_unknown_base_model_names_the_key(tmp_path):
    path = write(tmp_path, "a.yml", "base_model: someone/NotAModel-9B\nadapter: lora\n")
    out = run("estimate", "--axolotl", path)
    assert out.exit_code == 2 and f"{path}: key 'base_model'" in out.output
    assert run("estimate", "--axolotl", path, "--model", "gpt2", "--targets", "c_attn").exit_code == 0  # --model wins
    assert "--model is required" in run("estimate", "--r", "8").output


# --- end to end: the files give the numbers the flags give ------------------------------------
def _json(out):
    assert out.exit_code == 0, out.output
    text = out.output[out.output.index("{"):]
    return json.loads(text)


def _flags(inputs: dict) -> list[str]:
    args = ["--model", inputs["model"], "--method", inputs["method"], "--batch", str(inputs["batch"]),
            "--seq", str(inputs["seq"]), "--precision", inputs["precision"], "--optimizer", inputs["optimizer"],
            "--attention", inputs["attention"], "--dropout", str(inputs["dropout"])]
    if inputs.get("r") is not None:
        args += ["--r", str(inputs["r"])]
    if inputs.get("targets"):
        args += ["--targets", ",".join(inputs["targets"])]
    args.append("--grad-checkpointing" if inputs["grad_checkpointing"] else "--no-grad-checkpointing")
    for k, v in (inputs.get("method_options") or {}).items():
        args += ([f"--{k.replace('_', '-')}"] if v is True else [f"--no-{k.replace('_', '-')}"] if v is False else
                 [f"--{k.replace('_', '-')}", v] if isinstance(v, str) else [])
    return args


@pytest.mark.parametrize("files, expect", [
    (["--axolotl", AXOLOTL], dict(model="llama-3.1-8b", method="qlora", r=32, batch=2, seq=4096, precision="amp-bf16",
                                  optimizer="paged-adamw-32bit", grad_checkpointing=True)),
    (["--peft-config", ADAPTER, "--training-args", SFT_ARGS], dict(model="qwen2.5-7b", method="lora", r=16, batch=4,
                                                                   seq=2048, precision="bf16", grad_checkpointing=True)),
])
def test_examples_equal_their_flags(files, expect):
    doc = _json(run("estimate", *files, "--json", "--engine", "analytic"))
    assert {k: doc["inputs"][k] for k in expect} == expect
    flags = _json(run("estimate", *_flags(doc["inputs"]), "--json", "--engine", "analytic"))
    assert flags["inputs"] == doc["inputs"]
    assert flags["memory"]["peak_bytes"] == doc["memory"]["peak_bytes"]
    assert flags["flops"] == doc["flops"]


def test_explicit_flags_override_files():
    doc = _json(run("estimate", "--axolotl", AXOLOTL, "--r", "8", "--seq", "1024", "--method", "lora",
                    "--targets", "q_proj,v_proj", "--no-grad-checkpointing", "--json"))
    inputs = doc["inputs"]
    assert (inputs["r"], inputs["seq"], inputs["method"], inputs["targets"], inputs["grad_checkpointing"]) == (
        8, 1024, "lora", ["q_proj", "v_proj"], False)
    assert inputs["batch"] == 2 and inputs["optimizer"] == "paged-adamw-32bit"  # not given: the file's
    q = _json(run("estimate", "--axolotl", AXOLOTL, "--quant-type", "fp4", "--json"))
    assert q["inputs"]["method_options"]["quant_type"] == "fp4"
    # the later file wins over the earlier (axolotl, then training args, then peft config)
    both = _json(run("estimate", "--axolotl", AXOLOTL, "--training-args", SFT_ARGS, "--json"))
    assert both["inputs"]["batch"] == 4 and both["inputs"]["seq"] == 2048 and both["inputs"]["model"] == "llama-3.1-8b"


def test_plan_reads_files():
    doc = _json(run("plan", "--axolotl", AXOLOTL, "--gpu", "rtx-4090-24gb", "--r", "8-32", "--batch", "1-4", "--json"))
    assert (doc["model"], doc["seq"], doc["optimizer"], doc["targets"], doc["precision"]) == (
        "llama-3.1-8b", 4096, "paged-adamw-32bit", ["all-linear"], "amp-bf16")  # axolotl QLoRA: Trainer autocast
    assert {m["method"] for m in doc["methods"]} == {"qlora"}  # the file's method; --methods would override
    assert doc["batch_range"] == [1, 4] and doc["ranks"] == [8, 16, 32]  # plan searches these, not the file's


def test_help_says_flags_override():
    out = run("estimate", "--help")
    assert "--axolotl" in out.output and "override" in out.output
    assert "--peft-config" in run("plan", "--help").output


def test_reader_targets_exist_today_or_warn():
    """Every target a reader sets is an estimate() keyword or a method option, or it is warned about: the
    list of keywords is read from estimate()'s signature (no hand-kept copy)."""
    assert {"batch", "seq", "r", "targets", "precision", "optimizer", "attention", "grad_checkpointing",
            "dropout", "task"} <= estimate_keywords()


def test_reading_files_imports_no_torch():
    """The readers are torch-free (a regex target_modules alone builds the model on the meta device)."""
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from lora_cost.cli import main; "
            f"r = CliRunner().invoke(main, ['estimate', '--axolotl', {AXOLOTL!r}, '--training-args', {SFT_ARGS!r}, "
            f"'--peft-config', {ADAPTER!r}, '--json']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
