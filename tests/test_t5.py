"""T5 / mT5 against the real libraries: saved-activation bytes and FLOPs of one training step against
a CPU `saved_tensors_hooks` count and FlopCounterMode (tiny T5ForConditionalGeneration / MT5 models,
transformers + peft, eager attention, fp32, labels of their own decoder length), and every bundled
profile's parameter count against transformers on the meta device."""

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lora_cost import estimate  # noqa: E402
from peft_step import SavedBytes, adapt  # noqa: E402
from lora_cost.profiles import bundled_models  # noqa: E402

B, S, T = 2, 24, 16  # batch, encoder length, decoder length (--target-seq)
CONFIGS = {
    # T5 v1.0: ReLU, tied output scaled by d^-0.5
    "t5": dict(model_type="t5", d_model=64, d_kv=16, d_ff=96, num_layers=3, num_heads=4, vocab_size=512,
               feed_forward_proj="relu", decoder_start_token_id=0),
    # T5 v1.1 / flan: gated-GELU (gelu_new), unequal stacks (3 encoder, 2 decoder blocks), not scaled
    "t5-gated": dict(model_type="t5", d_model=64, d_kv=16, d_ff=96, num_layers=3, num_decoder_layers=2, num_heads=4,
                     vocab_size=512, feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0),
    # mT5: inner width heads x d_kv = 32, not d_model = 64
    "mt5": dict(model_type="mt5", d_model=64, d_kv=8, d_ff=96, num_layers=2, num_heads=4, vocab_size=512,
                feed_forward_proj="gated-gelu", decoder_start_token_id=0),
}


def measure(cfg: dict, method: str, targets, r: int, ckpt: bool, keep_alive: bool = False) -> tuple[int, int, int]:
    """(saved-activation bytes, forward FLOPs, backward FLOPs) of one real step on the CPU."""
    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    kwargs["dropout_rate"] = 0.0
    config = transformers.AutoConfig.for_model(cfg["model_type"], **kwargs)
    config.use_cache = False
    torch.manual_seed(0)
    model = transformers.AutoModelForSeq2SeqLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    model = adapt(model, method, targets, r, ckpt)

    ids, labels = torch.randint(2, 512, (B, S)), torch.randint(2, 512, (B, T))
    counter = FlopCounterMode(display=False)
    with counter:
        with SavedBytes(model, keep_alive) as saved:
            loss = model(input_ids=ids, labels=labels).loss
        forward = counter.get_total_flops()
        loss.backward()
    return saved.bytes, forward, counter.get_total_flops() - forward


def analytic(tmp_path, cfg: dict, method: str, targets, r: int, ckpt: bool):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    kw = dict(batch=B, seq=S, target_seq=T, precision="fp32", attention="eager", model_dropout=0.0,
              grad_checkpointing=ckpt)
    if method != "full":
        kw.update(r=r, targets=",".join(targets) if isinstance(targets, tuple) else targets)
    return estimate(str(path), method, **kw)


CASES = [
    ("t5", "full", None, 0, False), ("t5", "lora", ("q", "v"), 8, False), ("t5", "lora", "all-linear", 4, False),
    ("t5", "lora-fa", "all-linear", 4, False), ("t5", "vera", ("q", "v"), 16, False),
    ("t5", "full", None, 0, True), ("t5", "lora", ("q", "v"), 8, True), ("t5", "lora", "all-linear", 4, True),
    ("t5-gated", "full", None, 0, False), ("t5-gated", "lora", ("q", "v"), 8, False),
    ("t5-gated", "lora", "all-linear", 4, False), ("t5-gated", "lora-fa", "all-linear", 4, False),
    ("t5-gated", "vera", "all-linear", 16, False), ("t5-gated", "full", None, 0, True),
    ("t5-gated", "lora", "all-linear", 4, True), ("t5-gated", "lora-fa", ("q", "v", "wo"), 4, True),
    ("t5-gated", "vera", "all-linear", 16, True),
    ("mt5", "lora", ("q", "v"), 8, False), ("mt5", "full", None, 0, False), ("mt5", "lora", "all-linear", 4, True),
    ("mt5", "lora", ("k", "wi_1"), 4, False),
]


@pytest.mark.parametrize("family,method,targets,r,ckpt", CASES)
def test_saved_bytes_and_flops_equal_torch(tmp_path, family, method, targets, r, ckpt):
    e = analytic(tmp_path, CONFIGS[family], method, targets, r, ckpt)
    saved, forward, backward = measure(CONFIGS[family], method, targets, r, ckpt)
    assert e.memory.saved_activation_bytes == saved
    assert (e.flops.forward, e.flops.backward) == (forward, backward)


@pytest.mark.parametrize("family,targets,ckpt", [("t5-gated", ("q", "v"), False), ("t5", "all-linear", False),
                                                 ("t5-gated", ("q", "v"), True)])
def test_dora(tmp_path, family, targets, ckpt):
    """DoRA: FLOPs exactly; saved bytes up to its orphaned saves (eye(d_in) and A @ eye per module per
    forward: tests/test_saved_vs_torch.py test_dora_transient_saves), which the hook sees and the
    estimator counts apart, as orphaned."""
    r, cfg = 4, CONFIGS[family]
    e = analytic(tmp_path, cfg, "dora", targets, r, ckpt)
    saved, forward, backward = measure(cfg, "dora", targets, r, ckpt, keep_alive=True)
    assert (e.flops.forward, e.flops.backward) == (forward, backward)
    d_in = {"q": 64, "v": 64, "k": 64, "o": 64, "wi": 64, "wi_0": 64, "wi_1": 64, "wo": 96}
    encoder, decoder = cfg["num_layers"], cfg.get("num_decoder_layers", cfg["num_layers"])
    if targets == "all-linear":  # q, k, v, o in both attentions, wi and wo
        per_block = [64] * 4 + [64, 96]
        modules = encoder * per_block + decoder * (per_block + [64] * 4)
    else:
        modules = [d_in[t] for t in targets] * (encoder + 2 * decoder)
    orphans = sum((d * d + d * r) * 4 for d in modules)
    extra = saved - e.memory.saved_activation_bytes
    if not ckpt:
        assert max(modules) * (max(modules) + r) * 4 <= extra <= orphans


def build_meta(cfg: dict):
    cfg = dict(cfg)
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        return transformers.AutoModelForSeq2SeqLM.from_config(config)


T5_PROFILES = sorted(n for n, p in bundled_models().items() if p.config["model_type"] in ("t5", "mt5"))


def test_seven_profiles():
    assert T5_PROFILES == ["flan-t5-xl", "flan-t5-xxl", "mt0-large", "mt0-xxl", "t0-3b", "t5-base", "t5-large"]


@pytest.mark.parametrize("name", T5_PROFILES)
def test_total_params_match_transformers(name):
    model = build_meta(bundled_models()[name].config)
    e = estimate(name, "full")
    assert e.total_params == sum(p.numel() for p in model.parameters()) == e.trainable_params


@pytest.mark.parametrize("name,targets,r", [("mt0-large", "q,v", 8), ("flan-t5-xl", "all-linear", 16),
                                            ("t5-base", "q,k,v,o,wi,wo", 4)])
def test_lora_trainable_matches_peft(name, targets, r):
    model = build_meta(bundled_models()[name].config)
    tg = "all-linear" if targets == "all-linear" else targets.split(",")
    model = peft.get_peft_model(model, peft.LoraConfig(r=r, target_modules=tg))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimate(name, "lora", r=r, targets=targets).trainable_params == trainable
