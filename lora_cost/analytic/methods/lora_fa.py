"""LoRA-FA: LoRA with A frozen at its random initialisation; only B trains.

Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models
Fine-tuning", arXiv:2308.03303, Sec. 3: with A frozen, its input need not be kept for backward,
so a layer caches only the [n, r] projection A x instead of the [n, d_in] input.
Modelled recipe: a peft LoRA model with every lora_A weight set to requires_grad=False.
"""

from __future__ import annotations

from .base import Method, TensorGroup, register_method
from .lora import (adapter_dtype, apply_lora, is_lora_config, lora_linear, lora_rank_rows, lora_serving,
                   lora_trainable)


def recognise_lora_fa(model, peft_config) -> bool:
    """A peft LoRA model whose lora_A weights are all frozen."""
    if not is_lora_config(peft_config):
        return False
    a = [p for name, p in model.named_parameters() if ".lora_A." in name]
    return bool(a) and not any(p.requires_grad for p in a)


LORA_FA = register_method(Method(
    forward_lifetimes=True,  # ligeracc: peft Linear.forward's references (lora.lora_linear)
    name="lora-fa",
    title="LoRA-FA (frozen A)",
    paper="Zhang et al. 2023, arXiv:2308.03303",
    recipe="peft LoRA, then lora_A.requires_grad_(False)",
    default_r=8,
    trainable=lambda site, run: lora_trainable(site, run, freeze_a=True),
    frozen=lambda site, run: [TensorGroup(f"{site.name}.lora_A", lora_rank_rows(site, run.r) * site.d_in, 1,
                                          adapter_dtype(run))],
    adapted_linear=lambda ctx, x, site: lora_linear(ctx, x, site, freeze_a=True),
    # served as LoRA: the frozen A is kept (or merged) with the trained B
    serving=lambda spec, sites, head_sites, run: lora_serving(spec, sites, head_sites, run, method=LORA_FA),
    apply_to_model=lambda model, run, targets, notes: apply_lora(model, run, targets, notes, freeze_a=True),
    recognise=recognise_lora_fa,
    recognise_priority=10,
))
