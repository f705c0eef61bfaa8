"""QLoRA across GPUs (task "fsdpqlora"): what bitsandbytes' 4-bit weights are to FSDP2 and DDP (torch-free).

The storage (bitsandbytes 0.50.2 `nn/modules.py` Params4bit, `functional.py` quantize_4bit):
- the packed weight is a `Params4bit` parameter of shape [(n + 1) // (2 x itemsize), 1] in
  `bnb_4bit_quant_storage` (`quant_storage`): with bf16 storage the n / 2 bytes are n / 4 bf16 elements.
  FSDP2's `fully_shard` shards it on dim 0 like any parameter (`_fsdp_param.py` `_init_sharded_param`:
  torch.chunk into S pieces, every rank keeping ceil(dim0 / S) rows, padded), so a rank stores
  ceil(packed / S) elements; Params4bit's `__torch_function__` (torch.chunk / torch.split) keeps the
  subclass and hands every chunk the same `quant_state`;
- the quantisation state (`QuantState`: absmax, with double quantisation the nested absmax, its code and
  offset) is a Python attribute of the parameter and of the module (`Linear4bit.quant_state`, restored by
  `fix_4bit_weight_quant_state_from_module` when FSDP replaces the parameter), not a parameter or a buffer:
  no strategy partitions it and every rank keeps it whole (here a BUFFER tensor, tensors.py);
- the frozen packed weight is all-gathered with its unit in its storage dtype, dequantised per matmul
  into a compute-dtype transient (as on one GPU: analytic/methods/storage.py FourBitStorage), and never
  reduced (no gradient).

`--quant-storage uint8` (the default) under FSDP: accelerate 1.15 `utils/fsdp_utils.py` `fsdp2_prepare_model`
passes every frozen non-floating Params4bit to `fully_shard(..., ignored_params=...)` ("to prevent quant_state
corruption"): FSDP2 leaves them alone, so every rank holds the whole packed weights and they are never gathered;
the estimate says so in a warning (the trace engine's wrap does the same, trace/sharded.py).

Which FSDP: `--sharding fsdp` is FSDP2 (`fully_shard` per decoder layer + root, config.py), per-parameter dim-0
shards, which takes the frozen packed storage beside fp32 LoRA factors in one unit (FSDP2 demands one dtype of the
trainable parameters only, `_fsdp_param_group.py` `_init_mp_dtypes`, and all-gathers mixed dtypes as bytes,
`_fsdp_collectives.py` `foreach_all_gather`). FSDP1's flat parameters (accelerate `fsdp_version: 1`, the original
FSDP-QLoRA path, where a uniform dtype per FlatParameter is why the storage must match the other parameters and
peft's `fsdp_auto_wrap_policy` wraps the LoRA layers as units of their own) are not modelled.
With --cpu-offload (CPUOffloadPolicy) the sharded packed weights go to the host with the other parameters; the
quant_state, not a parameter, is assumed to stay on the GPU where the model was loaded.

The non-quantised parameters: fp32 after peft's prepare_model_for_kbit_training (the default), or, as TRL's
`prepare_peft_model` (`is_sharded_qlora`) and axolotl (`is_qlora_and_fsdp_enabled`) run FSDP + QLoRA, left in
the model's dtype (--no-kbit-prepare; methods/qlora.py KBIT_PREPARE).

What is refused, in one line each:
- `--fsdp-param-dtype` other than a float storage dtype: FSDP2 casts every parameter of a unit to the
  MixedPrecisionPolicy's param_dtype for its all-gather (`_fsdp_param.py` `init_dtype_attrs`), which would
  convert the packed bytes as numbers and destroy them;
- DeepSpeed ZeRO: ZeRO-3 partitions Params4bit through its own hooks (transformers disables zero.init for
  QLoRA) and the engine's `module.bfloat16()` cast; neither is modelled here.
"""

from __future__ import annotations

from ...errors import LoraCostError
from ..formulas.storage import QUANT_STORAGE_BYTES, nf4_bytes, packed_4bit_numel

QLORA_STRATEGIES = ("ddp", "fsdp", "fsdp-grad-op", "hsdp")


RECIPE_NOTE = ("QLoRA under {strategy}: modelled with peft's prepare_model_for_kbit_training (embeddings, norms and "
               "LM head cast to fp32, sharded and gathered as fp32); TRL's FSDP-QLoRA path skips that cast and "
               "keeps the adapters in the model's dtype (trl prepare_peft_model, is_sharded_qlora): "
               "--no-kbit-prepare --adapter-dtype bf16")


UINT8_NOTE = ("QLoRA under {strategy} with --quant-storage uint8: accelerate keeps integer Params4bit out of FSDP2's "
              "sharding (fsdp_utils.py fsdp2_prepare_model, ignored_params), so every rank holds the whole 4-bit "
              "weights; --quant-storage bf16 shards them")


def replicated_4bit(storage) -> bool:
    """The packed weights stay whole on every rank: integer storage, which accelerate keeps out of fully_shard
    (under DDP everything is whole anyway)."""
    return storage.quant_storage == "uint8"


def check_qlora(run, storage) -> tuple[str, ...]:
    """Refuse what FSDP2/DDP cannot run with 4-bit weights (see the module doc); the note on the recipe."""
    sh = run.sharding
    if sh is None:
        return ()
    if sh.strategy not in QLORA_STRATEGIES:
        raise LoraCostError(f"--method qlora with --sharding {sh.strategy}: DeepSpeed ZeRO + QLoRA is not modelled "
                            f"(ZeRO partitions bitsandbytes' Params4bit through its own hooks); use --sharding "
                            f"{', '.join(QLORA_STRATEGIES)}")
    if sh.strategy == "ddp":
        return ()
    notes = (RECIPE_NOTE.format(strategy=sh.strategy),) if storage.other_dtype == "fp32" else ()
    if storage.quant_storage == "uint8":
        return (UINT8_NOTE.format(strategy=sh.strategy),) + notes
    if sh.param_dtype is not None and sh.param_dtype != storage.quant_storage:
        raise LoraCostError(f"--fsdp-param-dtype {sh.param_dtype} with --quant-storage {storage.quant_storage}: "
                            "FSDP2 would cast the packed 4-bit values for the all-gather and destroy them; give the "
                            "storage dtype or drop --fsdp-param-dtype")
    return notes


def packed_numel(numel: int, storage) -> int:
    """Elements of the packed Params4bit of one weight of `numel` values: its dim 0 (its shape is [packed, 1])."""
    return packed_4bit_numel(numel, QUANT_STORAGE_BYTES[storage.quant_storage])


def quant_state_bytes(numel: int, storage) -> int:
    """Bytes of one weight's QuantState (absmax and, with double quantisation, the nested absmax, code and
    offset): what `nf4_bytes` adds to the packed values; whole on every rank."""
    storage_bytes = QUANT_STORAGE_BYTES[storage.quant_storage]
    return (nf4_bytes(numel, storage.double_quant, storage_bytes)
            - packed_4bit_numel(numel, storage_bytes) * storage_bytes)
