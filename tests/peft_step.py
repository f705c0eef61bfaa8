"""One real training step of a tiny transformers (+ peft) model on the CPU, measured: the bytes autograd
saves (`saved_tensors_hooks`, distinct storages, parameters and buffers excluded, as
tests/test_saved_vs_torch.py counts them) and the FLOPs `FlopCounterMode` counts, forward and backward;
and the analytic estimate of the same step. Eager attention, fp32, no dropout. Used by the per-family
tests (tests/test_phi3.py, tests/test_bloom.py)."""

import json

import torch
import transformers
import peft
from torch.utils.flop_counter import FlopCounterMode

from lora_cost import estimate

B, S = 2, 24
DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout", "attention_dropout", "hidden_dropout_prob",
                "attention_probs_dropout_prob")


def adapt(model, method: str, targets, r: int, ckpt: bool, task_type: str | None = None):
    """The recipe both engines model, applied to a real model: peft's adapter (`targets` for IA3 is
    (target_modules, feedforward_modules)), LoRA-FA's frozen A, non-reentrant checkpointing, train mode."""
    if method != "full":
        tg = "all-linear" if targets == "all-linear" else list(targets)
        if method == "ia3":
            conf = peft.IA3Config(target_modules=list(targets[0]), feedforward_modules=list(targets[1]))
        elif method == "vera":
            conf = peft.VeraConfig(r=r, target_modules=tg, task_type=task_type)
        else:
            conf = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=tg, use_dora=method == "dora",
                                   task_type=task_type)
        model = peft.get_peft_model(model, conf)
        if method == "lora-fa":
            for name, p in model.named_parameters():
                if "lora_A" in name:
                    p.requires_grad_(False)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method != "full":
            model.enable_input_require_grads()
    model.train()
    return model


class SavedBytes:
    """`with SavedBytes(model) as saved:` counts the distinct storages autograd saves inside the block
    (parameters and buffers excluded) in `saved.bytes`. keep_alive: no packed storage is freed, so no
    address is reused and counted once for two."""

    def __init__(self, model, keep_alive: bool = False) -> None:
        self.excluded = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.excluded |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        self.seen: dict[int, int] = {}
        self.alive = []
        self.keep_alive = keep_alive
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.excluded and ptr not in self.seen:
            self.seen[ptr] = t.untyped_storage().nbytes()
            if self.keep_alive:
                self.alive.append(t)
        return t

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())

    def __enter__(self) -> "SavedBytes":
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)


def saved_under_amp_bf16(model, vocab_size: int, batch: int, seq: int) -> int:
    """The bytes autograd saves in one causal-LM step of `model` under the trace's emulation of CUDA's bf16
    autocast (lora_cost.trace.autocast.CudaAutocast: CPU autocast casts by other op lists), every saved storage
    kept alive."""
    from lora_cost.trace.autocast import CudaAutocast

    ids = torch.randint(2, vocab_size, (batch, seq))
    autocast = CudaAutocast(torch.bfloat16)
    with SavedBytes(model, keep_alive=True) as saved:
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        autocast.end_forward()
        loss.backward()
    return saved.bytes

def measure(cfg: dict, method: str, targets, r: int, ckpt: bool, keep_alive: bool = False,
            auto_class: str = "AutoModelForCausalLM") -> tuple[int, int, int]:
    """(saved-activation bytes, forward FLOPs, backward FLOPs) of one step of the real model
    (`auto_class`: the transformers class of the task, AutoModelForMaskedLM for encoders)."""
    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    kwargs.update({k: 0.0 for k in DROPOUT_KEYS})
    config = transformers.AutoConfig.for_model(cfg["model_type"], **kwargs)
    config.use_cache = False
    torch.manual_seed(0)
    model = getattr(transformers, auto_class).from_config(config, attn_implementation="eager", dtype=torch.float32)
    model = adapt(model, method, targets, r, ckpt)

    ids = torch.randint(2, cfg["vocab_size"], (B, S))
    with SavedBytes(model, keep_alive) as saved:
        model(input_ids=ids, labels=ids).loss.backward()
    with FlopCounterMode(display=False) as fwd:
        loss = model(input_ids=ids, labels=ids).loss
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    return saved.bytes, fwd.get_total_flops(), bwd.get_total_flops()


def estimated(tmp_path, cfg: dict, method: str, targets, r: int, ckpt: bool) -> tuple[int, int, int]:
    """The analytic engine's (saved-activation bytes, forward FLOPs, backward FLOPs) of the same step."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    kw = dict(batch=B, seq=S, precision="fp32", attention="eager", model_dropout=0.0, grad_checkpointing=ckpt)
    if method not in ("full", "ia3"):  # (IA)3 here: peft's default targets
        kw.update(r=r, targets=",".join(targets) if isinstance(targets, tuple) else targets)
    e = estimate(str(path), method, **kw)
    return e.memory.saved_activation_bytes, e.flops.forward, e.flops.backward


def meta_model(cfg: dict, auto_class: str = "AutoModelForCausalLM"):
    """The transformers model of a config.json dict, on the meta device (no memory)."""
    cfg = dict(cfg)
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        return getattr(transformers, auto_class).from_config(config)


TASK_CLASSES = {"masked-lm": "AutoModelForMaskedLM", "seq-cls": "AutoModelForSequenceClassification",
                "token-cls": "AutoModelForTokenClassification"}


def measure_task(cfg: dict, method: str, targets, r: int, ckpt: bool, task: str = "masked-lm", labels: int = 3):
    """(saved bytes, forward FLOPs, backward FLOPs) of one real step of the tiny model with the task's head: the
    masked-LM head, or a classifier (`labels` classes) that peft trains as modules_to_save (task_type)."""
    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    kwargs.update({k: 0.0 for k in DROPOUT_KEYS + ("classifier_dropout",)})
    config = transformers.AutoConfig.for_model(cfg["model_type"], **kwargs)
    if task != "masked-lm":  # as the trace engine builds a classifier (lora_cost/trace/build.py hf_config)
        config.num_labels = labels
        if task == "seq-cls":
            config.problem_type = "single_label_classification"
            if config.pad_token_id is None:  # decoders pool the last non-pad token (trace/build.py hf_config)
                eos = getattr(config, "eos_token_id", None)
                config.pad_token_id = eos if isinstance(eos, int) else 0
    torch.manual_seed(0)
    model = getattr(transformers, TASK_CLASSES[task]).from_config(config, attn_implementation="eager", dtype=torch.float32)
    task_type = {"seq-cls": "SEQ_CLS", "token-cls": "TOKEN_CLS"}.get(task)
    model = adapt(model, method, targets, r, ckpt, task_type)
    ids = torch.randint(2, cfg["vocab_size"], (B, S))
    y = {"masked-lm": ids, "seq-cls": torch.randint(0, labels, (B,)), "token-cls": torch.randint(0, labels, (B, S))}[task]
    with SavedBytes(model) as saved:
        model(input_ids=ids, labels=y).loss.backward()
    with FlopCounterMode(display=False) as fwd:
        loss = model(input_ids=ids, labels=y).loss
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    return saved.bytes, fwd.get_total_flops(), bwd.get_total_flops()
