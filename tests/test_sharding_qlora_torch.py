"""Task "fsdpqlora": the QLoRA stand-in (lora_cost/trace/qlora.py, its packed weight a Params4bit [n / 4, 1] in bf16)
under the real FSDP2 `fully_shard` as rank 0 of N on torch's fake process group: the rank's parameter, gradient and
AdamW-state bytes equal the analytic per-rank model exactly, and its quantisation state (buffers here, a Python
attribute in bitsandbytes: neither is sharded) is whole on every rank. World sizes 2 and 3 (3 pads the packed rows)."""

import pytest

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
from lora_cost.trace.qlora import Linear4bitStandIn, quantize_linears  # noqa: E402
from lora_cost.trace.sharded import rank_bytes  # noqa: E402


def _qlora_model(family: str, prepare: bool, storage: str = "bf16"):
    model = tiny_models.build(family, "bf16")
    quantize_linears(model, torch.bfloat16, True, storage)
    model.is_loaded_in_4bit = True
    if prepare:  # peft's own: every non-Params4bit parameter to fp32
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = ["q_proj", "v_proj"] if family == "llama" else ["c_attn"]
    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets))


def _analytic(tmp_path, family: str, world: int, prepare: bool, storage: str = "bf16"):
    spec = load_model(tiny_models.config_file(tmp_path, family))
    run = RunConfig(method="qlora", r=4, precision="bf16", targets=("q_proj", "v_proj") if family == "llama" else ("c_attn",),
                    method_options=(("kbit_prepare", prepare), ("quant_storage", storage)),
                    sharding=ShardingSpec("fsdp", world))
    run, m, _, sites, heads = validated_run(spec, run)
    return rank_of(get_architecture(spec.model_type), spec, m, run, get_optimizer("adamw"), sites, heads)


@pytest.mark.parametrize("family,world,prepare,storage", [("llama", 2, True, "bf16"), ("llama", 3, False, "bf16"),
                                                           ("gpt2", 3, True, "bf16"), ("llama", 3, True, "uint8")])
def test_fully_shard_qlora_rank_bytes_exact(tmp_path, family, world, prepare, storage):
    """uint8: the packed weights are fully_shard's ignored_params (as accelerate passes them): whole on the rank."""
    model = _qlora_model(family, prepare, storage)
    stand_ins = [mod for mod in model.modules() if isinstance(mod, Linear4bitStandIn)]
    state = sum(b.numel() * b.element_size() for mod in stand_ins for b in mod.buffers(recurse=False))
    whole = sum(mod.weight.numel() for mod in stand_ins) if storage == "uint8" else 0  # 1 byte each
    real = rank_bytes(model, "fsdp", world, vocab=tiny_models.CONFIGS[family]["vocab_size"])
    rank = _analytic(tmp_path, family, world, prepare, storage)
    assert rank.replicated == state + whole
    assert (rank.weights, rank.trainable, rank.gradients, rank.optimizer_state) == (
        real["frozen"] + state, real["trainable"], real["gradients"], real["optimizer_state"])


def test_fsdp2_and_accelerate_rules():
    """The torch and accelerate source the per-rank QLoRA model rests on (installed versions)."""
    import inspect

    from torch.distributed.fsdp._fully_shard import _fsdp_collectives, _fsdp_param, _fsdp_param_group
    param = inspect.getsource(_fsdp_param.FSDPParam._init_sharded_param)
    assert "_chunk_with_empty(param_data, shard_world_size, dim=shard_dim)" in param  # dim-0 chunks, padded
    assert "requires_grad=param.requires_grad" in param  # a frozen packed weight stays frozen
    # uniform dtype is demanded of the trainable parameters only: frozen 4-bit storage beside fp32 LoRA is allowed,
    # and mixed dtypes are all-gathered as bytes
    assert "p for p in self.fsdp_params if p.sharded_param.requires_grad" in inspect.getsource(
        _fsdp_param_group.FSDPParamGroup._init_mp_dtypes)
    assert "t.view(torch.uint8) for ts in param_all_gather_inputs for t in ts" in inspect.getsource(
        _fsdp_collectives.foreach_all_gather)
    fsdp_utils = pytest.importorskip("accelerate.utils.fsdp_utils")
    prepare = inspect.getsource(fsdp_utils.fsdp2_prepare_model)
    assert 'param.__class__.__name__ == "Params4bit"' in prepare and "not param.is_floating_point()" in prepare
    assert 'fsdp2_kwargs["ignored_params"] = ignored | incompatible_params4bit' in prepare
