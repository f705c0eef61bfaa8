"""The dtypes a QLoRA run really has when axolotl or transformers' Trainer launches it (task "axodtype", issue 9).

axolotl 0.19.0 (`pip download axolotl==0.19.0`), adapter: qlora + load_in_4bit, not FSDP/DeepSpeed ZeRO-3:
- utils/config/__init__.py normalize_config: bf16 (true or auto) -> cfg.torch_dtype = bfloat16 (fp16 -> float16,
  neither -> float32); a `torch_dtype` key is overwritten.
- loaders/model.py `_set_quantization_config`: BitsAndBytesConfig(bnb_4bit_compute_dtype=cfg.torch_dtype,
  nf4, double quant, bnb_4bit_quant_storage=torch.bfloat16), bnb_config_kwargs updating it.
- `ModelLoader.load`: `_apply_post_model_load_setup` -> `_configure_embedding_dtypes`, then `_load_adapters`.
  `_configure_embedding_dtypes` converts norms ("norm" in the module name) and the embedding modules
  (`get_linear_embedding_layers`: embed_tokens, lm_head) to fp32, then `_prepare_model_for_quantization` calls
  peft's `prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)` (every
  non-Params4bit parameter to fp32; the embedding-output hook), then, because adapter is lora/qlora
  (`needs_fa2_dtype`, whatever the attention), `_convert_embedding_modules_dtype(..., dist_dtype=cfg.torch_dtype)`:
  norms, embed_tokens and lm_head back to bf16. So on Llama-like models every non-quantised parameter ends bf16,
  what `--no-kbit-prepare` describes (the non-quantised parameters in the compute dtype). A bias of a 4-bit linear
  (Qwen2's q, k, v) is missed by the loop but bitsandbytes' Linear4bit.forward casts it to its input's dtype (bf16).
- loaders/adapter.py `load_lora`: get_peft_model after that, with autocast_adapter_dtype only if
  `peft_autocast_adapter_dtype` is set: peft's default True leaves the LoRA factors fp32; false leaves them in
  the base layer's dtype (peft tuners_utils `_get_base_layer_device_and_dtype`: a Linear4bit's compute_dtype).
- core/builders/base.py `_configure_precision_settings`: TrainingArguments(bf16=cfg.bf16) (bf16: full gives
  bf16_full_eval only, bf16=False): Trainer's accelerate mixed precision, the forward under autocast.
So axolotl QLoRA + bf16 is `--precision amp-bf16 --no-kbit-prepare --quant-storage bf16` with fp32 adapters.
For adapter: lora (no 4-bit) the same loop runs before get_peft_model: a bf16 model with fp32 adapters, as today.

transformers Trainer + peft (peft's QLoRA guide): prepare_model_for_kbit_training leaves every non-quantised
parameter fp32 and the adapters fp32 (autocast_adapter_dtype=True); TrainingArguments(bf16=True) runs the step under
autocast: `--precision amp-bf16` (what task "recast" models). TRL's SFTTrainer (trl 1.16 sft_trainer.py) does not
call prepare_model_for_kbit_training and casts the trainable parameters of a quantised model to bf16: there
`--no-kbit-prepare --adapter-dtype bf16` (a note says so).
"""

from __future__ import annotations

from dataclasses import replace

from .base import Collector, Resolved

_KEYS = ("bf16", "fp16")  # the keys the settings below come from (the family check finds them by these)


def axolotl_qlora_precision(c: Collector, bf16, fp16) -> None:
    """axolotl QLoRA without FSDP: precision and the non-quantised parameters' dtype (see the module doc)."""
    if not (bf16 or fp16):
        c.warn("bf16", "QLoRA without bf16 or fp16 computes in fp32 (axolotl's torch_dtype float32), which is not "
               "modelled: the estimate keeps --precision (default bf16)")
        return
    key = "bf16" if bf16 else "fp16"
    if bf16 in (True, "auto"):
        c.set("precision", "amp-bf16", key)
    elif bf16 == "full":
        c.set("precision", "bf16", key)
    else:
        c.set("precision", "fp16", key)
        c.warn(key, "fp16: Trainer's fp16 autocast over a QLoRA model (amp-fp16) is not modelled: estimated without "
               "autocast (--precision fp16)")
    c.set("kbit_prepare", False, key)
    if not any(s.target == "quant_storage" for s in c.settings):
        c.set("quant_storage", "bf16", "load_in_4bit" if c.data.get("load_in_4bit") else "adapter")
    c.note(key, f"axolotl QLoRA: prepare_model_for_kbit_training, then norms, embed_tokens and lm_head back to "
           f"{'bf16' if bf16 else 'fp16'} (ModelLoader._configure_embedding_dtypes), 4-bit weights stored in bf16, "
           f"{'Trainer autocast' if bf16 in (True, 'auto') else 'no autocast'}: --precision "
           f"{'amp-bf16' if bf16 in (True, 'auto') else key} --no-kbit-prepare --quant-storage bf16")


def axolotl_adapter_dtype(c: Collector, bf16, fp16) -> None:
    """peft_autocast_adapter_dtype: false -> get_peft_model(..., autocast_adapter_dtype=False): the factors keep the
    base layer's dtype, cfg.torch_dtype (a 4-bit layer's compute dtype); true or absent: peft's fp32."""
    value = c.flag("peft_autocast_adapter_dtype")
    if value is False and (bf16 or fp16):
        c.set("adapter_dtype", "bf16" if bf16 else "fp16", "peft_autocast_adapter_dtype")


def axolotl_family(model_type: str | None, found: Resolved) -> Resolved:
    """The axolotl mix is modelled where its loop reaches every non-quantised parameter; elsewhere it leaves some
    fp32 (GPT-2's ln_*, MoE routers and experts, ...): then prepare's fp32 for all of them, with a warning."""
    origin = found.origins.get("kbit_prepare", "")
    if found.method_options.get("kbit_prepare") is not False or not origin.endswith(tuple(f"key {k!r}" for k in _KEYS)):
        return found
    # the model types where axolotl's name matching ('norm' in the name, embed_tokens, lm_head) reaches every
    # non-quantised parameter: the Llama-style architecture's (LlamaRMSNorm-style norms, Qwen3's q_norm/k_norm)
    from ..analytic.architectures.llama import LLAMA
    if model_type is None or model_type in LLAMA.model_types:
        return found
    options = {k: v for k, v in found.method_options.items() if k != "kbit_prepare"}
    origins = {k: v for k, v in found.origins.items() if k != "kbit_prepare"}
    warning = (f"{origin}: axolotl returns only modules named *norm*, embed_tokens, lm_head to the compute dtype after "
               f"prepare_model_for_kbit_training; on {model_type} that leaves a mix lora-cost does not model: estimated "
               "with every non-quantised parameter fp32 (an upper bound)")
    return replace(found, method_options=options, origins=origins, warnings=found.warnings + (warning,))


def trainer_qlora_precision(method: str, kwargs: dict, origins: dict, training_args: str | None,
                            explicit: bool) -> tuple[dict, list[str], list[str]]:
    """A TrainingArguments file's bf16/fp16 read as 16-bit weights (common.precision_from) when the method is QLoRA
    (a flag, or another file): peft's prepare_model_for_kbit_training makes them fp32 and Trainer autocasts, so
    amp-bf16. Returns (kwargs, notes, warnings)."""
    origin = origins.get("precision", "")
    if (method != "qlora" or explicit or not training_args or not origin.startswith(f"{training_args}:")
            or kwargs.get("precision") not in ("bf16", "fp16")
            or origins.get("method", "").startswith(f"{training_args}:")):  # a TRL recipe: trl_model.kbit_dtypes
        return kwargs, [], []
    if kwargs["precision"] == "fp16":
        return kwargs, [], [f"{origin}: fp16 over QLoRA: Trainer's fp16 autocast (amp-fp16) is not modelled for QLoRA; "
                            "estimated without autocast (--precision fp16)"]
    kwargs = dict(kwargs, precision="amp-bf16")
    return kwargs, [f"{origin}: QLoRA under Trainer bf16=True: prepare_model_for_kbit_training's fp32 non-quantised "
                    "parameters under autocast, --precision amp-bf16 (TRL's SFTTrainer skips that preparation and "
                    "casts the adapters to bf16: add --no-kbit-prepare --adapter-dtype bf16)"], []


def axolotl_full_dtypes(c: Collector, half: bool) -> None:
    """Full fine-tuning (no adapter), not FSDP: `_configure_embedding_dtypes` upcasts norms, embed_tokens and lm_head
    to fp32 and converts them back only when the attention needs it (`attn_needs_dtype_cast`: not eager, sdpa or
    unset; utils/schemas/enums.py ATTN_IMPLS_WITHOUT_DTYPE_CAST). That fp32 mix is not modelled: a warning."""
    if not half or any(c.data.get(k) for k in ("flash_attention", "flex_attention")):
        return
    c.warn("adapter", "full fine-tuning: axolotl leaves norms, embed_tokens and lm_head in fp32 (its upcast before "
           "training, undone only for flash or flex attention), which is not modelled: estimated in the 16-bit "
           "dtype (their weights, gradients and optimizer states are under-counted)")
