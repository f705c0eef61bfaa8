"""Build the real model and apply the method as a user would, on the meta device (no memory).

transformers builds the model from its config (`AutoModelForCausalLM.from_config`, the masked-LM
class for BERT/RoBERTa) under `torch.device("meta")`; each method applies itself through its trace
hook (`Method.apply_to_model` in lora_cost/analytic/methods/: peft's `get_peft_model` for LoRA,
LoRA-FA, DoRA and VeRA, the reference layers nola.py for NoLA and bottleneck.py for the `adapters` library's
bottleneck adapters, the 4-bit stand-in qlora.py and peft's
`prepare_model_for_kbit_training` for QLoRA). `fake.py` later turns every meta tensor into a fake tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LoraCostError
from ..profiles import find_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MASKED_LM = ("bert", "roberta", "deberta-v2")
SEQ2SEQ = ("t5", "mt5")
# the transformers auto class of each task (--task)
AUTO_CLASSES = {"causal-lm": "AutoModelForCausalLM", "masked-lm": "AutoModelForMaskedLM",
                "seq2seq": "AutoModelForSeq2SeqLM", "seq-cls": "AutoModelForSequenceClassification",
                "token-cls": "AutoModelForTokenClassification"}
# a config's `architectures` entry -> its task (checked in this order: ConditionalGeneration last)
TASK_SUFFIXES = (("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"), ("ForMaskedLM", "masked-lm"),
                 ("ForSequenceClassification", "seq-cls"), ("ForTokenClassification", "token-cls"),
                 ("ForConditionalGeneration", "seq2seq"))


def transformers_knows(model_type: str) -> bool:
    import transformers

    return model_type in transformers.CONFIG_MAPPING


def auto_class_for(model_type: str, task: str):
    """transformers' class for (model_type, task), or None when it has none."""
    import transformers

    mapping = getattr(transformers, AUTO_CLASSES[task])._model_mapping
    try:
        return mapping[transformers.CONFIG_MAPPING[model_type]]
    except (KeyError, ValueError):
        return None


def raw_config(name_or_path: str) -> dict:
    """The config.json fields of a bundled profile or of a local file (the analytic lookup's sources)."""
    return dict(find_config(name_or_path)[1])


def hf_config(cfg: dict, run):
    """A transformers config from the dict, with the run's attention implementation and dropout."""
    import transformers

    cfg = dict(cfg)
    model_type = cfg.pop("model_type")
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype", "auto_map", "quantization_config"):
        cfg.pop(key, None)
    try:
        config = transformers.AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError):
        raise LoraCostError(f"transformers {transformers.__version__} cannot build model_type {model_type!r} "
                            "(it has no config class for it)") from None
    except Exception as exc:  # a field transformers' config class refuses
        raise LoraCostError(f"transformers refused the {model_type} config: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}"[:400]) from None
    config.use_cache = False
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None:
        # the decoder's inputs are the labels shifted right behind this id (T5 `_shift_right`); transformers 5
        # no longer defaults it on the config: the published configs give the pad id, 0
        pad = getattr(config, "pad_token_id", None)
        config.decoder_start_token_id = pad if isinstance(pad, int) else 0
    if run.task in ("seq-cls", "token-cls"):
        config.num_labels = run.labels
        if run.task == "seq-cls":  # as transformers infers it from integer labels (DeBERTa would branch on their values)
            config.problem_type = "regression" if run.labels == 1 else "single_label_classification"
        if run.task == "seq-cls" and getattr(config, "pad_token_id", 0) is None:
            # decoder classifiers pool the last non-pad token and refuse a batch > 1 without a pad id;
            # fine-tuning scripts set it to the eos id (ids are random here: the shapes are what count)
            eos = getattr(config, "eos_token_id", None)
            config.pad_token_id = eos if isinstance(eos, int) else 0
    p = run.model_dropout
    if p is not None:
        for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob",
                    "attention_dropout", "hidden_dropout", "dropout_rate"):
            if hasattr(config, key):
                setattr(config, key, p)
        if run.task in ("seq-cls", "token-cls"):  # the classifier's dropout (read with getattr by every family)
            config.classifier_dropout = p
    return config


@dataclass
class Built:
    model: nn.Module
    adapted: int  # adapted modules
    notes: list


def default_task(model_type: str, config=None) -> str:
    """The family's own task: masked-LM for BERT/RoBERTa, seq2seq for encoder-decoders, else causal-LM."""
    if model_type in MASKED_LM:
        return "masked-lm"
    if model_type in SEQ2SEQ or getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    return "causal-lm"


def build_model(name: str, config, run, notes: list | None = None):
    """The bare transformers model for the run's task on the meta device, in training mode (a family
    without sdpa falls back to its eager attention, said in `notes`)."""
    notes = [] if notes is None else notes
    task = run.task or default_task(config.model_type, config)
    cls = auto_class_for(config.model_type, task)
    if cls is None:
        raise LoraCostError(f"transformers has no {task} model for model_type {config.model_type!r} ({name})")
    with torch.device("meta"):
        try:
            model = cls._from_config(config, dtype=DTYPES[run.weight_dtype],
                                     attn_implementation=_attention(cls, config, run, notes))
        except Exception as exc:  # ValueError, an unsupported attention implementation, a bad shape, ...
            text = str(exc).splitlines()[0] if str(exc) else ""
            if "attention implementation" in text and run.attention != "eager":
                raise LoraCostError(f"transformers has no {run.attention} attention for {type(config).__name__[:-6]} "
                                    f"models ({name}); use --attention eager") from None
            raise LoraCostError(f"transformers cannot build {name}: {type(exc).__name__}: {text}"[:400]) from None
    model.config.use_cache = False
    _use_fused_kernel(model, config, run, name)
    model.train()
    return model


def _use_fused_kernel(model, config, run, name) -> None:
    """flash-attention 2/3 and flex cannot be built on a CPU without flash-attn (transformers checks the
    package): the model is built eager, then switched to the kernel, whose stand-in (kernels.py) runs it."""
    from ..attention_kernels import get_kernel
    kernel = get_kernel(run.attention)
    if not kernel.fused:
        return
    flag = "_supports_flex_attn" if kernel.name == "flex" else "_supports_flash_attn"
    if not getattr(type(model), flag, False):
        raise LoraCostError(f"transformers has no {kernel.name} for {type(config).__name__[:-6]} models ({name}); "
                            "use --attention sdpa or eager")
    from .kernels import install
    install(kernel.name)
    model.config._attn_implementation = kernel.hf_name


def build(spec, cfg: dict, run, method, target_names: tuple[str, ...]) -> Built:
    config = hf_config(cfg, run)
    notes: list[str] = []
    return apply_method(build_model(spec.name, config, run, notes), run, method, target_names, notes)


def apply_method(model, run, method, target_names, notes: list | None = None) -> Built:
    notes = [] if notes is None else notes
    with torch.device("meta"):
        model, adapted = _apply_method(model, run, method, target_names, notes)
    return Built(model=model, adapted=adapted, notes=notes)


def _attention(cls, config, run, notes: list) -> str | None:
    """The run's attention implementation; for `sdpa` (the default) on a model class that cannot run it
    (Gemma 2: `_supports_sdpa = False`, soft-capping), None: transformers' own default, which falls
    back to eager as a user who asks for nothing gets."""
    from ..attention_kernels import is_fused
    if is_fused(run.attention):
        return "eager"  # then switched to the kernel (_use_fused_kernel)
    if run.attention != "sdpa":
        return run.attention
    # an auto class maps the config to its model class; a model class is its own
    model_class = cls._model_mapping.get(type(config), None) if hasattr(cls, "_model_mapping") else cls
    if model_class is not None and not getattr(model_class, "_supports_sdpa", True):
        notes.append(f"{model_class.__name__} cannot run sdpa; transformers runs eager attention")
        return None
    return run.attention


def _apply_method(model, run, method, targets, notes):
    """The method's own trace hook (`Method.apply_to_model`): (model, adapted modules)."""
    if method.apply_to_model is None:
        raise LoraCostError(f"the trace engine cannot apply {method.name}; use --engine analytic")
    return method.apply_to_model(model, run, tuple(targets), notes)
