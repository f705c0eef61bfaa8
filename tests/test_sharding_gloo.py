"""Ground truth: real multi-process steps on the CPU with gloo (2 and 4 ranks; FSDP2 and DDP; tiny llama,
full fine-tuning and LoRA, with and without checkpointing). Per rank, the parameter, gradient and
AdamW-state bytes equal the analytic estimate's exactly, and the saved-activation bytes equal the analytic
engine's saved_activation_bytes (FSDP2 and DDP change what each rank stores, never what autograd saves)."""

import json
import os
import socket

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import gloo_rank  # noqa: E402
import tiny_models  # noqa: E402
from lora_cost import estimate  # noqa: E402
from test_sharding_fake_pg import analytic_rank  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(rank, *args):
    gloo_rank.run(rank, *args)


# each case spawns its ranks (torch + transformers imports in each): one in CI, the 8 with LORA_COST_GLOO_ALL=1
CASES = [("fsdp", 2, "full", False)]
MORE = [("ddp", 4, "lora", True), ("fsdp", 4, "lora", True), ("ddp", 2, "lora", False), ("ddp", 4, "full", True), ("fsdp", 4, "full", True),
        ("fsdp", 2, "lora", False), ("ddp", 2, "full", False)]


@pytest.mark.parametrize("strategy,world,method,ckpt", CASES + (MORE if os.environ.get("LORA_COST_GLOO_ALL") else []))
def test_gloo_ranks_equal_the_estimate(tmp_path, strategy, world, method, ckpt):
    torch.multiprocessing.spawn(_spawn, args=(world, _port(), str(tmp_path), strategy, method, ckpt), nprocs=world)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    rank = analytic_rank(tmp_path, "llama", method, world, strategy)
    e = estimate(tiny_models.config_file(tmp_path, "llama"), method, r=4 if method == "lora" else None,
                 targets="q_proj,v_proj" if method == "lora" else None, precision="fp32", batch=tiny_models.B,
                 seq=tiny_models.S, grad_checkpointing=ckpt, gpus=world, sharding=strategy)
    # rank 0 is the busiest: every rank stores the padded shard, rank 0's chunks are the full ones
    real = ranks[0]
    grads = rank.gradients if not (strategy == "ddp" and rank.sharding.gradient_as_bucket_view) else rank.trainable
    assert (real["frozen"], real["trainable"], real["gradients"], real["optimizer_state"]) == (
        rank.weights, rank.trainable, grads, rank.optimizer_state)
    assert max(r["optimizer_state"] for r in ranks) == rank.optimizer_state
    assert all(r["saved"] == e.memory.saved_activation_bytes for r in ranks), [r["saved"] for r in ranks]
