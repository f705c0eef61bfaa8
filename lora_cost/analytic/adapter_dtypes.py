"""`--adapter-dtype fp32|bf16|fp16`: the dtype of the LoRA factors, and which values each method takes.

peft (tuners/tuners_utils.py `_cast_adapter_dtype`, peft_model.py `get_peft_model(...,
autocast_adapter_dtype=True)`) creates the factors and, by default, casts 16-bit ones up to fp32
(the default, `fp32`). With `autocast_adapter_dtype=False` they keep the dtype of their base layer
(`_move_adapter_to_device_of_base_layer`): the model's dtype, `bf16` or `fp16` here; scripts that cast
`LoraLayer` modules themselves (artidoro/qlora `qlora.py`: `module.to(torch.bfloat16)` under --bf16)
get the same factors. In the forward (tuners/lora/layer.py Linear.forward) peft casts the layer input to
the factors' dtype (`_cast_input_dtype`: no copy when they agree) and the sum back to the base output's.

What is modelled: LoRA, LoRA+, LoRA-FA (same factors) on a dense base in fp32 or the model's own 16-bit
dtype, and QLoRA's factors in fp32 or bf16 (the QLoRA script's recast; a 4-bit base layer has no float
weight for peft to follow, so bf16 factors there come only from such a cast). A 16-bit factor dtype other
than the model's (bf16 factors on an fp16 model: torch promotes bf16 + fp16 to fp32) and 16-bit factors
under autocast are refused, as are other methods (their extra tensors keep peft's own dtypes); QLoRA's bf16
factors under amp-bf16 are not: that is the QLoRA script's own run (task "recast", analytic/qlora_recast.py).
"""

from __future__ import annotations

from ..errors import LoraCostError
from ..spec import RunConfig

ADAPTER_DTYPE_METHODS = ("lora", "lora-plus", "lora-fa", "qlora")


def check_adapter_dtype(method_name: str, run: RunConfig) -> None:
    dtype = run.adapter_dtype
    if dtype is None or dtype == "fp32":
        if dtype is not None and method_name not in ADAPTER_DTYPE_METHODS:
            raise LoraCostError(f"--adapter-dtype is modelled for {', '.join(ADAPTER_DTYPE_METHODS)}; not {method_name}")
        return
    if method_name not in ADAPTER_DTYPE_METHODS:
        raise LoraCostError(f"--adapter-dtype is modelled for {', '.join(ADAPTER_DTYPE_METHODS)}; not {method_name}")
    if method_name == "qlora":  # task "recast": amp-bf16 is the script's own run (Trainer bf16=True)
        if dtype != "bf16" or run.precision not in ("bf16", "amp-bf16"):
            raise LoraCostError("qlora takes --adapter-dtype fp32 (peft's default) or bf16 with --precision bf16 or "
                                "amp-bf16 (the QLoRA script's recast of the LoRA layers)")
        return
    if run.autocast_dtype:
        raise LoraCostError(f"--adapter-dtype {dtype} under autocast (--precision {run.precision}) is not modelled: "
                            "the fp32 master weights keep fp32 adapters")
    if dtype != run.weight_dtype:
        raise LoraCostError(f"--adapter-dtype {dtype} on a {run.weight_dtype} model is not modelled (peft keeps factors "
                            "in fp32 or in the base layer's dtype; bf16 + fp16 sums promote to fp32)")
