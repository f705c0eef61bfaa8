"""Mappings the Trainer, TRL and axolotl readers share: optimizer names, precision, attention, sharding.

Each maps to lora-cost's own spelling and is checked against what this lora-cost accepts today
(`base.accepted`); a value the library takes but lora-cost does not model yet is a warning naming it.
"""

from __future__ import annotations

from ..attention_kernels import ALIASES
from .base import Collector, accepted

# Trainer spellings whose implementation lora-cost models under another name today (the same optimizer
# class: transformers/trainer_optimizer.py). Tried only when the dashed Trainer name itself is unknown.
OPTIMIZER_FALLBACKS = {
    "adamw_torch": "adamw",  # torch.optim.AdamW, foreach (lora-cost's "adamw")
    "adamw_bnb_8bit": "adamw-8bit", "adamw_8bit": "adamw-8bit",  # bnb.optim.AdamW (optim_bits=8)
    "paged_adamw_8bit": "paged-adamw-8bit", "paged_adamw_32bit": "paged-adamw-32bit",
}
# transformers >= 4.5x with torch >= 2.8: TrainingArguments.optim defaults to adamw_torch_fused (training_args.py)
TRAINER_DEFAULT_OPTIM = "adamw_torch_fused"
# transformers training_args.py TrainingArguments.per_device_train_batch_size: "defaults to 8"
TRAINER_DEFAULT_BATCH = 8
# the weight dtypes model-loading kwargs name (torch_dtype / dtype)
DTYPE_NAMES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16",
               "float32": "fp32", "fp32": "fp32", "float": "fp32"}
# attention_implementation spellings (transformers' attn_implementation) -> lora-cost's --attention
# transformers' attn_implementation spellings -> --attention: the kernel registry's aliases (attention_kernels.py)
ATTENTION_NAMES = ALIASES


def set_optimizer(c: Collector, key: str, name: str, default: bool = False) -> None:
    """An optimizer in Trainer's (or axolotl's) spelling."""
    dashed = name.lower().replace("_", "-")
    if accepted("optimizer", dashed):
        chosen = dashed
    elif name.lower() in OPTIMIZER_FALLBACKS and accepted("optimizer", OPTIMIZER_FALLBACKS[name.lower()]):
        chosen = OPTIMIZER_FALLBACKS[name.lower()]
    else:
        what = f"Trainer's default optimizer {name}" if default else f"optimizer {name}"
        c.warn(key, f"{what} is not modelled by this lora-cost; the estimate keeps its --optimizer (default: "
               "foreach AdamW with its state-sized sqrt temporary)")
        return
    if chosen == "sgd":
        c.warn(key, "Trainer's sgd is torch.optim.SGD without momentum unless optim_args sets it (no state); "
               "lora-cost's sgd keeps a momentum buffer (an upper bound)")
    c.set("optimizer", chosen, key)


def set_attention(c: Collector, key: str, value: str) -> None:
    name = ATTENTION_NAMES.get(value, value)
    if accepted("attention", name):
        c.set("attention", name, key)
    else:
        c.warn(key, f"attention {name} is not modelled by this lora-cost; the estimate keeps its --attention "
               "(default sdpa)")


def precision_from(c: Collector, key: str, bf16: bool | None, fp16: bool | None, weights: str | None) -> None:
    """Trainer's bf16/fp16 flags run the step under torch.autocast (accelerate's mixed precision); the
    weights keep the dtype they were loaded in (transformers 5 from_pretrained dtype="auto": the
    checkpoint's, bf16 for most current models). 16-bit weights -> bf16/fp16, fp32 weights -> amp-bf16/amp-fp16."""
    if bf16 and fp16:
        raise c.error(key, "bf16 and fp16 cannot both be true")
    half = "bf16" if bf16 else "fp16" if fp16 else None
    if half is None:
        if weights is not None:
            c.set("precision", weights, key)
        return
    if weights == "fp32":
        c.set("precision", f"amp-{half}", key)
        return
    c.set("precision", weights or half, key)
    loaded = f"{weights} (the dtype it is loaded in)" if weights else f"{half} (the checkpoint's dtype under transformers' dtype='auto')"
    c.note(key, f"{half}=true: estimated as a model loaded in {loaded}; a model loaded in fp32 runs autocast over "
           f"fp32 weights: --precision amp-{half}. Autocast over 16-bit weights, which casts the fp32 adapters' "
           "matmuls, is not modelled")


# settings that describe a data-parallel run: applied only with a world size (--gpus), which no training
# file holds (the launcher's: torchrun --nproc-per-node, accelerate --num_processes)
DISTRIBUTED = ("sharding", "sharding_options")


def set_sharding(c: Collector, key: str, value) -> None:
    """Trainer's fsdp (a string or list of FSDP options, training_args.py FSDPOption)."""
    options = value.split() if isinstance(value, str) else value if isinstance(value, list) else None
    if options is None or not all(isinstance(o, str) for o in options):
        raise c.error(key, "must be a string or a list of FSDP options")
    kinds = {"full_shard": "fsdp", "shard_grad_op": "fsdp-grad-op", "hybrid_shard": "hsdp",
             "hybrid_shard_zero2": "hsdp"}
    chosen = [kinds[o] for o in options if o in kinds]
    if not chosen:
        return
    c.set("sharding", chosen[0], key)
    if "offload" in options:
        c.set("sharding_options.cpu_offload", True, key)


def set_deepspeed(c: Collector, key: str) -> None:
    """Trainer's / axolotl's `deepspeed`: the path of a DeepSpeed JSON config. Its ZeRO stage
    (zero_optimization.stage) is the sharding; the file itself goes to the sharding model, which reads
    buckets and offload from it. The path is tried as given, then beside the file naming it."""
    from pathlib import Path

    from ..errors import LoraCostError
    from ..profiles import read_json

    value = c.raw(key)
    if not isinstance(value, str) or not value:
        raise c.error(key, "must be the path of a DeepSpeed JSON config")
    found = next((p for p in (Path(value), Path(c.path).parent / value) if p.is_file()), None)
    if found is None:
        c.warn(key, f"DeepSpeed config {value} not found here (the sharding is not read from it)")
        return
    try:
        config = read_json(found)
    except LoraCostError as exc:
        raise LoraCostError(f"{c.origin(key)}: {exc}") from None
    stage = (config.get("zero_optimization") or {}).get("stage", 0) if isinstance(config.get("zero_optimization", {}), dict) else None
    if stage not in (0, 1, 2, 3):
        raise LoraCostError(f"{c.origin(key)}: {found}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if stage == 0:
        c.warn(key, "ZeRO stage 0 (DeepSpeed's plain data parallelism) is not modelled")
        return
    c.set("sharding", f"zero{stage}", key)
    c.set("sharding_options.deepspeed_config", str(found), key)
