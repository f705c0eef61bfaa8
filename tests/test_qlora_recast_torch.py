"""Task "recast" (issue 9): QLoRA under autocast (`--precision amp-bf16`, Trainer bf16=True over peft's prepared
fp32 model) and the QLoRA paper script's recast (`--qlora-recast`, analytic/qlora_recast.py), on a real CPU step.

The model is built as the script builds it, with bitsandbytes' Linear4bit replaced by the trace's documented
stand-in (lora_cost/trace/qlora.py: bitsandbytes needs CUDA): 4-bit linears (bf16 compute), peft's own
prepare_model_for_kbit_training, peft LoRA, then the script's loop (trace.qlora.script_recast). The step runs
forward and backward under the trace's CUDA-autocast emulation (trace/autocast.py: CUDA's op lists; torch's CPU
autocast keeps other lists) and autograd's saved tensors are counted with `saved_tensors_hooks`
(tests/peft_step.py SavedBytes); the analytic engine's saved-activation bytes must equal that count exactly.
Then both engines on the same configurations (tests/grid_support.py assert_engines_agree)."""

import contextlib

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import tiny_models  # noqa: E402
from grid_support import engines_terms, assert_engines_agree  # noqa: E402
from peft_step import saved_under_amp_bf16  # noqa: E402
from tiny_configs import B, CONFIGS, S  # noqa: E402
from lora_cost import estimate  # noqa: E402
from lora_cost.trace.autocast import CudaAutocast  # noqa: E402
from lora_cost.trace.qlora import Linear4bitStandIn, quantize_linears, script_recast  # noqa: E402

TARGETS = {"llama": ["q_proj", "v_proj"], "qwen3": ["q_proj", "o_proj", "down_proj"]}


def _recompute_context():
    """Checkpointing's recomputation runs in backward, outside the autocast mode entered around the forward:
    re-enter it there, as torch.utils.checkpoint does for torch.autocast (trace/step.py _recompute_under)."""
    return contextlib.nullcontext(), CudaAutocast(torch.bfloat16)


def _model(family: str, ckpt: bool, recast: bool):
    model = tiny_models.build(family, "fp32")
    quantize_linears(model, torch.bfloat16, True)
    model.is_loaded_in_4bit = True
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt, gradient_checkpointing_kwargs={
        "use_reentrant": False, "context_fn": _recompute_context})
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                        target_modules=TARGETS[family]))
    if recast:
        script_recast(model)
    model.train()
    return model


def _dtypes(model) -> dict:
    out = {}
    for name, p in model.named_parameters():
        kind = ("lora" if "lora_" in name else "embed" if "embed_tokens" in name else "head" if "lm_head" in name
                else "norm" if "norm" in name else "packed" if p.dtype == torch.uint8 else "other")
        out.setdefault(kind, set()).add(p.dtype)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_script_recast_dtypes(family):
    """What the script's loop leaves: bf16 factors, embeddings, head; fp32 norms; the 4-bit state untouched."""
    plain, recast = _model(family, False, False), _model(family, False, True)
    assert _dtypes(plain) == {"lora": {torch.float32}, "embed": {torch.float32}, "norm": {torch.float32},
                              "packed": {torch.uint8}} | ({"head": {torch.float32}} if family == "llama" else {})
    assert _dtypes(recast) == {"lora": {torch.bfloat16}, "embed": {torch.bfloat16}, "norm": {torch.float32},
                               "packed": {torch.uint8}} | ({"head": {torch.bfloat16}} if family == "llama" else {})
    # qwen3's head is tied to embed_tokens: the cast of either keeps the tie (Module._apply assigns param.data)
    if family == "qwen3":
        assert recast.get_output_embeddings().weight is recast.get_input_embeddings().weight
    buffers = {b.dtype for m in recast.modules() if isinstance(m, Linear4bitStandIn) for b in m.buffers(recurse=False)}
    assert buffers == {torch.uint8, torch.float32}  # bitsandbytes' QuantState is no module tensor: never cast


def test_profiler_sees_the_recast():
    """The profiler's reading of a live QLoRA model (methods/qlora.py observed_recast): the script's recast, not
    peft's fp32 defaults, nor bf16 factors on an unprepared bf16 model (the FSDP-QLoRA recipe)."""
    from lora_cost.analytic.methods.qlora import observed_recast

    assert observed_recast(_model("llama", False, True)) and not observed_recast(_model("llama", False, False))
    unprepared = tiny_models.build("llama", "bf16")
    quantize_linears(unprepared, torch.bfloat16, True)
    unprepared = peft.get_peft_model(unprepared, peft.LoraConfig(r=4, target_modules=TARGETS["llama"]),
                                     autocast_adapter_dtype=False)
    assert not observed_recast(unprepared)


def _saved(model, family: str) -> int:
    return saved_under_amp_bf16(model, CONFIGS[family]["vocab_size"], B, S)


def _kwargs(family: str, ckpt: bool, recast: bool) -> dict:
    kw = dict(r=4, targets=",".join(TARGETS[family]), batch=B, seq=S, precision="amp-bf16", attention="eager",
              model_dropout=0.0, grad_checkpointing=ckpt)
    if recast:
        kw["method_options"] = {"qlora_recast": True}
    return kw


@pytest.mark.parametrize("family,ckpt,recast", [("llama", False, False), ("llama", False, True), ("llama", True, True),
                                                ("qwen3", False, True), ("qwen3", True, False)])
def test_saved_bytes_equal_torch(tmp_path, family, ckpt, recast):
    real = _saved(_model(family, ckpt, recast), family)
    e = estimate(tiny_models.config_file(tmp_path, family), "qlora", **_kwargs(family, ckpt, recast))
    assert e.memory.saved_activation_bytes == real


# both engines on the same tiny configurations
AGREE = [
    ("llama", dict(attention="sdpa", grad_checkpointing=True, method_options={"qlora_recast": True})),
    ("llama", dict(attention="sdpa")),
    ("llama", dict(attention="eager", method_options={"qlora_recast": True})),
    ("llama", dict(attention="sdpa", optimizer="adamw-torch-fused", method_options={"qlora_recast": True})),
    ("llama", dict(attention="flash-attention-2", targets="all-linear", grad_checkpointing=True,
                   method_options={"qlora_recast": True})),
    ("qwen3", dict(attention="sdpa", targets="all-linear", grad_checkpointing=True, method_options={"qlora_recast": True})),
    ("qwen3", dict(attention="flash-attention-2", adapter_dtype="bf16", packing=True)),
]


@pytest.mark.parametrize("family,kwargs", AGREE, ids=[f"{f}-{'-'.join(map(str, k.values()))}" for f, k in AGREE])
def test_engines_agree(tmp_path, family, kwargs):
    kw = dict(r=4, batch=2, seq=64, precision="amp-bf16", **kwargs)
    assert_engines_agree(engines_terms(tmp_path / family, CONFIGS[family], "qlora", kw), peak_tolerance=0.06)


def test_library_rules_the_model_rests_on():
    """The installed sources behind the dtypes above. peft's LoRA on a real bitsandbytes Linear4bit (tuners/lora/bnb.py,
    GPU only) skips its input cast under autocast and lets autocast cast x inside lora_A's matmul; the trace's stand-in
    gets peft's lora.Linear, which casts x to the factors' dtype itself (`_cast_input_dtype`, no copy when they agree):
    one bf16 copy of x either way, saved for lora_A's weight gradient. bnb's `result.clone()` copies the base output
    (saves nothing; a transient neither engine counts)."""
    import importlib.util
    import inspect
    from pathlib import Path

    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import other
    from transformers.loss import loss_utils
    from transformers.models.llama import modeling_llama

    # tuners/lora/bnb.py imports bitsandbytes (not installed on the CPU): read the file
    text = Path(importlib.util.find_spec("peft.tuners.lora").submodule_search_locations[0], "bnb.py").read_text()
    four_bit = text[text.index("class Linear4bit("):]
    assert "requires_conversion = not torch.is_autocast_enabled()" in four_bit
    assert "result = result.clone()" in four_bit
    cast = inspect.getsource(BaseTunerLayer._cast_input_dtype)
    assert "x.dtype == dtype" in cast and "return x.to(dtype=dtype)" in cast
    prepare = inspect.getsource(other.prepare_model_for_kbit_training)
    assert 'param.__class__.__name__ != "Params4bit"' in prepare and "param.data.to(torch.float32)" in prepare
    norm = inspect.getsource(modeling_llama.LlamaRMSNorm.forward)
    assert "hidden_states.to(torch.float32)" in norm and "return self.weight * hidden_states.to(input_dtype)" in norm
    assert "logits = logits.float()" in inspect.getsource(loss_utils.ForCausalLMLoss)


def test_stand_in_follows_bitsandbytes():
    """bitsandbytes needs CUDA: its MatMul4Bit and Linear4bit.forward are quoted verbatim in tests/data (0.50.2 wheel).
    It keeps the packed weight on ctx (`ctx.tensors`), never through save_for_backward, so saved-tensor hooks (and
    non-reentrant checkpointing's early stop) do not see it; the stand-in does the same. The input goes to the compute
    dtype and the output back to the input's (under autocast as without: explicit casts)."""
    import inspect
    from pathlib import Path

    from lora_cost.trace import qlora as stand_in

    bnb = (Path(__file__).parent / "data" / "bnb_0.50.2_matmul4bit.py.txt").read_text()
    assert "ctx.tensors = (None, B)" in bnb and "save_for_backward" not in bnb and "_, B = ctx.tensors" in bnb
    assert "x = x.to(self.compute_dtype)" in bnb and ".to(inp_dtype)" in bnb
    forward = inspect.getsource(stand_in.MatMul4Bit.forward)
    assert "ctx.tensors = (None, packed)" in forward and "ctx.save_for_backward(" not in forward
    assert "_, packed = ctx.tensors" in inspect.getsource(stand_in.MatMul4Bit.backward)
    linear = inspect.getsource(stand_in.Linear4bitStandIn.forward)
    assert "x = x.to(self.compute_dtype)" in linear and ".to(inp_dtype)" in linear
