"""A TRL recipe (`trl sft --config recipe.yaml`): ScriptArguments, SFTConfig and ModelConfig keys in ONE file, read
whole by `--training-args` (task "trlmodel", issue 9). training_args.py reads the SFTConfig keys; this module the
ModelConfig ones, and how TRL 1.16 (`pip download trl==1.16.0`) turns them into the model it trains.

- trl/scripts/sft.py `make_parser`: TrlParser((ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig)) over
  the one YAML (`env:` sets environment variables first, scripts/utils.py `parse_args_and_config`); `main` builds
  model_init_kwargs = {revision, trust_remote_code, attn_implementation, dtype} from ModelConfig, updated by
  SFTConfig.model_init_kwargs, and calls SFTTrainer(model=model_name_or_path, quantization_config=
  get_quantization_config(model_args), peft_config=get_peft_config(model_args)).
- trl/trainer/model_config.py ModelConfig: dtype defaults to "float32" (choices auto, bfloat16, float16, float32),
  attn_implementation None (transformers' default: sdpa), use_peft False (full fine-tuning), lora_r 16,
  lora_alpha 32, lora_dropout 0.05, lora_target_modules None (peft's per-model default), lora_task_type CAUSAL_LM,
  load_in_4bit/load_in_8bit False (both: ValueError), bnb_4bit_quant_type nf4, use_bnb_nested_quant False,
  bnb_4bit_quant_storage None (BitsAndBytesConfig's uint8). `__post_init__` turns a one-element
  lora_target_modules list into its string (so ["all-linear"] is peft's all-linear, ["q_proj"] a regex).
- trl/trainer/utils.py get_quantization_config: BitsAndBytesConfig(load_in_4bit, bnb_4bit_compute_dtype=
  model_args.dtype, quant type, use_double_quant=use_bnb_nested_quant, quant storage) or (load_in_8bit);
  "auto" as compute dtype fails there (transformers BitsAndBytesConfig: getattr(torch, "auto")).
  get_peft_config: LoraConfig(task_type, r, target_modules, lora_alpha, lora_dropout, bias="none", use_rslora,
  use_dora, modules_to_save[, target_parameters]) when use_peft, else None.
  create_model_from_path: dtype absent -> float32; device_map "auto" on a GPU (get_kbit_device_map is gone in 1.16).
- trl/trainer/sft_trainer.py SFTTrainer.__init__: get_peft_model(model, peft_config) -- no
  prepare_model_for_kbit_training anywhere in TRL 1.16 -- then, for a quantised model (`is_loaded_in_4bit/8bit`),
  every trainable parameter except DoRA's lora_magnitude_vector is cast to bf16 ("the PEFT adapter weights are
  converted to bf16 to follow the recommendations from the original paper"); with gradient_checkpointing,
  model.enable_input_require_grads().
- trl/trainer/base_config.py _BaseConfig (SFTConfig's base): bf16 defaults to `not fp16`, gradient_checkpointing
  to True (TrainingArguments: False for both).

So a TRL QLoRA recipe with dtype bfloat16 trains 4-bit weights whose non-quantised parameters (embeddings, norms,
head) stay bf16, bf16 LoRA factors, under Trainer's bf16 autocast: `--method qlora --precision amp-bf16
--no-kbit-prepare --adapter-dtype bf16` (qlora_dtypes.py has axolotl's and Trainer's QLoRA mixes).
"""

from __future__ import annotations

from .base import Collector, Setting
from .common import DTYPE_NAMES, set_attention
from .regex import TargetRegex

MODEL_CONFIG_KEYS = (  # trl/trainer/model_config.py ModelConfig's fields
    "model_name_or_path", "model_revision", "dtype", "attn_implementation", "use_peft", "lora_r", "lora_alpha",
    "lora_dropout", "lora_target_modules", "lora_target_parameters", "lora_modules_to_save", "lora_task_type",
    "use_rslora", "use_dora", "load_in_8bit", "load_in_4bit", "bnb_4bit_quant_type", "use_bnb_nested_quant",
    "bnb_4bit_quant_storage")
# ScriptArguments and DatasetMixtureConfig (trl/scripts/utils.py) and SFTConfig keys with no cost for one step
NO_COST = ("dataset_name", "dataset_config", "dataset_train_split", "dataset_test_split", "dataset_streaming",
           "ignore_bias_buffers", "datasets", "streaming", "test_split_size", "model_revision", "lora_alpha",
           "use_rslora", "trust_remote_code", "truncation_mode")
_DTYPES = ("auto", "bfloat16", "float16", "float32")  # ModelConfig.dtype's choices
TRL_DEFAULT_DTYPE = "float32"  # ModelConfig.dtype's default (and create_model_from_path's)
TRL_DEFAULT_MAX_LENGTH = 1024  # trl/trainer/sft_config.py SFTConfig.max_length: default=1024 (the truncation length)


def is_trl_recipe(data: dict) -> bool:
    """A TRL CLI file: it holds ModelConfig keys beside the SFTConfig ones."""
    return any(k in data for k in MODEL_CONFIG_KEYS)


def anchor(c: Collector) -> str:
    """The key a TRL default is reported under: the first ModelConfig key of the file."""
    return next(k for k in c.data if k in MODEL_CONFIG_KEYS)


def init_kwargs(c: Collector) -> dict:
    """SFTConfig.model_init_kwargs (the keyword arguments SFTTrainer loads the model with): a mapping or absent."""
    init = c.raw("model_init_kwargs")
    if init is None:
        return {}
    if not isinstance(init, dict):
        raise c.error("model_init_kwargs", "must be a mapping of from_pretrained keyword arguments")
    return init


def read_model_config(c: Collector) -> tuple[str | None, str | None]:
    """The ModelConfig keys: model, attention, method and its fields. Returns (weights, quantised): the dtype the
    model is loaded in (lora-cost's spelling; None: the checkpoint's, dtype auto) and "4bit"/"8bit"/None."""
    name = c.text("model_name_or_path")
    if name:
        c.model = Setting("model", name, c.origin("model_name_or_path"))
    init = init_kwargs(c)
    weights = _weights(c, init)
    own = c.text("attn_implementation")  # read (and checked) even where model_init_kwargs' value wins
    attention = init.get("attn_implementation") or own
    if attention:
        if not isinstance(attention, str):
            raise c.error("model_init_kwargs", "attn_implementation must be a string")
        set_attention(c, "model_init_kwargs" if init.get("attn_implementation") else "attn_implementation", attention)
    four, eight = c.flag("load_in_4bit"), c.flag("load_in_8bit")
    if four and eight:  # ModelConfig.__post_init__
        raise c.error("load_in_4bit", "and load_in_8bit cannot both be true")
    quantised = "4bit" if four else "8bit" if eight else None
    if quantised and weights is None and four:
        raise c.error("dtype", "must name a dtype with load_in_4bit (TRL passes it as bnb_4bit_compute_dtype, and "
                      "BitsAndBytesConfig has no 'auto')")
    peft = c.flag("use_peft")
    if not peft:
        if quantised:
            raise c.error("use_peft", f"must be true with load_in_{quantised} (Trainer does not train a purely "
                          "quantised model)")
        c.set("method", "full", "use_peft")
        lora_keys = [k for k in ("lora_r", "lora_dropout", "lora_target_modules", "lora_modules_to_save", "use_dora",
                                 "lora_target_parameters") if c.has(k)]
        if lora_keys:
            c.note(lora_keys[0], "use_peft is not true: TRL's get_peft_config returns None (full fine-tuning), so "
                   f"{', '.join(lora_keys)} have no effect")
        c.used.update(MODEL_CONFIG_KEYS)
        return weights, None
    _lora(c, quantised)
    return weights, quantised


def _weights(c: Collector, init: dict) -> str | None:
    """model_init_kwargs' dtype (sft.py: it updates ModelConfig's), else ModelConfig.dtype, default float32."""
    own = c.text("dtype")
    if own is not None and own not in _DTYPES:
        raise c.error("dtype", f"must be one of {', '.join(_DTYPES)}")
    key = "model_init_kwargs" if init.get("dtype", init.get("torch_dtype")) is not None else "dtype"
    value = init.get("dtype", init.get("torch_dtype")) if key == "model_init_kwargs" else own
    if value is None and c.raw("torch_dtype") is not None:
        # ModelConfig's field before its rename to dtype; `trl sft` parses the file with
        # parse_args_and_config(fail_with_unknown_args=False) (scripts/sft.py main), so an unknown key is dropped
        value = TRL_DEFAULT_DTYPE
        c.warn("torch_dtype", "TRL 1.16's ModelConfig has no torch_dtype (now dtype) and `trl sft` ignores unknown "
               "keys: the model loads in float32, as estimated (write dtype: bfloat16 for 16-bit weights)")
    elif value is None:
        value = TRL_DEFAULT_DTYPE
        c.note(anchor(c), "no dtype: TRL's ModelConfig loads the model in float32 (its default, unlike "
               "from_pretrained's auto)")
    if not isinstance(value, str) or (value not in _DTYPES and value not in DTYPE_NAMES):
        raise c.error(key, f"must be one of {', '.join(_DTYPES)}")
    return None if value == "auto" else DTYPE_NAMES[value]


def _lora(c: Collector, quantised: str | None) -> None:
    """get_peft_config's LoraConfig (bias "none"), on a 4-bit (qlora), 8-bit (lora-8bit) or plain base."""
    dora = c.flag("use_dora")
    if quantised == "4bit":
        c.set("method", "qlora", "load_in_4bit")
        if dora:
            c.warn("use_dora", "DoRA on 4-bit weights is not modelled; estimated as QLoRA")
        quant_type = c.text("bnb_4bit_quant_type", ("nf4", "fp4")) or "nf4"
        c.set("quant_type", quant_type, "bnb_4bit_quant_type" if c.has("bnb_4bit_quant_type") else "load_in_4bit")
        # TRL's default is no double quantisation (use_bnb_nested_quant False), lora-cost's qlora default is on
        c.set("double_quant", bool(c.flag("use_bnb_nested_quant")),
              "use_bnb_nested_quant" if c.has("use_bnb_nested_quant") else "load_in_4bit")
        storage = c.text("bnb_4bit_quant_storage")
        if storage is not None:
            if storage != "uint8" and storage not in DTYPE_NAMES:
                raise c.error("bnb_4bit_quant_storage", "must be uint8, bfloat16, float16 or float32")
            c.set("quant_storage", DTYPE_NAMES.get(storage, storage), "bnb_4bit_quant_storage")
    elif quantised == "8bit":
        if dora:
            c.warn("use_dora", "DoRA on 8-bit weights is not modelled; estimated as LoRA on the 8-bit base")
        c.set("method", "lora-8bit", "load_in_8bit")
    else:
        c.set("method", "dora" if dora else "lora", "use_dora" if dora else "use_peft")
    for key in ("bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage"):
        if c.has(key) and quantised != "4bit":
            c.note(key, "read only with load_in_4bit (TRL's get_quantization_config)")
        c.used.add(key)
    if c.has("lora_r"):
        c.set("r", c.integer("lora_r"), "lora_r")
    else:
        c.set("r", 16, "use_peft")  # ModelConfig.lora_r's default
    dropout = c.number("lora_dropout")
    c.set("dropout", 0.05 if dropout is None else dropout, "lora_dropout" if dropout is not None else "use_peft")
    targets = c.names("lora_target_modules")
    if isinstance(targets, tuple) and len(targets) == 1:  # ModelConfig.__post_init__: one name -> the string
        targets = targets[0]
        if targets != "all-linear":
            c.note("lora_target_modules", f"TRL's ModelConfig turns a one-element list into the string {targets!r}, "
                   "which peft matches as a regex against the full module names (re.fullmatch)")
    if targets == "all-linear":
        c.set("targets", ("all-linear",), "lora_target_modules")
    elif isinstance(targets, str):
        c.set("targets", TargetRegex(targets), "lora_target_modules")
    elif targets:
        c.set("targets", targets, "lora_target_modules")
    else:
        c.note("use_peft", "no lora_target_modules: peft's default targets (the query and value projections)")
    saved = c.names("lora_modules_to_save")
    if saved:
        c.set("modules_to_save", (saved,) if isinstance(saved, str) else saved, "lora_modules_to_save")
    if c.raw("lora_target_parameters"):
        c.warn("lora_target_parameters", "LoRA on parameters (peft target_parameters, MoE experts) is not modelled")
    task = c.text("lora_task_type")
    if task not in (None, "CAUSAL_LM"):
        c.warn("lora_task_type", f"{task}: `trl sft` still loads the causal LM (AutoModelForCausalLM); estimated as "
               "that")


def kbit_dtypes(c: Collector, quantised: str, weights: str | None, bf16: bool, fp16: bool, key: str) -> None:
    """The dtypes SFTTrainer leaves a quantised model in (module doc): no prepare_model_for_kbit_training, the
    non-quantised parameters in the load dtype, the trainable ones cast to bf16, Trainer's autocast on top."""
    if quantised == "8bit":
        c.set("precision", weights or "bf16", key)
        c.warn("load_in_8bit", f"TRL skips prepare_model_for_kbit_training (the non-int8 parameters stay "
               f"{weights or 'in the checkpoint dtype'}) and casts the adapters to bf16"
               f"{', under bf16 autocast' if bf16 else ''}; lora-8bit models peft's recipe (prepare's fp32 non-int8 "
               f"parameters, fp32 adapters, no autocast): estimated as that, loaded in {weights or 'bf16'}")
        return
    if fp16 or not bf16:
        half = "fp16" if weights == "fp16" or fp16 else "bf16"
        c.set("precision", half, key)
        c.set("kbit_prepare", False, "dtype")  # origin "dtype": not axolotl's mix (qlora_dtypes.axolotl_family)
        c.set("adapter_dtype", "bf16", key)
        if fp16 or weights != "bf16":
            c.warn(key, f"QLoRA loaded in {weights} with {'fp16 autocast' if fp16 else 'no autocast'} and TRL's bf16 "
                   "adapters is not modelled: estimated as 16-bit non-quantised parameters without autocast "
                   f"(--precision {half} --no-kbit-prepare --adapter-dtype bf16)")
        return
    c.set("precision", "amp-bf16", key)
    c.set("adapter_dtype", "bf16", key)
    if weights == "fp32":
        # the non-quantised parameters fp32 as prepare_model_for_kbit_training would leave them (kbit_prepare on)
        c.set("kbit_prepare", True, "dtype")
        c.warn("dtype", "float32 with load_in_4bit: TRL also passes it as bnb_4bit_compute_dtype, so the 4-bit "
               "weights dequantise to fp32 before autocast casts them to bf16; lora-cost dequantises to bf16 (each "
               "layer's dequantised-weight temporary is under-counted by half); fp32 embeddings, norms and head, bf16 "
               "adapters, amp-bf16 are modelled")
    else:
        c.set("kbit_prepare", False, "dtype")
        if weights == "fp16":
            c.warn("dtype", "float16 with bf16 autocast: estimated as bf16 non-quantised parameters and compute "
                   "dtype (the same bytes)")
    c.note(key, f"TRL SFTTrainer over a 4-bit model: no prepare_model_for_kbit_training, non-quantised parameters "
           f"in {weights}, adapters cast to bf16, Trainer bf16 autocast: --precision amp-bf16 "
           f"{'--kbit-prepare' if weights == 'fp32' else '--no-kbit-prepare'} --adapter-dtype bf16")


def alloc_conf(c: Collector) -> None:
    """`env:` (TrlParser sets these environment variables before training): PYTORCH_CUDA_ALLOC_CONF -> --alloc-conf."""
    env = c.raw("env")
    if env is None:
        return
    if not isinstance(env, dict):
        raise c.error("env", "must be a mapping of environment variables")
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        if isinstance(env.get(name), str):
            c.set("alloc_conf", env[name], "env")
            return
