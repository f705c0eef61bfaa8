"""Write `estimates.jsonl`: the analytic engine's numbers on a fixed set of configurations.

    python tests/golden/make_golden.py          # rewrite the golden file (a deliberate change)

The set: the 29 calibration runs (their flags, see benchmarks/score_calibration.py), the 168
tiny-model configurations of the analytic-vs-trace grid, and every bundled model under every
method at two settings plus the optimizers. `tests/test_golden.py` recomputes each one and demands
the same numbers, so a refactor that changes any number fails, and a measured fix shows up as a
diff of this file.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE.parent))

GOLDEN = HERE / "estimates.jsonl"

# the flags of the 29 H100 calibration rows (benchmarks/score_calibration.py row_to_kwargs), as inputs
CALIBRATION_RUNS = HERE / "calibration_runs.json"


def numbers(doc):
    """The numeric skeleton of an estimate's JSON: every number and flag, keyed by its path; text dropped."""
    if isinstance(doc, dict):
        out = {}
        for k, v in doc.items():
            if k == "terms" and isinstance(v, list):
                out[k] = {t["name"]: numbers({x: y for x, y in t.items() if x != "name"}) for t in v}
            else:
                n = numbers(v)
                if n is not None:
                    out[k] = n
        return out or None
    if isinstance(doc, list):
        kept = [numbers(v) for v in doc]
        return kept if any(v is not None for v in kept) else None
    if isinstance(doc, bool) or isinstance(doc, (int, float)):
        return doc
    return None


def cases() -> list[dict]:
    from test_trace_grid import CASES, TINY, kwargs_for

    out = [{"model": k.pop("model"), **k} for k in json.loads(CALIBRATION_RUNS.read_text())]
    for family, method, setting in CASES:
        out.append({"config": TINY[family], "method": method, **kwargs_for(method, setting)})
    models = ["gpt2", "gpt2-xl", "llama-2-7b", "llama-3.1-8b", "llama-3.1-70b", "llama-3.2-1b", "mistral-7b",
              "qwen2.5-0.5b", "qwen2.5-7b", "roberta-base", "roberta-large", "gpt3-175b", "llama-2-70b"]
    for model in models:
        for method in ("full", "lora", "lora-fa", "dora", "vera", "nola", "qlora"):
            for ckpt, targets, seq in ((False, None, 512), (True, "all-linear", 2048)):
                kw = dict(model=model, method=method, batch=2, seq=seq, grad_checkpointing=ckpt, gpu="h100-80gb")
                if method != "full":
                    kw["targets"] = targets
                out.append(kw)
    for opt in ("adamw", "sgd", "adamw-8bit", "paged-adamw-32bit", "paged-adamw-8bit"):
        for method in ("full", "lora"):
            out.append(dict(model="llama-3.2-1b", method=method, optimizer=opt, batch=4, seq=1024))
    for precision in ("fp32", "bf16", "fp16", "amp-bf16", "amp-fp16"):
        for attention in ("sdpa", "eager"):
            out.append(dict(model="qwen2.5-0.5b", method="lora", precision=precision, attention=attention, r=16,
                            batch=2, seq=777))
    for r in (1, 7, 64, 1000):
        out.append(dict(model="llama-3.1-8b", method="dora", r=r, targets="all-linear", dropout=0.05, seq=1024))
    # --- task "attention": the fused kernels (flash-attention 2/3, flex) and --packing
    for attention in ("flash-attention-2", "flash-attention-3", "flex"):
        out.append(dict(model="llama-3.1-8b", method="qlora", r=16, targets="all-linear", seq=8192,
                        grad_checkpointing=True, attention=attention))
        out.append(dict(model="mistral-7b", method="lora", r=16, batch=2, seq=6144, attention=attention))
        out.append(dict(model="qwen2.5-7b", method="lora", r=8, batch=1, seq=4096, attention=attention, model_dropout=0.0))
        out.append(dict(model="gemma-2-9b", method="lora", r=16, targets="all-linear", seq=4096, grad_checkpointing=True,
                        attention=attention))
    for attention in ("flash-attention-2", "flash-attention-3"):
        out.append(dict(model="llama-3.2-1b", method="lora", r=16, batch=8, seq=1024, attention=attention, packing=True))
        out.append(dict(model="llama-3.1-8b", method="lora", precision="amp-bf16", seq=2048, attention=attention))
    # --- families task: DeBERTa-v2/v3 (masked-LM, the GLUE classifier)
    for model in ("deberta-v3-base", "deberta-v3-large", "deberta-v2-xxlarge"):
        for method in ("full", "lora", "dora", "qlora"):
            out.append(dict(model=model, method=method, batch=8, seq=256, gpu="h100-80gb"))
        out.append(dict(model=model, method="lora", r=16, task="seq-cls", num_labels=3, batch=32, seq=128,
                        grad_checkpointing=True))
    # task "sharding": the busiest rank of several GPUs (appended: the rows above do not move)
    for sharding in ("ddp", "fsdp", "fsdp-grad-op", "zero1", "zero2", "zero3"):
        for method, gpus in (("full", 8), ("lora", 4)):
            out.append(dict(model="llama-3.1-8b", method=method, gpus=gpus, sharding=sharding, seq=2048,
                            grad_checkpointing=True, gpu="h100-80gb"))
    out.append(dict(model="llama-3.1-70b", method="lora", r=16, targets="all-linear", seq=4096, gpus=8,
                    sharding="fsdp", grad_checkpointing=True, gpu="h100-80gb"))
    out.append(dict(model="llama-3.1-8b", method="full", gpus=4, sharding="zero3",
                    sharding_options={"offload": "optimizer"}))
    out.append(dict(model="llama-3.1-8b", method="full", gpus=16, nodes=2, sharding="hsdp", gpu="h100-80gb"))
    # task "optim" (issue 9): the optimizers added then, fp32 master weights and stepping in backward
    for opt in ("adamw-torch-fused", "adafactor", "lion-8bit", "lion-32bit", "paged-lion-8bit", "paged-lion-32bit"):
        for method in ("full", "lora"):
            out.append(dict(model="llama-3.2-1b", method=method, optimizer=opt, batch=4, seq=1024))
    for opt in ("adamw-torch", "adamw-torch-fused", "adafactor", "adamw-bnb-8bit"):
        for master, in_backward in ((True, False), (False, True), (True, True)):
            kw = dict(model="llama-3.2-1b", method="full", optimizer=opt, batch=4, seq=1024)
            kw.update({"master_weights": "fp32"} if master else {})
            kw.update({"optimizer_in_backward": True} if in_backward else {})
            out.append(kw)
    for model in ("gpt2", "qwen2.5-0.5b"):  # tied embeddings: the head's gradient is stepped at the end
        out.append(dict(model=model, method="full", optimizer_in_backward=True, batch=2, seq=512))
    out.append(dict(model="llama-3.1-8b", method="lora", r=16, targets="all-linear", optimizer="adafactor",
                    optimizer_in_backward=True, seq=2048, grad_checkpointing=True))
    for model in ("llama-3.2-1b", "llama-3.1-8b", "mistral-7b"):
        out.append(dict(model=model, method="full", optimizer="galore-adamw", batch=2, seq=1024))
    out.append(dict(model="llama-3.1-8b", method="full", optimizer="galore-adamw", master_weights="fp32",
                    optimizer_in_backward=True, batch=2, seq=1024, grad_checkpointing=True))
    # task "galore": the projector refresh step (memory.refresh) where it is the higher step, with a GPU fit
    out.append(dict(model="llama-3.1-8b", method="full", optimizer="galore-adamw", batch=1, seq=512, gpu="h200-141gb"))
    out.append(dict(model="qwen2.5-7b", method="full", optimizer="galore-adamw", optimizer_in_backward=True, batch=1,
                    seq=2048, grad_checkpointing=True))
    out.append(dict(model="mistral-7b", method="full", optimizer="galore-adamw", master_weights="fp32", batch=1, seq=512))
    for opt in ("adamw-torch-8bit", "adamw-torch-4bit"):
        for method in ("full", "lora"):
            out.append(dict(model="llama-3.2-1b", method=method, optimizer=opt, batch=4, seq=1024))
    # lossdtype: --loss liger | chunked[:N], --adapter-dtype
    for model in ("llama-3.1-8b", "qwen2.5-7b", "mistral-7b"):
        for method in ("full", "lora", "qlora"):
            for loss, ckpt in (("liger", True), ("chunked", True), ("chunked:16", False), ("liger", False)):
                out.append(dict(model=model, method=method, loss=loss, batch=2, seq=2048, grad_checkpointing=ckpt))
    for model in ("llama-3.1-8b", "llama-2-7b"):
        for method in ("lora", "lora-fa", "qlora"):
            for loss in ("standard", "liger"):
                out.append(dict(model=model, method=method, adapter_dtype="bf16", r=64, targets="all-linear", seq=1024,
                                loss=loss))
    out.append(dict(model="qwen2.5-0.5b", method="lora", precision="fp16", adapter_dtype="fp16", batch=2, seq=777,
                    loss="chunked:7"))
    for storage in ("bf16", "fp32"):
        out.append(dict(model="llama-3.1-8b", method="qlora", r=64, targets="all-linear", seq=2048, grad_checkpointing=True,
                        method_options={"quant_storage": storage}))
    for modules, loss in (("embed_tokens,lm_head", "standard"), ("embed_tokens", "liger"), ("lm_head", "standard")):
        for method in ("lora", "dora"):
            out.append(dict(model="llama-3.1-8b", method=method, modules_to_save=modules, loss=loss, r=16, seq=1024,
                            grad_checkpointing=True))
    # --- task "moeexperts": LoRA on the router and the fused expert parameters (peft lora.ParamWrapper)
    out.append(dict(model="mixtral-8x7b", method="lora", r=16, targets="all-linear", seq=1024, grad_checkpointing=True))
    out.append(dict(model="mixtral-8x7b", method="qlora", r=16, targets="all-linear", seq=1024, grad_checkpointing=True))
    out.append(dict(model="qwen3-30b-a3b", method="lora", r=8, targets="q_proj,v_proj,experts.gate_up_proj,experts.down_proj",
                    seq=2048))
    out.append(dict(model="qwen3-30b-a3b", method="lora-fa", r=8, targets="gate_proj,up_proj,down_proj", batch=2,
                    seq=1024, grad_checkpointing=True))
    # --- task "ligerkernels": Liger's RMSNorm, RoPE and SwiGLU ("all": with its fused loss, Trainer's use_liger_kernel)
    for model in ("llama-3.1-8b", "qwen2.5-7b", "mistral-7b", "qwen3-8b"):
        for method in ("full", "lora", "qlora"):
            for kernels, ckpt in (("all", True), ("all", False), ("rms_norm,rope,swiglu", False)):
                out.append(dict(model=model, method=method, liger_kernels=kernels, batch=2, seq=2048,
                                grad_checkpointing=ckpt))
    for kernels in ("rms_norm", "rope", "swiglu"):
        out.append(dict(model="llama-3.2-1b", method="lora", r=16, targets="all-linear", seq=4096, liger_kernels=kernels,
                        attention="flash-attention-2"))
    for method in ("lora", "qlora"):
        out.append(dict(model="phi-3-mini-4k", method=method, r=16, targets="all-linear", batch=2, seq=2048,
                        liger_kernels="all", grad_checkpointing=True))
    for model, kernels in (("gemma-3-1b", "all"), ("gemma-3-4b", "all"), ("gemma-2-2b", "rms_norm,rope,geglu")):
        for method, ckpt in (("lora", True), ("full", False)):
            out.append(dict(model=model, method=method, liger_kernels=kernels, batch=2, seq=2048,
                            grad_checkpointing=ckpt))
    # --- task "fsdpqlora": QLoRA across GPUs (FSDP2 shards the packed 4-bit weights, quant_state whole; DDP)
    out.append(dict(model="llama-3.1-70b", method="qlora", gpus=2, sharding="fsdp", method_options={"quant_storage": "bf16"},
                    gpu="rtx-4090-24gb"))
    out.append(dict(model="llama-3.1-70b", method="qlora", gpus=2, sharding="fsdp", grad_checkpointing=True,
                    method_options={"quant_storage": "bf16", "kbit_prepare": False}, adapter_dtype="bf16",
                    sharding_options={"cpu_offload": True}, gpu="rtx-4090-24gb"))
    out.append(dict(model="llama-3.1-8b", method="qlora", r=64, targets="all-linear", gpus=4, sharding="ddp", seq=2048,
                    grad_checkpointing=True, gpu="rtx-4090-24gb"))
    # --- allocevents: the analytic engine's own allocation sequence replayed (--reserved-model replay | auto)
    replay = [dict(model="gpt2", method="lora", r=8, batch=4, seq=512, precision="fp32", model_dropout=0.0),
              dict(model="gpt2", method="lora", r=8, batch=4, seq=512, precision="fp32", model_dropout=0.0,
                   grad_checkpointing=True),
              dict(model="gpt2", method="full", batch=4, seq=512, precision="amp-bf16", model_dropout=0.0),
              dict(model="llama-3.2-1b", method="qlora", r=16, targets="all-linear", batch=2, seq=1024,
                   grad_checkpointing=True, gpu="h100-80gb"),
              dict(model="qwen2.5-0.5b", method="lora", r=16, targets="all-linear", batch=4, seq=512),
              dict(model="gemma-2-2b", method="lora", r=16, seq=1024),
              dict(model="llama-3.1-8b", method="lora", r=16, seq=2048, loss="liger", grad_checkpointing=True),
              dict(model="llama-3.2-1b", method="lora", r=8, batch=2, seq=1024, alloc_conf="expandable_segments:True"),
              dict(model="t5-base", method="lora", r=8)]  # not covered: keeps the slack, says why
    out += [dict(kw, reserved_model="replay") for kw in replay]
    out.append(dict(model="llama-3.1-8b", method="lora", r=16, batch=1, seq=512, gpu="l4-24gb", reserved_model="auto"))
    out.append(dict(model="llama-3.1-70b", method="lora", r=16, gpu="h100-80gb", reserved_model="auto"))
    # --- task "recast": QLoRA under amp-bf16 (Trainer bf16=True over peft's prepared model) and the QLoRA paper
    # script's recast (--qlora-recast: bf16 LoRA layers, embeddings and head)
    for options in ({}, {"qlora_recast": True}):
        out.append(dict(model="llama-3.1-8b", method="qlora", precision="amp-bf16", method_options=options))
        out.append(dict(model="llama-3.1-8b", method="qlora", r=64, targets="all-linear", seq=2048, precision="amp-bf16",
                        grad_checkpointing=True, attention="flash-attention-2", method_options=options,
                        gpu="rtx-4090-24gb"))
    out.append(dict(model="qwen3-0.6b", method="qlora", r=16, targets="all-linear", batch=4, seq=1024,
                    precision="amp-bf16", grad_checkpointing=True, method_options={"qlora_recast": True}))
    # --- task "axodtype": QLoRA as axolotl's loader leaves it (bf16 embeddings, norms, head; bf16-stored 4-bit
    # weights; fp32 factors; Trainer autocast), what `--axolotl` with adapter qlora + bf16 reads
    axolotl = {"kbit_prepare": False, "quant_storage": "bf16"}
    out.append(dict(model="llama-3.1-8b", method="qlora", r=16, targets="all-linear", seq=2048, precision="amp-bf16",
                    grad_checkpointing=True, attention="flash-attention-2", optimizer="paged-adamw-8bit",
                    method_options=axolotl, gpu="rtx-4090-24gb"))
    out.append(dict(model="qwen2.5-7b", method="qlora", r=32, targets="all-linear", batch=2, seq=4096,
                    precision="amp-bf16", grad_checkpointing=True, attention="flash-attention-2", method_options=axolotl))
    return out


def compute(case: dict, root: Path) -> dict:
    from lora_cost import estimate
    from lora_cost.report.jsonout import estimate_to_json

    kw = dict(case)
    if "config" in kw:
        cfg = kw.pop("config")
        path = root / f"{cfg['model_type']}-{hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]}" / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cfg))
        kw["model"] = str(path)
    doc = estimate_to_json(estimate(**kw))
    doc.pop("inputs", None)  # echoes the flags (a temporary path for config cases)
    return numbers(doc)


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="lora-cost-golden-"))
    with GOLDEN.open("w") as f:
        for case in cases():
            f.write(json.dumps({"case": case, "numbers": compute(case, root)}, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
