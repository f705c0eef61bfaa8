"""P-tuning: prompt tuning whose N virtual-token embeddings come out of a trainable prompt encoder.

Liu et al. 2021, "GPT Understands, Too", arXiv:2103.10385, Sec. 3 (the prompt encoder).
Modelled library behaviour: peft `PromptEncoderConfig` (default MLP reparameterisation) and
peft/tuners/p_tuning/model.py `PromptEncoder`: embedding(N, d) -> Linear(d, h) -> ReLU -> Linear(h, h)
-> ReLU -> Linear(h, d), with h = encoder_hidden_size (peft's default: the model's hidden size,
utils/other.py `_prepare_prompt_learning_config`). The encoder runs once on `prompt_tokens[:1]` (one
row of N tokens), then the output is repeated over the batch and prepended like prompt tuning's.
Saves: the int64 token indices (embedding backward), each Linear's input (its weight trains) and each
ReLU's output (threshold_backward); the second and third Linear's inputs are the ReLU outputs.
"""

from __future__ import annotations

from .. import ops
from .base import Method, TensorGroup, register_method
from .options import MethodOption
from .prompt_tuning import (NO_LINEAR_ADAPTER, PROMPT_DTYPE, VIRTUAL_TOKENS, active_config, apply_prompt_learning,
                            check_virtual_tokens, peft_type, prepend, prompt_indices, prompt_serving, virtual_tokens)

ENCODER_HIDDEN = MethodOption("encoder_hidden_size", "--prompt-encoder-hidden", int, 0,
                              "hidden size of P-tuning's MLP prompt encoder (0: the model's hidden size, as peft)",
                              minimum=0)


def encoder_hidden(spec, run) -> int:
    return ENCODER_HIDDEN.value(run) or spec.hidden


def encoder_groups(spec, run) -> list[TensorGroup]:
    n, d, h = virtual_tokens(run), spec.hidden, encoder_hidden(spec, run)
    return [TensorGroup("prompt_encoder.embedding", n * d, 1, PROMPT_DTYPE),
            TensorGroup("prompt_encoder.mlp_head", d * h + h + h * h + h + h * d + d, 1, PROMPT_DTYPE)]


def relu(tape, x):
    """aten.relu: threshold_backward reads the output, which is saved."""
    out = tape.new(x.numel, x.dtype, x.rg)
    if x.rg:
        tape.save(out, "adapter extras")
    return out


def p_tuning_embeddings(ctx, x):
    tape, spec = ctx.tape, ctx.spec
    n, d, h = virtual_tokens(ctx.run), spec.hidden, encoder_hidden(spec, ctx.run)
    e = ops.embedding(tape, prompt_indices(ctx, n), d, w_trainable=True, w_dtype=PROMPT_DTYPE)
    y = relu(tape, ops.linear(tape, e, d, h, w_trainable=True, w_dtype=PROMPT_DTYPE, kind="adapter"))
    y = relu(tape, ops.linear(tape, y, h, h, w_trainable=True, w_dtype=PROMPT_DTYPE, kind="adapter"))
    prompts = ops.linear(tape, y, h, d, w_trainable=True, w_dtype=PROMPT_DTYPE, kind="adapter")
    return prepend(ctx, prompts, x)


def apply_p_tuning(model, run, targets, notes):
    import peft

    cfg = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual_tokens(run),
                                   encoder_hidden_size=ENCODER_HIDDEN.value(run) or None)
    return apply_prompt_learning(model, run, notes, cfg)


P_TUNING = register_method(Method(
    name="p-tuning",
    title="P-tuning",
    paper="Liu et al. 2021, arXiv:2103.10385",
    recipe="peft PromptEncoderConfig(task_type=CAUSAL_LM, num_virtual_tokens=N, encoder_hidden_size): MLP prompt "
           "encoder in fp32, its output prepended",
    **NO_LINEAR_ADAPTER,
    options=(VIRTUAL_TOKENS, ENCODER_HIDDEN),
    validate=lambda spec, sites, run: check_virtual_tokens(spec, run, "p-tuning", run.seq + virtual_tokens(run)),
    model_trainable=lambda spec, groups, run: encoder_groups(spec, run),
    virtual_tokens=virtual_tokens,
    input_embeddings=p_tuning_embeddings,
    # at serving the encoder's output is computed once and kept: the same as prompt tuning
    serving=prompt_serving,
    apply_to_model=apply_p_tuning,
    recognise=lambda model, peft_config: peft_type(peft_config) == "PromptEncoderConfig",
    observed_options=lambda model: {"virtual_tokens": active_config(model).num_virtual_tokens,
                                    "encoder_hidden_size": active_config(model).encoder_hidden_size},
))
