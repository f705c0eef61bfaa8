"""LoRA+: LoRA with a larger learning rate for B than for A (eta_B = ratio * eta_A).

Hayou, Ghosh and Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models", arXiv:2402.12354,
Sec. 3 (ratio lambda = eta_B / eta_A, about 2^4 in their experiments).
Modelled library behaviour: peft `optimizers/loraplus.py` create_loraplus_optimizer(model, AdamW,
lr, loraplus_lr_ratio): the same LoRA model, its trainable parameters split into parameter groups
(lora_A at lr; lora_B and 1-D parameters at lr * ratio; LoRA embeddings at loraplus_lr_embedding).
A learning rate changes no tensor's size and no kernel: the step's memory and FLOPs are LoRA's,
tensor for tensor (everything below is lora.py's).
"""

from __future__ import annotations

from dataclasses import replace

from .base import register_method
from .lora import LORA, is_lora_config
from .options import MethodOption

RATIO = MethodOption("lora_plus_ratio", "--lora-plus-ratio", float, 16.0,
                     "learning rate of lora_B over that of lora_A (peft loraplus_lr_ratio)", above=0.0)


def optimizer_ratio(model, optimizer) -> float | None:
    """lr(lora_B) / lr(lora_A) read from the optimizer's parameter groups, when they differ."""
    names = {id(p): name for name, p in model.named_parameters()}
    lr_a = lr_b = None
    for group in getattr(optimizer, "param_groups", ()):
        kinds = {("A" if ".lora_A." in names.get(id(p), "") else "B" if ".lora_B." in names.get(id(p), "") else "")
                 for p in group["params"]}
        if "A" in kinds:
            lr_a = group["lr"]
        if "B" in kinds:
            lr_b = group["lr"]
    if not lr_a or lr_b is None or lr_a == lr_b:
        return None
    return float(lr_b / lr_a)


def recognise_lora_plus(model, peft_config, optimizer) -> dict | None:
    """Profiler: a plain LoRA model (no DoRA, A trains) whose optimizer gives lora_B another learning
    rate than lora_A (two or more parameter groups, as create_loraplus_optimizer builds)."""
    if not is_lora_config(peft_config) or getattr(peft_config, "use_dora", False):
        return None
    if len(getattr(optimizer, "param_groups", ())) < 2:
        return None
    ratio = optimizer_ratio(model, optimizer)
    return None if ratio is None or ratio <= 0 else {RATIO.name: ratio}


def apply_lora_plus(model, run, targets, notes):
    """Trace hook: LoRA's (the optimizer's groups change learning rates only, not what it stores)."""
    notes.append("LoRA+: the optimizer's parameter groups differ in learning rate only; memory and FLOPs are LoRA's")
    return LORA.apply_to_model(model, run, targets, notes)


# LoRA with its own name, option, trace note and optimizer recognition: every other field is LoRA's
# (replace, so a field LoRA gains later is LoRA+'s too)
LORA_PLUS = register_method(replace(
    LORA,
    name="lora-plus",
    title="LoRA+ (B's learning rate x ratio)",
    paper="Hayou et al. 2024, arXiv:2402.12354 (ICML 2024)",
    recipe="peft LoRA + create_loraplus_optimizer(model, AdamW, lr, loraplus_lr_ratio)",
    options=(RATIO,),
    apply_to_model=apply_lora_plus,
    recognise=None,  # a LoRA model: only its optimizer tells LoRA+ apart
    recognise_optimizer=recognise_lora_plus,
    note="memory and FLOPs equal LoRA's: LoRA+ changes only the learning rate of B (an optimizer parameter group)",
))
