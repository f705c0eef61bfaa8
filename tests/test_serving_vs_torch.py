"""The serving block against PyTorch itself: tiny transformers + peft models on the CPU in eval mode.

One generated token with a KV cache (GPT-2, Llama; RoBERTa has no cache, so its whole forward is
divided by the tokens) measured three ways: `FlopCounterMode` for the forward FLOPs, a dispatch mode
counting the operations that write a new tensor (kernels; views and no-op casts write none) for the
sequential operations, and the adapter tensors' bytes. The unmerged adapter's extra, and the nothing
of a merged one (peft merge_and_unload), must equal the estimate exactly."""

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lora_cost import estimate  # noqa: E402

CONFIGS = {
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=3, n_head=4, vocab_size=512, n_positions=64),
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=64),
    "roberta": dict(model_type="roberta", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, vocab_size=512, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1),
}
TARGETS = {"gpt2": ("c_attn",), "llama": ("q_proj", "v_proj"), "roberta": ("query", "value")}
DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob")
CONTEXT = 11  # positions the measured token attends to: 10 cached + itself (RoBERTa: an 11-token input)
LAYERS = 3


class KernelCount(TorchDispatchMode):
    """Operations whose output is not a view of an input: each one a kernel writing a new tensor."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        if any(o.untyped_storage().data_ptr() not in inputs for o in tree_leaves(out) if isinstance(o, torch.Tensor)):
            self.count += 1
        return out


def build(family: str, method: str, r: int, dtype: str):
    cfg = CONFIGS[family]
    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    kwargs.update({k: 0.0 for k in DROPOUT_KEYS})
    config = transformers.AutoConfig.for_model(cfg["model_type"], **kwargs)
    torch.manual_seed(0)
    cls = transformers.AutoModelForMaskedLM if family == "roberta" else transformers.AutoModelForCausalLM
    model = cls.from_config(config, attn_implementation="eager", dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    if method == "vera":
        model = peft.get_peft_model(model, peft.VeraConfig(r=r, target_modules=list(TARGETS[family])))
    elif method != "base":
        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS[family]),
                                                           use_dora=method == "dora"))
        # give B non-zero values: a zero B would make nothing to merge, and DoRA's norm trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p)
    return model.eval()


def one_token(model, family: str) -> tuple[int, int]:
    """(FLOPs, kernels) of the forward that produces one token's output at CONTEXT positions."""
    torch.manual_seed(1)
    with torch.no_grad():
        if family == "roberta":
            kwargs = dict(input_ids=torch.randint(3, 500, (1, CONTEXT)))
        else:
            cache = model(input_ids=torch.randint(3, 500, (1, CONTEXT - 1)), use_cache=True).cache
            kwargs = dict(input_ids=torch.randint(3, 500, (1, 1)), cache=cache, use_cache=True)
        flops, kernels = FlopCounterMode(display=False), KernelCount()
        with flops, kernels:
            model(**kwargs)
    return flops.get_total_flops(), kernels.count


def adapter_bytes(model) -> int:
    """Every adapter tensor peft added (parameters and buffers, shared ones once)."""
    tensors = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
               for name, t in [*model.named_parameters(), *model.named_buffers()]
               if any(key in name for key in ("lora_", "vera_"))}
    return sum(tensors.values())


def serving(tmp_path, family: str, method: str, r: int, dtype: str):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIGS[family]))
    kw = dict(r=r, targets=",".join(TARGETS[family])) if method != "full" else {}
    return estimate(str(path), method, seq=CONTEXT, precision=dtype, attention="eager", serving=True, **kw).serving


@pytest.mark.parametrize("family", ["gpt2", "llama", "roberta"])
def test_base_flops_per_token_equal_flopcounter(tmp_path, family):
    s = serving(tmp_path, family, "full", 0, "fp32")
    flops, _ = one_token(build(family, "base", 0, "fp32"), family)
    tokens = CONTEXT if family == "roberta" else 1  # RoBERTa's forward computes every position's output
    assert s.base_flops_per_token * tokens == flops
    assert s.merged.flops_per_token == s.unmerged.flops_per_token == s.base_flops_per_token  # full: nothing added


CASES = [(family, method, r, dtype) for family in ("gpt2", "llama", "roberta")
         for method, r in (("lora", 4), ("dora", 4), ("vera", 16)) for dtype in ("fp32", "bf16")]


@pytest.mark.parametrize("family,method,r,dtype", CASES)
def test_unmerged_extra_equals_torch(tmp_path, family, method, r, dtype):
    s = serving(tmp_path, family, method, r, dtype)
    base_flops, base_kernels = one_token(build(family, "base", 0, dtype), family)
    model = build(family, method, r, dtype)
    flops, kernels = one_token(model, family)
    tokens = CONTEXT if family == "roberta" else 1
    assert flops - base_flops == s.unmerged.extra_flops_per_token * tokens + s.unmerged.extra_flops_per_forward
    assert kernels - base_kernels == LAYERS * s.unmerged.extra_sequential_ops_per_block
    assert adapter_bytes(model) == s.unmerged.extra_weight_bytes


@pytest.mark.parametrize("family,method", [("gpt2", "lora"), ("gpt2", "dora"), ("llama", "vera"), ("roberta", "dora")])
def test_merged_adds_nothing(tmp_path, family, method):
    r = 16 if method == "vera" else 4
    s = serving(tmp_path, family, method, r, "fp32")
    assert s.mergeable and (s.merged.extra_flops_per_token, s.merged.extra_sequential_ops_per_block) == (0, 0)
    base = one_token(build(family, "base", 0, "fp32"), family)
    merged = build(family, method, r, "fp32").merge_and_unload()
    assert one_token(merged, family) == base
    assert adapter_bytes(merged) == s.merged.extra_weight_bytes == 0
