"""Liger-Kernel's swaps of a model's RMSNorm, RoPE and SwiGLU (`--liger`, `--liger-kernels`), on the tape.

Trainer's `use_liger_kernel=True` (transformers integrations/liger.py `apply_liger_kernel`) calls
`liger_kernel.transformers._apply_liger_kernel_to_instance(model=<the peft-unwrapped model>, **liger_kernel_config)`,
which runs the family's `apply_liger_kernel_to_<model_type>` (liger_kernel 0.8.5 transformers/monkey_patch.py,
MODEL_TYPE_TO_APPLY_LIGER_FN) with its defaults: for llama, mistral, qwen2, qwen3 and phi3 `rope=True, rms_norm=True,
swiglu=True, fused_linear_cross_entropy=True, cross_entropy=False`. On the instance it binds `LigerRMSNorm.forward`
to `base_model.norm` and every layer's `input_layernorm`, `post_attention_layernorm` (Qwen3 also
`self_attn.q_norm`, `k_norm`) (`_patch_rms_norm_module`, casting_mode "llama", in_place=True), binds
`LigerSwiGLUMLP.forward` to every layer's `mlp` (`_patch_swiglu_module`; Phi-3: `LigerPhi3SwiGLUMLP.forward`, which
chunks the fused gate_up_proj output into two views that `@ensure_contiguous` copies), and replaces the module's
`apply_rotary_pos_emb` by `liger_rotary_pos_emb`. The fused loss is `--loss liger` (analytic/losses.py).

What each kernel's autograd Function allocates and keeps (ops/rms_norm.py, ops/swiglu.py, ops/rope.py):

- `LigerRMSNormFunction` (`@ensure_contiguous`; `rms_norm_forward`): `Y = torch.empty((n_rows, n_cols),
  dtype=X.dtype)`, `RSTD = torch.empty(n_rows, dtype=torch.float32)` (llama casting mode), then
  `ctx.save_for_backward(X, W, RSTD)`: the input itself (no fp32 copy of it, unlike transformers' LlamaRMSNorm
  whose `hidden_states.to(torch.float32)` is a saved copy), the weight (a parameter) and the fp32 [rows] rstd.
  The output keeps the input's dtype. Backward (`rms_norm_backward`, in_place=True): `dX = dY` (written in
  place), and when the weight trains `_dW = torch.empty((sm_count, n_cols), dtype=torch.float32)` summed to
  `dW`.
- `LigerSiLUMulFunction` (`@ensure_contiguous`; `swiglu_forward`): `c = torch.empty_like(a)`,
  `ctx.save_for_backward(a, b)`: the gate and up outputs; silu(a) is recomputed in backward, which writes the
  gradients into a and b in place (`swiglu_backward` returns `a.view(...)`, `b.view(...)`).
- `LigerRopeFunction` (`rope_forward`): `q.transpose(1, 2)` and `.contiguous()` (a no-op on transformers'
  `view(...).transpose(1, 2)` of a projection's output; a copy of Phi-3's slices of the fused qkv_proj), the Triton kernel rotates q and k in place, and
  `ctx.save_for_backward(cos, sin)`: the shared tables. No new q or k (transformers' version makes
  q*cos, rotate_half(q), its product with sin and the sum). Both q and k leave the Function requiring grad when
  either entered it so (autograd marks every output of an executable Function).

FLOPs: these kernels do elementwise work only, which FlopCounterMode (the convention here) does not count: the
step's FLOPs do not change.
"""

from __future__ import annotations

from ..errors import LoraCostError
from ..spec import ModelSpec, RunConfig
from .tape import Tape, Tensor

# the block kernels Liger swaps (the fused linear cross-entropy is `--loss liger`); swiglu and geglu both name the
# gated MLP's kernel, and the family's own is used (Gemma's MLP is GEGLU: apply_liger_kernel_to_gemma2/gemma3_text
# take `geglu`, the others `swiglu`)
BLOCK_KERNELS = ("rms_norm", "rope", "swiglu", "geglu")
DEFAULT_KERNELS = ("rms_norm", "rope", "swiglu")  # 'all' (Trainer's use_liger_kernel): the MLP kernel is the family's
FUSED_LOSS = "fused_linear_cross_entropy"
KERNEL_NAMES = BLOCK_KERNELS + (FUSED_LOSS,)
# model types whose apply_liger_kernel_to_<type> (monkey_patch.py, 0.8.5) swaps exactly these modules with these
# defaults (rope, rms_norm, swiglu or geglu, fused_linear_cross_entropy True; cross_entropy False), and that this
# tool models
MODELLED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")
GEGLU_TYPES = ("gemma2", "gemma3_text")
# patched by Liger 0.8.5 too, with kernels not modelled here (the MoE experts' LigerExperts)
PATCHED_NOT_MODELLED = ("mixtral", "qwen3_moe")
# rms_norm_backward: `_dW = torch.empty((sm_count, n_cols), dtype=torch.float32)` with sm_count =
# torch.cuda.get_device_properties(...).multi_processor_count: 132 on the H100 SXM the calibration measures
# (NVIDIA H100 datasheet: 132 SMs); only when the norm weight trains (full fine-tuning)
SM_COUNT = 132


def parse_liger_kernels(value) -> tuple[tuple[str, ...], bool]:
    """`all` (Trainer's use_liger_kernel=True: every default kernel), a comma-separated list or an iterable of
    rms_norm, rope, swiglu, fused_linear_cross_entropy -> (the block kernels in canonical order, fused loss on?)."""
    if value is None:
        return (), False
    if isinstance(value, str):
        names = [v.strip().lower().replace("-", "_") for v in value.split(",") if v.strip()]
    elif isinstance(value, (tuple, list, set, frozenset)) and all(isinstance(v, str) for v in value):
        names = [v.strip().lower().replace("-", "_") for v in value]
    else:
        raise LoraCostError(f"--liger-kernels takes 'all' or a comma-separated list of {', '.join(KERNEL_NAMES)}; "
                            f"got {value!r}")
    if names == ["all"]:
        return DEFAULT_KERNELS, True
    if not names:
        raise LoraCostError(f"--liger-kernels is empty; give 'all' or some of {', '.join(KERNEL_NAMES)}")
    unknown = [n for n in names if n not in KERNEL_NAMES]
    if unknown:
        raise LoraCostError(f"unknown Liger kernel {unknown[0]!r}; choose 'all' or some of {', '.join(KERNEL_NAMES)}"
                            + (" (cross_entropy, the unfused loss, is not modelled)" if unknown[0] == "cross_entropy"
                               else ""))
    return tuple(k for k in BLOCK_KERNELS if k in names), FUSED_LOSS in names


def resolve(liger_kernels, loss: str = "standard") -> tuple[tuple[str, ...], str]:
    """(RunConfig.liger_kernels, RunConfig.loss) from `liger_kernels` (see parse_liger_kernels) and `loss`: the fused
    linear cross-entropy is `--loss liger`; asking for it with another non-standard loss is an error."""
    kernels, fused = parse_liger_kernels(liger_kernels)
    if fused:
        kind = str(loss).split(":")[0].strip().lower()
        if kind not in ("standard", "liger"):
            raise LoraCostError(f"--liger-kernels with fused_linear_cross_entropy is --loss liger; it cannot go with "
                                f"--loss {loss} (drop fused_linear_cross_entropy, or the --loss)")
        loss = "liger"
    return kernels, loss


def check_liger(spec: ModelSpec, run: RunConfig) -> RunConfig:
    """Refuse the swaps on families this tool does not model them for (one line); the run with the gated MLP's
    kernel named as the family's (swiglu, or geglu for Gemma)."""
    if not run.liger_kernels:
        return run
    if spec.model_type in MODELLED_TYPES:
        mlp = "geglu" if spec.model_type in GEGLU_TYPES else "swiglu"
        kernels = {mlp if k in ("swiglu", "geglu") else k for k in run.liger_kernels}
        from dataclasses import replace
        return replace(run, liger_kernels=tuple(k for k in BLOCK_KERNELS if k in kernels))
    flag = f"--liger-kernels {','.join(run.liger_kernels)}"
    if spec.model_type in PATCHED_NOT_MODELLED:
        raise LoraCostError(f"{flag}: Liger's kernels for model type {spec.model_type} are not modelled yet (only for "
                            f"{', '.join(MODELLED_TYPES)}); its fused loss alone is --loss liger")
    raise LoraCostError(f"{flag}: Liger has no kernels for model type {spec.model_type} (liger_kernel 0.8.5 "
                        "MODEL_TYPE_TO_APPLY_LIGER_FN); Trainer's use_liger_kernel leaves such a model as it is")


def rms_norm(tape: Tape, x: Tensor, width: int, *, w_trainable: bool, in_place: bool = True) -> Tensor:
    """LigerRMSNormFunction (casting_mode "llama", in_place=True; Gemma's: "gemma", offset 1.0, in_place=False,
    RSTD fp32 in both): saves X itself and the fp32 [rows] RSTD (and the weight, a parameter) when a gradient is
    needed; Y is a new tensor in X's dtype."""
    rows = x.numel // width
    rg = x.rg or w_trainable
    if rg:
        tape.save(x, "norm inputs")
        tape.save(tape.new(rows, "fp32", False), "norm statistics")
        # backward: dX written into dY (in place) or a zeros_like(dY); a trained weight's per-SM fp32 partial sums
        tape.norm_backward_buffers((1 if in_place else 2) * x.nbytes + (SM_COUNT * width * 4 if w_trainable else 0))
    return tape.new(x.numel, x.dtype, rg)


def rope(tape: Tape, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, copies: bool = False) -> tuple[Tensor, Tensor]:
    """LigerRopeFunction: q and k rotated in place (the same storages come out), cos and sin saved. `copies`: q and
    k are slices of a fused projection (Phi-3's qkv_proj), so `q.transpose(1, 2).contiguous()` copies each first."""
    rg = q.rg or k.rg
    if copies:
        q, k = tape.new(q.numel, q.dtype, rg), tape.new(k.numel, k.dtype, rg)
    if rg:
        tape.save(cos, "rotary tables")
        tape.save(sin, "rotary tables")
    return q.view(rg=rg), k.view(rg=rg)


def swiglu(tape: Tape, a: Tensor, b: Tensor) -> Tensor:
    """LigerSiLUMulFunction (and LigerGELUMulFunction, ops/geglu.py, the same rule): c = empty_like(a); saves a (gate
    output) and b (up output) when a gradient is needed."""
    rg = a.rg or b.rg
    if rg:
        tape.save(a, "activation function")
        tape.save(b, "activation function")
    # its backward holds the incoming dc only: da and db are stored into a and b (saved, counted above), not the
    # three buffers of transformers' act(gate) * up product (tape.widest_moment, peaks.py in_block)
    return tape.new(a.numel, a.dtype, rg, gradient_buffers=1)


def notes(spec: ModelSpec, run: RunConfig) -> tuple[str, ...]:
    """What an estimate with Liger's block kernels assumes (its assumptions list)."""
    if not run.liger_kernels:
        return ()
    what = {"rms_norm": "RMSNorm (saves its input and an fp32 rstd per row; no fp32 copy)",
            "rope": "RoPE (q and k rotated in place; cos and sin saved)",
            "swiglu": "SwiGLU (saves the gate and up outputs; silu recomputed in backward)",
            "geglu": "GEGLU (saves the gate and up outputs; gelu recomputed in backward)"}
    return ("Liger kernels (liger-kernel 0.8.5, as Trainer's use_liger_kernel applies them to the model instance"
            + ("; Gemma's norms: offset 1, gemma casting, not in place" if spec.model_type in GEGLU_TYPES else "") + "): "
            + "; ".join(what[k] for k in run.liger_kernels)
            + "; elementwise kernels add no counted FLOPs",)
