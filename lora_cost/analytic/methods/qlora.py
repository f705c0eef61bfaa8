"""QLoRA: LoRA on a base model whose linear layers are stored in 4-bit NormalFloat.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314, Sec. 3:
NF4 with blocksize 64; double quantisation stores the fp32 block constants as 8-bit values with
one fp32 constant per 256 of them, 0.5 + 8/64 + 32/(64*256) = 4.127 bits per weight.

Modelled library behaviour (bitsandbytes `nn/modules.py` Linear4bit, `autograd/_functions.py`
MatMul4Bit; peft `utils/other.py` prepare_model_for_kbit_training, `tuners/lora/bnb.py`):
  * every linear layer of the blocks is quantised, targeted or not; embeddings, norms, biases and
    the LM head are not, and prepare_model_for_kbit_training casts them all to fp32, so the
    residual stream and most activations are fp32;
  * Linear4bit casts its input to the compute dtype (bf16), runs bitsandbytes' gemm_4bit and casts
    the output back to the input dtype; MatMul4Bit saves only the packed weight for backward
    (no activation), and its backward dequantises the weight (a d_out x d_in bf16 transient) and
    multiplies; the forward gemm is a custom op FlopCounterMode does not count;
  * LoRA on top as in peft (fp32 adapters; the input is already fp32, so no cast).
"""

from __future__ import annotations

from .. import ops
from ...errors import LoraCostError
from ...spec import LinearSite
from .base import Method, register_method
from .lora import lora_linear, lora_trainable, validate_lora

NF4_BLOCK = 64  # bnb_4bit blocksize
DQ_BLOCK = 256  # second-level block of the double quantisation
CODE_BYTES = 256 * 4  # the fp32 code table of the 8-bit quantised block constants


def nf4_bytes(numel: int, double_quant: bool = True, quant_type: str = "nf4") -> float:
    """Bytes of one quantised weight matrix: packed 4-bit values plus its quantisation state."""
    blocks = -(-numel // NF4_BLOCK)
    packed = (numel + 1) // 2
    if not double_quant:
        return packed + 4 * blocks  # one fp32 absmax per block
    blocks2 = -(-blocks // DQ_BLOCK)
    return packed + blocks + 4 * blocks2 + CODE_BYTES + 4  # uint8 absmax, fp32 absmax2, code, offset


def bits_per_weight(double_quant: bool = True) -> float:
    """0.5 B + block constants, in bits: 4.127 with double quantisation, 4.5 without."""
    if double_quant:
        return 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * DQ_BLOCK)
    return 4 + 32 / NF4_BLOCK


def linear_4bit(ctx, x, site: LinearSite):
    """bnb Linear4bit forward: x.to(bf16) -> gemm_4bit -> .to(x.dtype); saves no activation."""
    tape = ctx.tape
    compute = "bf16" if ctx.run.precision != "fp16" else "fp16"
    xc = ops.cast(tape, x, compute)
    n = xc.numel // site.d_in
    # forward gemm (not counted by FlopCounterMode) and, when x needs a grad, the dequantised matmul
    tape.matmul("base", n, site.d_in, site.d_out, grad_a=x.rg, grad_b=False, counted=False)
    tape.transient(2 * site.d_in * site.d_out)  # dequantised weight inside gemm_4bit
    if x.rg:
        tape.transient(2 * site.d_in * site.d_out, backward=True)
    out = tape.new(n * site.d_out, compute, x.rg)
    return ops.cast(tape, out, x.dtype)


def validate_qlora(spec, sites, run) -> None:
    validate_lora(spec, sites, run)
    if run.precision not in ("bf16", "fp16"):
        raise LoraCostError(f"qlora computes in 16-bit (bnb_4bit_compute_dtype): use --precision bf16 or fp16, not {run.precision}")
    quant_type = run.option("quant_type", "nf4")
    if quant_type not in ("nf4", "fp4"):
        raise LoraCostError(f"--quant-type must be nf4 or fp4, got {quant_type!r}")


QLORA = register_method(Method(
    name="qlora",
    title="QLoRA (4-bit base + LoRA)",
    paper="Dettmers et al. 2023, arXiv:2305.14314",
    recipe="BitsAndBytesConfig(load_in_4bit, nf4, double quant, bf16 compute) + prepare_model_for_kbit_training + peft LoRA",
    default_r=8,
    trainable=lora_trainable,
    frozen=lambda site, run: [],
    adapted_linear=lora_linear,
    quantized_base=True,
    options=("quant_type", "double_quant"),
    option_defaults={"quant_type": "nf4", "double_quant": True},
    validate=validate_qlora,
))
