"""One rank of a real multi-process step on the CPU (gloo): tiny llama + peft, FSDP2 or DDP. Used by
tests/test_sharding_gloo.py through torch.multiprocessing.spawn; each rank writes its bytes to a JSON file."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run(rank: int, world: int, port: int, out: str, strategy: str, method: str, ckpt: bool) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import peft
        import tiny_models
        from lora_cost.trace.sharded import _storage_bytes, wrap

        torch.manual_seed(0)
        model = tiny_models.build("llama")
        if method == "lora":
            model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        if ckpt:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        model.train()
        wrapped = wrap(model, strategy, world)
        params = list(wrapped.parameters())
        trainable = [p for p in params if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-3)
        ids = torch.randint(0, tiny_models.CONFIGS["llama"]["vocab_size"], (tiny_models.B, tiny_models.S))
        # saved activations as tests/test_saved_vs_torch.py counts them: distinct storages autograd packs,
        # parameter storages excluded (FSDP2's unsharded parameters are module parameters while in use)
        seen = {}

        def ptr(p):
            p = p.to_local() if hasattr(p, "to_local") else p
            return p.untyped_storage().data_ptr()

        def pack(t):
            mods = wrapped.module if strategy == "ddp" else wrapped
            excluded = {ptr(p) for p in mods.parameters()} | {ptr(b) for b in mods.buffers()}
            key = t.untyped_storage().data_ptr()
            if key not in excluded and key not in seen:
                seen[key] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        result = {"frozen": _storage_bytes(p for p in params if not p.requires_grad),
                  "trainable": _storage_bytes(trainable),
                  "gradients": _storage_bytes(p.grad for p in trainable),
                  "optimizer_state": _storage_bytes(v for st in opt.state.values() for k, v in st.items() if k != "step"),
                  "saved": sum(seen.values())}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
