"""Read a DeepSpeed JSON config's ZeRO section into a `ShardingSpec` (torch-free, DeepSpeed not needed).

Fields (deepspeed/runtime/zero/config.py, 0.19.8): zero_optimization.stage, offload_optimizer.device,
offload_param.device, reduce_bucket_size, allgather_bucket_size, stage3_prefetch_bucket_size,
stage3_max_live_parameters, stage3_param_persistence_threshold, overlap_comm. "auto" is what transformers'
Trainer fills in (transformers/integrations/deepspeed.py `HfTrainerDeepSpeedConfig.trainer_config_finalize`):
reduce_bucket_size = hidden^2, stage3_prefetch_bucket_size = int(0.9 * hidden^2),
stage3_param_persistence_threshold = 10 * hidden.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ...errors import LoraCostError
from .config import ShardingSpec

_INT_FIELDS = {"reduce_bucket_size": "reduce_bucket_size", "allgather_bucket_size": "allgather_bucket_size",
               "stage3_prefetch_bucket_size": "prefetch_bucket_size",
               "stage3_max_live_parameters": "max_live_parameters",
               "stage3_param_persistence_threshold": "param_persistence_threshold"}


def _auto(field: str, hidden: int) -> int:
    return {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden}.get(field, -1)


def apply_deepspeed_config(sharding: ShardingSpec, hidden: int) -> ShardingSpec:
    """The spec with the file's ZeRO values (its stage must match --sharding; offload devices "cpu" or "nvme"
    both count as host memory here, nvme refused: not modelled)."""
    if sharding.deepspeed_config is None:
        return sharding
    from ...profiles import read_json
    path = Path(sharding.deepspeed_config)
    doc = read_json(path)
    zero = doc.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise LoraCostError(f"{path}: zero_optimization must be an object")
    stage = zero.get("stage", 0)
    if stage != int(sharding.strategy[-1]):
        raise LoraCostError(f"{path}: zero_optimization.stage is {stage!r} but --sharding is {sharding.strategy}")
    changes: dict = {}
    for key, attr in _INT_FIELDS.items():
        if key not in zero:
            continue
        v = zero[key]
        if v == "auto" and _auto(key, hidden) >= 0:
            v = _auto(key, hidden)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 1 << 50:
            raise LoraCostError(f"{path}: zero_optimization.{key} must be a non-negative integer, got {v!r}")
        changes[attr] = v
    if "overlap_comm" in zero:
        if not isinstance(zero["overlap_comm"], bool):
            raise LoraCostError(f"{path}: zero_optimization.overlap_comm must be true or false")
        changes["overlap_comm"] = zero["overlap_comm"]
    offload = "none"
    for key, kind in (("offload_optimizer", "optimizer"), ("offload_param", "params")):
        section = zero.get(key)
        if section is None:
            continue
        device = section.get("device", "none") if isinstance(section, dict) else None
        if device not in ("none", "cpu", "nvme"):
            raise LoraCostError(f"{path}: zero_optimization.{key}.device must be none, cpu or nvme, got {device!r}")
        if device == "nvme":
            raise LoraCostError(f"{path}: zero_optimization.{key}.device nvme is not modelled (cpu is)")
        if device == "cpu":
            offload = kind if kind == "params" or offload == "none" else offload
    if offload != "none":
        if sharding.offload not in ("none", offload):
            raise LoraCostError(f"{path} offloads {offload} but --offload is {sharding.offload}")
        changes["offload"] = offload
    return replace(sharding, **changes)
