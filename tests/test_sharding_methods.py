"""Methods beyond full/LoRA/DoRA across GPUs (task "sharding2"): LoRA-FA (lora_A frozen: gathered, never
reduced, no optimizer state), (IA)3 (feedforward vectors [1, d_in] whose single row lands on rank 0,
the others [d_out, 1] split on dim 0: peft tuners/ia3/layer.py `IA3Layer.update_layer`) and VeRA (lambda_b
[d_out], lambda_d [r] sharded; the shared vera_A/vera_B are buffers, whole on every rank). The analytic rank
shards equal the real FSDP2 `fully_shard` rank 0 under the fake process group, byte for byte."""

import pytest

from lora_cost.errors import LoraCostError

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import tiny_models  # noqa: E402
from lora_cost.analytic.architectures import get_architecture  # noqa: E402
from lora_cost.analytic.estimator import validated_run  # noqa: E402
from lora_cost.analytic.optimizers import get_optimizer  # noqa: E402
from lora_cost.analytic.sharding import ShardingSpec, rank_of  # noqa: E402
from lora_cost.profiles import load_model  # noqa: E402
from lora_cost.spec import RunConfig  # noqa: E402
from lora_cost.trace.sharded import rank_bytes  # noqa: E402

IA3_TARGETS = ("k_proj", "v_proj", "down_proj")  # peft's llama defaults; down_proj is the feedforward module


def _peft(method: str):
    model = tiny_models.build("llama")
    if method == "lora-fa":
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)
        return model
    if method == "vera":
        return peft.get_peft_model(model, peft.VeraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    return peft.get_peft_model(model, peft.IA3Config(target_modules=list(IA3_TARGETS), feedforward_modules=["down_proj"]))


def _buffers(model) -> int:
    """Bytes of the module buffers that are not the model's own (rotary inv_freq): VeRA's shared projections."""
    seen = {}
    for name, b in model.named_buffers():
        if "vera" in name:
            seen[b.untyped_storage().data_ptr()] = b.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("method,world", [("lora-fa", 3), ("ia3", 5), ("vera", 3)])
def test_rank_shards_equal_fully_shard(tmp_path, method, world):
    model = _peft(method)
    real = rank_bytes(model, "fsdp", world, vocab=tiny_models.CONFIGS["llama"]["vocab_size"])
    real["frozen"] += _buffers(model)  # rank_bytes counts parameters; the rank also keeps the shared buffers
    spec = load_model(tiny_models.config_file(tmp_path, "llama"))
    run = RunConfig(method=method, r={"lora-fa": 4, "vera": 16}.get(method), precision="fp32",
                    targets=IA3_TARGETS if method == "ia3" else ("q_proj", "v_proj"),
                    sharding=ShardingSpec("fsdp", world))
    run, m, _, sites, heads = validated_run(spec, run)
    rank = rank_of(get_architecture(spec.model_type), spec, m, run, get_optimizer("adamw"), sites, heads)
    assert (rank.weights, rank.trainable, rank.gradients, rank.optimizer_state) == (
        real["frozen"], real["trainable"], real["gradients"], real["optimizer_state"])


def test_unmodelled_methods_are_refused_in_one_line(tmp_path):
    from lora_cost import estimate
    with pytest.raises(LoraCostError, match="nola is not modelled across GPUs yet"):
        estimate(tiny_models.config_file(tmp_path, "llama"), "nola", gpus=2, sharding="fsdp")
