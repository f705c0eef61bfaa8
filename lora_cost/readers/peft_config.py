"""`--peft-config adapter_config.json`: a peft config (LoraConfig, VeraConfig, AdaLoraConfig, IA3Config,
PromptTuningConfig, PromptEncoderConfig, PrefixTuningConfig) as `PeftConfig.save_pretrained` writes it.

Field meanings follow peft 0.21 (`peft/tuners/lora/config.py` LoraConfig and its siblings):
- `target_modules`: a list is matched by name (or dotted suffix); a string other than "all-linear" is a
  regex peft matches with `re.fullmatch(target_modules, key)` on every module key
  (`peft/tuners/tuners_utils.py` check_target_module_exists), resolved in `regex.py` against the model.
- `r`, `lora_dropout` (VeRA `vera_dropout`), `use_dora` (-> dora), `modules_to_save`, `task_type`.
- No effect on one step's memory or FLOPs: `lora_alpha`, `alpha_pattern`, `use_rslora` (the scale
  lora_alpha/sqrt(r) instead of lora_alpha/r, `LoraLayer.update_layer`), `init_lora_weights` (gaussian,
  PiSSA, OLoRA, LoftQ, EVA, CorDA change the initial values of A, B and possibly W, not their shapes),
  `fan_in_fan_out` (peft reads it from the layer: GPT-2's Conv1D is known to the architecture).
"""

from __future__ import annotations

from .base import Collector, Reading, Setting, load_mapping
from .regex import TargetRegex

# peft_type -> lora-cost method (PeftType in peft/utils/peft_types.py)
PEFT_TYPES = {"LORA": "lora", "VERA": "vera", "ADALORA": "adalora", "IA3": "ia3", "PROMPT_TUNING": "prompt-tuning",
              "P_TUNING": "p-tuning", "PREFIX_TUNING": "prefix-tuning"}
# task_type -> --task (TaskType in peft/utils/peft_types.py)
TASK_TYPES = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "seq-cls", "TOKEN_CLS": "token-cls", "SEQ_2_SEQ_LM": "seq2seq"}
# init_lora_weights values (LoraConfig.init_lora_weights): the same shapes, so the same step cost
INIT_VARIANTS = ("gaussian", "pissa", "olora", "loftq", "eva", "corda", "orthogonal")
# the classification heads peft adds to modules_to_save itself for SEQ_CLS/TOKEN_CLS (PeftModelForSequenceClassification)
TASK_HEADS = ("classifier", "score")

_NO_COST = (  # fields that change no byte and no FLOP of one training step
    "lora_alpha", "alpha_pattern", "use_rslora", "fan_in_fan_out", "inference_mode", "revision", "peft_version",
    "auto_mapping", "base_model_name_or_path", "megatron_config", "megatron_core", "loftq_config", "eva_config",
    "corda_config", "runtime_config", "layer_replication", "use_qalora", "qalora_group_size", "ensure_weight_tying",
    "projection_prng_key", "save_projection", "d_initial", "tinit", "tfinal", "deltaT", "beta1", "beta2",
    "orth_reg_weight", "total_step", "init_ia3_weights", "prompt_tuning_init", "prompt_tuning_init_text",
    "tokenizer_name_or_path", "tokenizer_kwargs", "num_transformer_submodules", "token_dim", "num_attention_heads",
    "num_layers", "encoder_num_layers", "encoder_dropout", "modules_to_save", "trainable_token_indices",
    "lora_ga_config", "target_modules", "exclude_modules", "target_parameters", "bias", "lora_bias")


def read_peft_config(path: str) -> Reading:
    c = Collector(path, load_mapping(path, "a peft adapter_config.json"), "peft config")
    peft_type = c.text("peft_type") or "LORA"
    if peft_type not in PEFT_TYPES:
        raise c.error("peft_type", f"is not a method lora-cost models (it models {', '.join(PEFT_TYPES)})")
    method = PEFT_TYPES[peft_type]
    if peft_type == "LORA" and c.flag("use_dora"):
        method = "dora"
    c.set("method", method, "peft_type" if c.has("peft_type") else "use_dora")
    base = c.text("base_model_name_or_path")
    if base:
        c.model = Setting("model", base, c.origin("base_model_name_or_path"))

    if peft_type == "ADALORA":
        for key in ("init_r", "target_r"):
            if c.has(key):
                c.set(key, c.integer(key), key)
        c.raw("r")  # AdaLoRA's `r` is LoraConfig's unused field (init_r is the rank)
    elif peft_type in ("LORA", "VERA") and c.has("r"):
        c.set("r", c.integer("r"), "r")
    dropout_key = {"LORA": "lora_dropout", "VERA": "vera_dropout", "ADALORA": "lora_dropout"}.get(peft_type)
    if dropout_key and c.has(dropout_key):
        c.set("dropout", c.number(dropout_key), dropout_key)
    if peft_type in ("LORA", "VERA", "ADALORA", "IA3"):
        _targets(c)
    if peft_type == "IA3" and c.has("feedforward_modules"):
        _ia3_feedforward(c)
    if peft_type in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING") and c.has("num_virtual_tokens"):
        c.set("virtual_tokens", c.integer("num_virtual_tokens"), "num_virtual_tokens")
    if peft_type == "P_TUNING":
        if c.has("encoder_hidden_size"):
            c.set("encoder_hidden_size", c.integer("encoder_hidden_size"), "encoder_hidden_size")
        kind = c.text("encoder_reparameterization_type")
        if kind not in (None, "MLP"):
            c.warn("encoder_reparameterization_type", f"{kind} is not modelled (lora-cost models the MLP encoder)")
    if peft_type == "PREFIX_TUNING":
        hidden = c.integer("encoder_hidden_size")
        if c.flag("prefix_projection"):
            c.set("prefix_projection", hidden or 0, "prefix_projection")
            if not hidden:
                c.warn("encoder_hidden_size", "prefix_projection needs encoder_hidden_size (peft's default is the "
                       "token dimension); not given")
    _task(c)
    _lora_extras(c, peft_type)
    c.irrelevant(_NO_COST)
    return c.finish("keys lora-cost does not read (not modelled)")


def _targets(c: Collector) -> None:
    targets = c.names("target_modules")
    if isinstance(targets, str):
        c.set("targets", ("all-linear",) if targets == "all-linear" else TargetRegex(targets), "target_modules")
    elif targets is not None:
        c.set("targets", targets, "target_modules")
    if c.has("exclude_modules"):
        c.names("exclude_modules")
        c.warn("exclude_modules", "not modelled: the estimate adapts every module target_modules names")
    if c.raw("target_parameters"):
        _target_parameters(c)


def _target_parameters(c: Collector) -> None:
    """peft target_parameters (lora.ParamWrapper on nn.Parameters: transformers 5's MoE experts) join the targets
    by their names (`experts.gate_up_proj`, `down_proj`); the router's `gate.weight` is the module `gate`, which
    peft maps to that same parameter at the same rank. Next to a regex target_modules they cannot be listed."""
    given = c.names("target_parameters")
    if isinstance(given, str):
        given = (given,)
    names = tuple(t[:-len(".weight")] if t.endswith(".weight") else t for t in given)
    modules = c.data.get("target_modules")
    if modules is None:
        c.set("targets", names, "target_parameters")
    elif isinstance(modules, list):  # already read as a tuple of names (_targets): one list of both
        listed = next(s.value for s in c.settings if s.target == "targets")
        c.settings = [s for s in c.settings if s.target != "targets"]
        c.set("targets", tuple(dict.fromkeys(listed + names)), "target_parameters")
    else:
        c.warn("target_parameters", "next to a regex or all-linear target_modules, not read: name the modules "
               "and parameters as lists")


def _ia3_feedforward(c: Collector) -> None:
    """lora-cost's (IA)3 scales the input of the targeted modules that are a family's MLP output layer
    (methods/ia3.py feedforward_targets); other feedforward_modules are a warning."""
    from ..analytic.methods.ia3 import feedforward_targets

    given = c.names("feedforward_modules")
    targets = c.data.get("target_modules")
    if isinstance(given, str) or isinstance(targets, str) or targets is None:
        c.warn("feedforward_modules", "as a regex, or without a target list, not read: the estimate scales the "
               "family's MLP output layer's input")
        return
    modelled = set(feedforward_targets(tuple(targets)))
    if set(given) != modelled:
        c.warn("feedforward_modules", f"{sorted(given)} differs from what lora-cost scales by input "
               f"({sorted(modelled) or 'none'}: the MLP output layer among the targets); not modelled")


def _task(c: Collector) -> None:
    task_type = c.text("task_type")
    if task_type is None:
        return
    if task_type in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
        return  # the LM head of a decoder or of T5: the family's own task, as without --task
    if task_type in TASK_TYPES:
        c.set("task", TASK_TYPES[task_type], "task_type")
    else:
        c.warn("task_type", f"{task_type} is not modelled; the family's own head and loss are estimated")


def _lora_extras(c: Collector, peft_type: str) -> None:
    saved = c.names("modules_to_save")
    if isinstance(saved, str):
        saved = (saved,)
    if saved:
        # peft adds the classification head itself for SEQ_CLS/TOKEN_CLS: --task counts that one
        extra = tuple(m for m in saved if not (c.data.get("task_type") in ("SEQ_CLS", "TOKEN_CLS") and m in TASK_HEADS))
        if extra:
            c.set("modules_to_save", extra, "modules_to_save")
    layers = c.raw("layers_to_transform")
    if layers not in (None, [], ()):
        if not (isinstance(layers, int) and not isinstance(layers, bool)) and not (
                isinstance(layers, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in layers)):
            raise c.error("layers_to_transform", "must be a layer index or a list of them")
        c.warn("layers_to_transform", "LoRA on a subset of layers is not modelled: the estimate adapts every layer "
               "(an upper bound)")
    c.raw("layers_pattern")
    pattern = c.raw("rank_pattern")
    if pattern:
        if not isinstance(pattern, dict):
            raise c.error("rank_pattern", "must be a mapping of module names to ranks")
        c.warn("rank_pattern", f"per-module ranks are not modelled: the estimate uses r={c.data.get('r', 8)} for "
               f"every module ({len(pattern)} patterns ignored)")
    init = c.raw("init_lora_weights")
    if isinstance(init, str) and not init.startswith(INIT_VARIANTS):
        raise c.error("init_lora_weights", f"must be true, false or one of {', '.join(INIT_VARIANTS)} (peft LoraConfig)")
    if init is not None and not isinstance(init, (bool, str)):
        raise c.error("init_lora_weights", "must be true, false or a string")
    bias = c.text("bias", ("none", "all", "lora_only")) if peft_type in ("LORA", "ADALORA", "VERA") else c.raw("bias")
    if bias in ("all", "lora_only"):
        c.warn("bias", f"bias={bias!r} trains biases too, which is not modelled with {peft_type}")
    if c.raw("lora_bias"):
        c.warn("lora_bias", "a bias on lora_B is not modelled")
