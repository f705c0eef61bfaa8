"""Storage of bitsandbytes' quantised tensors: 4-bit weights (QLoRA) and 8-bit optimizer states.

Torch-free; the analytic engine counts these bytes and the trace engine's stand-ins allocate them,
both from the constants below (bitsandbytes 0.4x-0.50).
"""

from __future__ import annotations

# 4-bit weights: bitsandbytes `functional.py` quantize_4bit(blocksize=64), the default of
# `nn/modules.py` Params4bit that transformers' BitsAndBytesConfig keeps: one absmax per 64 weights.
NF4_BLOCK = 64
# Double quantisation (`compress_statistics=True`, bnb_4bit_use_double_quant): quantize_4bit stores
# the absmax values minus their mean (`offset`, one fp32) with quantize_blockwise(blocksize=256):
# uint8 codes, one fp32 absmax per 256 of them ...
NF4_DQ_BLOCK = 256
# ... and the 256-entry fp32 code table of that 8-bit quantisation (`create_dynamic_map()`, state2.code).
DQ_CODE_BYTES = 256 * 4
DQ_OFFSET_BYTES = 4

# 8-bit optimizer states: bitsandbytes `optim/optimizer.py` Optimizer8bit(min_8bit_size=4096):
# tensors with fewer elements keep fp32 states; larger ones uint8 states with one fp32 absmax per
# block of 256 elements (Optimizer2State.init_state, `blocks = ceil(n / 256)`).
BNB_8BIT_MIN_SIZE = 4096
BNB_8BIT_BLOCK = 256


def blocks(numel: int, block: int) -> int:
    """ceil(numel / block): the last block may be partial."""
    return -(-numel // block)


# bnb_4bit_quant_storage (lossdtype): the dtype the packed 4-bit values are stored in (FSDP + QLoRA keep them in
# the model's dtype so that every parameter can be flattened together); bytes per element of that dtype
QUANT_STORAGE_BYTES = {"uint8": 1, "bf16": 2, "fp16": 2, "fp32": 4}


def packed_4bit_numel(numel: int, storage_bytes: int = 1) -> int:
    """Elements of the packed tensor: bitsandbytes `functional.py` quantize_4bit,
    `mod = dtype2bytes[quant_storage] * 2; out = torch.zeros(((n + 1) // mod, 1), dtype=quant_storage)`:
    two 4-bit values per byte whatever the storage dtype (its bytes are n / 2 when 2 x itemsize divides n)."""
    return (numel + 1) // (2 * storage_bytes)


def nf4_bytes(numel: int, double_quant: bool = True, storage_bytes: int = 1) -> int:
    """Bytes of one 4-bit weight matrix (NF4 or FP4 store alike): packed values plus quantisation state."""
    first = blocks(numel, NF4_BLOCK)
    packed = packed_4bit_numel(numel, storage_bytes) * storage_bytes  # two 4-bit values per byte
    if not double_quant:
        return packed + 4 * first  # one fp32 absmax per block
    # uint8 absmax per block, fp32 absmax per 256 blocks, the code table and the offset
    return packed + first + 4 * blocks(first, NF4_DQ_BLOCK) + DQ_CODE_BYTES + DQ_OFFSET_BYTES


def nf4_bits_per_weight(double_quant: bool = True) -> float:
    """Dettmers et al. 2023 (QLoRA, arXiv:2305.14314) Sec. 3: 4 + 8/64 + 32/(64*256) = 4.127 bits with
    double quantisation, 4 + 32/64 = 4.5 without (the per-matrix code table and offset left out)."""
    if double_quant:
        return 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * NF4_DQ_BLOCK)
    return 4 + 32 / NF4_BLOCK
