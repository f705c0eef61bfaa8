"""Frozen result types shared by the estimator, the CLI and the reports. Rendering only reads them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum


class MemoryCategory(str, Enum):
    """What a piece of allocated memory holds: one vocabulary for the analytic engine's terms, the
    trace engine's categories, the profiler's measurements, their comparisons and every report.

    The values are the JSON names (`memory.components`, phase terms, trace categories); a member is a
    `str` equal to its value, so it is written and looked up as one. Each carries the label reports
    print and a sentence on what it is. Not every engine sees every category: the analytic engine
    names the parts of an activation peak (logits, loss and activation-gradient buffers, ...), the
    trace and the profiler only know what a storage is and call the unnamed rest `TEMPORARIES`.
    """

    label: str
    meaning: str

    def __new__(cls, value: str, label: str, meaning: str) -> "MemoryCategory":
        member = str.__new__(cls, value)
        member._value_ = value
        member.label = label
        member.meaning = meaning
        return member

    def __str__(self) -> str:  # the JSON name, also in f-strings (a mixed-in Enum would print its class)
        return self.value

    __format__ = str.__format__

    @classmethod
    def label_of(cls, name: str) -> str:
        """The label of a category's JSON name; any other name is its own label."""
        try:
            return cls(name).label
        except ValueError:
            return name

    # -- parameters and optimizer state (steady between steps)
    WEIGHTS = ("weights", "frozen weights",
               "parameters that do not train; under QLoRA NF4 linears plus fp32 embeddings, norms and head "
               "(embeddings and head bf16 under --qlora-recast)")
    TRAINABLE_WEIGHTS = ("trainable_weights", "trainable weights", "the parameters the optimizer updates")
    BUFFERS = ("buffers", "buffers", "module buffers that are not parameters (rotary tables, position ids)")
    OPTIMIZER_STATE = ("optimizer_state", "optimizer state",
                       "optimizer buffers in torch's allocator (paged states are outside it)")
    MASTER_WEIGHTS = ("master_weights", "fp32 master weights",
                      "the optimizer's fp32 copy of 16-bit trainable weights (--master-weights fp32)")
    LOOP_STATE = ("loop_state", "training-loop state",
                  "kept between steps by the training loop outside the optimizer (AdaLoRA's rank allocator averages)")
    # -- what the step adds
    SAVED_ACTIVATIONS = ("saved_activations", "saved activations",
                         "what backward needs, kept from forward (those not yet freed at this moment)")
    LOGITS = ("logits", "logits", "the LM head output, alive until the step ends")
    LOGITS_FP32_COPY = ("logits_fp32_copy", "logits fp32 copy", "transformers' causal-LM loss calls logits.float()")
    LOSS_GRADIENT_BUFFERS = ("loss_gradient_buffers", "loss gradient buffers",
                             "log-softmax backward holds its incoming and outgoing gradient")
    GRADIENTS = ("gradients", "gradients", "parameter gradients accumulated so far")
    RECOMPUTED_ACTIVATIONS = ("recomputed_activations", "recomputed block activations",
                              "gradient checkpointing reruns the block inside backward")
    ACTIVATION_GRADIENT_BUFFERS = ("activation_gradient_buffers", "activation gradients",
                                   "gradients flowing through the block being differentiated")
    TRANSIENT_BUFFERS = ("transient_buffers", "transient buffers",
                         "dequantised 4-bit weight, DoRA's weight-norm inputs, NoLA's bases, attention mask")
    # ligeracc: the forward's tracked moment (analytic/tape.py forward_live, peaks.py)
    FORWARD_LIVE = ("forward_live", "forward tensors alive",
                    "inside one block, the head or the loss: its saves so far, op outputs only Python still holds "
                    "(not saved for backward) and the running op's buffers")
    OPTIMIZER_TEMPORARIES = ("optimizer_temporaries", "optimizer temporaries",
                             "torch._foreach_sqrt(exp_avg_sq) for all tensors at once")
    TEMPORARIES = ("temporaries", "temporaries",
                   "everything else alive: op outputs not saved for backward, workspaces (the profiler's residual)")
    # -- several GPUs (--gpus/--sharding, task "sharding"): buffers of the data-parallel libraries
    GATHERED_PARAMETERS = ("gathered_parameters", "gathered parameters",
                           "FSDP/ZeRO-3: all-gathered (unsharded) parameters of the units in use, and the root's")
    PREFETCHED_PARAMETERS = ("prefetched_parameters", "prefetched parameters",
                             "FSDP: the next unit's parameters, all-gathered ahead of its use")
    UNSHARDED_GRADIENTS = ("unsharded_gradients", "unsharded gradients",
                           "FSDP: full-size gradients of gathered parameters, before their reduce-scatter")
    REDUCE_SCATTER_BUFFERS = ("reduce_scatter_buffers", "reduce-scatter buffers",
                              "FSDP: a unit's reduce-scatter input (world x padded shard)")
    GRADIENT_BUCKETS = ("gradient_buckets", "gradient buckets",
                        "DDP's flat gradient buckets; ZeRO's contiguous reduce buckets (reduce_bucket_size)")
    EARLIER_STEPS = ("earlier_steps", "earlier steps", "storages left alive by an earlier step")
    # -- task "galore": the optimizer's occasional heavier step
    PROJECTOR_REFRESH = ("projector_refresh", "projector refresh",
                         "GaLore's refresh step (the first, then every update_proj_gap): the gradient's fp32 copy, "
                         "torch.linalg.svd's U, S, Vh, info and column-major input copy, the new orthogonal matrix")


@dataclass(frozen=True)
class Term:
    """One named quantity with the formula that produced it and a sentence on what it is; a stored
    quantity also says which memory category it belongs to."""

    name: str
    value: int
    formula: str
    explanation: str
    category: MemoryCategory | None = None


@dataclass(frozen=True)
class PhasePeak:
    """Predicted peak of allocated memory within one phase of the step, and what is alive then."""

    phase: str  # forward | backward | optimizer
    peak_bytes: int
    moment: str  # where in the phase the peak happens
    terms: tuple[Term, ...]


@dataclass(frozen=True)
class DeviceMemory:
    """What the GPU holds at the peak (analytic/device.py): the caching allocator's reserved segments, the
    CUDA context and libraries outside it, and paged optimizer state when resident."""

    reserved_bytes: int
    context_bytes: int
    paged_bytes: int  # bitsandbytes paged optimizer state (CUDA managed memory)
    paged_resident: bool  # counted in device_bytes (False: --paged-evictable, the host may take it)
    fragmentation_bytes: int  # reserved but not allocated at the allocated peak
    device_bytes: int
    uncertainty_bytes: int  # the stated uncertainty of device_bytes (verdict "tight" within it)
    context_measured: bool  # a context measurement for this GPU and family (else the largest figure)
    reserved_model: str  # "allocator replay" (trace engine), "slack" or "allocator replay (analytic)" (analytic engine)


@dataclass(frozen=True)
class RefreshStep:
    """An optimizer step that allocates more than the steady one, every `every_steps` steps and on the first
    (GaLore's projector refresh: an SVD of each projected gradient, galore_projector.py). `peak_bytes` is that
    step's peak of allocated memory (the steady step's is MemoryEstimate.peak_bytes); the GPU fit takes the
    larger of the two device figures, since a run whose first step does not fit never trains."""

    every_steps: int
    peak_bytes: int
    peak_phase: str
    moment: str
    components: tuple[Term, ...]  # what is alive at that peak; sums to peak_bytes
    device_bytes: int  # reserved (caching-allocator slack on peak_bytes, at least the steady step's) + context
    above_steady_bytes: int  # peak_bytes less the steady step's peak (0 when the steady step is higher)


@dataclass(frozen=True)
class MemoryEstimate:
    peak_bytes: int
    peak_phase: str
    components: tuple[Term, ...]  # what is alive at the peak; sums to peak_bytes
    phases: tuple[PhasePeak, ...]
    device_bytes: int  # what the GPU would show at the peak: reserved memory + CUDA context (+ paged state)
    steady_bytes: int  # allocated between steps: weights + optimizer state
    saved_activation_bytes: int  # what autograd keeps for backward (saved_tensors_hooks' count)
    saved_by_kind: tuple[Term, ...]
    terms: tuple[Term, ...]  # every stored quantity (weights, grads, states, ...), peak or not
    device: DeviceMemory | None = None  # task allocator: how device_bytes is made up
    host_bytes: int | None = None  # --gpus: host memory per node (offloaded state); None on one GPU
    refresh: RefreshStep | None = None  # task "galore": the optimizer's refresh step (None: every step alike)

    @property
    def fit_device_bytes(self) -> int:
        """The device memory the run needs to train: the steady step's, or the optimizer's refresh step's, which
        is never below it (refresh.py): a run whose refresh step does not fit never trains."""
        return self.refresh.device_bytes if self.refresh is not None else self.device_bytes

    def stored_bytes(self, category: MemoryCategory) -> int | None:
        """Bytes of the stored quantities of one category (None when no term has it)."""
        values = [t.value for t in self.terms if t.category == category]
        return sum(values) if values else None


@dataclass(frozen=True)
class FlopEstimate:
    forward: int
    backward: int
    forward_uncounted: int  # part of `forward` that FlopCounterMode does not see (bitsandbytes 4-bit gemm)
    backward_uncounted: int  # the same kernels rerun by gradient checkpointing inside backward
    terms: tuple[Term, ...]

    @property
    def total(self) -> int:
        return self.forward + self.backward


@dataclass(frozen=True)
class GpuFit:
    gpu: str
    memory_bytes: int
    fits: bool
    headroom_bytes: int  # memory_bytes - device_bytes
    step_time_s: float  # FLOPs / (peak TFLOP/s x utilisation)
    utilisation: float
    verdict: str = ""  # fits / tight / does not fit (tight: memory_bytes within the stated uncertainty)
    uncertainty_bytes: int = 0


@dataclass(frozen=True)
class ServingVariant:
    """One way of serving the fine-tuned model (merged into the base weights, or unmerged): what it adds
    to the base model per generated token, per forward call and per block (analytic/serving.py)."""

    extra_weight_bytes: int
    extra_flops_per_token: int  # the method's matmuls plus attention over its extra positions
    extra_flops_per_forward: int  # once per forward call whatever its tokens (DoRA's weight norm unmerged)
    extra_sequential_ops_per_block: int
    flops_per_token: int  # base model + extra


@dataclass(frozen=True)
class ServingEstimate:
    """Inference cost at a context length: the base model's per-token forward FLOPs and weights, and
    what the method adds merged and unmerged (None, with a note, when the method does not describe it)."""

    context_positions: int  # positions a new token attends to: --seq, capped by a sliding window
    base_weight_bytes: int  # the pretrained weights as the method stores them
    base_matmul_flops_per_token: int  # 2 x the weights of every matmul (block linears, LM head)
    base_attention_flops_per_token: int  # 4 x heads x head_dim per layer per attended position
    mergeable: bool | None  # None: the method describes no serving cost
    extra_positions: int  # prompt or prefix positions every request attends to
    merged: ServingVariant | None
    unmerged: ServingVariant | None
    note: str

    @property
    def base_flops_per_token(self) -> int:
        return self.base_matmul_flops_per_token + self.base_attention_flops_per_token


@dataclass(frozen=True)
class DistributedEstimate:
    """Several GPUs: the world, the strategy's settings and each rank's traffic per step."""

    gpus: int
    nodes: int
    sharding: str
    settings: dict  # the strategy's knobs as modelled (bucket sizes, dtypes, offload, ...)
    communication_bytes: dict  # collective -> payload bytes per rank per step
    wire_bytes: int  # bytes each rank sends per step (ring algorithms)
    bandwidth_bytes_per_s: float | None  # per GPU, the link the collectives cross (None: no --gpu)
    link: str | None  # nvlink | pcie | infiniband
    compute_time_s: float | None
    communication_time_s: float | None
    exposed_communication_time_s: float | None  # the part not hidden behind compute
    overlap: str  # the overlap assumption, in words


@dataclass(frozen=True)
class RunHeader:
    """The run as both engines describe it: the inputs after defaults are filled in, and the
    parameter counts. An `Estimate` and a `TraceResult` are each a header plus their engine's
    numbers (report/jsonout.py `run_header` writes it, once for both)."""

    model: str
    family: str
    method: str
    r: int | None  # None for full fine-tuning
    targets: tuple[str, ...]
    batch: int
    seq: int
    precision: str
    optimizer: str
    grad_checkpointing: bool
    attention: str
    dropout: float
    method_options: dict
    trainable_params: int
    total_params: int
    adapted_modules: int


@dataclass(frozen=True)
class Estimate(RunHeader):
    """The analytic engine's answer for one run."""

    memory: MemoryEstimate
    flops: FlopEstimate
    gpu: GpuFit | None
    warnings: tuple[str, ...]
    assumptions: tuple[str, ...]
    serving: ServingEstimate | None = None  # only when asked for (estimate --serving)
    distributed: "DistributedEstimate | None" = None  # --gpus/--sharding only

    def to_dict(self) -> dict:
        d = asdict(self)
        d["flops"]["total"] = self.flops.total
        return d
