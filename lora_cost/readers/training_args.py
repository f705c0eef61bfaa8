"""`--training-args FILE`: transformers' TrainingArguments or TRL's SFTConfig as JSON or YAML (the
dict `HfArgumentParser` reads, or `TrainingArguments.to_dict()`).

Fields read (transformers 5 training_args.py, TRL sft_config.py):
- per_device_train_batch_size -> batch (absent: Trainer's default 8); max_length / max_seq_length (TRL) -> seq (absent
  in a TRL recipe: SFTConfig's 1024)
- gradient_checkpointing -> grad_checkpointing; gradient_checkpointing_kwargs.use_reentrant: true is
  reentrant checkpointing, not modelled (transformers 5 defaults to use_reentrant=False, modelled)
- bf16 / fp16 (+ TRL model_init_kwargs dtype) -> precision (common.precision_from); with QLoRA (--method qlora or
  another file) bf16 -> amp-bf16, prepare_model_for_kbit_training's fp32 under autocast (qlora_dtypes.py, applied
  in cli/files.py where the method is known)
- optim -> optimizer (absent: Trainer's default adamw_torch_fused)
- packing / padding_free (TRL) -> packing; use_liger_kernel (+ liger_kernel_config) -> liger_kernels and loss liger
  (Trainer: `apply_liger_kernel(model, liger_kernel_config)`; analytic/liger.py)
- fsdp -> sharding (applied with --gpus); deepspeed (a JSON config) -> sharding zero1/2/3 + the file
- a TRL recipe (`trl sft --config recipe.yaml`: ModelConfig keys beside SFTConfig's, task "trlmodel"): the model,
  its dtype, attention, LoRA/QLoRA and the dtypes SFTTrainer leaves (trl_model.py); TRL's defaults bf16 = not fp16
  and gradient_checkpointing true
- gradient_accumulation_steps: no effect on one step's memory (each micro-batch's backward adds into the
  same .grad tensors, `AccumulateGrad`) nor on its FLOPs (a step here is one micro-batch); a note says so.
"""

from __future__ import annotations

from .base import Collector, Reading, load_mapping
from .common import (DTYPE_NAMES, TRAINER_DEFAULT_BATCH, TRAINER_DEFAULT_OPTIM, precision_from, set_deepspeed,
                     set_optimizer, set_sharding)
from .trl_model import NO_COST as TRL_NO_COST
from .trl_model import (TRL_DEFAULT_MAX_LENGTH, alloc_conf, anchor, init_kwargs, is_trl_recipe, kbit_dtypes,
                        read_model_config)

_NO_COST = (  # TrainingArguments / SFTConfig fields with no effect on one training step's memory or FLOPs
    "output_dir", "overwrite_output_dir", "do_train", "do_eval", "do_predict", "eval_strategy", "evaluation_strategy",
    "prediction_loss_only", "per_device_eval_batch_size", "eval_accumulation_steps", "eval_delay", "learning_rate",
    "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "num_train_epochs", "max_steps",
    "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_ratio", "warmup_steps", "log_level", "log_level_replica",
    "log_on_each_node", "logging_dir", "logging_strategy", "logging_first_step", "logging_steps",
    "logging_nan_inf_filter", "save_strategy", "save_steps", "save_total_limit", "save_safetensors",
    "save_on_each_node", "save_only_model", "seed", "data_seed", "use_cpu", "tf32", "local_rank", "ddp_backend",
    "dataloader_drop_last", "eval_steps", "dataloader_num_workers", "dataloader_prefetch_factor", "past_index",
    "run_name", "disable_tqdm", "remove_unused_columns", "label_names", "load_best_model_at_end",
    "metric_for_best_model", "greater_is_better", "ignore_data_skip", "report_to", "push_to_hub", "hub_model_id",
    "hub_strategy", "hub_token", "hub_private_repo", "hub_always_push", "hub_revision", "resume_from_checkpoint",
    "include_num_input_tokens_seen", "group_by_length", "length_column_name", "dataloader_pin_memory",
    "dataloader_persistent_workers", "skip_memory_metrics", "full_determinism", "bf16_full_eval", "fp16_full_eval",
    "fp16_opt_level", "half_precision_backend", "auto_find_batch_size", "average_tokens_across_devices",
    "batch_eval_metrics", "eval_on_start", "eval_use_gather_object", "restore_callback_states_from_checkpoint",
    "accelerator_config", "optim_args", "project", "trackio_space_id", "enable_jit_checkpoint", "logging_nan_inf_filter",
    # TRL SFTConfig
    "dataset_text_field", "dataset_kwargs", "dataset_num_proc", "eos_token", "pad_token", "completion_only_loss",
    "assistant_only_loss", "chat_template_path", "dataset_name", "pad_to_multiple_of", "eval_packing",
    "shuffle_dataset", "model_init_kwargs", "packing_strategy", "max_seq_length", "padding_free")


def read_training_args(path: str) -> Reading:
    return training_args_reading(load_mapping(path, "TrainingArguments / SFTConfig"), path)


def training_args_reading(data: dict, label: str) -> Reading:
    """The Reading of TrainingArguments fields (a file's, or a live Trainer's `args.to_dict()`)."""
    c = Collector(label, data, "training args")
    trl = is_trl_recipe(data)  # task "trlmodel": a `trl sft --config` recipe, ModelConfig keys beside SFTConfig's
    weights, quantised = read_model_config(c) if trl else (_init_dtype(c), None)
    if c.has("per_device_train_batch_size"):
        c.set("batch", c.integer("per_device_train_batch_size"), "per_device_train_batch_size")
    else:  # what Trainer runs with when the file leaves it out (a flag still wins)
        c.set("batch", TRAINER_DEFAULT_BATCH, "per_device_train_batch_size")
        c.note("per_device_train_batch_size", f"not in the file: Trainer's default, {TRAINER_DEFAULT_BATCH} "
               "sequences per device (--batch to change it)")
    lengths = [key for key in ("max_length", "max_seq_length") if c.has(key)]  # TRL: max_seq_length before 0.20
    for key in lengths:
        c.set("seq", c.integer(key), key)
    if not lengths and trl:  # SFTConfig truncates to max_length, 1024 unless set
        c.set("seq", TRL_DEFAULT_MAX_LENGTH, "max_length")
        c.note("max_length", f"not in the recipe: SFTConfig's default, {TRL_DEFAULT_MAX_LENGTH} tokens (the "
               "length sequences are truncated to; --seq to change it)")
    steps = c.integer("gradient_accumulation_steps")
    if steps and steps > 1:
        c.note("gradient_accumulation_steps", f"{steps} micro-batches per optimizer step change no memory (each "
               "backward adds into the same .grad tensors) and the FLOPs are per micro-batch")
    if c.has("gradient_checkpointing"):
        c.set("grad_checkpointing", c.flag("gradient_checkpointing"), "gradient_checkpointing")
    elif trl:  # trl/trainer/base_config.py _BaseConfig.gradient_checkpointing defaults to True
        c.set("grad_checkpointing", True, anchor(c))
        c.note(anchor(c), "no gradient_checkpointing: TRL's SFTConfig defaults it to true")
    kwargs = c.raw("gradient_checkpointing_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise c.error("gradient_checkpointing_kwargs", "must be a mapping")
        if kwargs.get("use_reentrant") is True and c.data.get("gradient_checkpointing"):
            c.warn("gradient_checkpointing_kwargs", "use_reentrant=true (torch.utils.checkpoint's reentrant "
                   "variant) is not modelled; the estimate is non-reentrant checkpointing")
        for k in set(kwargs) - {"use_reentrant"}:
            c.warn("gradient_checkpointing_kwargs", f"{k} is not modelled")
    bf16, fp16 = c.flag("bf16"), c.flag("fp16")
    if trl and bf16 is None:  # _BaseConfig.__post_init__: bf16 = not fp16 when unset
        bf16 = not fp16
    key = "bf16" if c.data.get("bf16") else "fp16" if c.data.get("fp16") else "bf16" if c.has("bf16") or not trl \
        else anchor(c)
    if quantised:
        kbit_dtypes(c, quantised, weights, bool(bf16), bool(fp16),
                    next((k for k in ("bf16", "fp16") if c.has(k)), f"load_in_{quantised}"))
    else:
        precision_from(c, key, bf16, fp16, weights)
    optim = c.text("optim")
    set_optimizer(c, "optim", optim or TRAINER_DEFAULT_OPTIM, default=optim is None)
    for key in ("packing", "padding_free"):
        if c.flag(key):
            c.set("packing", True, key)
    if c.flag("use_liger_kernel"):
        _liger(c)
    elif c.raw("liger_kernel_config"):
        c.note("liger_kernel_config", "read only with use_liger_kernel: true (Trainer applies no kernel without it)")
    if c.flag("torch_compile"):
        c.warn("torch_compile", "torch.compile fuses kernels and changes what is saved; not modelled (the estimate "
               "is eager PyTorch)")
    for key in ("torch_compile_backend", "torch_compile_mode"):
        c.raw(key)
    if c.has("fsdp") and c.data["fsdp"] not in ("", []):
        set_sharding(c, "fsdp", c.raw("fsdp"))
    c.raw("fsdp_config")
    if c.has("deepspeed"):
        set_deepspeed(c, "deepspeed")
    if c.raw("activation_offloading"):
        c.warn("activation_offloading", "activation offloading to the CPU is not modelled")
    if c.raw("neftune_noise_alpha"):
        c.warn("neftune_noise_alpha", "NEFTune's embedding noise is not modelled")
    if c.raw("torch_empty_cache_steps"):
        c.note("torch_empty_cache_steps", "emptying the cache changes reserved memory only, not the allocated peak")
    if c.raw("optim_target_modules"):
        c.set("optim_target_modules", c.data["optim_target_modules"], "optim_target_modules")
    if c.raw("label_smoothing_factor"):
        c.warn("label_smoothing_factor", "label smoothing's extra loss tensors are not modelled")
    if c.has("ddp_bucket_cap_mb"):
        c.set("sharding_options.bucket_cap_mb", c.number("ddp_bucket_cap_mb"), "ddp_bucket_cap_mb")
    c.raw("ddp_find_unused_parameters")
    if trl:
        alloc_conf(c)
        c.irrelevant(TRL_NO_COST)
    c.irrelevant(_NO_COST)
    return c.finish("keys lora-cost does not read (not modelled)")


def _liger(c: Collector) -> None:
    """use_liger_kernel: Liger's defaults (rope, rms_norm, swiglu, fused_linear_cross_entropy on; cross_entropy off),
    changed by liger_kernel_config's booleans (passed to apply_liger_kernel_to_<type> as keyword arguments)."""
    from ..analytic.liger import DEFAULT_KERNELS, FUSED_LOSS
    on = dict.fromkeys(DEFAULT_KERNELS + (FUSED_LOSS,), True)
    config = c.raw("liger_kernel_config")
    if config is not None:
        if not isinstance(config, dict):
            raise c.error("liger_kernel_config", "must be a mapping of kernel names to true/false")
        for key, value in config.items():
            if not isinstance(value, bool):
                raise c.error("liger_kernel_config", f"{key} must be true or false")
            if key in on or key == "geglu":  # geglu (Gemma's apply function) and swiglu: the gated MLP's kernel
                on["swiglu" if key == "geglu" else key] = value
            elif key == "cross_entropy" and value:
                c.warn("liger_kernel_config", "cross_entropy (Liger's unfused cross-entropy on full logits) is not "
                       "modelled; the loss is transformers'")
            elif key != "cross_entropy":
                c.warn("liger_kernel_config", f"{key} is not modelled")
    kernels = tuple(k for k in DEFAULT_KERNELS if on[k])
    if kernels:
        c.set("liger_kernels", kernels, "use_liger_kernel")
    if on[FUSED_LOSS]:
        c.set("loss", "liger", "use_liger_kernel")


def _init_dtype(c: Collector):
    """TRL's model_init_kwargs {"dtype"|"torch_dtype": ...}: the weights' dtype, when SFTTrainer loads the model."""
    init = init_kwargs(c)
    value = init.get("dtype", init.get("torch_dtype"))
    if value in (None, "auto"):
        return None
    if value not in DTYPE_NAMES:
        raise c.error("model_init_kwargs", f"dtype must be one of {', '.join(DTYPE_NAMES)} or auto")
    return DTYPE_NAMES[value]
