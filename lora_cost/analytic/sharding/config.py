"""How a run is spread over GPUs: the strategy, the world, and each library's knobs (torch-free).

One frozen `ShardingSpec` per run (`RunConfig.sharding`; None: one GPU, nothing changes). Defaults are the
libraries' own:
- DDP (torch/nn/parallel/distributed.py `DistributedDataParallel.__init__`): bucket_cap_mb=25, the first
  bucket `dist._DEFAULT_FIRST_BUCKET_BYTES` = 1 MiB, gradient_as_bucket_view=False;
- FSDP2 (torch/distributed/fsdp/_fully_shard/_fully_shard.py `fully_shard`): reshard_after_forward=True,
  no MixedPrecisionPolicy (param and reduce dtype = the parameter's), one unit per decoder layer plus the
  root (what accelerate's and Trainer's `transformer_layer_cls_to_wrap` = `_no_split_modules` give);
- DeepSpeed ZeRO (deepspeed/runtime/zero/config.py `DeepSpeedZeroConfig`, 0.19.8): reduce_bucket_size and
  allgather_bucket_size 5e8 elements, stage3_prefetch_bucket_size 5e7, stage3_max_live_parameters 1e9,
  stage3_param_persistence_threshold 1e5, overlap_comm False (stage 3: True, deepspeed/runtime/zero/
  stage3.py), contiguous_gradients True.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import LoraCostError

STRATEGIES = ("ddp", "fsdp", "fsdp-grad-op", "hsdp", "zero1", "zero2", "zero3")
FSDP_STRATEGIES = ("fsdp", "fsdp-grad-op", "hsdp")
ZERO_STRATEGIES = ("zero1", "zero2", "zero3")
OFFLOADS = ("none", "optimizer", "params")
MAX_GPUS = 1 << 20  # far above any cluster a fine-tuning step runs on
MIB = 1 << 20

# torch/distributed/distributed_c10d.py: _DEFAULT_FIRST_BUCKET_BYTES = int(1024 * 1024)
DDP_FIRST_BUCKET_BYTES = 1 << 20
DDP_BUCKET_CAP_MB = 25  # DistributedDataParallel(bucket_cap_mb=None) -> 25 (distributed.py)

# DeepSpeed 0.19.8 deepspeed/runtime/zero/config.py defaults (elements, not bytes)
ZERO_REDUCE_BUCKET = 500_000_000
ZERO_ALLGATHER_BUCKET = 500_000_000
ZERO3_PREFETCH_BUCKET = 50_000_000
ZERO3_MAX_LIVE = 1_000_000_000
ZERO3_PERSISTENCE_THRESHOLD = 100_000


@dataclass(frozen=True)
class ShardingSpec:
    """A data-parallel world of `gpus` ranks over `nodes` nodes and the strategy that splits the model."""

    strategy: str
    gpus: int
    nodes: int = 1
    offload: str = "none"  # ZeRO: offload_optimizer / offload_param to the CPU
    cpu_offload: bool = False  # FSDP: CPUOffloadPolicy (sharded params, grads and optimizer state on the host)
    reshard_after_forward: bool | None = None  # FSDP; None: the strategy's (fsdp: True, fsdp-grad-op: False)
    param_dtype: str | None = None  # FSDP MixedPrecisionPolicy.param_dtype (None: the parameter's dtype)
    reduce_dtype: str | None = None  # FSDP MixedPrecisionPolicy.reduce_dtype (None: param_dtype)
    bucket_cap_mb: float = DDP_BUCKET_CAP_MB  # DDP
    gradient_as_bucket_view: bool = False  # DDP
    reduce_bucket_size: int = ZERO_REDUCE_BUCKET  # ZeRO (elements)
    allgather_bucket_size: int = ZERO_ALLGATHER_BUCKET
    prefetch_bucket_size: int = ZERO3_PREFETCH_BUCKET
    max_live_parameters: int = ZERO3_MAX_LIVE
    param_persistence_threshold: int = ZERO3_PERSISTENCE_THRESHOLD
    overlap_comm: bool | None = None  # ZeRO; None: DeepSpeed's default for the stage
    deepspeed_config: str | None = None  # the file the ZeRO values were read from

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise LoraCostError(f"unknown sharding {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        for flag, v in (("--gpus", self.gpus), ("--nodes", self.nodes)):
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_GPUS:
                raise LoraCostError(f"{flag} must be a positive integer of at most {MAX_GPUS:,}, got {v!r}")
        if self.gpus % self.nodes:
            raise LoraCostError(f"--gpus {self.gpus} (the world size) is not divisible by --nodes {self.nodes}")
        if self.offload not in OFFLOADS:
            raise LoraCostError(f"unknown --offload {self.offload!r}; choose one of {', '.join(OFFLOADS)}")
        zero, fsdp = self.strategy in ZERO_STRATEGIES, self.strategy in FSDP_STRATEGIES
        if self.offload != "none" and not zero:
            raise LoraCostError(f"--offload is DeepSpeed ZeRO's (offload_optimizer/offload_param); --sharding "
                                f"{self.strategy} " + ("has no offload" if self.strategy == "ddp" else "takes --cpu-offload"))
        if self.offload == "params" and self.strategy != "zero3":
            raise LoraCostError("--offload params (offload_param) needs --sharding zero3: stages 1 and 2 keep full parameters")
        if self.cpu_offload and not fsdp:
            raise LoraCostError(f"--cpu-offload is FSDP's CPUOffloadPolicy; --sharding {self.strategy} "
                                + ("has no offload" if self.strategy == "ddp" else "takes --offload optimizer|params"))
        if self.deepspeed_config is not None and not zero:
            raise LoraCostError(f"--deepspeed (a DeepSpeed config) applies to --sharding zero1|zero2|zero3, not {self.strategy}")
        if not fsdp and (self.reshard_after_forward is not None or self.param_dtype or self.reduce_dtype):
            raise LoraCostError(f"--reshard-after-forward and --fsdp-param-dtype/--fsdp-reduce-dtype are FSDP options, "
                                f"not {self.strategy}'s")
        for flag, d in (("--fsdp-param-dtype", self.param_dtype), ("--fsdp-reduce-dtype", self.reduce_dtype)):
            if d is not None and d not in ("fp32", "bf16", "fp16"):
                raise LoraCostError(f"{flag} must be fp32, bf16 or fp16, got {d!r}")
        if self.strategy != "ddp" and (self.gradient_as_bucket_view or self.bucket_cap_mb != DDP_BUCKET_CAP_MB):
            raise LoraCostError(f"--bucket-cap-mb and --gradient-as-bucket-view are DDP options, not {self.strategy}'s")
        if not (isinstance(self.bucket_cap_mb, (int, float)) and 0 < self.bucket_cap_mb <= 1 << 20):
            raise LoraCostError(f"--bucket-cap-mb must be in (0, 1048576], got {self.bucket_cap_mb!r}")
        if self.strategy == "hsdp" and self.nodes < 2:
            raise LoraCostError("--sharding hsdp shards within a node and replicates across nodes: give --nodes 2 or more")

    @property
    def gpus_per_node(self) -> int:
        return self.gpus // self.nodes

    @property
    def shard_size(self) -> int:
        """Ranks one parameter is split over: the world, or one node under HSDP."""
        if self.strategy == "ddp":
            return 1
        return self.gpus_per_node if self.strategy == "hsdp" else self.gpus

    @property
    def resharded(self) -> bool:
        """FSDP frees a unit's gathered parameters after its forward (fsdp, hsdp) or keeps them (fsdp-grad-op)."""
        if self.reshard_after_forward is not None:
            return self.reshard_after_forward
        return self.strategy != "fsdp-grad-op"

    @property
    def overlapped(self) -> bool:
        """DeepSpeed's overlap_comm: default False for stages 1 and 2, True for stage 3."""
        return self.strategy == "zero3" if self.overlap_comm is None else self.overlap_comm
