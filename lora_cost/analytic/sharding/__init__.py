"""Several GPUs (--gpus, --sharding): the busiest rank's memory, its traffic and a step time (torch-free).

config.py holds the options and their library defaults, deepspeed.py reads a DeepSpeed config, tensors.py
lists every parameter with its shape, rank.py says what a rank holds at each moment of the step.
"""

from __future__ import annotations

from dataclasses import asdict
from functools import lru_cache

from ...results import DistributedEstimate, Term
from .config import ShardingSpec  # light: the CLI reads its choices; the rest loads with the first --gpus estimate

__all__ = ["ShardingSpec", "rank_of", "distributed_estimate", "sharding_terms", "exposed_time_s"]


# DeepSpeed's engine casts the module's parameters to the 16-bit dtype when its bf16/fp16 mode is enabled
# (deepspeed/runtime/engine.py `DeepSpeedEngine._configure_distributed_model`: `self.module.bfloat16()` /
# `.half()`, or `_cast_module_mixed_precision` in newer releases) and runs no torch autocast: fp32 weights under
# autocast (--precision amp-bf16/amp-fp16) do not exist under ZeRO, and peft's fp32 adapters become 16-bit.
ZERO_AMP = ("--sharding {strategy}: DeepSpeed's bf16/fp16 mode casts the whole module to 16-bit "
            "(deepspeed/runtime/engine.py _configure_distributed_model) and runs no autocast; give --precision "
            "bf16 or fp16 (Trainer --bf16/--fp16 with DeepSpeed), or fp32")
ZERO_ADAPTERS = ("--sharding {strategy} with --precision {precision}: DeepSpeed casts peft's fp32 adapters to "
                 "{precision} with the module (deepspeed/runtime/engine.py _configure_distributed_model); this estimate "
                 "keeps {method}'s adapter tensors in fp32 (their weights, gradients and the fp32 input copies peft makes "
                 "for them are over-counted): its adapter dtype is not modelled")
ZERO_CAST = ("--sharding {strategy} with --precision {precision}: DeepSpeed casts the whole module, peft's adapters "
             "included, to {precision} (deepspeed/runtime/engine.py _configure_distributed_model), so the adapters are "
             "counted as --adapter-dtype {precision}")


def zero_adapter_cast(run, method):
    """Under ZeRO in 16-bit the adapters are cast with the module: the run with `adapter_dtype` set to the
    precision, for the methods whose adapter dtype is modelled (adapter_dtypes.py); the run unchanged otherwise."""
    from dataclasses import replace
    from ..adapter_dtypes import ADAPTER_DTYPE_METHODS
    sh = run.sharding
    if sh is None or not sh.strategy.startswith("zero") or run.precision not in ("bf16", "fp16") \
            or method.name not in ADAPTER_DTYPE_METHODS or method.name == "qlora" or run.adapter_dtype is not None:
        return run
    return replace(run, adapter_dtype=run.precision)


def check_run(run, method) -> tuple[str, ...]:
    """Refuse what a strategy's library cannot run as given (one line), and return the warnings of what the
    estimate knowingly leaves out."""
    sh = run.sharding
    notes: tuple[str, ...] = ()
    if sh is not None and method.name == "qlora":  # task "fsdpqlora": 4-bit weights under FSDP2 / DDP only
        from .qlora import check_qlora
        notes = check_qlora(run, method.storage(run))
    if sh is None or not sh.strategy.startswith("zero"):
        return notes
    from ...errors import LoraCostError
    if run.precision.startswith("amp-"):
        raise LoraCostError(ZERO_AMP.format(strategy=sh.strategy))
    if run.precision in ("bf16", "fp16") and not method.base_trainable:
        if run.adapter_dtype == run.precision:  # zero_adapter_cast applied it
            return (ZERO_CAST.format(strategy=sh.strategy, precision=run.precision),)
        return (ZERO_ADAPTERS.format(strategy=sh.strategy, precision=run.precision, method=method.name),)
    return ()


def rank_of(arch, spec, method, run, opt, sites, head_sites):
    """The busiest rank's RankModel (rank.py), cached: batch and length sweeps do not change it."""
    check_run(run, method)
    key = run.__class__(method=run.method, r=run.r, precision=run.precision, method_options=run.method_options,
                        targets=run.targets, task=run.task, num_labels=run.num_labels, adapter_dtype=run.adapter_dtype)
    return _rank_of(arch, spec, method, key, run.sharding, opt, tuple(sites), tuple(head_sites))


@lru_cache(maxsize=2048)
def _rank_of(arch, spec, method, key, sharding, opt, sites, head_sites):
    from .deepspeed import apply_deepspeed_config
    from .rank import rank_model
    from .tensors import shard_tensors
    sharding = apply_deepspeed_config(sharding, spec.hidden)
    return rank_model(shard_tensors(arch, spec, method, key, sites, head_sites), sharding, opt, spec.layers, spec.hidden)


OVERLAP = {
    "ddp": "DDP all-reduces each bucket as its gradients are ready: overlapped with backward",
    "fsdp": "FSDP2 overlaps all-gathers (prefetch) and reduce-scatters with compute",
    "zero12": "ZeRO-1/2 reduce during backward (overlapped only with overlap_comm) and all-gather the updated "
              "parameters after the optimizer step (not overlapped)",
    "zero3": "ZeRO-3 prefetches and reduces while computing (overlap_comm)",
}


@lru_cache(maxsize=256)
def _link(gpu, sharding: ShardingSpec) -> tuple[str | None, float | None]:
    """The slowest link a step's collectives cross: InfiniBand across nodes, else NVLink or PCIe."""
    if gpu is None:
        return None, None
    if sharding.nodes > 1:  # HSDP's all-reduce and every other strategy's ring cross nodes
        bw, name = gpu.infiniband_bandwidth_GB_per_s, "infiniband"
    elif gpu.nvlink_bandwidth_GB_per_s:
        bw, name = gpu.nvlink_bandwidth_GB_per_s, "nvlink"
    else:
        bw, name = gpu.pcie_bandwidth_GB_per_s, "pcie"
    return (name, bw * 1e9) if bw else (None, None)


def communication_times(rank, bandwidth: float | None, compute_time_s: float | None) -> tuple:
    """(communication time, the part compute does not hide) in seconds; (None, None) without a link or a compute
    time. The overlapped collectives hide behind compute (OVERLAP says which each strategy overlaps); the rest
    is serial."""
    if not bandwidth or compute_time_s is None:
        return None, None
    overlapped, serial = _wire_seconds(rank, bandwidth)
    return overlapped + serial, max(overlapped - compute_time_s, 0.0) + serial


@lru_cache(maxsize=4096)
def _wire_seconds(rank, bandwidth: float) -> tuple[float, float]:
    """(overlapped, serial) seconds of the rank's collectives on the link: independent of the batch, so a sweep
    over batches computes them once."""
    overlapped = sum(p * f for n, p, f in rank.collectives if n in rank.overlapped_collectives) / bandwidth
    serial = sum(p * f for n, p, f in rank.collectives if n not in rank.overlapped_collectives) / bandwidth
    return overlapped, serial


def exposed_time_s(rank, gpu, compute_time_s: float) -> float:
    """What the step adds to its compute time for the communication compute does not hide (fast.py's numbers
    path and `estimate_run` both add this: one definition)."""
    _, bandwidth = _link(gpu, rank.sharding)
    return communication_times(rank, bandwidth, compute_time_s)[1] or 0.0


def distributed_estimate(rank, gpu, compute_time_s: float | None) -> DistributedEstimate:
    sh = rank.sharding
    link, bandwidth = _link(gpu, sh)
    comm_time, exposed = communication_times(rank, bandwidth, compute_time_s)
    key = sh.strategy if sh.strategy in ("ddp", "zero3") else ("zero12" if sh.strategy.startswith("zero") else "fsdp")
    settings = {k: v for k, v in asdict(sh).items() if k not in ("strategy", "gpus", "nodes")}
    return DistributedEstimate(gpus=sh.gpus, nodes=sh.nodes, sharding=sh.strategy, settings=settings,
                               communication_bytes=rank.comm_bytes, wire_bytes=rank.wire_bytes,
                               bandwidth_bytes_per_s=bandwidth, link=link, compute_time_s=compute_time_s,
                               communication_time_s=comm_time, exposed_communication_time_s=exposed,
                               overlap=OVERLAP[key] + "; step time = compute + the communication not hidden by it")


def sharding_terms(rank) -> tuple[Term, ...]:
    """The rank's stored quantities for memory.terms (--explain)."""
    from ...units import fmt_bytes
    sh = rank.sharding
    what = {"ddp": "every rank holds the whole model", "zero1": "optimizer state partitioned",
            "zero2": "gradients and optimizer state partitioned", "zero3": "parameters, gradients, optimizer partitioned"}
    where = what.get(sh.strategy, f"every parameter sharded on dim 0 over {sh.shard_size} ranks, padded")
    out = [Term("rank weights", rank.weights, f"{sh.strategy} x {sh.gpus} GPUs: {where}", "frozen parameters this rank stores"),
           Term("rank trainable weights", rank.trainable, where, "trainable parameters this rank stores"),
           Term("rank gradients", rank.gradients, where, "gradients this rank keeps after backward"),
           Term("rank optimizer state", rank.optimizer_state,
                "ZeRO: fp32 master partition + states" if sh.strategy.startswith("zero") else "states of the rank's shards",
                "on the GPU"),
           Term("host memory per rank", rank.host_bytes_per_rank, "offloaded state", f"x {sh.gpus_per_node} ranks per node")]
    if rank.replicated:  # task "fsdpqlora"
        out.append(Term("rank weights kept whole", rank.replicated, "not parameters: no strategy partitions them",
                        "of the rank weights: QLoRA's 4-bit quant_state (absmax, nested absmax, code), VeRA's buffers"))
    if rank.unit_gathered:
        out.append(Term("gathered decoder layer", rank.unit_gathered, "one unit's all-gather output",
                        f"{fmt_bytes(rank.unit_gathered)} per unit in use"))
    return tuple(out)
