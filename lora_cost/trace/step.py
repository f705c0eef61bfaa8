"""Run one training step on fake tensors under the trace's modes and collect what they saw.

The step is the calibration's reference recipe: `out = model(input_ids=ids, labels=ids)`,
`out.loss.backward()`, `opt.step()`, `opt.zero_grad(set_to_none=True)`, in steady state (the
optimizer state exists before the step), with `out` (and so the logits) alive until the step ends.
Modes, innermost first: FakeTensorMode (shapes via meta kernels), FlopCounterMode, the simulated
allocator (dispatch level, below autograd); CUDA attention and CUDA autocast (function level, above
autograd); saved_tensors_hooks for the saved set.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from . import flops as flopmod
from .allocator import AllocatorSim
from .attention import CudaAttention
from .autocast import CudaAutocast
from .fake import materialize
from .moe import any_dtype_grouped_mm


@dataclass
class StepRecord:
    sim: AllocatorSim
    flops_fwd: dict
    flops_bwd: dict
    counted_ops: set
    backends: dict
    trainable_ids: set
    grad_blocks: set = field(default_factory=set)
    paged_bytes: int = 0  # optimizer state in CUDA managed memory (bitsandbytes paged optimizers)


class Where:
    """Where an allocation happens: the innermost module whose forward (or checkpoint recomputation)
    is running, else, in backward, the autograd node being executed. Forward hooks only: grad hooks
    (torch.utils.module_tracker) would keep recomputation graphs alive and distort the memory."""

    def __init__(self, model) -> None:
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack: list[str] = []

    def __call__(self) -> tuple[str, bool]:
        if self.stack:
            return self.stack[-1], True
        node = torch._C._current_autograd_node()
        return (f"backward: {node.name()}" if node is not None else ""), False

    @contextlib.contextmanager
    def hooks(self):
        def pre(mod, args):
            self.stack.append(self.names.get(id(mod), type(mod).__name__))

        def post(mod, args, out):
            if self.stack:
                self.stack.pop()

        # always_call: a non-reentrant checkpoint stops its recomputation early by raising inside
        # the block's forward; the post hook must still pop the module
        h1, h2 = register_module_forward_pre_hook(pre), register_module_forward_hook(post, always_call=True)
        try:
            yield
        finally:
            h1.remove()
            h2.remove()


def make_optimizer(name: str, params: list, run=None, model=None):
    """The run's optimizer over `params` (trace/optimizers.py): the base optimizer, wrapped for fp32
    master weights and, with --optimizer-in-backward, one per tensor stepped from its gradient hook."""
    from .optimizers import InBackward, MasterWeights, make_base

    from ..analytic.optimizers import get_optimizer
    name = get_optimizer(name).name
    master = run is not None and run.master_weights == "fp32"
    targets = set()
    if name == "galore-adamw" and model is not None:
        from .galore import galore_targets
        targets = galore_targets(model)

    def one(ps):
        if master:  # the masters stand for their parameters: GaLore projects a target's master
            return MasterWeights(ps, lambda ms: make_base(name, ms, {id(m) for p, m in zip(ps, ms) if id(p) in targets}))
        return make_base(name, ps, targets)

    if run is not None and run.optimizer_in_backward:
        return InBackward(params, one)
    return one(params)


def init_state(opt, mode: FakeTensorMode) -> None:
    """The state a first step creates, before the traced step. AdamW foreach and SGD (torch/optim/adamw.py,
    sgd.py `_init_group`): moments shaped like the parameter in its dtype; AdamW's `step` counter is a CPU
    scalar (not device memory), kept as a real tensor so that the update can read it. The bitsandbytes
    stand-in builds its own; the wrappers recurse; fused AdamW and Adafactor take one real step."""
    from .optimizers import InBackward, MasterWeights, warm_state

    if isinstance(opt, (InBackward, MasterWeights)):
        opt.init_state(mode, init_state)
        return
    if hasattr(opt, "init_state"):  # the bitsandbytes stand-in
        opt.init_state(mode)
        return
    foreach = isinstance(opt, torch.optim.SGD) or isinstance(opt, torch.optim.AdamW) and not opt.defaults.get("fused")
    if not foreach:
        warm_state(opt, mode)
        return
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            with mode:
                if isinstance(opt, torch.optim.AdamW):
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                else:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if isinstance(opt, torch.optim.AdamW):
                state["step"] = torch.tensor(1.0)


def _recompute_under(model, attention: CudaAttention, autocast_dtype) -> None:
    """Checkpoint recomputation runs inside backward, where function modes entered around the step
    are not active: pass torch.utils.checkpoint a `context_fn` whose second context (the
    recomputation's) re-enters CUDA attention and, like checkpoint does for torch.autocast, the
    autocast state of the forward."""

    @contextlib.contextmanager
    def recompute_context():
        with contextlib.ExitStack() as stack:
            stack.enter_context(CudaAttention(attention.backends))
            if autocast_dtype:
                stack.enter_context(CudaAutocast({"bf16": torch.bfloat16, "fp16": torch.float16}[autocast_dtype]))
            yield

    def context_fn():
        return contextlib.nullcontext(), recompute_context()

    model = getattr(model, "module", model)  # DistributedDataParallel wraps the model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": context_fn})


def _is_seq2seq(model) -> bool:
    model = getattr(model, "module", model)  # DistributedDataParallel wraps the model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base.config, "is_encoder_decoder", False))


def _get_value(x):
    """torch.optim's `_get_value` for the CPU `step` counters: read the real scalar outside fake mode."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    if isinstance(x, torch.Tensor):
        with unset_fake_temporarily():
            return x.item()
    return x


def _without(counts: dict, step_flops: dict) -> dict:
    """Backward's FLOP counts less the optimizer steps run inside it (--optimizer-in-backward)."""
    return {op: v - step_flops.get(op, 0) for op, v in counts.items()}


def step_inputs(run, ids, seq2seq: bool = False) -> dict:
    """The step's keyword arguments: language-model labels are the input ids (seq2seq: the decoder's
    targets, which the model shifts into its decoder inputs); a sequence classifier takes one label per
    row, a token classifier one per position (random classes: only shapes matter on fake tensors)."""
    if run.task == "seq-cls" and run.labels == 1:  # regression (GLUE STS-B): one float target per row
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.weight_dtype, torch.float32)
        return {"input_ids": ids, "labels": torch.randn(run.batch, dtype=dtype)}
    if run.task == "seq-cls":
        return {"input_ids": ids, "labels": torch.randint(0, run.labels, (run.batch,))}
    if run.task == "token-cls":
        return {"input_ids": ids, "labels": torch.randint(0, run.labels, (run.batch, run.seq))}
    if seq2seq:  # labels of the decoder's length (the decoder input is them shifted right)
        vocab_ids = torch.randint(0, 2, (run.batch, run.decoder_seq))
        return {"input_ids": ids, "labels": vocab_ids}
    if getattr(run, "packing", False):  # one flattened row; positions restart at each of the `batch` sequences
        ids = ids.reshape(1, -1)
        return {"input_ids": ids, "labels": ids, "position_ids": torch.arange(run.seq).repeat(run.batch)[None]}
    return {"input_ids": ids, "labels": ids}


def _kernel_patches(run, model) -> list:
    """flex: transformers' flex mask interface builds a BlockMask (create_block_mask evaluates the mask on
    values); the stand-in kernel takes none (kernels.py). --packing: the padding-free path's value reads.
    flash: transformers' `get_target_dtype` asks torch whether autocast is on for the query's device (the
    trace's CUDA autocast is emulated, so it answers as CUDA would) and whether the model is quantized
    (bitsandbytes' quantizer sets `config._is_quantized`; the trace's 4-bit weights are uint8 stand-ins, its
    8-bit ones int8)."""
    from ..attention_kernels import get_kernel
    from .kernels import packed_position_patches
    out = []
    if get_kernel(run.attention).casts_fp32_inputs:
        import transformers.integrations.flash_attention as fa
        quantized = any(p.dtype in (torch.uint8, torch.int8) for p in model.parameters())  # 4-bit, int8 (issue9b)
        original = fa.get_target_dtype

        def target_dtype(query, module):
            if query.dtype != torch.float32:
                return None
            active = CudaAutocast.active()  # the forward's, or a checkpoint recomputation's in backward
            if active is not None:
                return active.dtype
            if quantized:
                return module.config.dtype
            return original(query, module)
        out.append(mock.patch.object(fa, "get_target_dtype", target_dtype))
    if get_kernel(run.attention).name == "flex":
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        out.append(mock.patch.dict(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping,
                                   {"flex_attention": lambda *args, **kwargs: None}))
    if getattr(run, "packing", False):
        out.extend(packed_position_patches(run))
    return out


def run_step(model, run, optimizer: str, vocab: int, calibration: bool = False,
             loop=None, refresh: bool = False) -> tuple[StepRecord, object]:
    """Trace one step. `calibration=True` reproduces how the H100 calibration rows were measured:
    an identity saved_tensors_hook active throughout and two full warm-up steps before the measured
    one (so graphs leaked by that hook in the warm-ups are still allocated). `loop`: the method's
    `trace_loop` (state the training loop keeps between steps, and its call after opt.step()). `refresh`: the
    measured step is the optimizer's occasional heavier one (GaLore's projector refresh, task "galore")."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    materialize(model, mode)
    world = contextlib.ExitStack()
    if getattr(run, "sharding", None) is not None:  # rank 0 of N under torch's fake process group (sharded.py)
        from .sharded import fake_world, mesh_of, wrap
        world.enter_context(fake_world(run.sharding.gpus))
        if run.sharding.strategy != "ddp":  # DDP wraps inside the simulated allocator (_run_step): its buckets
            mesh = mesh_of(run.sharding.gpus)
            with mode:
                model = wrap(model, run.sharding.strategy, run.sharding.gpus, run.sharding.resharded, mesh=mesh)
    with world:
        return _run_step(model, run, optimizer, vocab, calibration, loop, mode, refresh)


def _run_step(model, run, optimizer, vocab, calibration, loop, mode, refresh=False):
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(optimizer, trainable, run, model)
    init_state(opt, mode)
    if refresh:
        from .optimizers import refresh_next_step
        refresh_next_step(opt)
    loop_state, loop_update = [], None
    if loop is not None:
        with mode:
            loop_state, loop_update = loop(model, run)
    where = Where(model)
    sim = AllocatorSim(where, identity_pack=calibration)
    attention = CudaAttention()
    autocast = CudaAutocast({"bf16": torch.bfloat16, "fp16": torch.float16}[run.autocast_dtype]) if run.autocast_dtype else None
    # One FlopCounterMode *below* the allocator: FlopCounterMode decomposes some ops to count them
    # (e.g. silu_backward into sigmoid, mul, ...); seen from above, each op stays the single kernel
    # CUDA runs, and the decomposition's intermediates stay invisible to the memory accounting.
    counter = flopmod.counter()
    if run.grad_checkpointing:
        _recompute_under(model, attention, run.autocast_dtype)
    # find_packed_sequence_indices reads position ids' values (a data-dependent branch fake tensors
    # cannot take); for the step's unpacked rows it returns None, which lets sdpa run mask-free.
    patch = mock.patch("transformers.masking_utils.find_packed_sequence_indices", lambda position_ids: None)
    with contextlib.ExitStack() as stack:
        stack.enter_context(patch)
        for p in _kernel_patches(run, model):
            stack.enter_context(p)
        stack.enter_context(mock.patch("torch.optim.adam._get_value", _get_value))
        stack.enter_context(any_dtype_grouped_mm())  # mixture-of-experts models (moe.py)
        stack.enter_context(mode)
        stack.enter_context(where.hooks())
        stack.enter_context(attention)
        if autocast is not None:
            stack.enter_context(autocast)
        stack.enter_context(counter)
        stack.enter_context(sim)
        if getattr(run, "sharding", None) is not None and run.sharding.strategy != "ddp":
            from .sharded import fsdp_storage_hooks
            stack.enter_context(fsdp_storage_hooks(sim))
        if getattr(run, "sharding", None) is not None and run.sharding.strategy == "ddp":
            # DistributedDataParallel allocates its flat gradient buckets when it is built (reducer.cpp
            # `initialize_buckets`, C++ ops the allocator's dispatch mode sees): build it here and name them
            from .sharded import wrap
            first = sim.event
            model = wrap(model, "ddp", run.sharding.gpus, spec=run.sharding)
            for blk in sim.blocks:
                if blk.alloc > first and blk.kind is None:
                    blk.kind = "gradient_buckets"
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(sim.pack, sim.unpack))
        for p in model.parameters():
            sim.adopt(p, "trainable_weights" if p.requires_grad else "weights")
        for b in model.buffers():
            sim.adopt(b, "weights")
        if not getattr(opt, "paged", False):  # paged: managed memory
            from .optimizers import state_tensors
            for v in state_tensors(opt):
                sim.adopt(v, "optimizer_state")
        for m in getattr(opt, "masters", []):  # --master-weights fp32
            sim.adopt(m, "master_weights")
        if hasattr(opt, "install"):  # --optimizer-in-backward: steps from gradient hooks
            opt.install(lambda: flopmod.by_op(counter))
            stack.callback(opt.remove)
        for v in loop_state:
            sim.adopt(v, "loop_state")
        del loop_state  # the loop's own tables hold them; a reference here would outlive their update
        ids = torch.randint(0, vocab, (run.batch, run.seq))
        inputs = step_inputs(run, ids, seq2seq=_is_seq2seq(model))
        for _ in range(2 if calibration else 0):
            sim.start_phase("warmup")
            warm = model(**inputs)
            if autocast is not None:
                autocast.end_forward()
                autocast.enabled = False
            sim.mark("warmup_backward")
            warm.loss.backward()
            sim.mark("warmup_optimizer")
            opt.step()
            if loop_update is not None:
                loop_update()
            opt.zero_grad(set_to_none=True)
            del warm
            if autocast is not None:
                autocast.enabled = True
        sim.start_phase("forward")
        before = flopmod.by_op(counter)
        out = model(**inputs)
        after_forward = flopmod.by_op(counter)
        if autocast is not None:
            autocast.end_forward()
            autocast.enabled = False  # backward and the optimizer step run outside the autocast region
        loss = out.loss
        sim.start_phase("backward")
        loss.backward()
        after_backward = flopmod.by_op(counter)
        grad_keys = {p.grad.untyped_storage()._cdata for p in trainable if p.grad is not None}
        grad_blocks = {id(sim.live[k]) for k in grad_keys if k in sim.live}
        sim.start_phase("optimizer")
        opt.step()
        if loop_update is not None:  # peft's AdaLoRA loop: update_and_allocate after step, before zero_grad
            loop_update()
        opt.zero_grad(set_to_none=True)
        sim.start_phase("end")
        del out, loss
    record = StepRecord(sim=sim, flops_fwd=flopmod.difference(after_forward, before),
                        flops_bwd=flopmod.difference(_without(after_backward, getattr(opt, "step_flops", {})), after_forward),
                        counted_ops=flopmod.counted_op_names(counter), backends=dict(attention.backends),
                        trainable_ids={id(p) for p in trainable}, grad_blocks=grad_blocks,
                        paged_bytes=opt.state_bytes() if getattr(opt, "paged", False) else 0)
    return record, opt
