"""Task heads other than the family's language-model head: sequence and token classification
(`--task seq-cls | token-cls`), for the families that have them in transformers.

What each family's classifier is (transformers 5):
- Llama, Mistral, Qwen2/3 (modeling_layers.py GenericForSequenceClassification / ...ForTokenClassification):
  seq-cls: `score` = Linear(d, labels, bias=False) over every position, then the logits of the last
  non-pad token (`logits[arange(b), last_non_pad_token]`: aten.index saves its two int64 [b] indices);
  token-cls: dropout (config classifier_dropout, else hidden_dropout, else 0.1) and `score` with a bias.
- GPT-2 (modeling_gpt2.py): seq-cls as above (`score`, no bias); token-cls: dropout (0.1 unless the
  config says otherwise) and `classifier` = Linear(d, labels).
- BERT (modeling_bert.py): seq-cls: the pooler (`hidden[:, 0]`, dense d x d, tanh), dropout
  (classifier_dropout, else hidden_dropout_prob), `classifier`; token-cls: dropout and `classifier`
  on every position (no pooler: add_pooling_layer=False).
- RoBERTa (modeling_roberta.py RobertaClassificationHead): seq-cls: `hidden[:, 0]`, dropout, dense,
  tanh, dropout, out_proj (no pooler); token-cls as BERT.
- DeBERTa-v2/v3 (modeling_deberta_v2.py): seq-cls: ContextPooler (`hidden[:, 0]`, dropout pooler_dropout,
  dense d x d, gelu), dropout (cls_dropout, else hidden_dropout_prob), `classifier`; token-cls as BERT.
Losses (loss/loss_utils.py): sequence classification is `cross_entropy(pooled.view(-1, labels), labels)`
on the logits as they are (MSE for one label: regression); the decoders' token classification upcasts
the logits (`logits.float()`), BERT/RoBERTa's `CrossEntropyLoss` does not.

With an adapter method the head trains: peft's task_type SEQ_CLS / TOKEN_CLS puts "classifier" and
"score" in modules_to_save, whose ModulesToSaveWrapper keeps the original module frozen and trains a copy
(in the model's dtype). The base model's parameter count holds the original head; the copy counts as
trainable, like an adapter.
"""

from __future__ import annotations

from ..errors import LoraCostError
from ..spec import CLASSIFICATION_TASKS, LinearSite, ModelSpec, RunConfig
from . import ops
from .architectures.base import ParamGroup
from .methods.base import TensorGroup
from .tape import Tensor

# decoder-only families whose transformers classifiers score positions with `score` (Generic...Classification
# in modeling_layers.py; GPT-2's and BLOOM's own classes are alike, their token classifier named `classifier`)
DECODER_FAMILIES = ("llama", "gpt2", "gpt3", "phi3", "gemma", "moe", "bloom")
# model types transformers 5.24 has no token classifier for (its auto mapping): Gemma 3 text has
# Gemma3TextForSequenceClassification only
NO_TOKEN_CLASSIFIER = ("gemma3_text",)
# methods whose trace hooks pass the classifier to peft as a task model (modules_to_save); the others
# (bottleneck adapters, prompt methods, QLoRA's 4-bit head, ...) are not modelled with a classifier yet
CLASSIFIER_METHODS = ("full", "lora", "lora-fa", "dora", "vera", "lora-plus")
DECODER_TOKEN_DROPOUT = 0.1  # GenericForTokenClassification / GPT2ForTokenClassification without a config value


def task_of(arch, run: RunConfig) -> str:
    return run.task or arch.tasks[0]


def check_task(arch, spec: ModelSpec, method, run: RunConfig) -> None:
    """The task must be one the family has; a classifier only with the methods modelled with one."""
    task = task_of(arch, run)
    if task not in arch.tasks:
        kind = "a decoder-only model" if "causal-lm" in arch.tasks else "an encoder"
        raise LoraCostError(f"--task {task} does not apply to {spec.name} ({kind}); its tasks: {', '.join(arch.tasks)}")
    if task == "token-cls" and spec.model_type in NO_TOKEN_CLASSIFIER:
        raise LoraCostError(f"--task token-cls: transformers has no token classifier for {spec.model_type} ({spec.name})")
    if task in CLASSIFICATION_TASKS and method.name not in CLASSIFIER_METHODS:
        raise LoraCostError(f"--task {task} is modelled for {', '.join(CLASSIFIER_METHODS)}; not yet for {method.name} "
                            "(--engine trace runs it)")


def head_linears(spec: ModelSpec, task: str, labels: int) -> tuple[LinearSite, ...]:
    """The classifier's linear layers in order (path = their module path under the task model)."""
    d = spec.hidden
    if spec.family in DECODER_FAMILIES:
        if task == "seq-cls":
            return (LinearSite("score", d, labels, False, path="score"),)
        name = "classifier" if spec.family in ("gpt2", "gpt3", "bloom") else "score"
        return (LinearSite(name, d, labels, True, path=name),)
    if task == "token-cls":
        return (LinearSite("classifier", d, labels, True, path="classifier"),)
    if spec.model_type == "roberta":
        return (LinearSite("dense", d, d, True, path="classifier.dense"),
                LinearSite("out_proj", d, labels, True, path="classifier.out_proj"))
    return (LinearSite("dense", d, d, True, path="pooler.dense"), LinearSite("classifier", d, labels, True, path="classifier"))


def saved_modules(spec: ModelSpec, task: str, labels: int) -> tuple[LinearSite, ...]:
    """The head linears inside peft's modules_to_save ("classifier" or "score"): BERT's pooler is not."""
    return tuple(s for s in head_linears(spec, task, labels) if s.path.split(".")[0] in ("classifier", "score"))


def check_targets(spec: ModelSpec, task: str, labels: int, targets, all_linear: bool) -> None:
    """peft refuses an adapter on a module it also saves (TypeError: modules_to_save cannot be applied to
    modules of type lora.Linear); other head linears a target reaches are not modelled: one line each."""
    if targets is None:
        return
    heads = head_linears(spec, task, labels)
    saved = saved_modules(spec, task, labels)
    if all_linear:
        # peft's all-linear leaves out the SEQ_CLS head module ("classifier"/"score") when it is a Linear
        reached = [s for s in heads if not (task == "seq-cls" and s.path in ("score", "classifier"))]
    else:
        reached = [s for s in heads if any(s.matches(t) for t in targets)]
    for s in reached:
        if s in saved and (s.path in ("score", "classifier")):
            raise LoraCostError(f"peft cannot adapt {s.path!r} and also train it as the {task} head "
                                "(modules_to_save); leave it out of --targets")
        raise LoraCostError(f"targets reaching the {task} head ({s.path}) are not modelled by the analytic engine; "
                            "leave it out of --targets or use --engine trace")


def param_groups(spec: ModelSpec, groups: list[ParamGroup], task: str, labels: int) -> list[ParamGroup]:
    """The base model's groups with the LM head replaced by the classifier (its original, frozen copy)."""
    kept = [g for g in groups if g.kind != "head" and not g.name.startswith("lm_head")]
    for s in head_linears(spec, task, labels):
        kept.append(ParamGroup(f"{s.path}.weight", s.d_in * s.d_out, 1, "head"))
        if s.bias:
            kept.append(ParamGroup(f"{s.path}.bias", s.d_out, 1, "bias"))
    return kept


def trainable_copy(spec: ModelSpec, run: RunConfig, task: str) -> list[TensorGroup]:
    """peft's trainable copy of the head (ModulesToSaveWrapper: a deepcopy, the model's dtype)."""
    out = []
    for s in saved_modules(spec, task, run.labels):
        out.append(TensorGroup(f"modules_to_save {s.path}", s.d_in * s.d_out + (s.d_out if s.bias else 0), 1,
                               run.weight_dtype))
    return out


def decoder_token_head(spec: ModelSpec) -> tuple[float, bool]:
    """A decoder's token classifier: (its dropout without a config value, whether its loss upcasts the logits).
    GenericForTokenClassification: classifier_dropout, else hidden_dropout, else 0.1 (no family config has
    the latter two), loss_function (`logits.float()`); BloomForTokenClassification: BLOOM's config has
    hidden_dropout (0.0 by default), and nn.CrossEntropyLoss on the logits as they are."""
    if spec.family == "bloom":
        return spec.hidden_dropout, False
    return DECODER_TOKEN_DROPOUT, True


def _linear(ctx, x, site: LinearSite, trainable: bool):
    return ops.linear(ctx.tape, x, site.d_in, site.d_out, w_trainable=trainable, w_dtype=ctx.other_dtype, kind="lm_head")


def classifier_and_loss(ctx, x, *, token_dropout: float, upcast_tokens: bool) -> None:
    """The classifier and its loss on the last hidden states x ([n, d], after the final norm)."""
    spec, run, tape = ctx.spec, ctx.run, ctx.tape
    task, labels = run.task, run.labels
    b = ctx.batch
    heads = head_linears(spec, task, labels)
    trains = set(saved_modules(spec, task, labels)) if not ctx.base_trainable else set(heads)
    tape.scope = "head"
    ctx.final_norm_saved_bytes = tape.saved_in("head")  # the final norm's saves (the family ran it in this scope)
    if task == "token-cls":
        h = ops.dropout(tape, x, token_dropout)
        logits = _linear(ctx, h, heads[0], heads[0] in trains)
        ctx.logits_bytes = logits.nbytes
        tape.scope = "loss"
        ctx.loss_copy_bytes = ops.cross_entropy(tape, logits, tape.new(ctx.tokens, "int64", False), upcast=upcast_tokens)
        ctx.log_softmax_bytes = tape.saved[("loss", "log-softmax output")]
        ctx.method.after_loss(ctx)
        return
    if spec.family in DECODER_FAMILIES:  # score every position, then index the last non-pad token
        every = _linear(ctx, x, heads[0], heads[0] in trains)
        tape.transient(every.nbytes)
        for _ in range(2):  # aten.index keeps arange(b) and the argmax of the non-pad positions (int64 [b])
            tape.save(tape.new(b, "int64", False), "pooling indices")
        pooled = tape.new(b * labels, every.dtype, every.rg)
    else:  # BERT: pooler dense + tanh + dropout + classifier; RoBERTa: dropout + dense + tanh + dropout + out_proj
        p = ctx.model_dropout(spec.hidden_dropout)
        first = _rows(x, b * spec.hidden)  # hidden[:, 0]: a view of the [n, d] storage
        deberta = spec.disentangled
        if spec.model_type == "roberta":
            first = ops.dropout(tape, first, p)
        elif deberta is not None:  # ContextPooler's dropout (pooler_dropout: not a dropout --model-dropout sets)
            first = ops.dropout(tape, first, deberta.pooler_dropout)
            if deberta.cls_dropout is not None:
                p = deberta.cls_dropout
        if first.sid == x.sid and heads[0] in trains:
            tape.save(x, "linear inputs")  # a saved view keeps its whole storage
        h = _linear(ctx, first, heads[0], heads[0] in trains)
        h = ops.gelu(tape, h) if deberta is not None else ops.tanh(tape, h)  # gelu saves its input, tanh its output
        h = ops.dropout(tape, h, p)
        pooled = _linear(ctx, h, heads[1], heads[1] in trains)
    ctx.logits_bytes = pooled.nbytes
    tape.scope = "loss"
    if labels == 1:  # regression: mse_loss(pooled.squeeze(), labels.squeeze()) saves both
        tape.save(pooled, "loss targets")
        tape.save(tape.new(b, pooled.dtype, False), "loss targets")
        ctx.loss_copy_bytes, ctx.log_softmax_bytes = 0, 0
    else:
        ctx.loss_copy_bytes = ops.cross_entropy(tape, pooled, tape.new(b, "int64", False), upcast=False)
        ctx.log_softmax_bytes = tape.saved[("loss", "log-softmax output")]
    ctx.method.after_loss(ctx)


def _rows(x, numel: int):
    """A view of x's storage holding `numel` of its elements (a slice such as hidden[:, 0])."""
    return Tensor(numel, x.dtype, x.rg, x.sid)
