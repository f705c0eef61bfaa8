"""Run-configuration flags shared by `estimate` and `plan`."""

from __future__ import annotations

import click

from ..errors import LoraCostError
from ..analytic.methods import all_methods
from ..analytic.methods.base import all_options
from ..analytic.optimizers import all_optimizers
from ..spec import ATTENTION_SPELLINGS, PRECISIONS


def stacked(f, decorators: list):
    """`f` under click option decorators, in the order listed (the first is the outermost, as when written)."""
    for d in reversed(decorators):
        f = d(f)
    return f


def method_choice() -> click.Choice:
    return click.Choice(list(all_methods()), case_sensitive=False)


def common_run_options(f):
    """--model, precision, optimizer, attention and method-option flags."""
    decorators = [
        click.option("--model", "-m", default=None, help="Bundled profile, Hugging Face id alias, config.json or a directory holding one (may come from --axolotl base_model or --peft-config base_model_name_or_path)."),
        click.option("--targets", "-t", default=None, help="peft target_modules, comma separated (e.g. q_proj,v_proj), or all-linear. Default: query and value projections."),
        click.option("--precision", type=click.Choice(PRECISIONS), default="bf16", show_default=True),
        click.option("--optimizer", type=OptimizerChoice(list(all_optimizers())), default="adamw", show_default=True,
                     help="Trainer's `optim` names, dashed or with underscores (adamw_torch_fused); adamw = adamw-torch."),
        click.option("--attention", type=click.Choice(ATTENTION_SPELLINGS), default="sdpa", show_default=True, help="transformers attention implementation (flash-attention-2/3 and flex: the fused kernels; transformers' spellings flash_attention_2, flash_attention_3, flex_attention accepted)."),
        click.option("--dropout", type=float, default=0.0, show_default=True, help="Adapter dropout (peft lora_dropout)."),
        click.option("--model-dropout", type=float, default=None, help="Override the model's own dropout probabilities (default: its config's)."),
        method_option_flags,
        file_options,
        optimizer_option_flags,
        click.option("--gpu", default=None, help="A bundled GPU profile (lora-cost gpus): say whether it fits and how long a step takes."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables."),
    ]
    return stacked(f, decorators)


# the Python name of a generated flag's parameter: prefix + the option's name
_OPTION_PARAM = "method_option_"


def method_option_flags(f):
    """One flag per method option, generated from each method's typed options (`MethodOption`).
    Unset flags stay None, so only the options a user gives reach the run (and its checks)."""
    flags = []
    for opt, owners in all_options().items():
        param = _OPTION_PARAM + opt.name
        text = f"{', '.join(owners)}: {opt.help} (default {opt.describe_default()})."
        if opt.type is bool:
            flags.append(click.option(f"{opt.flag}/--no-{opt.flag[2:]}", param, default=None, help=text))
        else:
            kind = click.Choice(list(opt.choices)) if opt.choices else opt.type
            flags.append(click.option(opt.flag, param, type=kind, default=None, help=text))
    for flag in reversed(flags):
        f = flag(f)
    return f


def method_options(params: dict) -> dict:
    """The method options among a command's parameters that were given ({option name: value})."""
    return {key[len(_OPTION_PARAM):]: value for key, value in params.items()
            if key.startswith(_OPTION_PARAM) and value is not None}


def parse_targets(targets: str | None):
    if targets is None:
        return None
    parts = tuple(t.strip() for t in targets.split(",") if t.strip())
    if not parts:
        raise LoraCostError("--targets is empty")
    return parts


# --- task "attention": the attention-kernel flags (one block)
def attention_options(f):
    """--packing: padding-free batches with the varlen flash kernels."""
    return click.option("--packing", is_flag=True, default=False,
                        help="Padding-free packing (TRL packing / DataCollatorWithFlattening): the --batch sequences of "
                        "--seq tokens flattened into one row, kept apart by the varlen flash kernel; flash-attention-2/3 "
                        "only.")(f)


# --- readers: the run read from files users already have (lora_cost/readers) ---
OPTION_PARAM = _OPTION_PARAM
_OVERRIDE = " Flags given explicitly override the file's values."


def file_options(f):
    """--peft-config, --training-args, --axolotl (estimate and plan)."""
    decorators = [
        click.option("--peft-config", default=None, metavar="adapter_config.json",
                     help="A peft config (LoraConfig, VeraConfig, ...): method, r, target_modules (list, regex or "
                     "all-linear), dropout, modules_to_save, task_type." + _OVERRIDE),
        click.option("--training-args", default=None, metavar="FILE",
                     help="transformers TrainingArguments or TRL SFTConfig as JSON or YAML: batch, max_length, "
                     "gradient checkpointing, bf16/fp16, optim, packing, use_liger_kernel." + _OVERRIDE),
        click.option("--axolotl", default=None, metavar="FILE.yml",
                     help="An axolotl config: base_model, adapter, lora_r, lora_target_modules, sequence_len, "
                     "micro_batch_size, optimizer, flash_attention, sample_packing, ..." + _OVERRIDE),
    ]
    return stacked(f, decorators)


# -- lossdtype: --loss and --adapter-dtype (issue 9), one block
def loss_dtype_options(f):
    """--loss standard|liger|chunked[:N], --adapter-dtype fp32|bf16|fp16, --modules-to-save (estimate)."""
    from ..spec import ADAPTER_DTYPES

    decorators = [
        click.option("--loss", "loss", default="standard", show_default=True,
                     help="Causal-LM loss: standard (transformers, full logits), liger (Liger fused linear "
                     "cross-entropy: no logits), chunked[:N] (torchtune CEWithChunkedOutputLoss, N=8 chunks)."),
        click.option("--adapter-dtype", "adapter_dtype", type=click.Choice(list(ADAPTER_DTYPES)), default=None,
                     help="LoRA factors' dtype (default fp32: peft autocast_adapter_dtype=True); bf16/fp16: the "
                     "model's dtype (autocast_adapter_dtype=False); qlora bf16: the QLoRA script's recast."),
        click.option("--modules-to-save", "modules_to_save", default=None,
                     help="peft modules_to_save on a causal LM: embed_tokens and/or lm_head (comma separated) trained in "
                     "full as copies (their gradients and optimizer state)."),
    ]
    return stacked(f, decorators)


# -- ligerkernels: Liger-Kernel's swaps (issue 9), one block
def liger_options(f):
    """--liger (Trainer's use_liger_kernel=True), --liger-kernels LIST (its liger_kernel_config) (estimate)."""
    decorators = [
        click.option("--liger", "liger", is_flag=True, default=False,
                     help="Trainer's use_liger_kernel=True: Liger's RMSNorm, RoPE and SwiGLU kernels and its fused linear "
                     "cross-entropy (--loss liger) on Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2/3 (GEGLU)."),
        click.option("--liger-kernels", "liger_kernels", default=None,
                     help="Some of Liger's kernels (comma separated): rms_norm, rope, swiglu (= geglu: the family's gated "
                     "MLP), fused_linear_cross_entropy (= --loss liger); 'all' is --liger."),
    ]
    return stacked(f, decorators)


def liger_kwargs(liger: bool, liger_kernels) -> dict:
    """The estimate()/trace() keyword arguments of --liger / --liger-kernels; absent flags leave the call as it was."""
    if liger and liger_kernels is not None:
        raise LoraCostError("give --liger (every kernel) or --liger-kernels LIST, not both")
    if liger:
        return {"liger_kernels": "all"}
    if liger_kernels is not None:
        return {"liger_kernels": liger_kernels}
    return {}


# -- task "sharding": several GPUs (one contiguous block; analytic/sharding/config.py holds the defaults)
def sharding_flags(f):
    """--gpus, --nodes, --sharding and each strategy's options."""
    from ..analytic.sharding.config import OFFLOADS, STRATEGIES
    decorators = [
        click.option("--gpus", type=int, default=None, help="Data-parallel world size: estimate the busiest rank (default: one GPU)."),
        click.option("--nodes", type=int, default=1, show_default=True, help="Nodes the --gpus are spread over (must divide --gpus)."),
        click.option("--sharding", type=click.Choice(STRATEGIES), default=None,
                     help="How the model is split (default with --gpus: fsdp, FSDP2 fully_shard per decoder layer)."),
        click.option("--offload", type=click.Choice(OFFLOADS), default=None, help="ZeRO: offload_optimizer (optimizer) or also offload_param (params) to the CPU."),
        click.option("--cpu-offload", is_flag=True, default=False, help="FSDP: CPUOffloadPolicy (shards, gradients, optimizer state on the host)."),
        click.option("--deepspeed", "deepspeed_config", default=None, help="A DeepSpeed JSON config: ZeRO stage, buckets, offload read from it."),
        click.option("--reshard-after-forward/--no-reshard-after-forward", default=None, help="FSDP: free a unit's gathered parameters after its forward (fsdp: yes, fsdp-grad-op: no)."),
        click.option("--fsdp-param-dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None, help="FSDP MixedPrecisionPolicy.param_dtype (default: the parameter's)."),
        click.option("--fsdp-reduce-dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None, help="FSDP MixedPrecisionPolicy.reduce_dtype (default: param dtype)."),
        click.option("--bucket-cap-mb", type=float, default=None, help="DDP bucket_cap_mb (default 25)."),
        click.option("--gradient-as-bucket-view", is_flag=True, default=False, help="DDP: gradients are views of the buckets."),
    ]
    return stacked(f, decorators)


# -- task allocator: the caching allocator's settings and paged optimizer state (one block) ------
def allocator_flags(f):
    """--alloc-conf (PYTORCH_CUDA_ALLOC_CONF) and --paged-evictable."""
    decorators = [
        click.option("--alloc-conf", default=None,
                     help="PYTORCH_CUDA_ALLOC_CONF for the step, e.g. expandable_segments:True,max_split_size_mb:512,"
                     "garbage_collection_threshold:0.8 (the trace engine replays its allocations with these settings)."),
        click.option("--paged-evictable", is_flag=True, default=False,
                     help="Paged optimizers: the driver may evict their state to host memory, so it is not counted on "
                     "the GPU (default: resident)."),
    ]
    return stacked(f, decorators)


def allocator_kwargs(params: dict) -> dict:
    """Pop the allocator flags from a command's parameters: only the ones given reach the run."""
    conf, evictable = params.pop("alloc_conf", None), params.pop("paged_evictable", False)
    out = {}
    if conf is not None:
        out["alloc_conf"] = conf
    if evictable:
        out["paged_evictable"] = True
    return out


def sharding_kwargs(gpus, nodes, sharding, offload, cpu_offload, deepspeed_config, reshard_after_forward,
                    fsdp_param_dtype, fsdp_reduce_dtype, bucket_cap_mb, gradient_as_bucket_view) -> dict:
    """`estimate()` keyword arguments of the sharding flags; {} when none is given (nothing changes)."""
    options = {k: v for k, v in dict(offload=offload, cpu_offload=cpu_offload or None, deepspeed_config=deepspeed_config,
                                     reshard_after_forward=reshard_after_forward, param_dtype=fsdp_param_dtype,
                                     reduce_dtype=fsdp_reduce_dtype, bucket_cap_mb=bucket_cap_mb,
                                     gradient_as_bucket_view=gradient_as_bucket_view or None).items() if v is not None}
    if gpus is None and sharding is None and nodes == 1 and not options:
        return {}
    if gpus is not None and gpus < 1:
        raise LoraCostError(f"--gpus must be a positive integer, got {gpus}")
    return dict(gpus=gpus, nodes=nodes, sharding=sharding, sharding_options=options)


# --- task "optim" (issue 9, Optimizers): optimizer flags --------------------------------------------
class OptimizerChoice(click.Choice):
    """The registered optimizer names; Trainer's underscore spelling (`adamw_torch_fused`) is accepted."""

    def convert(self, value, param, ctx):
        from ..registry import dashed
        return super().convert(dashed(value) if isinstance(value, str) else value, param, ctx)


def optimizer_option_flags(f):
    """--master-weights and --optimizer-in-backward (lora_cost/analytic/optimizer_budget.py)."""
    f = click.option("--optimizer-in-backward", "optimizer_in_backward", is_flag=True, default=False,
                     help="Step each tensor from its gradient hook inside backward, freeing its gradient "
                     "(torchtune optimizer_in_bwd).")(f)
    return click.option("--master-weights", "master_weights", type=click.Choice(["fp32"]), default=None,
                        help="Keep fp32 master copies of 16-bit trainable weights and fp32 optimizer states "
                        "(Megatron-LM / DeepSpeed mixed precision).")(f)


def optimizer_options(params: dict) -> dict:
    """The optimizer flags among a command's parameters that were given (absent ones leave a call as it was)."""
    out = {}
    if params.pop("master_weights", None) is not None:
        out["master_weights"] = "fp32"
    if params.pop("optimizer_in_backward", False):
        out["optimizer_in_backward"] = True
    return out


def loss_dtype_kwargs(loss: str, adapter_dtype, modules_to_save=None) -> dict:
    """The estimate()/trace() keyword arguments of these flags; absent flags leave the call as it was."""
    out = {}
    if modules_to_save is not None:
        out["modules_to_save"] = modules_to_save
    if loss != "standard":
        out["loss"] = loss
    if adapter_dtype is not None:
        out["adapter_dtype"] = adapter_dtype
    return out


# -- allocevents: how the analytic engine gets reserved memory (one block) ----------------------------
def reserved_model_flag(f):
    """--reserved-model slack|replay|auto (lora_cost/analytic/reserved_events.py)."""
    return click.option(
        "--reserved-model", type=click.Choice(["slack", "replay", "auto"]), default=None,
        help="Analytic engine's reserved memory: slack (allocated peak x 1.10, the default), replay (the step's "
        "allocation sequence composed from the analytic tape, replayed through the caching-allocator model), "
        "auto (replay only when --gpu's memory is near the device total).")(f)


def reserved_model_kwargs(params: dict) -> dict:
    """Pop --reserved-model: only a given one reaches estimate()."""
    value = params.pop("reserved_model", None)
    return {} if value is None else {"reserved_model": value}
