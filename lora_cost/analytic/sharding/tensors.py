"""Every parameter tensor of a run with the shape facts sharding needs: its dim 0, its elements, its dtype,
whether it trains, and which wrapping unit holds it (a decoder layer or the root). Torch-free.

FSDP2 shards each parameter on dim 0 and ZeRO-3 each flattened parameter, so a group count of the
architecture is not enough: the linears come from the architecture's linear sites (nn.Linear weight
[d_out, d_in], GPT-2's Conv1D [d_in, d_out]: `LinearSite.fan_in_fan_out`), the adapters from the method's
tensor names (peft lora_A [r, d_in], lora_B [d_out, r], DoRA's lora_magnitude_vector [d_out]), the rest from
the architecture's groups (embeddings and LM heads [rows, hidden], norms and biases 1-D).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ...errors import LoraCostError
from ..architectures.base import Architecture
from ..budget import param_groups
from ..methods.base import Method
from ..methods.storage import FourBitStorage
from ...spec import LinearSite, ModelSpec, RunConfig

LAYER, ROOT = "layer", "root"
# not a parameter: a module buffer (VeRA's shared vera_A/vera_B, peft BufferDict). fully_shard and ZeRO partition
# parameters only and DDP buckets only gradients, so every rank keeps the whole buffer (rank.py `rank_model`)
BUFFER = "buffer"


@dataclass(frozen=True)
class ShardTensor:
    """`count` tensors of `numel` elements, `dim0` rows each (1-D tensors: dim0 == numel)."""

    name: str
    dim0: int
    numel: int
    count: int
    dtype: str
    trainable: bool
    unit: str  # LAYER: `count` is spread evenly over the decoder layers; ROOT: the root unit's
    late: bool = False  # its gradient arrives at the end of backward (an embedding no LM head is tied to)

    @property
    def row(self) -> int:
        return self.numel // self.dim0


# the sharding model covers these methods: the parameters they add and their shapes are listed below
# (task "sharding2": LoRA-FA's frozen lora_A, (IA)3's vectors, VeRA's scaling vectors and its shared projections,
# buffers every rank keeps whole; AdaLoRA's rank allocator copies whole parameters in the training loop: not
# modelled across GPUs yet)
SHARDED_METHODS = ("full", "lora", "lora-plus", "dora", "lora-fa", "ia3", "vera",
                   "qlora")  # task "fsdpqlora": packed 4-bit weights sharded, their quant_state whole (qlora.py)


def _adapter_dim0(name: str, site: LinearSite, run: RunConfig) -> int:
    if name.endswith("lora_A"):
        return run.r or 0  # peft lora_A = nn.Linear(d_in, r): weight [r, d_in] (LoRA-FA: the same, frozen)
    if name.endswith("lora_B") or name.endswith("lora_magnitude_vector"):
        return site.d_out  # lora_B = nn.Linear(r, d_out): weight [d_out, r]; DoRA magnitude [d_out]
    if name.endswith("vera_lambda_b"):  # peft tuners/vera/layer.py VeraLayer.update_layer: lambda_b [d_out],
        return site.d_out
    if name.endswith("vera_lambda_d"):  # lambda_d [r]
        return run.r or 0
    if name.endswith("ia3_l"):  # peft tuners/ia3/layer.py IA3Layer.update_layer: feedforward modules scale the
        from ..methods.ia3 import is_feedforward  # input, weight [1, d_in]; the others the output, [d_out, 1]
        return 1 if is_feedforward(site, run.targets) else site.d_out
    raise LoraCostError(f"sharding: no shape known for adapter tensor {name}")


@lru_cache(maxsize=1024)
def shard_tensors(arch: Architecture, spec: ModelSpec, method: Method, run: RunConfig,
                  sites: tuple[LinearSite, ...], head_sites: tuple[LinearSite, ...]) -> tuple[ShardTensor, ...]:
    if method.name not in SHARDED_METHODS:
        raise LoraCostError(f"--gpus/--sharding model the methods {', '.join(SHARDED_METHODS)}; {method.name} "
                            "is not modelled across GPUs yet")
    if spec.moe is not None or spec.decoder_layers:
        raise LoraCostError(f"--gpus/--sharding model dense decoder and encoder stacks; {spec.name} "
                            f"({'mixture of experts' if spec.moe is not None else 'encoder-decoder'}) is not modelled yet")
    if run.task in ("seq-cls", "token-cls"):
        raise LoraCostError("--gpus/--sharding with a classification --task is not modelled yet")
    L, dtype, trainable_base = spec.layers, run.weight_dtype, method.base_trainable
    storage = method.storage(run)
    four_bit = isinstance(storage, FourBitStorage)  # task "fsdpqlora": QLoRA's Params4bit and its quant_state
    other = storage.other_dtype if four_bit else dtype  # prepare_model_for_kbit_training: the rest in fp32
    out: list[ShardTensor] = []
    linear_total = 0
    for s in arch.linear_sites(spec):
        count = s.blocks or L
        dim0 = s.d_in if s.fan_in_fan_out else s.d_out
        name = f"{s.path or s.name}.weight"
        if four_bit and s.quantised:
            out.extend(four_bit_tensors(name, s.d_in * s.d_out, count, storage, LAYER, BUFFER))
        else:
            out.append(ShardTensor(name, dim0, s.d_in * s.d_out, count, other, trainable_base, LAYER))
        linear_total += s.d_in * s.d_out * count
    groups = param_groups(arch, spec, run.task, run.labels)
    if linear_total != sum(g.total for g in groups if g.kind in ("linear", "kept-linear")):
        raise LoraCostError(f"--gpus/--sharding: the linear layers of {spec.name} do not match its parameter "
                            "groups; not modelled for this family yet")
    for g in groups:
        if g.kind in ("linear", "kept-linear"):
            continue
        unit = LAYER if "*" in g.name else ROOT
        pieces = 2 if g.bias_numel else 1  # a LayerNorm group holds weight and bias, each [hidden]
        numel = g.numel // pieces
        if g.kind in ("embedding", "head") and numel % spec.hidden == 0:
            dim0 = numel // spec.hidden  # nn.Embedding [rows, hidden], nn.Linear head [vocab, hidden]
        else:
            dim0 = numel  # norms and biases are 1-D
        late = g.kind == "embedding" and not (spec.tie_embeddings and dim0 == spec.vocab)
        out.append(ShardTensor(g.name, dim0, numel, g.count * pieces, other, trainable_base, unit, late))
    if not trainable_base:
        for s in sites:
            for t, trains in [(t, True) for t in method.trainable(s, run)] + [(t, False) for t in method.frozen(s, run)]:
                out.append(ShardTensor(t.name, _adapter_dim0(t.name, s, run), t.numel, t.count * (s.blocks or L),
                                       t.dtype, trains, LAYER))
        for t in method.shared_frozen(list(sites) + list(head_sites), run):  # buffers, whole on every rank
            out.append(ShardTensor(t.name, t.numel, t.numel, t.count, t.dtype, False, BUFFER))
        for s in head_sites:
            for t, trains in [(t, True) for t in method.trainable(s, run)] + [(t, False) for t in method.frozen(s, run)]:
                out.append(ShardTensor(t.name, _adapter_dim0(t.name, s, run), t.numel, t.count, t.dtype, trains, ROOT))
    for t in out:
        if t.unit == LAYER and t.count % L:
            raise LoraCostError(f"--gpus/--sharding: {t.name} is not in every layer; not modelled yet")
    return tuple(out)


def four_bit_tensors(name: str, numel: int, count: int, storage: FourBitStorage, unit: str, buffer: str) -> list[ShardTensor]:
    """Task "fsdpqlora": one bitsandbytes 4-bit weight of `numel` values as sharding sees it (qlora.py): the packed
    Params4bit [packed, 1] in the storage dtype, frozen, sharded on dim 0 with its unit (uint8: left out of
    sharding, whole); its QuantState, not a parameter, whole on every rank (bytes as uint8 elements)."""
    from .qlora import packed_numel, quant_state_bytes, replicated_4bit
    packed, state = packed_numel(numel, storage), quant_state_bytes(numel, storage)
    if replicated_4bit(storage):  # uint8: kept out of fully_shard (accelerate's ignored_params), whole on every rank
        unit = buffer
    return [ShardTensor(name, packed, packed, count, storage.quant_storage, False, unit),
            ShardTensor(f"{name}.quant_state", state, state, count, "uint8", False, buffer)]
