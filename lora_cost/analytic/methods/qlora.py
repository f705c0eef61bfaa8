"""QLoRA: LoRA on a base model whose linear layers are stored in 4-bit NormalFloat.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314, Sec. 3:
NF4 with blocksize 64; double quantisation stores the fp32 block constants as 8-bit values with
one fp32 constant per 256 of them, 0.5 + 8/64 + 32/(64*256) = 4.127 bits per weight
(`formulas/storage.py`).

The base weights are a `FourBitStorage` (`storage.py`: every block linear quantised, the rest fp32
after peft's prepare_model_for_kbit_training, the 4-bit forward and its dequantised transients);
LoRA on top as in peft (`tuners/lora/bnb.py`: fp32 adapters; the input is already fp32, so no cast).
"""

from __future__ import annotations

import sys

from .base import Method, register_method
from .lora import apply_lora, is_lora_config, lora_linear, lora_serving, lora_trainable
from .options import MethodOption
from .serving import ServingCost
from .storage import FourBitStorage
from ..qlora_recast import RECAST_DTYPE, RECAST_KEY, check_recast, recast, resolve_recast
from ...units import DTYPE_BYTES

QUANT_TYPE = MethodOption("quant_type", "--quant-type", str, "nf4", "4-bit data type (bnb_4bit_quant_type)",
                          choices=("nf4", "fp4"))
DOUBLE_QUANT = MethodOption("double_quant", "--double-quant", bool, True,
                            "double quantisation of the block constants (bnb_4bit_use_double_quant)")

# lossdtype: bnb_4bit_quant_storage (bitsandbytes Params4bit(quant_storage=...), transformers BitsAndBytesConfig):
# the packed weights as elements of a wider dtype; the bytes are the same, the element count divides by its size
QUANT_STORAGE = MethodOption("quant_storage", "--quant-storage", str, "uint8",
                             "dtype the packed 4-bit weights are stored in (bnb_4bit_quant_storage; same bytes)",
                             choices=("uint8", "bf16", "fp16", "fp32"))


# task "fsdpqlora": peft's prepare_model_for_kbit_training (utils/other.py) casts every fp16/bf16 parameter that is
# not a Params4bit to fp32 (and enables checkpointing and input gradients). The FSDP-QLoRA recipe skips it: TRL's
# `prepare_peft_model` calls it only when not `is_sharded_qlora` (the 4-bit weights loaded on the CPU or the meta
# device for FSDP, `fsdp_cpu_ram_efficient_loading`), so embeddings, norms and LM head keep the dtype the model was
# loaded in (torch_dtype = bnb_4bit_quant_storage in the bitsandbytes FSDP-QLoRA guide; here the compute dtype)
# and the adapters that of the model (`get_peft_model(..., autocast_adapter_dtype=False)`: give --adapter-dtype)
KBIT_PREPARE = MethodOption("kbit_prepare", "--kbit-prepare", bool, True,
                            "peft prepare_model_for_kbit_training casts the non-quantised parameters to fp32 "
                            "(--no-kbit-prepare: the FSDP-QLoRA recipe, they stay in the compute dtype)")

# task "recast": the QLoRA paper script's recast after get_peft_model (analytic/qlora_recast.py)
QLORA_RECAST = MethodOption(RECAST_KEY, "--qlora-recast", bool, False,
                            "the QLoRA paper script's recast (artidoro/qlora qlora.py): LoRA layers, embeddings and "
                            "LM head to bf16, norms fp32; needs --precision amp-bf16 (Trainer bf16=True)")


def four_bit_storage(run) -> FourBitStorage:
    """bnb_4bit_compute_dtype follows --precision (bf16, or fp16; amp-bf16: bf16)."""
    compute = "fp16" if run.precision == "fp16" else "bf16"
    return FourBitStorage(compute_dtype=compute,
                          double_quant=DOUBLE_QUANT.value(run), quant_type=QUANT_TYPE.value(run),
                          quant_storage=QUANT_STORAGE.value(run), other="fp32" if KBIT_PREPARE.value(run) else compute,
                          embed_head=RECAST_DTYPE if recast(run) else None)


def apply_qlora(model, run, targets, notes):
    """Trace hook: the 4-bit stand-in for every linear (lora_cost/trace/qlora.py), peft's own
    prepare_model_for_kbit_training (fp32 casts, checkpointing, input gradients), then LoRA."""
    import peft
    import torch

    from ...trace.qlora import quantize_linears

    compute = torch.float16 if run.precision == "fp16" else torch.bfloat16
    quantize_linears(model, compute, DOUBLE_QUANT.value(run), QUANT_STORAGE.value(run))
    model.is_loaded_in_4bit = True  # what transformers sets after a bitsandbytes 4-bit load
    notes.append("QLoRA: bitsandbytes Linear4bit replaced by a stand-in with the same storage, saved tensors "
                 "and dequantised transients (lora_cost/trace/qlora.py)")
    if not KBIT_PREPARE.value(run):  # task "fsdpqlora": TRL's sharded-QLoRA path, no fp32 cast (see KBIT_PREPARE)
        # task "axodtype": the model is loaded in the compute dtype (from_pretrained dtype=torch_dtype =
        # bnb_4bit_compute_dtype); under amp-* the trace builds it in fp32 (RunConfig.weight_dtype), so cast here
        from ...trace.qlora import cast_unquantised
        cast_unquantised(model, compute)
        notes.append("QLoRA without prepare_model_for_kbit_training: the non-quantised parameters keep the model's dtype")
        model, adapted = apply_lora(model, run, targets, notes)
        _bnb_input_cast(model, run)
        return model, adapted
    peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=run.grad_checkpointing,
                                         gradient_checkpointing_kwargs={"use_reentrant": False})
    model, adapted = apply_lora(model, run, targets, notes, prepared=True)  # LoRA factors in run.adapter_dtype
    if recast(run):  # task "recast": the script's loop after get_peft_model (analytic/qlora_recast.py)
        from ...trace.qlora import script_recast
        script_recast(model)
        notes.append("QLoRA script recast (artidoro/qlora qlora.py): LoRA factors, embed_tokens and lm_head in bf16, "
                     "norms fp32")
    _bnb_input_cast(model, run)
    return model, adapted


def _bnb_input_cast(model, run) -> None:
    """peft wraps a real bitsandbytes Linear4bit in lora/bnb.py `Linear4bit`, whose forward casts the input to the
    factors' dtype only outside autocast (`requires_conversion = not torch.is_autocast_enabled()`, then
    `_cast_input_dtype`); the stand-in, an nn.Linear, gets peft's generic lora `Linear`, which always casts. Under
    autocast the rule is bnb.py's: no cast (`cast_input_dtype_enabled = False`), so a 16-bit input reaches lora_A as
    it is and autocast uses it without a copy (task "axodtype"; an fp32 input is copied by autocast either way)."""
    if not run.autocast_dtype:
        return
    from peft.tuners.lora import LoraLayer

    from ...trace.qlora import Linear4bitStandIn
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), Linear4bitStandIn):
            module.cast_input_dtype_enabled = False


def _linear4bit_modules(model):
    bnb = sys.modules.get("bitsandbytes")
    linear4 = getattr(getattr(bnb, "nn", None), "Linear4bit", None) if bnb is not None else None
    return [m for m in model.modules() if isinstance(m, linear4)] if linear4 is not None else []


def recognise_qlora(model, peft_config) -> bool:
    """Profiler: a peft LoRA model with bitsandbytes Linear4bit layers."""
    return is_lora_config(peft_config) and bool(_linear4bit_modules(model))


def observed_options(model) -> dict:
    """quant_type and double_quant from the first quantised weight's bitsandbytes QuantState; qlora_recast when the
    model shows the QLoRA script's recast (task "recast")."""
    recast_seen = {RECAST_KEY: True} if observed_recast(model) else {}
    if observed_unprepared(model):  # task "axodtype"
        recast_seen["kbit_prepare"] = False
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            return {"quant_type": getattr(qs, "quant_type", "nf4"), "double_quant": bool(getattr(qs, "nested", True)),
                    **recast_seen}
    return recast_seen


def observed_recast(model) -> bool:
    """The QLoRA script's recast as it shows on a live model: LoRA factors and `embed_tokens` in bf16 beside fp32
    norms (prepare_model_for_kbit_training's; without it, as in the FSDP-QLoRA recipe, the norms stay 16-bit)."""
    import torch

    def dtypes(match) -> set:
        return {p.dtype for name, p in model.named_parameters() if match(name)}

    factors = dtypes(lambda n: ".lora_A." in n or ".lora_B." in n)
    embed = dtypes(lambda n: "embed_tokens" in n)
    norms = dtypes(lambda n: "norm" in n and "lora_" not in n)
    return factors == embed == {torch.bfloat16} and norms == {torch.float32}


def observed_unprepared(model) -> bool:
    """Every non-quantised floating-point base parameter 16-bit (none fp32): no prepare_model_for_kbit_training's fp32
    cast, or one undone, as axolotl's loader undoes it (readers/qlora_dtypes.py): `--no-kbit-prepare`. Packed
    weights are told apart as peft's prepare tells them (`param.__class__.__name__ != "Params4bit"`)."""
    import torch

    dtypes = {p.dtype for name, p in model.named_parameters()
              if "lora_" not in name and p.is_floating_point() and p.__class__.__name__ != "Params4bit"}
    return bool(dtypes) and dtypes <= {torch.bfloat16, torch.float16}


def observed_precision(model) -> str:
    """The 4-bit layers' compute dtype (bnb_4bit_compute_dtype): fp16, else bf16."""
    import torch

    compute = next((getattr(m, "compute_dtype", None) for m in _linear4bit_modules(model)), None)
    return "fp16" if compute == torch.float16 else "bf16"


def qlora_serving(spec, sites, head_sites, run) -> ServingCost:
    """Unmerged: LoRA's fp32 factors beside the 4-bit base, its branch in the 16-bit compute dtype (casts
    to fp32 and back). Merged: W + s B A exists only in 16 bits, so the served model is the base dequantised
    to the compute dtype with the update added: every 4-bit block linear grows to 16 bits. (peft's own
    Linear4bit.merge re-quantises W + s B A to 4 bits, adding nothing but rounding the update away in the
    4-bit grid; peft warns so.)"""
    from ..architectures import get_architecture
    from ..budget import param_groups

    storage = four_bit_storage(run)
    sixteen = DTYPE_BYTES[storage.compute_dtype]
    linears = [g for g in param_groups(get_architecture(spec.model_type), spec) if g.kind == "linear"]
    growth = sum(g.count * (sixteen * g.numel - storage.linear_bytes(g.numel)) for g in linears)
    unmerged = lora_serving(spec, sites, head_sites, run, method=QLORA)
    return ServingCost(
        mergeable=True,
        extra_weight_bytes_unmerged=unmerged.extra_weight_bytes_unmerged,
        extra_weight_bytes_merged=growth,
        extra_flops_per_token_unmerged=unmerged.extra_flops_per_token_unmerged,
        extra_flops_per_token_merged=0,
        extra_sequential_ops_per_block_unmerged=unmerged.extra_sequential_ops_per_block_unmerged,
        extra_sequential_ops_per_block_merged=0,
        note=(f"merged means dequantised: the block linears in {storage.compute_dtype} instead of "
              f"{storage.quant_type.upper()} ({growth:,} bytes more); peft's merge into Linear4bit re-quantises "
              "W + s B A instead (nothing more, the update rounded to 4 bits); unmerged: LoRA on the 4-bit base"),
    )


QLORA = register_method(Method(
    forward_lifetimes=True,  # ligeracc: peft Linear.forward's references (lora.lora_linear)
    name="qlora",
    title="QLoRA (4-bit base + LoRA)",
    paper="Dettmers et al. 2023, arXiv:2305.14314",
    recipe="BitsAndBytesConfig(load_in_4bit, nf4, double quant, bf16 compute) + prepare_model_for_kbit_training + peft LoRA",
    default_r=8,
    trainable=lora_trainable,
    frozen=lambda site, run: [],
    adapted_linear=lora_linear,
    storage=four_bit_storage,
    serving=qlora_serving,
    options=(QUANT_TYPE, DOUBLE_QUANT, QUANT_STORAGE, KBIT_PREPARE, QLORA_RECAST),
    # bitsandbytes computes in 16-bit (bnb_4bit_compute_dtype); task "recast": amp-bf16 is Trainer(bf16=True) on
    # the prepared model (fp32 non-quantised parameters, the forward under torch.autocast(bfloat16))
    precisions=("bf16", "fp16", "amp-bf16"),
    apply_to_model=apply_qlora,
    resolve=resolve_recast,  # task "recast": --qlora-recast sets the adapters' dtype (bf16)
    validate=check_recast,
    recognise=recognise_qlora,
    recognise_priority=30,
    observed_options=observed_options,
    observed_precision=observed_precision,
))
