"""T5 / mT5 without torch: the CLI's --target-seq, bad input, the bundled profiles' shapes and counts
written out by hand."""

import json

import pytest
from click.testing import CliRunner

from lora_cost import estimate
from lora_cost.cli import main

pytestmark = pytest.mark.fast


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_target_seq_is_the_decoder_length():
    out = run("estimate", "--model", "flan-t5-xl", "--r", "8", "--seq", "512", "--target-seq", "128", "--json")
    assert out.exit_code == 0, out.output
    short = json.loads(out.output)
    long = json.loads(run("estimate", "--model", "flan-t5-xl", "--r", "8", "--seq", "512", "--json").output)
    # the logits are [b * target_seq, vocab]: 128 decoder positions x 32128 x 2 bytes (bf16, no upcast)
    assert short["memory"]["components"]["logits"] == 128 * 32128 * 2
    assert long["memory"]["components"]["logits"] == 512 * 32128 * 2
    assert short["flops"]["forward"] < long["flops"]["forward"]


@pytest.mark.parametrize("args,needle", [
    (["--model", "gpt2", "--target-seq", "64"], "encoder-decoder"),
    (["--model", "llama-3.2-1b", "--target-seq", "64"], "encoder-decoder"),
    (["--model", "t5-base", "--target-seq", "0"], "--target-seq"),
    (["--model", "t5-base", "--targets", "q_proj"], "matches nothing"),
])
def test_bad_input_is_one_line_exit_2(args, needle):
    out = run("estimate", *args)
    assert out.exit_code == 2
    lines = [ln for ln in out.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in out.output


@pytest.mark.parametrize("field,value", [("feed_forward_proj", "gated-gelu-x"), ("feed_forward_proj", "swish"),
                                         ("d_kv", 16.0), ("num_decoder_layers", 0), ("dropout_rate", 1.5)])
def test_bad_config_field_is_one_line(tmp_path, field, value):
    cfg = {"model_type": "t5", "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4,
           "vocab_size": 512, field: value}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    out = run("estimate", "--model", str(path))
    assert out.exit_code == 2
    lines = [ln for ln in out.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and field in lines[0]


def test_t5_base_counts_by_hand():
    # 12 + 12 blocks of d = 768, inner 12 x 64 = 768, d_ff 3072, vocab 32128, 32 buckets x 12 heads per stack:
    # shared 32128 * 768 = 24,674,304; encoder block 4 * 768^2 + 2 * 768 * 3072 + 2 * 768 = 7,079,424;
    # decoder block adds cross-attention 4 * 768^2 + 768 = 2,360,064; final norms 2 * 768; biases 2 * 384
    e = estimate("t5-base", "lora", r=8)
    expected = 24_674_304 + 12 * 7_079_424 + 12 * (7_079_424 + 2_360_064) + 2 * 768 + 2 * 384
    assert e.total_params == expected == 222_903_552
    # LoRA r=8 on q and v: (768 + 768) * 8 per module; 12 encoder blocks x 2 + 12 decoder blocks x 4
    assert e.trainable_params == (768 + 768) * 8 * (12 * 2 + 12 * 4) == 884_736


def test_mt0_large_lora_matches_peft_readme():
    """peft's README (mt0-large, LoRA r=8 on q, v): "trainable params: 2359296 || all params: 1231940608".
    transformers 5 ties mT5's lm_head to the shared embedding (configuration_mt5.py forces
    tie_word_embeddings=True); the checkpoint peft counted had its own [250112, 1024] head."""
    e = estimate("mt0-large", "lora", r=8)
    assert e.trainable_params == 2_359_296  # (1024 + 1024) * 8 * (24 * 2 + 24 * 4)
    assert e.total_params + 250_112 * 1024 + e.trainable_params == 1_231_940_608
