"""The context an architecture's forward runs in: the tape, shapes, the method, and how to run a linear."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..attention_kernels import is_fused
from . import ops
from .methods.base import Method
from .methods.storage import BaseStorage
from ..spec import LinearSite, ModelSpec, RunConfig
from .stack import Stack
from .tape import Tape, Tensor


@dataclass
class StepContext:
    """What an architecture's forward needs: the tape, shapes, the method and how to run a linear."""

    tape: Tape
    spec: ModelSpec
    run: RunConfig
    method: Method
    storage: BaseStorage  # how the base weights are stored and run (the method's)
    targets: frozenset[str]
    weight_dtype: str  # dtype the base linear weights compute in
    other_dtype: str  # dtype of embeddings, norms and LM head
    input_requires_grad: bool
    stack: Stack  # the block plan the forward walks
    block_input_bytes: dict[str, int] = field(default_factory=dict)  # scope -> bytes of the block's input
    # tensors passed positionally to every checkpointed block besides the hidden states (GPT-2's eager
    # causal mask): torch.utils.checkpoint keeps them once (one shared tensor)
    checkpoint_extra_bytes: int = 0
    _input_ids: Tensor | None = None
    logits_bytes: int = 0
    loss_copy_bytes: int = 0
    log_softmax_bytes: int = 0
    # logits alive while the loss runs when that differs from `logits_bytes` (the logits kept until the step
    # ends): --loss liger's chunk buffer, --loss chunked's every chunk (freed before backward); None: the same
    loss_logits_bytes: int | None = None
    # task "recast": the token embeddings' and the LM head's dtype (other_dtype unless the QLoRA script recasts them)
    embed_head_dtype: str = ""
    final_norm_saved_bytes: int = 0  # a classifier's: what the head's scope saved before it (heads.py)
    # moments: a trained LM head's gradient summed over --loss chunked's chunks in backward (losses.chunked_loss)
    head_accumulation_bytes: int = 0
    _site_gradients: dict = field(default_factory=dict)  # moments: (site, adapted) -> budget.site_gradient_bytes

    @property
    def base_trainable(self) -> bool:
        return self.method.base_trainable

    @property
    def rank(self) -> int:
        return self.run.r or 0

    @property
    def seq(self) -> int:
        """The length the model runs at: the run's tokens plus any virtual tokens the method prepends."""
        return self.run.seq + self.method.virtual_tokens(self.run)

    @property
    def kv_seq(self) -> int:
        """The keys and values each query attends to: `seq` plus any prefix the method prepends."""
        return self.seq + self.method.extra_keys(self.run)

    def key_values(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """A layer's keys and values as attention sees them (prefix tuning joins its prefix here)."""
        return self.method.key_values(self, k, v)

    @property
    def batch(self) -> int:
        return self.run.batch

    @property
    def tokens(self) -> int:
        """Positions the model computes: batch x `seq`."""
        return self.run.batch * self.seq

    def model_dropout(self, p: float) -> float:
        return self.run.model_dropout if self.run.model_dropout is not None else p

    def stream_input(self, t: Tensor) -> Tensor:
        """`enable_input_require_grads()` (gradient checkpointing with adapters) makes the
        embedding output require grad, so the first block saves like every other one."""
        return t.view(rg=True) if self.input_requires_grad else t

    def input_ids(self) -> Tensor:
        """The [b, s] int64 token ids the step is called with (embeddings and an MLM loss share them)."""
        if self._input_ids is None:
            self._input_ids = self.tape.new(self.run.tokens, "int64", False)
        return self._input_ids

    @property
    def head_trainable(self) -> bool:
        """The LM head's weight trains: full fine-tuning, or peft's trained copy (--modules-to-save lm_head)."""
        return self.base_trainable or bool(self.run.modules_to_save and "lm_head" in self.run.modules_to_save)

    def embedding(self, rows: int | None, width: int) -> Tensor:
        """Look up `rows` new int64 indices (position or token-type ids), or the input ids when None."""
        indices = self.input_ids() if rows is None else self.tape.new(rows, "int64", False)
        trains = self.base_trainable or (rows is None and bool(self.run.modules_to_save)
                                         and "embed_tokens" in self.run.modules_to_save)
        dtype = self.embed_head_dtype if rows is None and self.embed_head_dtype else self.other_dtype  # recast: token ids'
        return ops.embedding(self.tape, indices, width, w_trainable=trains, w_dtype=dtype)

    def word_embeddings(self, width: int) -> Tensor:
        """The token embeddings of the input ids, as the method hands them to the first block (prompt
        tuning prepends its virtual tokens here)."""
        return self.method.input_embeddings(self, self.embedding(None, width))

    def layer_norm(self, x: Tensor, width: int) -> Tensor:
        return ops.layer_norm(self.tape, x, width, w_trainable=self.base_trainable, b_trainable=self.method.trains_biases)

    def rms_norm(self, x: Tensor, width: int) -> Tensor:
        if "rms_norm" in self.run.liger_kernels:  # ligerkernels: LigerRMSNormFunction (liger.py)
            from .liger import rms_norm
            return rms_norm(self.tape, x, width, w_trainable=self.base_trainable)
        return ops.rms_norm(self.tape, x, width, w_trainable=self.base_trainable, w_dtype=self.other_dtype)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, shape, **kwargs) -> Tensor:
        """The attention core, as the method runs it (prefix tuning extends the keys and values).
        A fused kernel (flash-attention 2/3, flex) replaces whatever path the family would take with sdpa
        or eager; fp32 inputs reach flash cast to the compute dtype (transformers `get_target_dtype`:
        autocast's, else the model's 16-bit dtype; a QLoRA model's `config.dtype`)."""
        if is_fused(self.run.attention):
            kwargs.update(implementation=self.run.attention, cast_to=self.tape.autocast or self.run.weight_dtype,
                          documents=self.run.batch if self.run.packing else None)
        return self.method.attention(self, q, k, v, shape, **kwargs)

    @property
    def position_rows(self) -> int:
        """Rows of the rotary cos/sin tables: position_ids are [1, s] (shared by the batch), or with
        --packing [1, batch x s] (the flattened row restarts its positions at each sequence)."""
        return self.tokens if self.run.packing else self.seq

    def residual(self, point: str, out: Tensor, x: Tensor, norm=None) -> Tensor:
        """A sublayer's output `out` joining the residual stream `x` at `point` ("attention" or "ffn"),
        followed by `norm` in post-norm models: where bottleneck adapters insert themselves."""
        return self.method.residual(self, point, out, x, norm)

    def base_linear(self, x: Tensor, site: LinearSite) -> Tensor:
        return self.storage.linear(self, x, site)

    def is_target(self, site: LinearSite) -> bool:
        """Whether the method adapts this linear: named by a target, or matched by a dotted target suffix."""
        return not self.base_trainable and (site.name in self.targets or any(site.matches(t) for t in self.targets))

    def linear(self, x: Tensor, site: LinearSite) -> Tensor:
        adapted = self.is_target(site)
        if adapted or self.base_trainable:  # moments: when this linear's trainable tensors are first used
            key = (site, adapted)
            nbytes = self._site_gradients.get(key)
            if nbytes is None:
                from .budget import site_gradient_bytes
                nbytes = self._site_gradients[key] = site_gradient_bytes(self.spec, self.method, self.run, site, adapted)
            self.tape.trainable_used(nbytes)
        if adapted:
            return self.method.adapted_linear(self, x, site)
        return self.base_linear(x, site)

    def head_site_linear(self, x: Tensor, site: LinearSite) -> Tensor:
        """A linear outside the blocks (RoBERTa's lm_head.dense): quantised under QLoRA like the
        block linears (bitsandbytes skips only the output embedding), adapted when targeted by name."""
        return self.linear(x, site)

    def blocks(self, x: Tensor, builders: dict, kinds=None) -> Tensor:
        """Run the stack's simulated blocks in layer order (stack.py: the first and the second block
        of each kind; the later ones repeat the second). `builders` maps a kind to its block forward;
        `kinds` (default: all) runs only those kinds' blocks (T5: the encoder, then the decoder)."""
        if not self.run.grad_checkpointing:
            self.tape.repeated_scopes = frozenset(s for s, n in self.stack.repetitions.items() if n > 1)
            self.tape.block_scopes = frozenset(self.stack.block_scopes)
        else:  # ligeracc: the checkpoint drops the blocks' saves and keeps each block's input (tape.hold)
            self.tape.checkpointed_scopes = frozenset(self.stack.block_scopes)
        for _, kind, scope in self.stack.simulated:
            if kinds is not None and kind not in kinds:
                continue
            self.tape.scope = scope
            self.block_input_bytes[scope] = x.nbytes
            if self.run.grad_checkpointing:
                self.tape.hold(x)
            x = builders[kind](x)
        return x

    def lm_head_and_loss(self, x: Tensor, *, upcast: bool, shifted_labels: bool = True,
                         softcap: bool = False, label_tokens: int | None = None) -> None:
        """The LM head and the loss. Causal-LM labels are padded and shifted (a new int64 tensor);
        a masked-LM loss reads the labels tensor itself (here the input ids); a seq2seq loss reads
        `label_tokens` labels of its own (the decoder's positions). `softcap`: the logits pass through
        cap * tanh(logits / cap) first (Gemma 2's final_logit_softcapping), whose tanh output is saved
        and whose head output and quotient briefly coexist. A decoder's --task seq-cls or token-cls runs
        its classifier instead (heads.py)."""
        if self.run.task in ("seq-cls", "token-cls"):
            from .heads import classifier_and_loss, decoder_token_head
            dropout, upcast = decoder_token_head(self.spec)
            classifier_and_loss(self, x, token_dropout=self.model_dropout(dropout), upcast_tokens=upcast)
            return
        if self.run.loss_kind != "standard":  # --loss liger | chunked (losses.py)
            from .losses import loss_and_head
            loss_and_head(self, x)
            return
        tape = self.tape
        tape.scope = "head"
        logits = ops.linear(tape, x, self.spec.hidden, self.spec.vocab, w_trainable=self.head_trainable,
                            w_dtype=self.embed_head_dtype or self.other_dtype, kind="lm_head")
        if softcap:
            tape.transient(2 * logits.nbytes)  # the head output and logits / cap, before tanh
            logits = ops.tanh_softcap(tape, logits)
        self.logits_bytes = logits.nbytes
        tape.scope = "loss"
        if label_tokens is not None:
            targets = tape.new(label_tokens, "int64", False)
        else:
            targets = tape.new(self.tokens, "int64", False) if shifted_labels else self.input_ids()
        self.loss_copy_bytes = ops.cross_entropy(tape, logits, targets, upcast=upcast)
        self.log_softmax_bytes = tape.saved[("loss", "log-softmax output")]
        self.method.after_loss(self)  # still the "loss" scope




def make_context(tape: Tape, spec: ModelSpec, run: RunConfig, method: Method, targets: frozenset[str],
                 stack: Stack) -> StepContext:
    """The dtypes follow the method's storage of the base weights (QLoRA: 4-bit linears computing in
    bf16 or fp16, every other parameter fp32; otherwise all weights share the run's dtype)."""
    storage = method.storage(run)
    return StepContext(tape=tape, spec=spec, run=run, method=method, storage=storage, targets=targets,
                       weight_dtype=storage.linear_dtype, other_dtype=storage.other_dtype,
                       embed_head_dtype=storage.embed_head_dtype,
                       input_requires_grad=run.grad_checkpointing and not method.base_trainable, stack=stack)
