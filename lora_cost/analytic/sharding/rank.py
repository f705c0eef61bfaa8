"""What one rank holds, per strategy: the busiest rank's shards, the buffers each library adds at each
moment of the step, host memory, and the collectives' bytes (torch-free).

Shards (the busiest rank is rank 0: every rank stores the padded size, rank 0's chunk is the full one):
- FSDP2 (torch/distributed/fsdp/_fully_shard/_fsdp_param.py `FSDPParam._init_sharded_param`): each parameter
  is split with torch.chunk on dim 0 into S pieces and every rank stores the 0th, padded size:
  ceil(dim0 / S) rows (`padded_sharded_param_size`). Gradients are views of the reduce-scatter output
  (`_fsdp_collectives.foreach_reduce`), the same padded shard; torch.optim's state is zeros_like the local
  shard. All-gather: each parameter's unsharded tensor is a view of its own output of S x padded-shard
  elements (`init_all_gather_outputs`), alive from the unit's pre-forward to its reshard.
- DeepSpeed ZeRO-1/2 (deepspeed/runtime/zero/stage_1_and_2.py): the trainable parameters are flattened,
  padded to a multiple of 2 x W elements (`nccl_start_alignment_factor = 2`) and split in W partitions;
  the fp32 master partition (`single_partition_of_fp32_groups`) and the optimizer state live on it; its fp32
  gradient (`single_partition_of_fp32_groups[i].grad`) is made for the step. Stage 2 keeps only the
  partition of the 16-bit gradients. Frozen parameters are not in the optimizer's groups: kept whole.
- ZeRO-3 (deepspeed/runtime/zero/partition_parameters.py `_aligned_size`): each parameter padded to a
  multiple of W and split; parameters below stage3_param_persistence_threshold elements stay whole on every
  rank (`ds_persist`). The gathered working set is modelled as one decoder layer plus the prefetch bucket,
  capped by stage3_max_live_parameters.
- DDP (torch/csrc/distributed/c10d/reducer.cpp `Reducer::initialize_buckets`): every trainable parameter
  is copied into flat bucket tensors that live as long as the DDP module (`bucket.gradients`); frozen
  parameters are never bucketed. With gradient_as_bucket_view the gradients are views of the buckets.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import LoraCostError
from ...results import MemoryCategory as C
from ...units import DTYPE_BYTES
from ..methods.base import TensorGroup
from ..optimizers import Optimizer
from .config import ShardingSpec
from .tensors import BUFFER, LAYER, ROOT, ShardTensor


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def fsdp_shard_numel(t: ShardTensor, shards: int) -> int:
    """Elements of one FSDP2 shard of one tensor: ceil(dim0 / S) rows of the other dims."""
    return ceil_div(t.dim0, shards) * t.row


def zero3_partition_numel(numel: int, world: int) -> int:
    """ZeRO-3: a parameter padded to a multiple of the world size, one part per rank (`_aligned_size`)."""
    return ceil_div(numel, world)


def zero12_partition_numel(total: int, world: int) -> int:
    """ZeRO-1/2: the flat group padded to a multiple of 2 x W (`align_dense_tensors`), one part per rank."""
    return ceil_div(total, 2 * world) * 2


@dataclass(frozen=True)
class RankModel:
    """The busiest rank's memory and traffic; the `*_unit` sizes are per decoder layer."""

    sharding: ShardingSpec
    layers: int
    weights: int  # frozen parameters on the GPU
    trainable: int  # trainable parameters on the GPU
    gradients: int  # gradients on the GPU at the end of backward
    optimizer_state: int  # on the GPU (ZeRO: fp32 master partition + states)
    optimizer_temporaries: int
    host_bytes_per_rank: int  # offloaded (pinned or pageable) host memory of one rank
    paged_state: int = 0  # bitsandbytes paged optimizers: the rank's state in CUDA managed memory
    root_gathered: int = 0  # FSDP root / ZeRO-3 persistent params gathered during forward and backward
    unit_gathered: int = 0  # one layer's gathered parameters
    unit_unsharded_grads: int = 0  # one layer's gradients before they are reduce-scattered
    unit_reduce_scatter: int = 0  # one layer's reduce-scatter input
    root_unsharded_grads: int = 0  # root's trainable gradients, reduced at the end of backward
    root_head_grads: int = 0  # of those, the ones the head's backward makes (not the embeddings')
    layer_sharded_grads: int = 0  # one layer's gradient shards (FSDP: the rank's part after its reduce-scatter)
    root_reduce_scatter: int = 0
    buckets: int = 0  # DDP buckets (persistent)
    backward_buckets: int = 0  # ZeRO ipg buckets (backward only)
    keep_gathered: bool = False  # fsdp-grad-op: units stay gathered from their forward to their backward
    backward_prefetch: bool = True  # FSDP2 all-gathers the next unit of backward ahead (ZeRO-3: inside unit_gathered)
    collectives: tuple[tuple[str, int, float], ...] = ()  # (collective, payload bytes per rank, wire factor)
    overlapped_collectives: tuple[str, ...] = ()
    # task "fsdpqlora": of `weights`, the module state no strategy partitions (VeRA's buffers, QLoRA's quant_state)
    replicated: int = 0

    def gathered(self, moment: str, i: int | None = None, unformed=None) -> list[tuple[C, int]]:
        """The parameters, all-gather buffers and reduction buffers alive at a moment of the step (peaks.py
        names the moments; i: the block whose backward or recomputation runs).

        FSDP2 keeps the flat output of the latest all-gather until the next all-gather's copy-in
        (_fsdp_param_group.py `AllGatherState`, freed at the latest by the root's final backward callback),
        so one unit's all-gather buffer is alive beside the gathered units throughout forward and backward:
        in forward the current unit's, in backward the next unit's prefetch (issued for the last layer at the
        root's pre-backward). A unit reduce-scatters after its backward (`post_backward`: reshard, then
        `foreach_reduce` copies the unsharded gradients into the reduce-scatter input)."""
        L, unit = self.layers, self.unit_gathered
        if not (unit or self.root_gathered or self.buckets or self.backward_buckets):
            return []
        root, keep = self.root_gathered, self.keep_gathered
        buffer = unit if self.backward_prefetch and not keep else 0  # the latest all-gather's flat output
        out: list[tuple[C, int]] = [(C.GRADIENT_BUCKETS, self.buckets)]
        if moment == "forward-loss":
            out += [(C.GATHERED_PARAMETERS, root + (L * unit if keep else 0)), (C.PREFETCHED_PARAMETERS, buffer)]
        elif moment == "forward-block":  # inside the last block: root + its unit, and its all-gather buffer
            out += [(C.GATHERED_PARAMETERS, root + (L * unit if keep else unit)), (C.PREFETCHED_PARAMETERS, buffer)]
        elif moment in ("backward-start", "backward-head"):
            out += [(C.GATHERED_PARAMETERS, root + (L * unit if keep else 0)), (C.PREFETCHED_PARAMETERS, buffer),
                    (C.GRADIENT_BUCKETS, self.backward_buckets)]
            if moment == "backward-head":
                out.append((C.UNSHARDED_GRADIENTS, self.root_head_grads))
        elif moment in ("backward-block", "recompute", "reduce-scatter"):
            assert i is not None
            unit_grads = self.unit_unsharded_grads if moment != "recompute" else 0
            if unformed is not None and unit_grads:  # peaks.in_block: only the gradients formed so far exist
                missing, per_layer = unformed
                if missing:
                    unit_grads -= missing if per_layer == unit_grads else unit_grads * missing // per_layer
            out += [(C.GATHERED_PARAMETERS, root + ((i + 1) * unit if keep else unit)),
                    (C.PREFETCHED_PARAMETERS, buffer if moment != "reduce-scatter" or i > 0 else 0),
                    (C.UNSHARDED_GRADIENTS, self.root_head_grads + unit_grads),
                    (C.GRADIENTS, self.layer_sharded_grads * (L - 1 - i)),
                    (C.GRADIENT_BUCKETS, self.backward_buckets)]
            if moment == "reduce-scatter":
                out.append((C.REDUCE_SCATTER_BUFFERS, self.unit_reduce_scatter))
            elif i < L - 1:
                # the unit above's reduce-scatter input, kept alive until this unit's post_backward reclaims it
                # (_fsdp_param_group.py post_backward: at most `reduce_scatter_max_input_buffers`, default 1,
                # ReduceScatterStates retained; the oldest is waited on and dropped before the next is appended)
                out.append((C.REDUCE_SCATTER_BUFFERS, self.unit_reduce_scatter))
        elif moment == "backward-end":  # the root's post-backward: its gradients reduce-scattered
            out += [(C.UNSHARDED_GRADIENTS, self.root_unsharded_grads), (C.REDUCE_SCATTER_BUFFERS, self.root_reduce_scatter),
                    (C.GRADIENT_BUCKETS, self.backward_buckets), (C.GRADIENTS, self.layer_sharded_grads * L)]
        return [(c, v) for c, v in out if v]

    @property
    def exact_gradients(self) -> bool:
        """FSDP: the rank's gradients at each moment come from gathered(); the others scale the one-GPU ones."""
        return bool(self.unit_gathered) and self.backward_prefetch

    @property
    def steady_bytes(self) -> int:
        """Allocated between steps on the rank's GPU: its stored weights, trainable weights and optimizer state
        (the training loop's own state is added by the caller), and DDP's buckets, built with the module
        (reducer.cpp `initialize_buckets`) and kept (task "sharding2": memory.steady_bytes is the rank's)."""
        return self.weights + self.trainable + self.optimizer_state + self.buckets

    @property
    def comm_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, payload, _ in self.collectives:
            out[name] = out.get(name, 0) + payload
        return out

    @property
    def wire_bytes(self) -> int:
        """Bytes each rank sends per step over a ring: all-gather and reduce-scatter (S-1)/S of the
        gathered size, all-reduce 2(S-1)/S (nccl-tests doc/PERFORMANCE.md, bus bandwidth)."""
        return int(sum(payload * factor for _, payload, factor in self.collectives))


def _bytes(t: ShardTensor, numel: int, dtype: str | None = None) -> int:
    return numel * t.count * DTYPE_BYTES[dtype or t.dtype]


def rank_model(tensors: tuple[ShardTensor, ...], sharding: ShardingSpec, opt: Optimizer, layers: int,
               hidden_size: int) -> RankModel:
    buffers = sum(_bytes(t, t.numel) for t in tensors if t.unit == BUFFER)
    if buffers:  # module buffers: no strategy partitions them, every rank holds them whole beside its weights
        # (FSDP2 moves buffers to the device even under CPUOffloadPolicy: _fully_shard/_fsdp_init.py
        # `_move_states_to_device`; only the sharded parameters go to the host)
        from dataclasses import replace
        model = rank_model(tuple(t for t in tensors if t.unit != BUFFER), sharding, opt, layers, hidden_size)
        return replace(model, weights=model.weights + buffers, replicated=buffers)
    s = sharding.strategy
    if s == "ddp":
        return _ddp(tensors, sharding, opt, layers)
    if s in ("fsdp", "fsdp-grad-op", "hsdp"):
        return _fsdp(tensors, sharding, opt, layers)
    if opt.name not in ("adamw-torch", "adamw-torch-fused", "sgd"):  # registry names (adamw is adamw-torch's alias)
        raise LoraCostError(f"--sharding {s}: DeepSpeed runs its own optimizer on the fp32 partition; --optimizer "
                            f"{opt.name} is not modelled with ZeRO (adamw, adamw-torch-fused or sgd)")
    return _zero(tensors, sharding, opt, layers)


def _full_groups(tensors, trainable: bool) -> list[TensorGroup]:
    return [TensorGroup(t.name, t.numel, t.count, t.dtype) for t in tensors if t.trainable == trainable]


def _ring(world: int, allreduce: bool = False) -> float:
    return (2.0 if allreduce else 1.0) * (world - 1) / world if world > 1 else 0.0


def _ddp(tensors, sh: ShardingSpec, opt: Optimizer, L: int) -> RankModel:
    trainable = _full_groups(tensors, True)
    frozen = sum(g.total_numel * DTYPE_BYTES[g.dtype] for g in _full_groups(tensors, False))
    grads = sum(g.total_numel * DTYPE_BYTES[g.dtype] for g in trainable)
    state = sum(opt.state_bytes(g) for g in trainable)
    return RankModel(sh, L, weights=frozen, trainable=grads, gradients=0 if sh.gradient_as_bucket_view else grads,
                     optimizer_state=0 if opt.paged else state, paged_state=state if opt.paged else 0,
                     optimizer_temporaries=opt.step_temporaries(trainable), host_bytes_per_rank=0, buckets=grads,
                     collectives=(("all_reduce", grads, _ring(sh.gpus, True)),), overlapped_collectives=("all_reduce",))


def _fsdp(tensors, sh: ShardingSpec, opt: Optimizer, L: int) -> RankModel:
    S = sh.shard_size
    shards = [(t, fsdp_shard_numel(t, S)) for t in tensors]
    sharded = lambda want: sum(_bytes(t, n) for t, n in shards if t.trainable == want)  # noqa: E731
    groups = [TensorGroup(t.name, n, t.count, t.dtype) for t, n in shards if t.trainable]
    full_state = sum(opt.state_bytes(g) for g in groups)
    state, paged = (0, full_state) if opt.paged else (full_state, 0)
    pdt = lambda t: sh.param_dtype or t.dtype  # noqa: E731
    rdt = lambda t: sh.reduce_dtype or pdt(t)  # noqa: E731

    def per_unit(unit: str, what) -> int:
        total = sum(what(t, n) for t, n in shards if t.unit == unit)
        return total // L if unit == LAYER else total

    gathered = lambda t, n: _bytes(t, S * n, pdt(t))  # noqa: E731
    ugrads = lambda t, n: _bytes(t, t.numel, pdt(t)) if t.trainable else 0  # noqa: E731
    rs_in = lambda t, n: _bytes(t, S * n, rdt(t)) if t.trainable else 0  # noqa: E731
    weights, trainable, grads = sharded(False), sharded(True), sharded(True)
    host = 0
    if sh.cpu_offload:  # CPUOffloadPolicy: sharded parameters, gradients and the optimizer state on the host
        host, weights, trainable, grads, state = weights + trainable + grads + state, 0, 0, 0, 0
    all_gather = sum(gathered(t, n) for t, n in shards)
    unit_ag = per_unit(LAYER, gathered)
    passes = all_gather + (0 if not sh.resharded else unit_ag * L)  # forward, and backward again when resharded
    reduce = sum(rs_in(t, n) for t, n in shards)
    coll = [("all_gather", passes, _ring(S)), ("reduce_scatter", reduce, _ring(S))]
    if sh.strategy == "hsdp":  # the shards are all-reduced across the replicas (one rank per node)
        coll.append(("all_reduce", reduce // S, _ring(sh.nodes, True)))
    return RankModel(sh, L, weights=weights, trainable=trainable, gradients=grads, optimizer_state=state,
                     optimizer_temporaries=opt.step_temporaries(groups), host_bytes_per_rank=host, paged_state=paged,
                     root_gathered=per_unit(ROOT, gathered), unit_gathered=unit_ag,
                     unit_unsharded_grads=per_unit(LAYER, ugrads), unit_reduce_scatter=per_unit(LAYER, rs_in),
                     root_unsharded_grads=per_unit(ROOT, ugrads), root_reduce_scatter=per_unit(ROOT, rs_in),
                     root_head_grads=sum(ugrads(t, n) for t, n in shards if t.unit == ROOT and not t.late),
                     layer_sharded_grads=0 if sh.cpu_offload else
                     sum(_bytes(t, n) for t, n in shards if t.unit == LAYER and t.trainable) // L,
                     keep_gathered=not sh.resharded, collectives=tuple(coll),
                     overlapped_collectives=("all_gather", "reduce_scatter", "all_reduce"))


def _zero(tensors, sh: ShardingSpec, opt: Optimizer, L: int) -> RankModel:
    W, stage = sh.gpus, int(sh.strategy[-1])
    half = lambda t: t.dtype  # noqa: E731  (the engine's 16-bit dtype; --precision fp32: fp32)
    trainable_numel = sum(t.numel * t.count for t in tensors if t.trainable)
    trainable_bytes = sum(_bytes(t, t.numel, half(t)) for t in tensors if t.trainable)
    frozen_bytes = sum(_bytes(t, t.numel) for t in tensors if not t.trainable)
    if stage < 3:
        part = zero12_partition_numel(trainable_numel, W)
    else:
        part = sum(zero3_partition_numel(t.numel, W) * t.count for t in tensors if t.trainable)
    grad_dtype_bytes = trainable_bytes // trainable_numel if trainable_numel else 2
    master = 4 * part  # fp32 master partition
    state = master + opt.state_bytes(TensorGroup("fp32 partition", part, 1, "fp32"))
    fp32_grad = 4 * part  # the partition's fp32 gradient, made for the step
    host = 0
    offload = sh.offload
    if stage == 1:
        grads = trainable_bytes
    else:
        grads = part * grad_dtype_bytes
    if offload != "none":  # offload_optimizer: master, states and fp32 gradients on the host; no GPU grad partition
        host, state, fp32_grad = state + fp32_grad, 0, 0
        if stage > 1:
            grads = 0
    buckets = sh.reduce_bucket_size * grad_dtype_bytes * (2 if sh.overlapped else 1)
    if stage < 3:
        weights, trainable = frozen_bytes, trainable_bytes
        unit = root = 0
        coll = [("reduce_scatter", trainable_bytes, _ring(W)), ("all_gather", trainable_bytes, _ring(W))]
        if stage == 1:
            coll[0] = ("all_reduce", trainable_bytes, _ring(W, True))
    else:
        persistent = [t for t in tensors if t.numel < sh.param_persistence_threshold]
        sharded_ = [t for t in tensors if t.numel >= sh.param_persistence_threshold]
        pbytes = lambda ts, want: sum(_bytes(t, t.numel) for t in ts if t.trainable == want)  # noqa: E731
        sbytes = lambda want: sum(_bytes(t, zero3_partition_numel(t.numel, W)) for t in sharded_ if t.trainable == want)  # noqa: E731
        weights, trainable = pbytes(persistent, False) + sbytes(False), pbytes(persistent, True) + sbytes(True)
        layer_numel = sum(t.numel * t.count for t in sharded_ if t.unit == LAYER) // L
        elem = DTYPE_BYTES[tensors[0].dtype] if tensors else 2
        live = min(layer_numel + sh.prefetch_bucket_size, sh.max_live_parameters)
        unit, root = live * elem, 0
        gathered_bytes = sum(_bytes(t, t.numel) for t in sharded_)
        coll = [("all_gather", 2 * gathered_bytes, _ring(W)), ("reduce_scatter", trainable_bytes, _ring(W))]
        if offload == "params":
            host += weights + trainable
            weights = trainable = sum(_bytes(t, t.numel) for t in persistent)
            trainable = pbytes(persistent, True)
            weights = pbytes(persistent, False)
    return RankModel(sh, L, weights=weights, trainable=trainable, gradients=grads, optimizer_state=state,
                     optimizer_temporaries=fp32_grad, host_bytes_per_rank=host, root_gathered=root, unit_gathered=unit,
                     backward_buckets=buckets, collectives=tuple(coll), backward_prefetch=False,
                     overlapped_collectives=("all_gather", "reduce_scatter") if stage == 3 else ("reduce_scatter",))
