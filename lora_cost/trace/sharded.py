"""Rank 0 of N on one CPU: the real FSDP2 `fully_shard` and `DistributedDataParallel` under torch's fake
process group (torch/testing/_internal/distributed/fake_pg.py: collectives that return at once without
moving data, any world size), one real training step, and the bytes the rank then holds.

The wrapping is accelerate's and Trainer's: `fully_shard` on every decoder layer (the model's
`_no_split_modules` class), then on the root. What is counted is what torch allocated for the rank:
parameters (their local shards), gradients and optimizer state, by distinct storage.
"""

from __future__ import annotations

from contextlib import contextmanager

from ..errors import LoraCostError


@contextmanager
def fake_world(world: int, rank: int = 0):
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def decoder_layers(model):
    names = set(getattr(model, "_no_split_modules", None) or ())
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names |= set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


@contextmanager
def fsdp_storage_hooks(sim):
    """FSDP2 frees and re-allocates each unsharded parameter by resizing its storage
    (_fsdp_param.py `free_storage`: `storage.resize_(0)`, `alloc_storage`), which no aten op of the step's
    dispatch shows and no storage object's death reports: tell the simulated allocator."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    orig_alloc, orig_free = _fsdp_param.alloc_storage, _fsdp_param.free_storage

    def alloc(tensor):
        orig_alloc(tensor)
        sim.storage_resized(tensor, "fsdp alloc_storage")

    def free(tensor):
        sim.storage_freed(tensor)
        orig_free(tensor)

    _fsdp_param.alloc_storage, _fsdp_param.free_storage, _fsdp_param_group.alloc_storage = alloc, free, alloc
    try:
        yield
    finally:
        _fsdp_param.alloc_storage, _fsdp_param.free_storage, _fsdp_param_group.alloc_storage = (
            orig_alloc, orig_free, orig_alloc)


def mesh_of(world: int):
    """A 1-D CPU device mesh over the world (built outside FakeTensorMode: it reads real rank tensors)."""
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (world,))


def wrap(model, strategy: str, world: int, reshard_after_forward: bool = True, mesh=None, spec=None):
    """The model as the strategy wraps it (fully_shard per decoder layer + root, or DDP; `spec`: the
    ShardingSpec whose DDP options, bucket_cap_mb and gradient_as_bucket_view, DDP is given)."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        options = {} if spec is None else dict(bucket_cap_mb=spec.bucket_cap_mb,
                                               gradient_as_bucket_view=spec.gradient_as_bucket_view)
        ddp = DistributedDataParallel(model, init_sync=False, **options)  # the initial broadcast reads real values
        ddp.register_comm_hook(None, _in_place_hook)
        return ddp
    if strategy not in ("fsdp", "fsdp-grad-op"):
        raise LoraCostError(f"the trace engine runs DDP and FSDP2 (fsdp, fsdp-grad-op); {strategy} is analytic only "
                            "(DeepSpeed cannot run on fake tensors; HSDP needs a 2-D mesh)")
    from torch.distributed.fsdp import fully_shard
    # task "fsdpqlora": as accelerate's fsdp2_prepare_model (utils/fsdp_utils.py), frozen integer Params4bit (QLoRA's
    # default uint8 storage) are kept out of sharding: every rank holds them whole. Found by their module (bitsandbytes'
    # Linear4bit, or the trace's stand-in): on fake tensors a parameter's class is FakeTensor
    ignored = {m.weight for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear4bitStandIn")
               and not m.weight.requires_grad and not m.weight.is_floating_point()}
    extra = {"ignored_params": ignored} if ignored else {}
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, mesh=mesh, **extra)
    fully_shard(model, reshard_after_forward=reshard_after_forward, mesh=mesh, **extra)
    return model


def _in_place_hook(state, bucket):
    """DDP's default hook all-reduces the bucket in place and returns it; the fake process group's future
    carries no value, so return the (same) bucket buffer: the memory is the default hook's."""
    import torch
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is None:
            continue
        t = _local(t)
        if t.numel() == 0:
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def rank_bytes(model, strategy: str, world: int, batch: int = 2, seq: int = 16, vocab: int = 512,
               ckpt: bool = False) -> dict[str, int]:
    """One step of rank 0: {frozen, trainable, gradients, optimizer_state} bytes it holds afterwards
    (gradients counted before zero_grad; DDP's buckets counted apart)."""
    import torch

    with fake_world(world):
        if ckpt:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        wrapped = wrap(model, strategy, world)
        params = [p for p in wrapped.parameters()]
        trainable = [p for p in params if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-3, foreach=True)
        ids = torch.randint(0, vocab, (batch, seq))
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        out = {"frozen": _storage_bytes(p for p in params if not p.requires_grad),
               "trainable": _storage_bytes(trainable),
               "gradients": _storage_bytes(p.grad for p in trainable),
               "optimizer_state": _storage_bytes(v for st in opt.state.values() for k, v in st.items() if k != "step")}
        if strategy == "ddp":
            reducer = wrapped.reducer
            out["buckets"] = sum(t.numel() * t.element_size() for b in reducer._get_zeros_like_grad_buckets()
                                 for t in [b.buffer()]) if hasattr(reducer, "_get_zeros_like_grad_buckets") else -1
        opt.zero_grad(set_to_none=True)
        return out
