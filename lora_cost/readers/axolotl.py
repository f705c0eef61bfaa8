"""`--axolotl FILE.yml`: an axolotl training config (axolotl's `AxolotlInputConfig`,
src/axolotl/utils/schemas/config.py), the YAML users launch with `axolotl train FILE.yml`.

Keys read: base_model (a bundled profile, its Hub id, or a local config.json/directory) -> --model;
adapter lora|qlora (absent: full fine-tuning) + load_in_4bit -> qlora, peft_use_dora -> dora; lora_r -> r;
lora_dropout; lora_target_modules (list or regex) / lora_target_linear -> targets; lora_modules_to_save;
sequence_len -> seq; micro_batch_size -> batch; gradient_checkpointing (true; "offload"/"unsloth" not
modelled) and its kwargs; optimizer (Trainer's names); bf16/fp16 (+ torch_dtype); flash_attention ->
flash-attention-2, sdp_attention -> sdpa, flex_attention -> flex, eager_attention -> eager;
sample_packing -> packing; load_in_8bit -> lora-8bit; bnb_config_kwargs (quant type, double quant, quant storage);
QLoRA's dtypes as axolotl's loader leaves them (amp-bf16, bf16 embeddings/norms/head, bf16-stored 4-bit weights)
and peft_autocast_adapter_dtype (qlora_dtypes.py);
liger_fused_linear_cross_entropy / chunked_cross_entropy -> loss; deepspeed; fsdp; torch_compile (warns).
"""

from __future__ import annotations

from .base import Collector, Reading, Setting, load_mapping
from .common import DTYPE_NAMES, precision_from, set_attention, set_deepspeed, set_optimizer, set_sharding
from .qlora_dtypes import axolotl_adapter_dtype, axolotl_full_dtypes, axolotl_qlora_precision
from .regex import TargetRegex

_NO_COST = (  # axolotl keys with no effect on one training step's memory or FLOPs
    "base_model_config", "model_type", "tokenizer_type", "tokenizer_config", "trust_remote_code", "strict",
    "datasets", "test_datasets", "dataset_prepared_path", "val_set_size", "output_dir", "lora_alpha",
    "lora_fan_in_fan_out", "peft_use_rslora", "wandb_project", "wandb_entity", "wandb_watch", "wandb_name",
    "wandb_log_model", "wandb_run_id", "num_epochs", "max_steps", "learning_rate", "lr_scheduler", "warmup_steps",
    "warmup_ratio", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "train_on_inputs",
    "group_by_length", "tf32", "early_stopping_patience", "resume_from_checkpoint", "local_rank", "logging_steps",
    "xformers_attention", "evals_per_epoch", "eval_steps", "saves_per_epoch", "save_steps", "save_total_limit",
    "debug", "seed", "special_tokens", "tokens", "eval_sample_packing", "pad_to_sequence_len", "chat_template",
    "hub_model_id", "hf_use_auth_token", "dataset_processes", "eval_batch_size", "eval_table_size",
    "eval_max_new_tokens", "lora_model_dir", "lora_on_cpu", "bnb_config_kwargs", "plugins", "torch_dtype",
    "load_in_4bit", "peft_use_dora", "lora_target_linear", "gradient_accumulation_steps", "shuffle_merged_datasets",
    "remove_unused_columns", "flash_attn_cross_entropy", "flash_attn_rms_norm", "flash_attn_fuse_qkv",
    "flash_attn_fuse_mlp", "fsdp_config", "fsdp_version", "gradient_checkpointing_kwargs", "s2_attention",
    "cosine_min_lr_ratio", "optim_args", "save_safetensors", "report_to", "use_wandb", "use_mlflow",
    "torch_compile_backend", "torch_compile_mode", "trl", "rl", "unfrozen_parameters", "is_llama_derived_model",
    "is_mistral_derived_model", "is_qwen_derived_model", "sequence_parallel_degree", "hub_strategy", "save_strategy",
    "eval_strategy", "evaluation_strategy", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_prefetch_factor", "low_cpu_mem_usage", "auto_resume_from_checkpoints", "use_tensorboard",
    "cosine_constant_lr_ratio", "loraplus_lr_embedding", "dataset_shard_num", "dataset_shard_idx", "shuffle_before_merging_datasets",
    "save_first_step", "include_tokens_per_second", "eval_causal_lm_metrics", "do_causal_lm_eval", "profiler_steps",
    "loraplus_lr_ratio")


def read_axolotl(path: str) -> Reading:
    c = Collector(path, load_mapping(path, "an axolotl config"), "axolotl config")
    base = c.text("base_model")
    if base:
        c.model = Setting("model", base, c.origin("base_model"))
    _method(c)
    if c.has("sequence_len"):
        c.set("seq", c.integer("sequence_len"), "sequence_len")
    if c.has("micro_batch_size"):
        c.set("batch", c.integer("micro_batch_size"), "micro_batch_size")
    steps = c.integer("gradient_accumulation_steps")
    if steps and steps > 1:
        c.note("gradient_accumulation_steps", f"{steps} micro-batches per optimizer step change no memory (each "
               "backward adds into the same .grad tensors) and the FLOPs are per micro-batch")
    _checkpointing(c)
    weights = None
    if c.has("torch_dtype"):
        dtype = c.text("torch_dtype")
        if dtype not in DTYPE_NAMES and dtype != "auto":
            raise c.error("torch_dtype", f"must be one of {', '.join(DTYPE_NAMES)} or auto")
        weights = DTYPE_NAMES.get(dtype)
    bf16 = c.raw("bf16")
    if bf16 not in (None, True, False, "auto", "full"):
        raise c.error("bf16", "must be true, false, auto or full")
    # axolotl: bf16 "auto" means bf16 where the GPU supports it (sm80+, what lora-cost models); "full" loads
    # the model in bf16 with no autocast, which is precision bf16 too
    fp16 = c.flag("fp16")
    if _qlora(c) and not _fsdp(c):  # task "axodtype": the dtypes axolotl's loader leaves a QLoRA model in
        if bf16 and fp16:
            raise c.error("bf16", "bf16 and fp16 cannot both be true")
        axolotl_qlora_precision(c, bf16, fp16)
    else:
        precision_from(c, "bf16" if bf16 else "fp16", bf16 in (True, "auto", "full"), fp16,
                       weights or ("bf16" if bf16 == "full" else None))
    axolotl_adapter_dtype(c, bf16, fp16)
    if not c.data.get("adapter") and not _fsdp(c):
        axolotl_full_dtypes(c, bool(bf16 or fp16))
    optimizer = c.text("optimizer")
    if optimizer:
        set_optimizer(c, "optimizer", optimizer)
    _attention(c)
    if c.flag("sample_packing"):
        c.set("packing", True, "sample_packing")
    if c.flag("liger_fused_linear_cross_entropy"):
        c.set("loss", "liger", "liger_fused_linear_cross_entropy")
    # axolotl's Liger plugin (integrations/liger: LigerArgs) passes these to apply_liger_kernel_to_<type>
    kernels = tuple(kernel for key, kernel in (("liger_rms_norm", "rms_norm"), ("liger_rope", "rope"),
                                               ("liger_glu_activation", "swiglu")) if c.flag(key))
    if kernels:
        c.set("liger_kernels", kernels, ",".join(k for k in ("liger_rms_norm", "liger_rope", "liger_glu_activation")
                                                 if c.data.get(k)))
    if c.flag("liger_layer_norm"):
        c.warn("liger_layer_norm", "Liger's LayerNorm is not modelled (the families it models use RMSNorm)")
    if c.flag("liger_cross_entropy"):
        c.warn("liger_cross_entropy", "Liger's unfused cross-entropy is not modelled; the loss is transformers'")
    chunked = c.raw("chunked_cross_entropy")
    if chunked:
        if not isinstance(chunked, bool):
            raise c.error("chunked_cross_entropy", "must be true or false")
        n = c.integer("chunked_cross_entropy_num_chunks")
        c.set("loss", f"chunked:{n}" if n else "chunked", "chunked_cross_entropy")
    c.raw("chunked_cross_entropy_num_chunks")
    if c.flag("torch_compile"):
        c.warn("torch_compile", "torch.compile fuses kernels and changes what is saved; not modelled")
    if c.has("deepspeed"):
        set_deepspeed(c, "deepspeed")
    if c.has("fsdp") and c.data["fsdp"] not in ("", []):
        set_sharding(c, "fsdp", c.raw("fsdp"))
    _qlora_fsdp(c)
    if c.data.get("unfrozen_parameters"):
        c.warn("unfrozen_parameters", "training a chosen subset of the base weights is not modelled")
    c.irrelevant(_NO_COST)
    return c.finish("keys lora-cost does not read (not modelled)")


def _method(c: Collector) -> None:
    adapter = c.text("adapter")
    if adapter not in (None, "", "lora", "qlora"):
        raise c.error("adapter", "must be lora or qlora (or absent: full fine-tuning)")
    four, eight = c.flag("load_in_4bit"), c.flag("load_in_8bit")
    if four and eight:
        raise c.error("load_in_4bit", "and load_in_8bit cannot both be true")
    if not adapter:
        c.set("method", "full", "adapter")
        if four or eight:
            raise c.error("adapter", "must be lora or qlora with a quantised base (load_in_4bit/8bit)")
        return
    dora = c.flag("peft_use_dora")
    chosen = "qlora" if adapter == "qlora" or four else "lora-8bit" if eight else "dora" if dora else "lora"
    if adapter == "qlora" or four:
        if adapter == "qlora" and eight:
            raise c.error("adapter", "qlora needs load_in_4bit, not load_in_8bit")
        if dora:
            c.warn("peft_use_dora", "DoRA on 4-bit weights is not modelled; estimated as QLoRA")
        c.set("method", "qlora", "adapter" if adapter == "qlora" else "load_in_4bit")
        _bnb(c)
        # task "recast": a setting of the QLoRA paper's script, in no axolotl (or TrainingArguments) key
        c.note("adapter" if adapter == "qlora" else "load_in_4bit",
               "the QLoRA paper script's recast (LoRA layers, embeddings and LM head in bf16) is no axolotl key: "
               "estimate that recipe with --qlora-recast --kbit-prepare --precision amp-bf16")
    elif eight:  # issue9b: LoRA on an LLM.int8() base (lora_cost/analytic/methods/lora_8bit.py)
        if dora:
            c.warn("peft_use_dora", "DoRA on 8-bit weights is not modelled; estimated as LoRA on the 8-bit base")
        c.set("method", "lora-8bit", "load_in_8bit")
    else:
        c.set("method", "dora" if dora else "lora", "peft_use_dora" if dora else "adapter")
    ratio = c.number("loraplus_lr_ratio")
    if ratio is not None and chosen == "lora":
        # LoRA+ (axolotl's loraplus_lr_ratio -> peft create_loraplus_optimizer): LoRA's memory and FLOPs
        c.set("method", "lora-plus", "loraplus_lr_ratio")
        c.set("lora_plus_ratio", ratio, "loraplus_lr_ratio")
    elif ratio is not None:
        c.note("loraplus_lr_ratio", "LoRA+ changes only B's learning rate: no cost of its own")
    if c.has("lora_r"):
        c.set("r", c.integer("lora_r"), "lora_r")
    if c.has("lora_dropout"):
        c.set("dropout", c.number("lora_dropout"), "lora_dropout")
    if c.flag("lora_target_linear"):
        c.set("targets", ("all-linear",), "lora_target_linear")
    targets = c.names("lora_target_modules")
    if targets and not c.data.get("lora_target_linear"):
        c.set("targets", TargetRegex(targets) if isinstance(targets, str) else targets, "lora_target_modules")
    elif targets:  # axolotl adds lora_target_modules to all-linear's list: still every linear
        c.note("lora_target_modules", "lora_target_linear already adapts every linear layer")
    saved = c.names("lora_modules_to_save")
    if saved:
        c.set("modules_to_save", (saved,) if isinstance(saved, str) else saved, "lora_modules_to_save")
    if c.data.get("lora_target_linear") is None and not targets:
        c.note("adapter", "no lora_target_modules: peft's default targets (the query and value projections)")


def _bnb(c: Collector) -> None:
    kwargs = c.data.get("bnb_config_kwargs")
    if kwargs is None:
        return
    if not isinstance(kwargs, dict):
        raise c.error("bnb_config_kwargs", "must be a mapping")
    if "bnb_4bit_quant_type" in kwargs:
        c.set("quant_type", kwargs["bnb_4bit_quant_type"], "bnb_config_kwargs")
    if "bnb_4bit_use_double_quant" in kwargs:
        c.set("double_quant", kwargs["bnb_4bit_use_double_quant"], "bnb_config_kwargs")
    storage = kwargs.get("bnb_4bit_quant_storage")
    if storage is not None:
        c.set("quant_storage", DTYPE_NAMES.get(storage, storage), "bnb_config_kwargs")


def _qlora(c: Collector) -> bool:
    return any(s.target == "method" and s.value == "qlora" for s in c.settings)


def _fsdp(c: Collector) -> bool:
    """axolotl's `is_fsdp_enabled` (loaders/model.py): fsdp or fsdp_config set."""
    return c.data.get("fsdp") not in (None, "", []) or c.data.get("fsdp_config") is not None


def _qlora_fsdp(c: Collector) -> None:
    """Task "fsdpqlora": axolotl's QLoRA under FSDP (loaders/model.py `ModelLoader`): `is_qlora_and_fsdp_enabled`
    (fsdp or fsdp_config set, adapter qlora) makes `_prepare_model_for_quantization` skip peft's
    prepare_model_for_kbit_training ("Make sure everything is in the same dtype"), and its BitsAndBytesConfig stores
    the packed weights as bnb_4bit_quant_storage=torch.bfloat16 unless bnb_config_kwargs say otherwise."""
    if c.data.get("fsdp") in (None, "", []) and c.data.get("fsdp_config") is None:
        return
    if not any(s.target == "method" and s.value == "qlora" for s in c.settings):
        return
    if not any(s.target == "quant_storage" for s in c.settings):
        c.set("quant_storage", "bf16", "adapter")
    c.set("kbit_prepare", False, "adapter")
    c.note("adapter", "QLoRA under FSDP: axolotl skips prepare_model_for_kbit_training and stores the 4-bit weights "
                      "in bf16 (bnb_4bit_quant_storage)")


def _checkpointing(c: Collector) -> None:
    value = c.raw("gradient_checkpointing")
    if value is None:
        return
    if value in ("offload", "unsloth"):
        c.set("grad_checkpointing", True, "gradient_checkpointing")
        c.warn("gradient_checkpointing", f"{value!r} also offloads the checkpointed activations to the CPU, "
               "which is not modelled: estimated as plain checkpointing (an upper bound)")
    elif isinstance(value, bool):
        c.set("grad_checkpointing", value, "gradient_checkpointing")
    else:
        raise c.error("gradient_checkpointing", "must be true, false, offload or unsloth")
    kwargs = c.data.get("gradient_checkpointing_kwargs")
    if isinstance(kwargs, dict) and kwargs.get("use_reentrant") is True and value:
        c.warn("gradient_checkpointing_kwargs", "use_reentrant=true is not modelled (the estimate is non-reentrant)")


def _attention(c: Collector) -> None:
    kinds = [(k, v) for k, v in (("flash_attention", "flash_attention_2"), ("sdp_attention", "sdpa"),
                                 ("flex_attention", "flex_attention"), ("eager_attention", "eager"))
             if c.flag(k)]
    if len(kinds) > 1:
        raise c.error(kinds[1][0], f"and {kinds[0][0]} cannot both be true")
    if kinds:
        set_attention(c, *kinds[0])
    if c.flag("xformers_attention"):
        c.warn("xformers_attention", "xformers attention is not modelled; the estimate keeps its --attention")
