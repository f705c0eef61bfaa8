"""LoRA on an 8-bit base (LLM.int8(), `lora-8bit`): the stand-in's rule against bitsandbytes' own source,
the stand-in's storage and kept tensors on the CPU, and the two engines against each other.

bitsandbytes' int8 kernels need CUDA, so the trace runs a stand-in (lora_cost/trace/int8.py). The excerpt
tests/data/bnb_0.50.2_int8.py.txt is verbatim bitsandbytes 0.50.2 (the wheel's autograd/_functions.py,
nn/modules.py, backends/default/ops.py); the first test pins the lines the stand-in's rule rests on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grid_support import assert_engines_agree  # noqa: E402

EXCERPT = Path(__file__).parent / "data" / "bnb_0.50.2_int8.py.txt"


@pytest.mark.fast
def test_stand_in_rule_is_bitsandbytes_rule():
    src = EXCERPT.read_text()
    # frozen weight: the fast path quantises an fp16 copy of A into CA (int8) and SCA (fp32 per row)
    assert "CA, SCA, outlier_cols = F.int8_vectorwise_quant(A.to(torch.float16), threshold=state.threshold)" in src
    # the int8 gemm: an int32 accumulator, dequantised into A's dtype
    assert "out_i32 = torch.ops.bitsandbytes.int8_linear_matmul.default(A, B)" in src
    assert "CA, state.CB, SCA, state.SCB, bias=bias, dtype=A.dtype" in src or "SCA,\n                state.SCB," in src
    # kept for backward: plain ctx attributes (not save_for_backward), A itself; CAt None without weight grads
    assert "ctx.tensors = (CAt, subA, A)" in src and "CAt = SCAt = None" in src
    assert "ctx.save_for_backward(None, None)" in src  # the only save_for_backward: nothing
    # backward: the weight dequantised into A's dtype (a [d_out, d_in] copy), then one matmul
    assert "CB = state.CB.to(ctx.dtype_A, copy=True).mul_(state.SCB.unsqueeze(1).mul(1.0 / 127.0))" in src
    assert "grad_A = torch.matmul(grad_output.to(ctx.dtype_A), CB).view(ctx.grad_shape)" in src
    # on CUDA in training MatMul8bitLt runs (MatMul8bitFp only on cpu/xpu)
    assert 'if A.device.type in ("cpu", "xpu"):\n            return MatMul8bitFp.apply' in src


@pytest.mark.fast
def test_analytic_storage_bytes():
    from lora_cost.analytic.methods.storage import EightBitStorage
    assert EightBitStorage().linear_bytes(4096 * 1024, 4096) == 4096 * 1024 + 4 * 4096  # CB + fp32 SCB per row


def test_stand_in_keeps_the_input_outside_saved_tensors_hooks():
    torch = pytest.importorskip("torch")
    from lora_cost.trace.int8 import Linear8bitLtStandIn

    lin = Linear8bitLtStandIn(64, 96, bias=False)
    assert lin.weight.dtype == torch.int8 and lin.SCB.dtype == torch.float32 and lin.SCB.numel() == 96
    x = torch.randn(2, 5, 64, requires_grad=True)
    h = x * 1.0  # a non-leaf input, as the hidden states are
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        out = lin(h)
    assert packed == [] and out.dtype == torch.float32 and out.shape == (2, 5, 96)
    node = out.grad_fn  # MatMul8bitLtBackward: its ctx
    assert node.tensors[2].untyped_storage().data_ptr() == h.untyped_storage().data_ptr()  # A: the input itself
    out.sum().backward()
    assert x.grad.shape == x.shape


TINY = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 256,
        "tie_word_embeddings": False}
CASES = [  # (precision, checkpointing, optimizer, loss, attention)
    ("bf16", False, "adamw-torch", "standard", "sdpa"),
    ("bf16", True, "adamw-torch-fused", "standard", "sdpa"),
    ("fp16", False, "adamw-bnb-8bit", "chunked:4", "eager"),
    ("bf16", False, "adamw-torch-fused", "liger", "flash-attention-2"),
    ("fp32", True, "adamw-torch", "standard", "sdpa"),
]


def compare(root: Path, case) -> dict:
    from lora_cost import estimate
    from lora_cost.trace import trace
    from lora_cost.trace.compare import differences

    precision, ckpt, optimizer, loss, attention = case
    path = root / "tiny-llama" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(TINY))
    kw = dict(batch=2, seq=64, precision=precision, grad_checkpointing=ckpt, r=8, optimizer=optimizer, loss=loss,
              attention=attention, targets="all-linear" if ckpt else None)
    e, t = estimate(str(path), "lora-8bit", **kw), trace(str(path), "lora-8bit", **kw)
    return {d.term: (d.analytic, d.trace) for d in differences(e, t)}


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_engines_agree(tmp_path_factory, case):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    terms = compare(tmp_path_factory.getbasetemp() / "int8", case)
    # the analytic saved bytes include the inputs MatMul8bitLt keeps as ctx attributes, which the trace's
    # saved_tensors_hooks count cannot see: the analytic count is the larger
    a, t = terms["saved_activation_bytes"]
    assert a >= t
    assert_engines_agree(terms, peak_tolerance=0.06)


def test_refuses_autocast():
    from lora_cost import estimate
    from lora_cost.errors import LoraCostError
    with pytest.raises(LoraCostError, match="lora-8bit needs --precision"):
        estimate("llama-3.2-1b", "lora-8bit", precision="amp-bf16")
