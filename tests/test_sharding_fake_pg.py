"""The analytic per-rank shards against the real FSDP2 `fully_shard` run as rank 0 of N under torch's fake
process group (lora_cost/trace/sharded.py): one real step of tiny llama/gpt2 models, full fine-tuning and
LoRA, then the bytes of the rank's parameters, gradients and AdamW state, exactly. World sizes that do not
divide the rows (3, 5, 7) exercise FSDP2's dim-0 padding (ceil(dim0 / W) rows per rank)."""

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import tiny_models  # noqa: E402
from lora_cost import estimate  # noqa: E402
from lora_cost.analytic.sharding import rank_of  # noqa: E402
from lora_cost.analytic.estimator import validated_run  # noqa: E402
from lora_cost.analytic.architectures import get_architecture  # noqa: E402
from lora_cost.analytic.optimizers import get_optimizer  # noqa: E402
from lora_cost.profiles import load_model  # noqa: E402
from lora_cost.spec import RunConfig  # noqa: E402
from lora_cost.analytic.sharding import ShardingSpec  # noqa: E402
from lora_cost.trace.sharded import rank_bytes  # noqa: E402


def analytic_rank(tmp_path, family, method, world, strategy="fsdp"):
    spec = load_model(tiny_models.config_file(tmp_path, family))
    run = RunConfig(method=method, r=4 if method == "lora" else None, precision="fp32",
                    targets=("q_proj", "v_proj") if method == "lora" and family == "llama" else
                    (("c_attn",) if method == "lora" else None),
                    sharding=ShardingSpec(strategy, world))
    run, m, _, sites, heads = validated_run(spec, run)
    return rank_of(get_architecture(spec.model_type), spec, m, run, get_optimizer("adamw"), sites, heads)


@pytest.mark.parametrize("family,method,world", [("llama", "full", 2), ("llama", "lora", 5), ("gpt2", "full", 5),
                                                 ("gpt2", "lora", 7)])
def test_fsdp2_rank_shards_equal_fully_shard(tmp_path, family, method, world):
    model = tiny_models.build(family)
    if method == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"] if family == "llama"
                                                            else ["c_attn"], fan_in_fan_out=family == "gpt2"))
    real = rank_bytes(model, "fsdp", world, vocab=tiny_models.CONFIGS[family]["vocab_size"])
    rank = analytic_rank(tmp_path, family, method, world)
    assert (rank.weights, rank.trainable, rank.gradients, rank.optimizer_state) == (
        real["frozen"], real["trainable"], real["gradients"], real["optimizer_state"])


def test_estimate_uses_the_rank_shards(tmp_path):
    """The estimate's steady terms are the rank's: weights + trainable + optimizer state."""
    path = tiny_models.config_file(tmp_path, "llama")
    e = estimate(path, "full", precision="fp32", gpus=5, sharding="fsdp")
    rank = analytic_rank(tmp_path, "llama", "full", 5)
    comps = {t.name: t.value for t in e.memory.phases[-1].terms}
    assert comps["trainable_weights"] == rank.trainable and comps["optimizer_state"] == rank.optimizer_state


# DeepSpeed imports torch: kept out of the torch-free `-m fast` module test_sharding_analytic.py
def test_deepspeed_estimator_if_installed():
    from test_sharding_analytic import _states
    ds2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    e = estimate("llama-3.1-8b", "full", gpus=8, sharding="zero2")
    _, gpu = ds2.estimate_zero2_model_states_mem_needs(e.total_params, 8, 1, cpu_offload=False)
    assert _states(e) == gpu
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    e3 = estimate("llama-3.1-8b", "full", gpus=8, sharding="zero3", sharding_options={"param_persistence_threshold": 0})
    _, gpu3, _ = estimate_zero3_model_states_mem_needs(e3.total_params, 0, 8, 1, cpu_offload=False)
    assert _states(e3) - 2 * e3.total_params // 8 == gpu3  # + the 16-bit gradient partition (see above)
