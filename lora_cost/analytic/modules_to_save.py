"""`--modules-to-save embed_tokens,lm_head`: peft's modules_to_save on a causal LM (LoRA and its variants).

peft (utils/other.py ModulesToSaveWrapper, tuners_utils `_set_trainable`): the named module is wrapped; the
original stays frozen and a `copy.deepcopy` of it, in the model's dtype, trains (the forward runs the copy).
So the base keeps its weights, and the copy adds V x d trainable elements per module, their gradients and
optimizer state. What autograd saves follows: a trained embedding keeps its int64 indices (aten.embedding),
a trained LM head its input (the final norm's output) and a weight-gradient matmul in backward. The
embedding's gradient arrives at the very end of backward; the head's right after the loss.

Modelled: the Llama-style decoders (model.embed_tokens, lm_head) with untied embeddings; the standard loss,
and Liger or chunked with a trained embedding copy. Refused: tied embeddings (the head and the table are one
tensor; peft's copies untie them or, with ensure_weight_tying, tie the copies: not modelled), a trained head
copy under Liger (its lce_maybe_trainable_lm_head path) or the chunked loss (its backward sums the chunks'
head-weight gradients while the other chunks' logit gradients wait), other methods and tasks.
"""

from __future__ import annotations

from ..errors import LoraCostError
from ..spec import ModelSpec, RunConfig
from .methods.base import TensorGroup

MODULES = ("embed_tokens", "lm_head")
METHODS = ("lora", "lora-plus", "lora-fa", "dora")
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def parse_modules(value) -> tuple[str, ...] | None:
    """`embed_tokens,lm_head` (a string or a sequence) -> its names, each once, checked."""
    if value is None:
        return None
    names = tuple(v.strip() for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip())
    if not names:
        raise LoraCostError("--modules-to-save is empty")
    for n in names:
        if n not in MODULES:
            raise LoraCostError(f"--modules-to-save takes {', '.join(MODULES)}; not {n!r}")
    return tuple(dict.fromkeys(names))


def check_modules_to_save(spec: ModelSpec, method_name: str, run: RunConfig, task: str) -> None:
    if not run.modules_to_save:
        return
    if method_name not in METHODS:
        raise LoraCostError(f"--modules-to-save is modelled for {', '.join(METHODS)}; not {method_name}")
    if spec.model_type not in MODEL_TYPES or task != "causal-lm":
        raise LoraCostError(f"--modules-to-save is modelled for causal LMs of model types {', '.join(MODEL_TYPES)}; "
                            f"not {spec.model_type} ({task})")
    if spec.tie_embeddings:
        raise LoraCostError(f"--modules-to-save on {spec.name}, whose LM head is tied to its embeddings, is not modelled "
                            "(peft's trained copies untie them)")
    if run.loss_kind != "standard" and "lm_head" in run.modules_to_save:
        # liger: lce_maybe_trainable_lm_head's path; chunked: the head's weight gradients of the chunks are summed
        # while the other chunks' logit gradients wait (a backward moment not modelled yet)
        raise LoraCostError(f"--loss {run.loss_kind} with a trained lm_head copy (--modules-to-save lm_head) is not "
                            "modelled yet")


def trained(run: RunConfig, module: str) -> bool:
    return bool(run.modules_to_save) and module in run.modules_to_save


def copies(spec: ModelSpec, run: RunConfig) -> list[TensorGroup]:
    """The trainable copies (ModulesToSaveWrapper.modules_to_save[adapter]), in the model's dtype."""
    return [TensorGroup(f"modules_to_save {m}", spec.vocab * spec.hidden, 1, run.weight_dtype)
            for m in run.modules_to_save or ()]
