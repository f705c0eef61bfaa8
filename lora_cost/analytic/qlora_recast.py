"""`--qlora-recast`: the QLoRA paper script's recast of the prepared 4-bit model (task "recast", issue 9).

artidoro/qlora `qlora.py` get_accelerate_model loads the model in 4-bit (bnb_4bit_compute_dtype bf16), runs peft's
prepare_model_for_kbit_training (every parameter that is not a Params4bit cast to fp32), adds LoRA, then:

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            if args.bf16: module = module.to(torch.bfloat16)
        if 'norm' in name: module = module.to(torch.float32)
        if 'lm_head' in name or 'embed_tokens' in name:
            if hasattr(module, 'weight'):
                if args.bf16 and module.weight.dtype == torch.float32: module = module.to(torch.bfloat16)

and trains with `Trainer(bf16=True)`: accelerate's mixed precision, the forward under
torch.autocast("cuda", torch.bfloat16) (`--precision amp-bf16`). So: the LoRA factors bf16 (the run's adapter
dtype), the token embeddings and the LM head bf16, the norms fp32 (already fp32 after prepare: no change), the 4-bit
linears as they were (Module.to casts floating-point tensors only; the packed uint8 weight and bitsandbytes'
QuantState, a Python attribute, are untouched).

What follows for the step (each modelled by the engines' generic dtype rules, not here): the embedding output is
bf16; LlamaRMSNorm computes in fp32 and returns `weight (fp32) * h.to(bf16)`, an fp32 product (mul is on no
autocast list: type promotion); peft's LoRA casts its input to the factors' dtype (`_cast_input_dtype`) and
autocast runs both factors' matmuls in bf16 with no weight copy (they are bf16 already); the LM head's matmul needs
no autocast copy of its [vocab, hidden] weight either (peft's default keeps it fp32 and autocast saves a bf16
copy for backward); the logits are bf16 and transformers' ForCausalLMLoss upcasts them (`logits.float()`).

Neither axolotl nor TrainingArguments has this setting: it is a CLI/API option only (`--qlora-recast`,
`method_options={"qlora_recast": True}`); the readers never set it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import LoraCostError

if TYPE_CHECKING:  # pragma: no cover
    from ..spec import LinearSite, ModelSpec, RunConfig

RECAST_KEY = "qlora_recast"  # the method option (methods/qlora.py QLORA_RECAST: --qlora-recast)
RECAST_DTYPE = "bf16"  # qlora.py: module.to(torch.bfloat16) under args.bf16


def recast(run: "RunConfig") -> bool:
    return run.method == "qlora" and bool(run.option(RECAST_KEY, False))


def resolve_recast(run: "RunConfig") -> "RunConfig":
    """The recast's LoRA factors are the run's adapter dtype (bf16), so every rule of --adapter-dtype applies;
    refused first, one line each: another precision, no kbit preparation, 16/32-bit float packed weights."""
    from dataclasses import replace

    if not recast(run):
        return run
    if run.precision != "amp-bf16":
        raise LoraCostError(f"--qlora-recast is the QLoRA script's bf16 run (Trainer bf16=True: autocast over the "
                            f"prepared fp32 model): it needs --precision amp-bf16, not {run.precision}")
    options = dict(run.method_options)
    if not options.get("kbit_prepare", True):
        raise LoraCostError("--qlora-recast follows prepare_model_for_kbit_training; --no-kbit-prepare is not modelled "
                            "with it")
    if options.get("quant_storage", "uint8") not in ("uint8", "bf16"):
        raise LoraCostError("--qlora-recast with --quant-storage fp16 or fp32 is not modelled: the script's "
                            "module.to(bfloat16) would convert the packed floating-point weights themselves")
    if run.adapter_dtype not in (None, RECAST_DTYPE):
        raise LoraCostError(f"--qlora-recast casts the LoRA layers to bf16; --adapter-dtype {run.adapter_dtype} "
                            "contradicts it")
    return replace(run, adapter_dtype=RECAST_DTYPE)


def check_recast(spec: "ModelSpec", sites: list["LinearSite"], run: "RunConfig") -> None:
    """Refuse, one line each, what the recast is not modelled with on this model (the checks that need no model
    are in `resolve_recast`, which the trace engine's path for other families runs too)."""
    if not recast(run):
        return
    # the model types whose module names the script's matching finds as it means to ('embed_tokens', 'lm_head',
    # '*norm'), with the norm the engines model for them: the Llama-style architecture's (LlamaRMSNorm)
    from .architectures.llama import LLAMA
    if spec.model_type not in LLAMA.model_types:
        raise LoraCostError(f"--qlora-recast is modelled for {', '.join(LLAMA.model_types)} (the module names the "
                            f"script matches: embed_tokens, lm_head, *norm); not {spec.model_type}")
    biased = sorted({s.name for s in sites if s.bias})
    if biased:
        raise LoraCostError(f"--qlora-recast on adapted linears with a bias ({', '.join(biased)}) is not modelled: the "
                            "script's LoraLayer cast moves those 4-bit layers' biases to bf16 too")
    for what, given in (("--task", run.task not in (None, "causal-lm")), ("--loss", run.loss != "standard"),
                        ("--modules-to-save", bool(run.modules_to_save)), ("--liger-kernels", bool(run.liger_kernels)),
                        ("--gpus", run.sharding is not None)):
        if given:
            raise LoraCostError(f"--qlora-recast with {what} is not modelled (one GPU, the causal-LM head, the "
                                "standard loss)")
