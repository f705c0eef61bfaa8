"""--loss liger | chunked[:N] and --adapter-dtype: the rules against the libraries' source and against torch.

- Liger's fused linear cross-entropy cannot run on a CPU (Triton): its chunk rule and what it saves are
  checked against a verbatim excerpt of liger-kernel 0.8.5 (tests/data/liger_flce_0.8.5.txt), and the trace's
  stand-in (lora_cost/trace/losses.py) against autograd's own cross-entropy gradients.
- torchtune's chunked output and CEWithChunkedOutputLoss run on a CPU: implemented below as torchtune writes
  them (independently of the trace's copy), the bytes autograd saves are counted with saved_tensors_hooks
  on a real transformers (+ peft) model and compared with the analytic engine's count, byte for byte.
- peft's adapters in the model's dtype (get_peft_model(..., autocast_adapter_dtype=False)) likewise.
"""

import importlib.util
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_cost import estimate
from lora_cost.analytic.losses import liger_chunk_size
from lora_cost.cli import main

EXCERPT = Path(__file__).parent / "data" / "liger_flce_0.8.5.txt"
LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, max_position_embeddings=64)
B, S = 2, 24


def _excerpt_lines() -> list[str]:
    return [line for line in EXCERPT.read_text().splitlines() if not line.startswith("#")]


@pytest.mark.fast
def test_liger_chunk_rule_is_the_sources():
    """The four chunk-size lines of the excerpt, run with triton's cdiv / next_power_of_2, give liger_chunk_size."""
    code = "\n".join(line.strip().split("  #")[0] for line in _excerpt_lines()
                     if line.strip().startswith(("inc_factor", "chunk_size", "num_chunks")))
    assert code.count("\n") == 3, code

    class triton:  # the two helpers the lines call (triton/__init__.py cdiv, next_power_of_2)
        cdiv = staticmethod(lambda a, b: (a + b - 1) // b)
        next_power_of_2 = staticmethod(lambda n: 1 << (n - 1).bit_length())

    for BT, H, V in [(16384, 4096, 128256), (4096, 4096, 32000), (256, 256, 3072), (200, 256, 2560), (7, 64, 512),
                     (4096 * 4, 4096, 32000)]:
        ns = {"triton": triton, "BT": BT, "H": H, "V": V, "chunk_mem_const": 1}
        exec(code, ns)
        assert liger_chunk_size(BT, H, V) == ns["chunk_size"], (BT, H, V)
    # Llama-3-8B, 8 x 2048 tokens: cdiv(128256, 4096) = 32; cdiv(16384, 32) = 512, a power of 2 -> 512 rows
    assert liger_chunk_size(16384, 4096, 128256) == 512
    # the source's own comment: BT = 4096*4, V = 32000, H = 4096 ==> inc_factor = 8, chunk_size = 2048
    assert liger_chunk_size(4096 * 4, 4096, 32000) == 2048


@pytest.mark.fast
def test_liger_saving_rule_is_the_sources():
    """What the estimate assumes Liger keeps and allocates is what the quoted source says; where liger-kernel
    is installed, the quote must still be in it."""
    text = "\n".join(_excerpt_lines())
    saved = re.search(r"ctx\.save_for_backward\(\s*grad_input\.detach\(\),\s*grad_weight\.detach\(\) if grad_weight "
                      r"is not None else None,", text)
    assert saved, "Liger saves the gradients computed in the forward"
    assert "grad_input = torch.zeros_like(_input" in text and "grad_weight = torch.zeros_like(weight" in text
    assert "torch.empty((chunk_size, V), dtype=_input.dtype" in text  # the reused logits buffer
    assert "grad_logits_chunk = logits_chunk" in text  # the kernel overwrites the logits with their gradient
    spec = importlib.util.find_spec("liger_kernel")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("liger-kernel not installed: the quote is checked against itself only")
    source = (Path(list(spec.submodule_search_locations)[0]) / "ops" / "fused_linear_cross_entropy.py").read_text()
    for line in _excerpt_lines():
        assert line in source, line


@pytest.mark.fast
def test_liger_estimate_by_hand():
    """Llama-3.1-8B, LoRA, 1 x 2048 tokens, bf16: Liger keeps grad_input (2048 x 4096 x 2 B = 16 MiB) and no logits;
    the standard loss keeps the fp32 log-softmax (2048 x 128256 x 4 B = 1002 MiB) and the bf16 logits."""
    kw = dict(r=8, seq=2048, precision="bf16")
    std = estimate("llama-3.1-8b", "lora", **kw)
    lig = estimate("llama-3.1-8b", "lora", loss="liger", **kw)
    kinds = {t.name: t.value for t in lig.memory.saved_by_kind}
    assert kinds["fused loss input gradient"] == 2048 * 4096 * 2
    assert "log-softmax output" not in kinds
    assert {t.name: t.value for t in std.memory.saved_by_kind}["log-softmax output"] == 2048 * 128256 * 4
    assert std.memory.saved_activation_bytes - lig.memory.saved_activation_bytes == \
        2048 * 128256 * 4 + 2048 * 8 + 4 - 2048 * 4096 * 2  # log-softmax, int64 targets, fp32 scalar vs grad_input
    # FLOPs: the head's three matmuls all in the forward (frozen weight: logits and grad_input, 2 x 2 n d V)
    head = 2 * 2048 * 4096 * 128256
    assert lig.flops.forward - std.flops.forward == head
    assert std.flops.backward - lig.flops.backward == head


@pytest.mark.fast
def test_adapter_dtype_halves_the_factors():
    """bf16 factors: 2 bytes per trainable parameter instead of 4 (weights, gradients, AdamW's two moments)."""
    fp32 = estimate("llama-2-7b", "lora", r=16, seq=256)
    bf16 = estimate("llama-2-7b", "lora", r=16, seq=256, adapter_dtype="bf16")
    n = fp32.trainable_params
    assert n == bf16.trainable_params == 32 * 2 * 16 * (4096 + 4096)  # q, v in 32 layers
    assert fp32.memory.steady_bytes - bf16.memory.steady_bytes == n * (4 - 2) * 3  # weights + 2 moments


@pytest.mark.fast
@pytest.mark.parametrize("args,needle", [
    (["--loss", "chunked:0"], "positive integer"),
    (["--loss", "fused"], "unknown --loss"),
    (["--loss", "liger:4"], "unknown --loss"),
    (["--loss", "chunked:3", "--seq", "512"], "must divide --seq"),
    (["--loss", "liger", "--model", "gpt2"], "not gpt2"),
    (["--loss", "liger", "--precision", "amp-bf16"], "autocast"),
    (["--adapter-dtype", "bf16", "--method", "dora"], "not dora"),
    (["--adapter-dtype", "fp16"], "on a bf16 model"),
    (["--adapter-dtype", "fp16", "--method", "qlora"], "qlora takes"),
    (["--loss", "chunked", "--model", "roberta-base"], "causal-LM loss"),
])
def test_bad_combinations_are_one_line(args, needle):
    base = {"--model": "llama-2-7b"}
    flat = list(args)
    if "--model" not in flat:
        flat += ["--model", base["--model"]]
    result = CliRunner().invoke(main, ["estimate", "--engine", "analytic", *flat])
    assert result.exit_code == 2, result.output
    assert needle in result.output and len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.fast
def test_flags_reach_the_estimate():
    result = CliRunner().invoke(main, ["estimate", "--engine", "analytic", "--model", "llama-2-7b", "--loss", "chunked",
                                       "--adapter-dtype", "bf16", "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    plain = json.loads(CliRunner().invoke(main, ["estimate", "--engine", "analytic", "--model", "llama-2-7b",
                                                 "--json"]).output)
    assert got["memory"]["peak_bytes"] < plain["memory"]["peak_bytes"]


# ---------------------------------------------------------------------------------------------- torch
def _model(dtype, method, targets, r, ckpt, autocast_adapter_dtype=True):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.AutoConfig.for_model(**LLAMA)
    config.use_cache = False
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
    if method != "full":
        conf = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets)
        model = peft.get_peft_model(model, conf, autocast_adapter_dtype=autocast_adapter_dtype)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method != "full":
            model.enable_input_require_grads()
    model.train()
    return model


def _count_saved(model, step) -> int:
    """Distinct storages saved for backward, parameters and buffers excluded (tests/test_saved_vs_torch.py)."""
    from peft_step import SavedBytes

    saved = SavedBytes(model, keep_alive=True)
    with saved:
        step().backward()
    return saved.bytes


def torchtune_chunked_step(model, ids, chunks: int):
    """torchtune as written (modules/transformer.py chunked_output; modules/loss/ce_chunked_output_loss.py
    CEWithChunkedOutputLoss; the recipe's label shift), on a transformers CausalLM."""
    import torch
    import torch.nn.functional as F

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    h = base.model(input_ids=ids)[0]
    logits = [base.lm_head(chunk) for chunk in h.tensor_split(chunks, dim=1)]
    labels = torch.hstack((ids[..., 1:], torch.full((ids.shape[0], 1), -100, dtype=ids.dtype)))
    total_elements = (labels != -100).sum()
    labels = [target_chunk.reshape(-1) for target_chunk in labels.chunk(chunks, dim=1)]
    logits = [logit_chunk.reshape(-1, logit_chunk.size(-1)) for logit_chunk in logits]
    total_loss = 0.0
    for logits_chunk, labels_chunk in zip(logits, labels):
        total_loss += F.cross_entropy(logits_chunk.float(), labels_chunk, ignore_index=-100, reduction="sum")
    return total_loss / total_elements


def _estimate(tmp_path, method, targets, r, ckpt, precision, batch=B, **kw):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA))
    run = dict(batch=batch, seq=S, precision=precision, attention="eager", model_dropout=0.0, grad_checkpointing=ckpt)
    if method != "full":
        run.update(r=r, targets=",".join(targets) if isinstance(targets, list) else targets)
    return estimate(str(path), method, **run, **kw)


@pytest.mark.parametrize("method,targets,ckpt,chunks,batch", [
    ("lora", ["q_proj", "v_proj"], False, 8, 2), ("lora", "all-linear", True, 4, 2), ("full", None, False, 4, 2),
    ("full", None, False, 8, 1), ("lora", ["q_proj", "v_proj"], False, 3, 1),
])
def test_chunked_saved_bytes_equal_torch(tmp_path, method, targets, ckpt, chunks, batch):
    torch = pytest.importorskip("torch")
    model = _model(torch.float32, method, targets, 4, ckpt)
    ids = torch.randint(2, LLAMA["vocab_size"], (batch, S))
    measured = _count_saved(model, lambda: torchtune_chunked_step(model, ids, chunks))
    e = _estimate(tmp_path, method, targets, 4, ckpt, "fp32", batch=batch, loss=f"chunked:{chunks}")
    assert e.memory.saved_activation_bytes == measured


@pytest.mark.parametrize("method,targets,ckpt", [("lora", "all-linear", False), ("lora", ["q_proj", "v_proj"], True)])
def test_bf16_adapters_saved_bytes_equal_torch(tmp_path, method, targets, ckpt):
    """peft with autocast_adapter_dtype=False on a bf16 model: bf16 factors, no fp32 copy of each input."""
    torch = pytest.importorskip("torch")
    model = _model(torch.bfloat16, method, targets, 4, ckpt, autocast_adapter_dtype=False)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.bfloat16}
    ids = torch.randint(2, LLAMA["vocab_size"], (B, S))
    measured = _count_saved(model, lambda: model(input_ids=ids, labels=ids).loss)
    e = _estimate(tmp_path, method, targets, 4, ckpt, "bf16", adapter_dtype="bf16")
    assert e.memory.saved_activation_bytes == measured
    if not ckpt:  # under checkpointing only the block inputs are kept, in the model dtype either way
        assert e.memory.saved_activation_bytes < _estimate(tmp_path, method, targets, 4, ckpt, "bf16").memory.saved_activation_bytes


def test_liger_stand_in_gradients_are_cross_entropys():
    """The stand-in computes in the forward what autograd computes for mean cross-entropy of x @ W.T (three
    chunks here: cdiv(64, 16) = 4, next_power_of_2(cdiv(12, 4)) = 4 rows each), ignored labels included."""
    torch = pytest.importorskip("torch")
    from lora_cost.trace.losses import LigerFusedLinearCEStandIn

    torch.manual_seed(0)
    x = torch.randn(12, 16, requires_grad=True)
    w = torch.randn(64, 16, requires_grad=True)
    target = torch.randint(0, 64, (12,))
    target[3] = -100
    loss = LigerFusedLinearCEStandIn.apply(x, w, target)
    loss.backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(x2 @ w2.t(), target, ignore_index=-100)
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5) and torch.allclose(w.grad, w2.grad, atol=1e-5)


# LLaMA-65B (Touvron et al. 2023, arXiv:2302.13971, Table 2: dim 8192, 64 heads, 80 layers; the published HF
# config's intermediate_size 22016 and vocabulary 32000), as a config.json
LLAMA_65B = dict(model_type="llama", hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=64, vocab_size=32000, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)


@pytest.mark.fast
@pytest.mark.parametrize("model,claim_gb,factors", [
    # r = 64 on all 7 linears of every layer: 80 x 64 x (4 x (8192 + 8192) + 3 x (8192 + 22016)) = 799,539,200
    ("llama-65b", 1.0, 799_539_200),
    # 32 x 64 x (2 x (4096 + 4096) + 2 x (4096 + 1024) + 3 x (4096 + 14336)) = 167,772,160
    ("llama-3.1-8b", 2.0, 167_772_160),
])
def test_qlora_script_recast_claim(tmp_path, model, claim_gb, factors):
    """The issue: the QLoRA script (artidoro/qlora qlora.py, --bf16, r=64 on every linear) keeps LoRA layers, embeddings
    and LM head in bf16 where peft's prepare_model_for_kbit_training leaves fp32: "~1 GB too much at 65B, ~2 GB at
    Llama-3.1-8B". Derived here from the shapes: the estimate's base weights hold embeddings and head at 4 B each
    (2 V d elements, untied); the script saves 2 B of each, and 2 B per LoRA factor (--adapter-dtype bf16)."""
    if model == "llama-65b":
        path = tmp_path / "config.json"
        path.write_text(json.dumps(LLAMA_65B))
        model = str(path)
    peft_fp32 = estimate(model, "qlora", r=64, targets="all-linear", seq=512)
    script = estimate(model, "qlora", r=64, targets="all-linear", seq=512, adapter_dtype="bf16")
    from lora_cost.profiles import load_model
    spec = load_model(model)
    V, d = spec.vocab, spec.hidden
    fp32_terms = {t.name: t.value for t in peft_fp32.memory.terms}
    norms = (2 * spec.layers + 1) * d * 4
    from lora_cost.analytic.formulas.storage import nf4_bytes
    linears = spec.layers * sum(nf4_bytes(n, double_quant=True) for n in (
        d * d, d * spec.kv_heads * spec.head_dim, d * spec.kv_heads * spec.head_dim, d * d,
        d * spec.intermediate, d * spec.intermediate, spec.intermediate * d))
    # embeddings and head as the estimate stores them: fp32, 4 B x 2 V d
    assert fp32_terms["base weights"] == pytest.approx(linears + norms + 4 * 2 * V * d, rel=1e-9)
    embed_head_saving = (4 - 2) * 2 * V * d  # 8B: 2 x 2 x 128256 x 4096 = 2.10 GB; 65B: 2 x 2 x 32000 x 8192 = 1.05 GB
    factor_saving = (peft_fp32.memory.steady_bytes - script.memory.steady_bytes) // 3  # weights + AdamW's 2 moments
    assert peft_fp32.trainable_params == factors
    assert factor_saving == (4 - 2) * factors
    # the claim holds for the embeddings and head alone (1.05 GB, 2.10 GB: within 10%); the bf16 factors save
    # 2 B x factors more in weights (1.60 GB at 65B, 0.34 GB at 8B), and as much again per AdamW moment
    assert embed_head_saving / 1e9 == pytest.approx(claim_gb, rel=0.1)


@pytest.mark.fast
def test_quant_storage_same_bytes_other_numel():
    """bnb_4bit_quant_storage: quantize_4bit packs into zeros(((n + 1) // (2 x itemsize), 1), dtype=storage). A 4096 x 4096
    weight: 8,388,608 uint8, 4,194,304 bf16 or fp16, 2,097,152 fp32 elements; 8 MiB each."""
    from lora_cost.analytic.formulas.storage import QUANT_STORAGE_BYTES, nf4_bytes, packed_4bit_numel

    n = 4096 * 4096
    assert [packed_4bit_numel(n, QUANT_STORAGE_BYTES[s]) for s in ("uint8", "bf16", "fp16", "fp32")] == \
        [8_388_608, 4_194_304, 4_194_304, 2_097_152]
    assert len({nf4_bytes(n, storage_bytes=b) for b in (1, 2, 4)}) == 1
    peaks = {s: estimate("llama-3.1-8b", "qlora", r=16, seq=1024, method_options={"quant_storage": s}).memory.peak_bytes
             for s in ("uint8", "bf16", "fp32")}
    assert len(set(peaks.values())) == 1
    result = CliRunner().invoke(main, ["estimate", "--engine", "analytic", "--model", "llama-2-7b", "--quant-storage", "bf16"])
    assert result.exit_code == 2 and "does not apply to method lora" in result.output


def test_quant_storage_trace_keeps_the_packed_dtype(tmp_path):
    """The stand-in packs as bitsandbytes does, and peft's prepare_model_for_kbit_training leaves a 16-bit packed weight
    alone because its class is named Params4bit (peft utils/other.py), so the traced steady memory does not move."""
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import inspect

    assert 'param.__class__.__name__ != "Params4bit"' in inspect.getsource(peft.prepare_model_for_kbit_training)
    from lora_cost.trace import trace

    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA))
    runs = {s: trace(str(path), "qlora", r=4, batch=1, seq=16, method_options={"quant_storage": s})
            for s in ("uint8", "bf16")}
    assert runs["uint8"].steady_bytes == runs["bf16"].steady_bytes
    # every packed weight holds half as many bf16 elements: the model's element count drops by a quarter of the linears
    linears = 3 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 96)
    assert runs["uint8"].total_params - runs["bf16"].total_params == linears // 4


@pytest.mark.fast
@pytest.mark.parametrize("args,needle", [
    (["--modules-to-save", "lm_head", "--model", "qwen2.5-0.5b"], "tied"),
    (["--modules-to-save", "embed_tokens", "--method", "vera"], "not vera"),
    (["--modules-to-save", "lm_head", "--loss", "chunked"], "not modelled yet"),
    (["--modules-to-save", "score"], "not 'score'"),
])
def test_modules_to_save_refusals(args, needle):
    flat = list(args) + ([] if "--model" in args else ["--model", "llama-2-7b"])
    result = CliRunner().invoke(main, ["estimate", "--engine", "analytic", *flat])
    assert result.exit_code == 2 and needle in result.output and len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.fast
def test_modules_to_save_by_hand():
    """Llama-2-7B, LoRA r=8 on q, v, + embed_tokens and lm_head trained as bf16 copies: 2 x 32000 x 4096 more trainable
    elements (each a weight and two AdamW moments of 2 B between steps)."""
    plain = estimate("llama-2-7b", "lora", seq=512)
    saved = estimate("llama-2-7b", "lora", seq=512, modules_to_save="embed_tokens,lm_head")
    copies = 2 * 32000 * 4096
    assert saved.trainable_params - plain.trainable_params == copies
    assert saved.memory.steady_bytes - plain.memory.steady_bytes == copies * 2 * 3
    # a trained head alone: it keeps its input (the final norm's bf16 output, 512 x 4096 x 2 B) and its weight
    # gradient costs 2 x 512 x 4096 x 32000 FLOPs in backward. (A trained embedding also makes the first block
    # compute and keep what its input gradient needs; test_modules_to_save_saved_bytes_equal_torch counts that.)
    head = estimate("llama-2-7b", "lora", seq=512, modules_to_save="lm_head")
    assert head.flops.backward - plain.flops.backward == 2 * 512 * 4096 * 32000
    assert head.memory.saved_activation_bytes - plain.memory.saved_activation_bytes == 512 * 4096 * 2


@pytest.mark.parametrize("dtype,modules,ckpt", [("fp32", ["embed_tokens", "lm_head"], False), ("bf16", ["lm_head"], False),
                                                ("bf16", ["embed_tokens"], True)])
def test_modules_to_save_saved_bytes_equal_torch(tmp_path, dtype, modules, ckpt):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.AutoConfig.for_model(**LLAMA)
    config.use_cache = False
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                          dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    conf = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], modules_to_save=modules)
    model = peft.get_peft_model(model, conf)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    ids = torch.randint(2, LLAMA["vocab_size"], (B, S))
    measured = _count_saved(model, lambda: model(input_ids=ids, labels=ids).loss)
    e = _estimate(tmp_path, "lora", ["q_proj", "v_proj"], 4, ckpt, dtype, modules_to_save=",".join(modules))
    assert e.memory.saved_activation_bytes == measured
    assert e.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
