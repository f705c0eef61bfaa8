"""The trace engine for a family the analytic engine does not know: the real model is the only
description. transformers builds it from the config.json (any model_type it can build), the method
applies itself through its trace hook, peft checks the targets against the real module names, and
the parameter counts, FLOPs and memory all come from the traced step; no ModelSpec is involved.

What needs a ModelSpec elsewhere comes from the model here: the vocabulary (the input embedding's
rows), the position limit (the config's max_position_embeddings / n_positions, when it has one),
the default targets (peft's own per-model_type table, as `get_peft_model` would use it), the task
(the config's `architectures` entry, else the first auto class transformers has for the model_type).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace

from ..errors import LoraCostError
from ..spec import RunConfig

ALL_LINEAR = "all-linear"
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_positions", "n_ctx")


@dataclass(frozen=True)
class TracedModel:
    """The few facts the trace's summary reads from a model (a ModelSpec stands in for known families)."""

    name: str
    model_type: str
    vocab: int
    max_positions: int


def task_of(cfg: dict) -> str:
    """The task a config describes: its `architectures` entry (what the checkpoint was saved as),
    else the first of causal-lm, seq2seq, masked-lm that transformers has a class for."""
    from .build import TASK_SUFFIXES, auto_class_for

    for arch in cfg.get("architectures") or ():
        if isinstance(arch, str):
            for suffix, task in TASK_SUFFIXES:
                if arch.endswith(suffix):
                    return task
    model_type = cfg["model_type"]
    for task in ("causal-lm", "seq2seq", "masked-lm"):
        if auto_class_for(model_type, task):
            return task
    raise LoraCostError(f"transformers has no causal-LM, seq2seq or masked-LM class for model_type {model_type!r}; "
                        "give --task seq-cls or token-cls")


def default_targets(model_type: str, method) -> tuple[str, ...]:
    """peft's per-model_type default target_modules (what `get_peft_model` uses when a LoraConfig has none)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as LORA_DEFAULTS

    found = LORA_DEFAULTS.get(model_type)
    if not found or method.default_targets is not None:  # ia3 and kin need their own peft table and spec
        raise LoraCostError(f"peft has no default target modules for model_type {model_type!r} and {method.name}; "
                            "give --targets (module names) or all-linear")
    return tuple(found)


def resolve_targets(model, run: RunConfig, method) -> tuple[str, ...]:
    """The run's targets against the real model: peft's defaults, all-linear exactly as peft resolves it
    (tuners_utils._maybe_include_all_linear_layers), or the given names, each of which must name a module
    (peft's rule: the module's name, or a dotted suffix of its path)."""
    if not method.takes_targets:
        return ()
    model_type = model.config.model_type
    if run.targets is None:
        return default_targets(model_type, method)
    if tuple(run.targets) == (ALL_LINEAR,):
        import peft
        from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

        task_type = {"seq-cls": "SEQ_CLS", "token-cls": "TOKEN_CLS"}.get(run.task)
        cfg = _maybe_include_all_linear_layers(peft.LoraConfig(target_modules=ALL_LINEAR, task_type=task_type), model)
        names = tuple(sorted({n.rsplit(".", 1)[-1] for n in cfg.target_modules}))
        if not names:
            raise LoraCostError(f"all-linear matches no linear layer in this {model_type} model")
        return names
    modules = [n for n, _ in model.named_modules() if n]
    for t in run.targets:
        if not any(n == t or n.endswith("." + t) for n in modules):
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if n and type(m).__name__ in ("Linear", "Conv1D")})
            shown = ", ".join(leaves[:24]) + (", ..." if len(leaves) > 24 else "")
            raise LoraCostError(f"target module {t!r} matches nothing in this {model_type} model; its linear modules "
                                f"are {shown} (or use all-linear)")
    return tuple(run.targets)


def plan_any(name: str, cfg: dict, method: str, *, targets=None, method_options=None, **kwargs):
    """The run checked as far as it can be without the model: (run, method)."""
    from ..analytic.estimator import validated_method_run
    from ..analytic.optimizers import get_optimizer

    if isinstance(targets, str):
        targets = tuple(targets.split(","))
    run = RunConfig(method=method, targets=tuple(targets) if targets is not None else None,
                    method_options=tuple(sorted((method_options or {}).items())), **kwargs)
    run, m = validated_method_run(run)
    if m.apply_to_model is None:
        raise LoraCostError(f"the trace engine cannot apply {m.name}")
    return replace(run, optimizer=get_optimizer(run.optimizer).name), m


def trace_any(name: str, cfg: dict, method: str = "lora", *, calibration: bool = False, **kwargs):
    """Trace one training step of a model the analytic engine has no family for."""
    from .deps import require

    run, m = plan_any(name, cfg, method, **kwargs)
    require()
    import transformers

    from .build import transformers_knows
    if not transformers_knows(cfg["model_type"]):
        raise LoraCostError(f"{name}: transformers {transformers.__version__} cannot build model_type "
                            f"{cfg['model_type']!r} (no analytic family either)")

    from .build import build_model, hf_config
    from .engine import summarise
    from .step import run_step

    t0 = time.perf_counter()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            task = run.task or task_of(cfg)
            run = replace(run, task=task)
            config = hf_config(cfg, run)
            model = build_model(name, config, run)
            names = resolve_targets(model, run, m)
            from .build import apply_method
            built = apply_method(model, run, m, names)
            vocab = built.model.get_input_embeddings().num_embeddings
            positions = next((getattr(config, k) for k in _POSITION_FIELDS
                              if isinstance(getattr(config, k, None), int)), run.seq)
            info = TracedModel(name=name, model_type=cfg["model_type"], vocab=vocab, max_positions=positions)
            total_params = sum(p.numel() for p in built.model.parameters())
            trainable_params = sum(p.numel() for p in built.model.parameters() if p.requires_grad)
            try:
                rec, _ = run_step(built.model, run, run.optimizer, vocab, calibration=calibration, loop=m.trace_loop)
            except LoraCostError:
                raise
            except Exception as exc:  # a model whose forward fake tensors cannot run (data-dependent shapes, ...)
                raise LoraCostError(f"the trace of {name} ({cfg['model_type']}) failed: {type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''}"[:400]) from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    built.notes.append(f"{cfg['model_type']}: no analytic model; the real {type(model).__name__} is the description "
                       f"(task {task}, targets {', '.join(names) or 'none'})")
    elapsed = time.perf_counter() - t0
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return summarise(info, run, m, names, built, rec, total_params, trainable_params, elapsed, rss)
