"""Liger's RMSNorm, RoPE and SwiGLU kernels (`--liger`, `--liger-kernels`): the rules against the library's source,
the stand-ins against torch, the engines against each other, hand arithmetic, the CLI and the readers.

1. Liger's Triton kernels do not run on a CPU: what their autograd Functions allocate and save, and what
   `apply_liger_kernel_to_<type>(model=...)` patches, is checked against verbatim excerpts of liger-kernel 0.8.5
   (tests/data/liger_kernels_0.8.5.txt), and the trace's stand-ins (lora_cost/trace/liger.py) against those rules
   on real CPU tensors under saved_tensors_hooks.
2. A real CPU step of tiny models with the stand-ins in place (transformers' and peft's own code around them):
   the saved bytes equal the analytic engine's.
3. Analytic vs trace (fake tensors) on a few configurations; the cross grid (tests/test_grid_issue9.py) has more.
4. Hand arithmetic on Llama-3.1-8B; refusals in one line; the readers' mapping.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_cost import estimate  # noqa: E402
from lora_cost.analytic import liger  # noqa: E402
from lora_cost.errors import LoraCostError  # noqa: E402

RULES = (Path(__file__).parent / "data" / "liger_kernels_0.8.5.txt").read_text()


def _section(name: str) -> str:
    return RULES.split(f"[{name}]\n")[1].split("\n[")[0]


def _saved(name: str) -> list[str]:
    args = re.findall(r"ctx\.save_for_backward\((.*?)\)", _section(name))[0]
    return [a.strip() for a in args.split(",")]


# ---- 1. the rules, from the source
@pytest.mark.fast
def test_save_rules_are_the_sources():
    # RMSNorm: the input itself (reshaped view), the weight (a parameter) and the fp32 rstd per row; Y in X's dtype
    assert _saved("ops/rms_norm.py LigerRMSNormFunction.forward") == ["X", "W", "RSTD"]
    fwd = _section("ops/rms_norm.py rms_norm_forward")
    assert "X = X.view(-1, dim)" in fwd and "Y = torch.empty((n_rows, n_cols), dtype=X.dtype" in fwd
    assert "torch.float32 if casting_mode in (_CASTING_MODE_LLAMA.value" in fwd
    assert "RSTD = torch.empty(n_rows, dtype=rstd_dtype" in fwd
    bwd = _section("ops/rms_norm.py rms_norm_backward")
    assert "dX = dY" in bwd  # in_place (the default _patch_rms_norm_module gives llama-family norms)
    assert "_dW = torch.empty((sm_count, n_cols), dtype=torch.float32" in bwd and "_dW.sum(dim=0).to(W.dtype)" in bwd
    assert 'casting_mode="llama", in_place=True' in _section("transformers/monkey_patch.py _patch_rms_norm_module")
    # SwiGLU: the gate and up outputs, c = empty_like(a); backward stores da, db into a and b
    assert _saved("ops/swiglu.py LigerSiLUMulFunction.forward") == ["a", "b"]
    assert "c = torch.empty_like(a)" in _section("ops/swiglu.py swiglu_forward")
    sw = _section("ops/swiglu.py swiglu_backward")
    assert "tl.store(a_ptr + col_offsets, da_row" in sw and "tl.store(b_ptr + col_offsets, db_row" in sw
    assert "@ensure_contiguous" in _section("ops/swiglu.py LigerSiLUMulFunction.forward")
    # RoPE: cos and sin; q and k made contiguous in their physical [b, s, h, d] layout (a no-op) and rotated in place
    assert _saved("ops/rope.py LigerRopeFunction.forward") == ["cos", "sin"]
    rope = _section("ops/rope.py rope_forward")
    assert "q = q.transpose(1, 2)" in rope and "q = q.contiguous()" in rope
    assert "return q.transpose(1, 2), k.transpose(1, 2), cos, sin" in rope


@pytest.mark.fast
def test_patched_modules_and_defaults_are_the_sources():
    llama = _section("transformers/monkey_patch.py apply_liger_kernel_to_llama")
    for kw in ("rope: bool = True", "cross_entropy: bool = False", "fused_linear_cross_entropy: bool = True",
               "rms_norm: bool = True", "swiglu: bool = True"):
        assert kw in llama
    assert set(liger.DEFAULT_KERNELS) == {"rope", "rms_norm", "swiglu"}
    for patched in ("_patch_rms_norm_module(base_model.norm)", "_patch_swiglu_module(decoder_layer.mlp, LigerSwiGLUMLP)",
                    "_patch_rms_norm_module(decoder_layer.input_layernorm)",
                    "_patch_rms_norm_module(decoder_layer.post_attention_layernorm)",
                    "modeling_llama.apply_rotary_pos_emb = liger_rotary_pos_emb"):
        assert patched in llama
    qwen3 = _section("transformers/monkey_patch.py apply_liger_kernel_to_qwen3 instance")
    assert "self_attn.q_norm" in qwen3 and "self_attn.k_norm" in qwen3
    phi3 = _section("transformers/monkey_patch.py apply_liger_kernel_to_phi3")
    for line in ("fused_linear_cross_entropy: bool = True", "modeling_phi3.apply_rotary_pos_emb = liger_rotary_pos_emb",
                 "_patch_swiglu_module(decoder_layer.mlp, LigerPhi3SwiGLUMLP)", "_patch_rms_norm_module(base_model.norm)"):
        assert line in phi3
    assert "gate, up_states = up_states.chunk(2, dim=-1)" in _section("transformers/swiglu.py LigerPhi3SwiGLUMLP.forward")
    # Gemma 2 / 3: GEGLU (the same saving rule as SwiGLU), their norms not in place, the feed-forward's norms too
    assert _saved("ops/geglu.py LigerGELUMulFunction") == ["a", "b"]
    assert "c = torch.empty_like(a)" in _section("ops/geglu.py geglu_forward")
    assert "tl.store(a + col_offsets, da_row" in _section("ops/geglu.py LigerGELUMulFunction")
    for fam in ("gemma2", "gemma3_text"):
        src = _section(f"transformers/monkey_patch.py apply_liger_kernel_to_{fam}")
        assert "geglu: bool = True" in src and 'casting_mode="gemma", in_place=False' in src
        assert "_patch_geglu_module(decoder_layer.mlp)" in src and "pre_feedforward_layernorm)" in src
    assert "self_attn.q_norm" in _section("transformers/monkey_patch.py apply_liger_kernel_to_gemma3_text")
    assert liger.GEGLU_TYPES == ("gemma2", "gemma3_text")
    trace_src = (Path(liger.__file__).parents[1] / "trace" / "liger.py").read_text()
    for attr in ("decoder.norm", "layer.input_layernorm", "layer.post_attention_layernorm", "layer.self_attn.q_norm",
                 "layer.self_attn.k_norm", "layer.mlp.forward", '"apply_rotary_pos_emb"'):
        assert attr in trace_src
    table = _section("transformers/monkey_patch.py MODEL_TYPE_TO_APPLY_LIGER_FN")
    for t in liger.MODELLED_TYPES + liger.PATCHED_NOT_MODELLED:
        assert f'"{t}": apply_liger_kernel_to_{t}' in table


def test_standins_save_what_liger_saves():
    """The trace's stand-ins on real CPU tensors: saved storages, dtypes and sizes as the rules say."""
    torch = pytest.importorskip("torch")
    from lora_cost.trace.liger import LigerRMSNormStandIn, LigerRopeStandIn, LigerSiLUMulStandIn

    def saved_of(fn):
        seen = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
            out = fn()
        return seen, out

    x = torch.randn(2, 5, 8, dtype=torch.bfloat16, requires_grad=True) * 1
    w = torch.nn.Parameter(torch.ones(8))
    seen, y = saved_of(lambda: LigerRMSNormStandIn.apply(x, w, 1e-6))
    assert [t.untyped_storage().data_ptr() for t in seen] == [x.untyped_storage().data_ptr(), w.data_ptr(),
                                                              seen[2].untyped_storage().data_ptr()]
    assert seen[2].dtype == torch.float32 and seen[2].shape == (10,) and y.dtype == torch.bfloat16
    y.sum().backward()  # dX = dY, dW from the [SM_COUNT, d] partial sums
    assert w.grad.shape == (8,)

    a = torch.randn(10, 16, requires_grad=True) * 1
    b = torch.randn(10, 16, requires_grad=True) * 1
    seen, c = saved_of(lambda: LigerSiLUMulStandIn.apply(a, b))
    assert [t.untyped_storage().data_ptr() for t in seen] == [a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()]
    assert c.untyped_storage().data_ptr() not in (a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr())

    proj = torch.randn(2, 5, 4 * 8, requires_grad=True) * 1  # q_proj output, [b, s, h*d]
    q = proj.view(2, 5, 4, 8).transpose(1, 2)
    k = (torch.randn(2, 5, 2 * 8, requires_grad=True) * 1).view(2, 5, 2, 8).transpose(1, 2)
    cos, sin = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    seen, (q2, k2) = saved_of(lambda: LigerRopeStandIn.apply(q, k, cos, sin))
    assert [t.data_ptr() for t in seen] == [cos.data_ptr(), sin.data_ptr()]
    assert q2.untyped_storage().data_ptr() == proj.untyped_storage().data_ptr()  # in place: no new q


# ---- 2. a real CPU step with the stand-ins: saved bytes, analytic vs saved_tensors_hooks
REAL = [  # (family config, method, targets, ckpt, kernels)
    ("llama", "lora", ("q_proj", "v_proj"), False, "rms_norm,rope,swiglu"),
    ("llama", "full", None, False, "rms_norm,swiglu"),
    ("qwen3", "lora", "all-linear", False, "rms_norm,rope,swiglu"),
    ("llama", "lora", ("k_proj",), False, "rope"),
    ("phi3", "lora", ("qkv_proj", "down_proj"), False, "rms_norm,rope,swiglu"),
    ("gemma3_text", "lora", "all-linear", False, "rms_norm,rope,geglu"),
    ("gemma2", "full", None, False, "rms_norm,rope,swiglu"),  # swiglu names the family's gated-MLP kernel: GEGLU
]
TINY = {
    "llama": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128},
    "qwen3": {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256,
              "max_position_embeddings": 128},
    "phi3": {"model_type": "phi3", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128,
             "partial_rotary_factor": 0.5, "pad_token_id": 0, "sliding_window": None},
    "gemma2": {"model_type": "gemma2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256,
               "max_position_embeddings": 128, "sliding_window": 16, "query_pre_attn_scalar": 16},
    "gemma3_text": {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 3,
                    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 256,
                    "max_position_embeddings": 128, "sliding_window": 16, "sliding_window_pattern": 3,
                    "query_pre_attn_scalar": 16},
    "mistral": {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128,
                "sliding_window": None},
}


@pytest.mark.parametrize("case", REAL, ids=lambda c: f"{c[0]}-{c[1]}-{c[4]}")
def test_saved_bytes_equal_a_real_cpu_step(case, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    import types

    import torch
    import transformers
    from peft_step import B, DROPOUT_KEYS, S, SavedBytes, adapt

    from lora_cost.spec import RunConfig
    from lora_cost.trace.liger import liger_swaps

    family, method, targets, ckpt, kernels = case
    cfg = TINY[family]
    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    kwargs.update({k: 0.0 for k in DROPOUT_KEYS})
    config = transformers.AutoConfig.for_model(cfg["model_type"], **kwargs)
    config.use_cache = False
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    model = adapt(model, method, targets, 8, ckpt)
    run = RunConfig(liger_kernels=kernels)
    spec = types.SimpleNamespace(qk_norm=family in ("qwen3", "gemma3_text"))
    ids = torch.randint(2, cfg["vocab_size"], (B, S))
    with liger_swaps(types.SimpleNamespace(model=model), spec, run), SavedBytes(model) as saved:
        model(input_ids=ids, labels=ids).loss.backward()

    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    kw = dict(batch=B, seq=S, precision="fp32", attention="eager", model_dropout=0.0, grad_checkpointing=ckpt,
              liger_kernels=kernels)
    if method != "full":
        kw.update(r=8, targets=",".join(targets) if isinstance(targets, tuple) else targets)
    e = estimate(str(path), method, **kw)
    assert e.memory.saved_activation_bytes == saved.bytes


# ---- 3. analytic vs trace
TRACED = [  # (family, method, kwargs)
    ("llama", "lora", dict(r=8, liger_kernels="all")),
    ("mistral", "qlora", dict(r=8, liger_kernels="rms_norm,rope,swiglu")),
    ("qwen3", "full", dict(liger_kernels="all", grad_checkpointing=True)),
    ("phi3", "lora", dict(r=8, targets="all-linear", liger_kernels="all", attention="sdpa")),
    ("gemma3_text", "lora", dict(r=8, targets="all-linear", liger_kernels="all", grad_checkpointing=True)),
    ("llama", "lora", dict(r=8, targets="all-linear", liger_kernels="all", attention="flash-attention-2",
                           grad_checkpointing=True, adapter_dtype="bf16")),
]


@pytest.mark.parametrize("case", TRACED, ids=lambda c: f"{c[0]}-{c[1]}-{'-'.join(f'{k}={v}' for k, v in c[2].items())}")
def test_engines_agree(case, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from grid_support import assert_engines_agree
    from lora_cost.trace import trace
    from lora_cost.trace.compare import differences

    family, method, kw = case
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY[family]))
    kw = dict(batch=2, seq=32, **kw)
    e, t = estimate(str(path), method, **kw), trace(str(path), method, **kw)
    terms = {d.term: (d.analytic, d.trace) for d in differences(e, t)}
    assert terms["saved_activation_bytes"][0] == pytest.approx(terms["saved_activation_bytes"][1], rel=0.002)
    assert_engines_agree(terms, peak_tolerance=0.08)


# ---- 4. hand arithmetic, refusals, readers
@pytest.mark.fast
def test_hand_arithmetic_llama_8b():
    """Llama-3.1-8B, LoRA r=16 on q,v, 1 x 2048 tokens, bf16 (n = 2048, d = 4096, I = 14336, 32 layers)."""
    base = estimate("llama-3.1-8b", "lora", r=16, seq=2048)
    norm = estimate("llama-3.1-8b", "lora", r=16, seq=2048, liger_kernels="rms_norm")
    swiglu = estimate("llama-3.1-8b", "lora", r=16, seq=2048, liger_kernels="swiglu")
    rope = estimate("llama-3.1-8b", "lora", r=16, seq=2048, liger_kernels="rope")
    n, d, inter, layers = 2048, 4096, 14336, 32
    # each block norm keeps its bf16 input instead of LlamaRMSNorm's fp32 copy: 2 x 32 x n d (4 - 2) bytes = 1 GiB
    assert base.memory.saved_activation_bytes - norm.memory.saved_activation_bytes == 2 * layers * n * d * 2 == 1 << 30
    # SwiGLU keeps no silu(gate) output: 32 x n I x 2 bytes
    assert base.memory.saved_activation_bytes - swiglu.memory.saved_activation_bytes == layers * n * inter * 2
    # RoPE in place saves the same cos and sin tables: no saved byte changes
    assert rope.memory.saved_activation_bytes == base.memory.saved_activation_bytes
    for e in (norm, swiglu, rope):  # elementwise kernels: FlopCounterMode counts none
        assert (e.flops.forward, e.flops.backward) == (base.flops.forward, base.flops.backward)


@pytest.mark.fast
def test_parsing_and_refusals():
    assert liger.resolve("all") == (("rms_norm", "rope", "swiglu"), "liger")
    assert liger.resolve("swiglu,rope") == (("rope", "swiglu"), "standard")
    assert liger.resolve(["fused_linear_cross_entropy"], "liger") == ((), "liger")
    for bad, words in (("bogus", "unknown Liger kernel"), ("", "empty"), ("cross_entropy", "not modelled"), (3, "takes")):
        with pytest.raises(LoraCostError, match=words):
            liger.resolve(bad)
    with pytest.raises(LoraCostError, match="cannot go with --loss chunked"):
        liger.resolve("all", "chunked:4")
    with pytest.raises(LoraCostError, match="not modelled yet"):
        estimate("mixtral-8x7b", "lora", liger_kernels="rms_norm")
    # the gated MLP's kernel is the family's: swiglu on Gemma is its GEGLU, geglu on Llama its SwiGLU
    assert (estimate("gemma-3-1b", "lora", liger_kernels="swiglu").memory.peak_bytes
            == estimate("gemma-3-1b", "lora", liger_kernels="geglu").memory.peak_bytes)
    assert (estimate("llama-3.2-1b", "lora", liger_kernels="geglu").memory.peak_bytes
            == estimate("llama-3.2-1b", "lora", liger_kernels="swiglu").memory.peak_bytes)
    with pytest.raises(LoraCostError, match="no kernels for model type gpt2"):
        estimate("gpt2", "lora", liger_kernels="rope")


@pytest.mark.fast
def test_cli(tmp_path):
    from click.testing import CliRunner

    from lora_cost.cli import main

    r = CliRunner().invoke(main, ["estimate", "--model", "llama-3.2-1b", "--liger", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert any(a.startswith("Liger kernels") for a in doc["assumptions"])
    same = estimate("llama-3.2-1b", "lora", liger_kernels="all")
    assert doc["memory"]["peak_bytes"] == same.memory.peak_bytes
    for args, words in ((["--liger", "--liger-kernels", "rope"], "not both"), (["--liger-kernels", "nope"], "unknown"),
                        (["--liger", "--loss", "chunked"], "cannot go with")):
        r = CliRunner().invoke(main, ["estimate", "--model", "llama-3.2-1b", *args])
        assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output


@pytest.mark.fast
def test_readers_map_to_the_kernels(tmp_path):
    from lora_cost.readers.axolotl import read_axolotl
    from lora_cost.readers.base import resolve
    from lora_cost.readers.training_args import read_training_args

    p = tmp_path / "a.json"
    p.write_text(json.dumps({"use_liger_kernel": True}))
    kw = resolve(read_training_args(str(p))).kwargs
    assert kw["liger_kernels"] == ("rms_norm", "rope", "swiglu") and kw["loss"] == "liger"
    p.write_text(json.dumps({"use_liger_kernel": True, "liger_kernel_config": {"rope": False,
                                                                               "fused_linear_cross_entropy": False}}))
    kw = resolve(read_training_args(str(p))).kwargs
    assert kw["liger_kernels"] == ("rms_norm", "swiglu") and "loss" not in kw
    p.write_text(json.dumps({"use_liger_kernel": True, "liger_kernel_config": {"rope": "yes"}}))
    with pytest.raises(LoraCostError, match="liger_kernel_config"):
        read_training_args(str(p))
    y = tmp_path / "ax.yml"
    y.write_text("base_model: meta-llama/Llama-3.2-1B\nplugins:\n  - axolotl.integrations.liger.LigerPlugin\n"
                 "liger_rope: true\nliger_rms_norm: true\nliger_glu_activation: true\n"
                 "liger_fused_linear_cross_entropy: true\n")
    kw = resolve(read_axolotl(str(y))).kwargs
    assert kw["liger_kernels"] == ("rms_norm", "rope", "swiglu") and kw["loss"] == "liger"


@pytest.mark.fast
def test_use_liger_kernel_from_a_file_on_families_without_modelled_kernels(tmp_path):
    """Trainer's use_liger_kernel on a family whose block kernels are not modelled (Mixtral) keeps the fused loss
    and warns; on one Liger has no kernels for (GPT-2) Trainer leaves the model as it is, and so does the
    estimate, with a warning. The same kernels typed as a flag are refused (check_liger)."""
    from click.testing import CliRunner

    from lora_cost.cli import main

    p, plain = tmp_path / "args.json", tmp_path / "plain.json"
    p.write_text(json.dumps({"use_liger_kernel": True, "bf16": True}))
    plain.write_text(json.dumps({"bf16": True}))
    runner = CliRunner()

    def peak(args):
        r = runner.invoke(main, ["estimate", "--r", "8", "--seq", "256", "--json", *args])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)["memory"]["peak_bytes"], r.stderr

    for model, loss, said in (("mixtral-8x7b", "liger", "not modelled yet"), ("gpt2", "standard", "leaves the model")):
        got, stderr = peak(["--model", model, "--training-args", str(p)])
        assert said in stderr
        assert got == peak(["--model", model, "--training-args", str(plain), "--loss", loss])[0]
    r = runner.invoke(main, ["estimate", "--model", "mixtral-8x7b", "--liger-kernels", "rms_norm"])
    assert r.exit_code == 2 and "not modelled yet" in r.output
