"""What the estimator is asked about: a model's shapes and one training run's settings.

Both are frozen dataclasses validated on construction; nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .attention_kernels import ATTENTIONS, ATTENTION_SPELLINGS, canonical_attention  # noqa: F401
from .errors import LoraCostError


@dataclass(frozen=True)
class LinearSite:
    """One linear layer inside a transformer block, named as peft's `target_modules` names it."""

    name: str  # module name, e.g. "q_proj", "c_attn", "query"
    d_in: int
    d_out: int
    bias: bool
    fan_in_fan_out: bool = False  # weight stored [d_in, d_out] (GPT-2's Conv1D), as peft's LoraConfig names it
    # the module's path inside its block where the name alone is ambiguous (GPT-2's "attn.c_proj" and
    # "mlp.c_proj"); a target with a dot matches it as peft matches module keys: equal or a "."-suffix
    path: str = ""
    # how many blocks hold this linear; 0: every block (T5's cross-attention: the decoder's blocks only)
    blocks: int = 0
    # False: kept out of 4-bit quantisation and in fp32 under QLoRA (transformers' `_keep_in_fp32_modules`,
    # which the bnb quantiser adds to modules_to_not_convert: T5's wo)
    quantised: bool = True
    # moeexperts: E >= 1 for a parameter peft adapts through `lora.ParamWrapper` (target_parameters): a 3-D expert
    # stack [E, d_out, d_in] (transformers' fused MoE experts), or E = 1 for a 2-D one (the MoE router's weight); its
    # lora_A is one nn.Linear(d_in, E r) and its lora_B one nn.Linear(E r, d_out) (peft tuners/lora/layer.py
    # ParamWrapper.update_layer). 0: an nn.Linear
    experts: int = 0
    # False: peft's `all-linear` does not reach it (a parameter named only through target_parameters: the fused
    # experts.gate_up_proj, which all-linear reaches as the v4 gate and up projections at rank 2r instead)
    all_linear: bool = True

    def matches(self, target: str) -> bool:
        """peft's `target_modules` rule for one name: the module name, or a dotted suffix of its path."""
        return target == self.name or bool(self.path) and (self.path == target or self.path.endswith("." + target))


@dataclass(frozen=True)
class DisentangledShape:
    """DeBERTa-v2/v3's disentangled attention (transformers modeling_deberta_v2.py): relative position
    embeddings of `span` x 2 rows (position_buckets, else max_relative_positions), content-to-position
    (`c2p`) and position-to-content (`p2c`) scores, the position projections shared with key_proj and
    query_proj (`share_att_key`) or their own, a LayerNorm on the table (`norm_rel_ebd`), and the
    convolution after the first layer (`conv_kernel`, 0: none; DeBERTa-v2 xlarge/xxlarge)."""

    relative: bool
    span: int
    c2p: bool
    p2c: bool
    share_att_key: bool
    norm_rel_ebd: bool
    position_biased_input: bool
    conv_kernel: int = 0
    conv_groups: int = 1
    conv_act: str = "tanh"
    pooler_dropout: float = 0.0
    cls_dropout: float | None = None


@dataclass(frozen=True)
class MoeShape:
    """A mixture-of-experts feed-forward (Mixtral, Qwen3-MoE): `experts` SwiGLU experts of width
    `expert_intermediate`, each token routed to `top_k` of them by a linear router; `dense_layers` lists the
    blocks that keep a plain MLP instead (Qwen3-MoE's mlp_only_layers / decoder_sparse_step)."""

    experts: int
    top_k: int
    expert_intermediate: int
    norm_topk: bool  # the top-k routing weights are renormalised to sum to one (an in-place division)
    dense_layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    """A model's shapes, read from a bundled profile or a Hugging Face config.json."""

    name: str
    family: str  # registered architecture name: gpt2, gpt3, llama, roberta
    model_type: str  # the config's model_type (llama, mistral, qwen2, gpt2, roberta, bert, gpt3)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int
    tie_embeddings: bool
    qkv_bias: bool = False
    mlp_bias: bool = False
    hidden_dropout: float = 0.0  # dropout on the residual branches (GPT-2 resid_pdrop, BERT hidden_dropout_prob)
    attention_dropout: float = 0.0  # dropout on the attention probabilities
    embedding_dropout: float = 0.0
    type_vocab_size: int = 0  # BERT/RoBERTa token-type embeddings
    sliding_window: int | None = None  # Mistral: a mask is built (and sdpa loses its fast path) past this length
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head's queries and keys before RoPE
    rotary_dim: int = 0  # head dimensions RoPE rotates (Phi-3's partial_rotary_factor); 0: the whole head
    # Gemma 2/3: each layer's attention kind ("sliding" or "full", config `layer_types`), tanh soft-capping
    # of the attention scores (Gemma 2 `attn_logit_softcapping`) and of the logits (`final_logit_softcapping`)
    layer_kinds: tuple[str, ...] | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    # encoder-decoder models (T5): the decoder's blocks, counted within `layers` (the encoder has the rest)
    decoder_layers: int = 0
    relative_attention_buckets: int = 0  # T5's relative position bias (one table per stack)
    ffn_activation: str = ""  # T5: the feed-forward activation (relu, gelu_new, ...); "" : the family's own
    gated_ffn: bool = False  # T5 v1.1 / flan / mT5: wi_0 and wi_1, the activation of one times the other
    source: str = ""
    moe: MoeShape | None = None  # mixture-of-experts models only
    # --- families task: DeBERTa-v2/v3 only
    disentangled: DisentangledShape | None = None

    def __post_init__(self) -> None:
        for attr in ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
            if getattr(self, attr) <= 0:
                raise LoraCostError(f"model {self.name}: {attr} must be positive, got {getattr(self, attr)}")
        if self.heads % self.kv_heads:
            raise LoraCostError(f"model {self.name}: {self.heads} attention heads are not a multiple of {self.kv_heads} key/value heads")


# Upper bounds of a run's sizes, far above any single training step people run; past them the
# numbers stop describing a step that could be taken (and a plan's bisection stays short).
MAX_BATCH = 1 << 30  # sequences per step
MAX_SEQ = 1 << 30  # tokens per sequence: the longest published contexts hold 10M tokens
MAX_RANK = 1 << 20  # an adapter's rank: at most a matrix side, and config widths stop at 2**20 (architectures/base.py)


def _bounded_int(flag: str, value: object, maximum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= maximum:
        raise LoraCostError(f"{flag} must be a positive integer of at most {maximum:,}, got {value!r}")


def _probability(flag: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:  # NaN fails too
        raise LoraCostError(f"{flag} must be in [0, 1), got {value!r}")


PRECISIONS = ("fp32", "bf16", "fp16", "amp-bf16", "amp-fp16")
# --task: what the model's head and loss are (None: the family's own, causal-lm or masked-lm)
TASKS = ("causal-lm", "masked-lm", "seq2seq", "seq-cls", "token-cls")
CLASSIFICATION_TASKS = ("seq-cls", "token-cls")
MAX_LABELS = 1 << 20
MASTER_WEIGHTS = (None, "fp32")  # task "optim": --master-weights


# -- lossdtype: --loss and --adapter-dtype values
LOSSES = ("standard", "liger", "chunked")
# torchtune's CEWithChunkedOutputLoss(num_output_chunks=8) (torchtune/modules/loss/ce_chunked_output_loss.py)
DEFAULT_LOSS_CHUNKS = 8
MAX_LOSS_CHUNKS = 1 << 20
ADAPTER_DTYPES = ("fp32", "bf16", "fp16")


def parse_loss(value: object) -> str:
    """`standard`, `liger`, `chunked` or `chunked:N` -> its normal form (`chunked:8` for `chunked`)."""
    if not isinstance(value, str):
        raise LoraCostError(f"--loss must be one of standard, liger, chunked[:N], got {value!r}")
    kind, _, n = value.strip().lower().partition(":")
    if kind not in LOSSES or (n and kind != "chunked"):
        raise LoraCostError(f"unknown --loss {value!r}; choose one of standard, liger, chunked[:N]")
    if kind != "chunked":
        return kind
    if not n:
        return f"chunked:{DEFAULT_LOSS_CHUNKS}"
    if not n.isdigit() or not 1 <= int(n) <= MAX_LOSS_CHUNKS:
        raise LoraCostError(f"--loss chunked:N takes N, a positive integer of at most {MAX_LOSS_CHUNKS:,}, got {n!r}")
    return f"chunked:{int(n)}"


@dataclass(frozen=True)
class RunConfig:
    """One training step's settings. Method-specific options live in `method_options`."""

    method: str = "lora"
    r: int | None = None  # None: the method's default rank
    targets: tuple[str, ...] | None = None  # None: the architecture's query and value projections
    batch: int = 1
    seq: int = 512
    precision: str = "bf16"
    optimizer: str = "adamw"
    grad_checkpointing: bool = False
    attention: str = "sdpa"
    dropout: float = 0.0  # adapter dropout (peft lora_dropout / vera_dropout)
    model_dropout: float | None = None  # override the model's own dropout probabilities (None: the config's)
    method_options: tuple[tuple[str, object], ...] = field(default_factory=tuple)
    target_seq: int | None = None  # encoder-decoder models: the decoder's length (None: `seq`)
    # mixture of experts: the busiest expert receives this many times its balanced share n*k/E (>= 1;
    # None: balanced routing, the default assumption); only mixture-of-experts models take it
    moe_imbalance: float | None = None
    task: str | None = None  # None: the family's default task (causal-lm for decoders, masked-lm for BERT/RoBERTa)
    num_labels: int | None = None  # seq-cls / token-cls only (None: 2, transformers' default)
    # --- task "attention": padding-free packing (--packing: the --batch sequences of --seq tokens flattened
    # into one row with restarting position_ids, as DataCollatorWithFlattening / TRL packing do)
    packing: bool = False
    # -- task allocator: the caching allocator's settings and paged optimizer state --------------
    alloc_conf: str | None = None  # PYTORCH_CUDA_ALLOC_CONF text (None: PyTorch's defaults)
    paged_evictable: bool = False  # paged optimizer state may be evicted to the host (not counted on the GPU)
    # -- task "sharding": several GPUs (analytic/sharding/config.py ShardingSpec; None: one GPU, nothing changes)
    sharding: "ShardingSpec | None" = None  # noqa: F821 (a torch-free frozen dataclass, imported where used)
    # --- task "optim" (issue 9, Optimizers): lora_cost/analytic/optimizer_budget.py ---
    master_weights: str | None = None  # "fp32": the optimizer keeps fp32 master copies of 16-bit trainable weights
    optimizer_in_backward: bool = False  # each tensor stepped, its gradient freed, as soon as it is accumulated
    # -- lossdtype (issue 9: losses, adapter dtypes) --
    # the causal-LM loss: "standard" (transformers' ForCausalLMLoss on full logits), "liger" (Liger's fused
    # linear cross-entropy) or "chunked:N" (torchtune's CEWithChunkedOutputLoss over N chunks); see
    # lora_cost/analytic/losses.py. Given as "chunked" it is normalised to "chunked:8".
    loss: str = "standard"
    # the adapters' parameter dtype (None: peft's default, fp32 via autocast_adapter_dtype=True)
    adapter_dtype: str | None = None
    # peft modules_to_save on a causal LM ("embed_tokens", "lm_head"): trained copies (analytic/modules_to_save.py)
    modules_to_save: tuple[str, ...] | None = None
    # -- ligerkernels (issue 9: Liger's block kernels; analytic/liger.py) --
    # the kernels swapped in as Trainer's use_liger_kernel does: some of "rms_norm", "rope", "swiglu" (canonical
    # order; the fused linear cross-entropy is `loss="liger"`)
    liger_kernels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _bounded_int("--batch", self.batch, MAX_BATCH)
        _bounded_int("--seq", self.seq, MAX_SEQ)
        if self.target_seq is not None:
            _bounded_int("--target-seq", self.target_seq, MAX_SEQ)
        if self.r is not None:
            _bounded_int("--r", self.r, MAX_RANK)
        if self.precision not in PRECISIONS:
            raise LoraCostError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        object.__setattr__(self, "attention", canonical_attention(self.attention))  # transformers' spellings too
        if not isinstance(self.packing, bool):
            raise LoraCostError(f"--packing is a flag (true or false), got {self.packing!r}")
        _probability("--dropout", self.dropout)
        if self.model_dropout is not None:
            _probability("--model-dropout", self.model_dropout)
        if self.moe_imbalance is not None:
            v = self.moe_imbalance
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 1.0 <= v <= 1e6:  # NaN fails too
                raise LoraCostError(f"--moe-imbalance must be a number from 1 (balanced routing) to 1,000,000, got {v!r}")
        if self.task is not None and self.task not in TASKS:
            raise LoraCostError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.num_labels is not None:
            if self.task not in CLASSIFICATION_TASKS:
                raise LoraCostError("--num-labels applies only to --task seq-cls or token-cls")
            _bounded_int("--num-labels", self.num_labels, MAX_LABELS)
        if self.alloc_conf is not None:
            from .analytic.allocator.config import parse_alloc_conf
            parse_alloc_conf(self.alloc_conf)  # LoraCostError naming the bad option
        if self.master_weights not in MASTER_WEIGHTS:  # task "optim"
            raise LoraCostError(f"unknown --master-weights {self.master_weights!r}; choose fp32 (or leave it unset)")
        if not isinstance(self.optimizer_in_backward, bool):
            raise LoraCostError(f"--optimizer-in-backward is a flag, got {self.optimizer_in_backward!r}")
        object.__setattr__(self, "loss", parse_loss(self.loss))  # lossdtype
        if self.modules_to_save is not None:
            from .analytic.modules_to_save import parse_modules
            object.__setattr__(self, "modules_to_save", parse_modules(self.modules_to_save))
        if self.adapter_dtype is not None and self.adapter_dtype not in ADAPTER_DTYPES:
            raise LoraCostError(f"unknown --adapter-dtype {self.adapter_dtype!r}; choose one of {', '.join(ADAPTER_DTYPES)}")
        if self.liger_kernels:  # ligerkernels
            from .analytic.liger import parse_liger_kernels
            kernels, fused = parse_liger_kernels(self.liger_kernels)
            if fused:
                raise LoraCostError("RunConfig.liger_kernels holds the block kernels; the fused linear cross-entropy "
                                    "is loss='liger'")
            object.__setattr__(self, "liger_kernels", kernels)

    @property
    def loss_kind(self) -> str:
        """standard, liger or chunked (lossdtype)."""
        return self.loss.split(":")[0]

    @property
    def loss_chunks(self) -> int:
        """chunked:N's N (1 for the other losses)."""
        return int(self.loss.split(":")[1]) if self.loss.startswith("chunked:") else 1

    @property
    def labels(self) -> int:
        """Classes of a classification head (transformers' default num_labels is 2)."""
        return self.num_labels or 2

    def option(self, key: str, default: object = None) -> object:
        return dict(self.method_options).get(key, default)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def decoder_seq(self) -> int:
        """An encoder-decoder model's decoder length (`--target-seq`, default `--seq`)."""
        return self.seq if self.target_seq is None else self.target_seq

    @property
    def weight_dtype(self) -> str:
        """Dtype of the base weights as stored (AMP keeps fp32 master weights)."""
        return {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "amp-bf16": "fp32", "amp-fp16": "fp32"}[self.precision]

    @property
    def autocast_dtype(self) -> str | None:
        return {"amp-bf16": "bf16", "amp-fp16": "fp16"}.get(self.precision)
