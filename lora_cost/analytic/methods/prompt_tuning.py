"""Prompt tuning: N trainable virtual-token embeddings prepended to every input sequence.

Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning", arXiv:2104.08691,
Sec. 2: trainable parameters N x d_model. The LoRA paper's "PrefixEmbed" baseline (Hu et al. 2021,
arXiv:2106.09685, Sec. 5.1) is this method with l_p + l_i virtual tokens.
Modelled library behaviour: peft `PromptTuningConfig` and `PeftModelForCausalLM.forward`
(peft/peft_model.py): `prompts = prompt_encoder(prompt_tokens[:1]).repeat(b, 1, 1)` (an nn.Embedding
of N rows, fp32, over the int64 arange of the virtual tokens, which its backward saves), then
`inputs_embeds = torch.cat((prompts.to(inputs_embeds.dtype), inputs_embeds), dim=1)`; the labels get N
`-100`s prepended. The model runs at length s + N, and since the residual stream requires grad from
the first block on, every block saves what a later block would (the gradient must reach the prompt).
"""

from __future__ import annotations

from .. import ops
from ...errors import LoraCostError
from .base import Method, TensorGroup, register_method
from .options import MethodOption
from .serving import ServingCost
from ...units import DTYPE_BYTES

PROMPT_DTYPE = "fp32"  # peft builds the prompt encoder in torch's default dtype, whatever the model's
# peft has no default (num_virtual_tokens=None); 20 is the value of its prompt-tuning and prefix-tuning
# guides, so that every method runs on defaults (plan, serving tables)
VIRTUAL_TOKENS = MethodOption("virtual_tokens", "--virtual-tokens", int, 20,
                              "virtual tokens (prompt/P-tuning: prepended to the input; prefix tuning: keys and "
                              "values prepended in every layer)", minimum=1)

# What every prompt-learning method declares alike (the Method fields of a method that adapts no linear layer):
# no rank, no adapter tensors at the linear sites, each linear the base one.
NO_LINEAR_ADAPTER = dict(default_r=None, trainable=lambda site, run: [], frozen=lambda site, run: [],
                         adapted_linear=lambda ctx, x, site: ctx.base_linear(x, site), uses_rank=False,
                         default_targets=lambda spec: (), max_rank=lambda site: None)


def active_config(model):
    """The peft config of a live model's (only) adapter."""
    return next(iter(model.peft_config.values()))


def virtual_tokens(run) -> int:
    return VIRTUAL_TOKENS.value(run)


def check_virtual_tokens(spec, run, name: str, positions: int) -> None:
    """No linear-layer settings; N given and positive; the positions the model sees (s + N) within its
    maximum; a causal LM."""
    for given, flag in ((run.targets is not None, "--targets"), (run.dropout, "--dropout")):
        if given:
            raise LoraCostError(f"{flag} does not apply to {name} (it adapts no linear layer)")
    n = virtual_tokens(run)
    if spec.family == "bert":
        raise LoraCostError(f"{name} runs only on causal LMs here: peft's prompt learning wrappers do not pad "
                            f"{spec.model_type}'s masked-LM labels for the virtual tokens, nor pass it a prefix cache")
    if positions > spec.max_positions:
        raise LoraCostError(f"--seq {run.seq} plus --virtual-tokens {n} is {positions} positions, more than "
                            f"{spec.name}'s maximum of {spec.max_positions}")


def prompt_indices(ctx, n: int):
    """peft's `prompt_tokens`: an int64 arange of the N virtual tokens (the embedding's backward saves it)."""
    return ctx.tape.new(n, "int64", False)


def prepend(ctx, prompts, x):
    """`prompts.repeat(b, 1, 1).to(x.dtype)` and `torch.cat((prompts, x), dim=1)`: repeat and cat save
    nothing (their backward needs only sizes); the result requires grad."""
    tape = ctx.tape
    repeated = tape.new(prompts.numel * ctx.batch, prompts.dtype, True)
    repeated = ops.cast(tape, repeated, x.dtype)
    return tape.new(x.numel + repeated.numel, x.dtype, True)


def prompt_embeddings(ctx, x):
    n, d = virtual_tokens(ctx.run), ctx.spec.hidden
    prompts = ops.embedding(ctx.tape, prompt_indices(ctx, n), d, w_trainable=True, w_dtype=PROMPT_DTYPE)
    return prepend(ctx, prompts, x)


def prompt_serving(spec, sites, head_sites, run, *, stored_numel: int | None = None) -> ServingCost:
    """N extra positions in every request, which every generated token attends to in every layer
    (analytic/serving.py adds that attention: 4 x heads x head_dim FLOPs per layer per position); the
    prompt's own forward runs once per request, with the prefill. The N x d embeddings are kept in
    fp32 (peft loads them as trained). Not mergeable: the prompt is input, not a weight update; no
    kernel is added inside a block (the concatenation happens once, before the first)."""
    n = virtual_tokens(run)
    stored = n * spec.hidden if stored_numel is None else stored_numel
    weight = stored * DTYPE_BYTES[PROMPT_DTYPE]
    return ServingCost(mergeable=False, extra_weight_bytes_unmerged=weight, extra_weight_bytes_merged=weight,
                       extra_flops_per_token_unmerged=0, extra_flops_per_token_merged=0,
                       extra_sequential_ops_per_block_unmerged=0, extra_sequential_ops_per_block_merged=0,
                       extra_positions=n,
                       note=f"{n} virtual positions in every request (not mergeable): each token attends over "
                            f"{n} more keys per layer; the prompt's own forward runs once per request")


def apply_prompt_learning(model, run, notes, config):
    """Trace hook shared by prompt, P- and prefix tuning: peft.get_peft_model with a prompt-learning
    config (task CAUSAL_LM). peft keeps `prompt_tokens` as a plain tensor attribute; it is rebuilt on
    the CPU so that the fake-tensor step can index with it."""
    import torch

    from ...trace.adapters import enable_checkpointing, enable_input_grads, peft_model

    if run.grad_checkpointing:
        enable_checkpointing(model)
    model = peft_model(model, config)
    for name, tokens in list(model.prompt_tokens.items()):
        model.prompt_tokens[name] = torch.arange(tokens.numel(), dtype=torch.long, device="cpu")
    if run.grad_checkpointing:
        enable_input_grads(model)
    return model, 0


def apply_prompt_tuning(model, run, targets, notes):
    import peft

    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual_tokens(run))
    return apply_prompt_learning(model, run, notes, cfg)


def peft_type(peft_config) -> str:
    return type(peft_config).__name__


PROMPT_TUNING = register_method(Method(
    name="prompt-tuning",
    title="Prompt tuning",
    paper="Lester et al. 2021, arXiv:2104.08691",
    recipe="peft PromptTuningConfig(task_type=CAUSAL_LM, num_virtual_tokens=N): N fp32 embeddings prepended",
    **NO_LINEAR_ADAPTER,
    options=(VIRTUAL_TOKENS,),
    validate=lambda spec, sites, run: check_virtual_tokens(spec, run, "prompt-tuning", run.seq + virtual_tokens(run)),
    model_trainable=lambda spec, groups, run: [TensorGroup("prompt_encoder.embedding", virtual_tokens(run) * spec.hidden, 1,
                                                   PROMPT_DTYPE)],
    virtual_tokens=virtual_tokens,
    input_embeddings=prompt_embeddings,
    serving=prompt_serving,
    apply_to_model=apply_prompt_tuning,
    recognise=lambda model, peft_config: peft_type(peft_config) == "PromptTuningConfig",
    observed_options=lambda model: {"virtual_tokens": active_config(model).num_virtual_tokens},
))
