"""How a method stores the pretrained weights: dense in the run's dtype, or 4-bit (QLoRA).

A method names its storage (`Method.storage(run)`); the context runs base linears through it, the
parameter budget counts its bytes and `--explain` prints its formula, none of them asking which
method it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .. import ops
from ..formulas.storage import NF4_BLOCK, QUANT_STORAGE_BYTES, nf4_bits_per_weight, nf4_bytes
from ...units import DTYPE_BYTES

if TYPE_CHECKING:  # pragma: no cover
    from ..context import StepContext
    from ...spec import LinearSite, RunConfig
    from ..tape import Tensor


class BaseStorage(Protocol):
    """What a storage answers; implementations are frozen (hashable) dataclasses."""

    @property
    def linear_dtype(self) -> str: ...  # what base linears compute in

    @property
    def other_dtype(self) -> str: ...  # embeddings, norms, biases, LM head

    @property
    def embed_head_dtype(self) -> str: ...  # the token embeddings and the LM head (other_dtype but for a recast)

    def linear_bytes(self, numel: int, rows: int = 0) -> int: ...  # one stored linear weight ([rows, numel/rows])

    def linear(self, ctx: "StepContext", x: "Tensor", site: "LinearSite") -> "Tensor": ...  # forward on the tape

    def formula(self, total_params: int) -> str: ...  # the "base weights" line of --explain


@dataclass(frozen=True)
class DenseStorage:
    """Every parameter in one dtype (the run's weight dtype: fp32 master weights under AMP)."""

    dtype: str

    @property
    def linear_dtype(self) -> str:
        return self.dtype

    @property
    def other_dtype(self) -> str:
        return self.dtype

    @property
    def embed_head_dtype(self) -> str:
        return self.dtype

    def linear_bytes(self, numel: int, rows: int = 0) -> int:
        return numel * DTYPE_BYTES[self.dtype]

    def linear(self, ctx: "StepContext", x: "Tensor", site: "LinearSite") -> "Tensor":
        return ops.linear(ctx.tape, x, site.d_in, site.d_out, w_trainable=ctx.base_trainable, w_dtype=ctx.weight_dtype,
                          b_trainable=site.bias and ctx.method.trains_biases)

    def formula(self, total_params: int) -> str:
        return f"{total_params:,} parameters x {DTYPE_BYTES[self.dtype]} B ({self.dtype})"


@dataclass(frozen=True)
class FourBitStorage:
    """bitsandbytes 4-bit linears (NF4 or FP4), everything else fp32.

    Modelled library behaviour (bitsandbytes `nn/modules.py` Linear4bit, `autograd/_functions.py`
    MatMul4Bit; peft `utils/other.py` prepare_model_for_kbit_training): every linear layer of the
    blocks is quantised, targeted or not; embeddings, norms, biases and the LM head are not, and
    prepare_model_for_kbit_training casts them all to fp32. Linear4bit casts its input to the compute
    dtype, runs gemm_4bit (a custom op FlopCounterMode does not count) and casts the output back;
    MatMul4Bit saves only the packed weight, and its backward dequantises the weight (a d_out x d_in
    compute-dtype transient) to multiply the incoming gradient."""

    compute_dtype: str  # bnb_4bit_compute_dtype
    double_quant: bool
    quant_type: str = "nf4"
    quant_storage: str = "uint8"  # bnb_4bit_quant_storage: same bytes, numel = bytes / itemsize (lossdtype)
    # task "fsdpqlora": the dtype of every parameter that is not quantised. fp32: peft's
    # prepare_model_for_kbit_training casts them (utils/other.py); the FSDP-QLoRA recipe skips that cast (TRL
    # `prepare_peft_model`: `is_sharded_qlora`) and keeps the dtype the model was loaded in (--no-kbit-prepare)
    other: str = "fp32"
    # task "recast": the token embeddings' and the LM head's dtype when the QLoRA script recasts them after
    # prepare_model_for_kbit_training (artidoro/qlora qlora.py: bf16; analytic/qlora_recast.py); None: `other`
    embed_head: str | None = None

    @property
    def linear_dtype(self) -> str:
        return self.compute_dtype

    @property
    def other_dtype(self) -> str:
        return self.other

    @property
    def embed_head_dtype(self) -> str:
        return self.embed_head or self.other

    def linear_bytes(self, numel: int, rows: int = 0) -> int:
        return nf4_bytes(numel, double_quant=self.double_quant, storage_bytes=QUANT_STORAGE_BYTES[self.quant_storage])

    def linear(self, ctx: "StepContext", x: "Tensor", site: "LinearSite") -> "Tensor":
        """Linear4bit forward: x.to(compute) -> gemm_4bit -> .to(x.dtype); saves no activation. A site
        kept out of quantisation (`LinearSite.quantised`) is a frozen fp32 nn.Linear."""
        tape = ctx.tape
        if not site.quantised:
            return ops.linear(tape, x, site.d_in, site.d_out, w_trainable=False, w_dtype=self.other_dtype)
        xc = ops.cast(tape, x, self.compute_dtype)
        n = xc.numel // site.d_in
        # forward gemm (not counted by FlopCounterMode) and, when x needs a grad, the dequantised matmul
        tape.matmul("base", n, site.d_in, site.d_out, grad_a=x.rg, grad_b=False, counted=False)
        dequantised = DTYPE_BYTES[self.compute_dtype] * site.d_in * site.d_out
        tape.transient(dequantised)  # dequantised weight inside gemm_4bit
        if x.rg:
            tape.transient(dequantised, backward=True)
        out = tape.new(n * site.d_out, self.compute_dtype, x.rg)
        tape.buffer_alive(dequantised)  # ligeracc: gemm_4bit writes its output with the dequantised weight alive
        return ops.cast(tape, out, x.dtype)

    def formula(self, total_params: int) -> str:
        bits = nf4_bits_per_weight(self.double_quant)
        packed = "" if self.quant_storage == "uint8" else f", packed in {self.quant_storage}"
        rest = (f"embeddings, norms, biases, LM head in {self.other}" if self.embed_head_dtype == self.other else
                f"embeddings and LM head in {self.embed_head_dtype} (the QLoRA script's recast), norms and biases in "
                f"{self.other}")
        return f"linear weights in {self.quant_type.upper()} ({bits:.3f} bits each, blocksize {NF4_BLOCK}{packed}) + {rest}"


# issue9b: LLM.int8() (Dettmers et al. 2022, arXiv:2208.07339; bitsandbytes 0.50.2 nn/modules.py Linear8bitLt,
# Int8Params; autograd/_functions.py MatMul8bitLt; backends/default/ops.py int8_mixed_scaled_mm / int8_scaled_mm).
INT8_ROW_SCALE_BYTES = 4  # SCB: one fp32 absmax per output row (F.int8_vectorwise_quant of the weight)


@dataclass(frozen=True)
class EightBitStorage:
    """bitsandbytes 8-bit linears (`load_in_8bit`), everything else fp32 (peft's prepare_model_for_kbit_training).

    Storage: Int8Params CB (one int8 per weight) + SCB (one fp32 per output row). Forward
    (MatMul8bitLt.forward, frozen weight = the fast path): `F.int8_vectorwise_quant(A.to(torch.float16))`
    makes an fp16 copy of the input (freed after the call), CA (int8, one per input value) and SCA (fp32, one
    per row); int8_scaled_mm multiplies into an int32 [rows, d_out] accumulator and dequantises into the output
    in A's dtype. When the input needs a gradient `ctx.tensors = (CAt, subA, A)`: CAt is None (no weight
    gradient), subA holds the outlier columns (threshold 6.0) of A - data dependent, none for the fake inputs
    the trace runs, so counted as 0 here (a lower bound: each outlier column adds rows x 4 B) - and A, the
    input itself (a view: no bytes when something else keeps it). Backward: `state.CB.to(A.dtype, copy=True)`
    a [d_out, d_in] transient in A's dtype, times SCB/127, then the grad_A matmul."""

    def linear_bytes(self, numel: int, rows: int = 0) -> int:
        return numel + INT8_ROW_SCALE_BYTES * rows

    @property
    def linear_dtype(self) -> str:
        return "fp32"  # the output follows A's dtype: fp32 hidden states after prepare_model_for_kbit_training

    @property
    def other_dtype(self) -> str:
        return "fp32"

    @property
    def embed_head_dtype(self) -> str:
        return "fp32"

    def linear(self, ctx: "StepContext", x: "Tensor", site: "LinearSite") -> "Tensor":
        tape = ctx.tape
        if not site.quantised:
            return ops.linear(tape, x, site.d_in, site.d_out, w_trainable=False, w_dtype=self.other_dtype)
        n = x.numel // site.d_in
        half = 0 if x.dtype == "fp16" else 2 * n * site.d_in  # A.to(torch.float16)
        codes = n * site.d_in + 4 * n  # CA (int8) + SCA (fp32 per row)
        tape.transient(max(half + codes, codes + 4 * n * site.d_out))  # quantisation, then the int32 accumulator
        if x.rg:
            tape.save(x, "8-bit matmul inputs")  # ctx.tensors = (None, subA, A): a ctx attribute,
            tape.keep_past_checkpoint(x)  # held through non-reentrant checkpointing too
            tape.transient(DTYPE_BYTES[x.dtype] * site.d_in * site.d_out + 4 * site.d_out, backward=True)
        tape.matmul("base", n, site.d_in, site.d_out, grad_a=x.rg, grad_b=False, counted=False)
        return tape.new(n * site.d_out, x.dtype, x.rg)

    def formula(self, total_params: int) -> str:
        return ("linear weights in int8 (LLM.int8(): 1 B each + one fp32 scale per output row) + "
                "embeddings, norms, biases, LM head in fp32")


def dense(run: "RunConfig") -> DenseStorage:
    """The storage of every method that leaves the base weights as they are."""
    return DenseStorage(run.weight_dtype)
