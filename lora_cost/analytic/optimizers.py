"""Optimizer state and step temporaries, one registry entry per optimizer (Trainer's `optim` names).

Each entry gives, per trainable tensor group, the bytes of state the optimizer keeps and the bytes its
step allocates and frees (temporaries), from the implementation it models:

* `adamw-torch` (alias `adamw`, the default): torch.optim.AdamW, foreach (what torch picks for CUDA
  tensors): exp_avg + exp_avg_sq in the parameter dtype; `step` counters are CPU scalars;
  `_multi_tensor_adam` computes `torch._foreach_sqrt(exp_avg_sqs)` for a whole dtype group at once.
* `adamw-torch-fused`: AdamW(fused=True), what Trainer's `adamw_torch_fused` builds. `_init_group` puts
  each `step` on the parameter's device (`torch.zeros((), dtype=float32, device=p.device)` when fused):
  one 4-byte tensor per parameter, a 512-byte block of the caching allocator (kMinBlockSize);
  `_fused_adam` calls `torch._fused_adamw_` on lists (no grad_scale/found_inf without a GradScaler),
  which updates param, exp_avg and exp_avg_sq in place: no state-sized temporary.
* `sgd`: torch.optim.SGD(momentum=0.9), one momentum buffer updated in place (as lora-cost always
  modelled; note Trainer's `sgd` defaults to momentum 0, which keeps no state at all).
* `adafactor`: transformers.optimization.Adafactor as Trainer builds it (scale_parameter=False,
  relative_step=False, beta1=None: no first moment). A tensor of >= 2 dims keeps factored second
  moments, fp32 vectors of numel/shape[-1] (rows) and numel/shape[-2] (columns) elements; others one
  fp32 exp_avg_sq like the tensor; and every tensor a 0-dim fp32 `RMS` on the device (a 512-byte block).
  The step loops over tensors (no foreach): see `_adafactor_temporaries`.
* `adamw-torch-8bit`, `adamw-torch-4bit`: torchao's AdamW8bit / AdamW4bit (`_torchao`); `galore-adamw`:
  GaLore's AdamW as Trainer builds it (`_galore_state`).
* bitsandbytes (`optim/optimizer.py`): `adamw-bnb-8bit` (alias `adamw-8bit`) and `paged-adamw-8bit`
  keep two uint8 states plus one fp32 absmax per block of 256 for tensors of at least 4096 elements
  (`min_8bit_size`) and two fp32 states for smaller ones (Optimizer2State.init_state); the 32-bit ones
  two fp32 states whatever the parameter dtype; Lion (`lion-8bit`, `lion-32bit`, `paged-lion-*`) is an
  Optimizer1State: one such state. The update kernels work in place (no temporaries). Paged variants
  allocate their states in CUDA managed memory (`F.get_paged`), outside PyTorch's caching allocator.

`state_bytes`, `tensor_temporaries` take a TensorGroup; with master weights (`master.py`) they are
applied to the fp32 master copies instead of the 16-bit parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from ..registry import Registry, dashed
from .formulas.blocks import MIN_BLOCK_SIZE, allocated  # allocated: where states are many small vectors
from .formulas.storage import BNB_8BIT_BLOCK, BNB_8BIT_MIN_SIZE, blocks
from .methods.base import TensorGroup
from .svd import svd_buffers
from ..errors import LoraCostError
from ..units import DTYPE_BYTES

FP32 = 4  # bytes of a float32 element
# A 0-dim fp32 tensor on the GPU (fused AdamW's `step`, Adafactor's `RMS`) takes the caching allocator's
# smallest block: c10/cuda/CUDACachingAllocator.cpp round_size, kMinBlockSize = 512 bytes.
DEVICE_SCALAR_BYTES = MIN_BLOCK_SIZE


def _adam(g: TensorGroup) -> int:
    """exp_avg + exp_avg_sq, shaped and typed like the parameter (torch/optim/adam.py `_init_group`)."""
    return 2 * g.total_numel * DTYPE_BYTES[g.dtype]


def _fused_adam(g: TensorGroup) -> int:
    return _adam(g) + g.count * DEVICE_SCALAR_BYTES  # + the device `step` of each tensor


def _bnb(states: int, eight_bit: bool) -> Callable[[TensorGroup], int]:
    """bitsandbytes Optimizer1State/Optimizer2State.init_state: `states` buffers per tensor."""

    def state(g: TensorGroup) -> int:
        if not eight_bit or g.numel < BNB_8BIT_MIN_SIZE:
            return states * g.total_numel * FP32
        return states * g.count * (g.numel + FP32 * blocks(g.numel, BNB_8BIT_BLOCK))

    return state


def _sgd(g: TensorGroup) -> int:
    return g.total_numel * DTYPE_BYTES[g.dtype]


def _factored(g: TensorGroup) -> bool:
    if g.shape:
        return len(g.shape) >= 2
    if g.numel > 1:
        raise LoraCostError(f"adafactor: the shape of {g.name} is not known to the analytic engine (it factors the "
                            "second moment of matrices only); use --engine trace or another optimizer")
    return False


def _adafactor(g: TensorGroup) -> int:
    """transformers Adafactor.step state initialisation (`exp_avg_sq_row`/`_col` or `exp_avg_sq`, `.to(grad)`,
    the gradient cast to fp32 first), plus the 0-dim `RMS` tensor it stores per parameter."""
    if _factored(g):
        rows, cols = g.numel // g.shape[-1], g.numel // g.shape[-2]
        per = allocated(rows * FP32) + allocated(cols * FP32)
    else:
        per = allocated(g.numel * FP32)
    return g.count * (per + DEVICE_SCALAR_BYTES)


def _none(g: TensorGroup) -> int:
    return 0


def _foreach_sqrt(g: TensorGroup) -> int:
    """One tensor's share of `torch._foreach_sqrt(exp_avg_sqs)` (torch/optim/adam.py `_multi_tensor_adam`)."""
    return g.numel * DTYPE_BYTES[g.dtype]


def _adafactor_tensor(g: TensorGroup) -> int:
    """Adafactor.step on one tensor of n elements (transformers/optimization.py): a 16-bit gradient and
    parameter are copied to fp32 (`grad.float()`, `p.float()`: 2 x 4n, alive for the whole update); then
    `update = grad**2 + eps` holds grad**2 and the sum (2 x 4n), and later `torch.mul(r_factor, c_factor)`
    (factored) or `exp_avg_sq.rsqrt()` and `-update` each allocate a new 4n while the old update lives:
    at most two n-element fp32 buffers besides the copies."""
    casts = 2 * g.numel * FP32 if DTYPE_BYTES[g.dtype] < FP32 else 0
    return casts + 2 * g.numel * FP32


def _adafactor_temporaries(groups: list[TensorGroup]) -> int:
    """The loop over tensors (model order) peaks on the largest; the previous tensor's `update` (4 bytes per
    element) is still bound while `update = grad**2 + eps` of the next one is computed. The tensor before
    one of a single-tensor group (embedding, LM head) is the group listed before it (none for the first);
    within a group of several (the same linear in every block) a tensor of the group bounds it."""
    if not groups:
        return 0
    i = max(range(len(groups)), key=lambda k: _adafactor_tensor(groups[k]))
    top = groups[i]
    previous = top.numel if top.count > 1 else (groups[i - 1].numel if i > 0 else 0)
    return _adafactor_tensor(top) + previous * FP32


# torchao low-bit AdamW (torchao/optim/adam.py `_AdamBase._new_buffer`): "follow bitsandbytes, only quantize
# tensors >= 4096 values", and only those whose size divides by the block: 256 (AdamW8bit), 128 (AdamW4bit)
TORCHAO_MIN_SIZE = 4096


def torchao_block(bits: int) -> int:
    return {8: 256, 4: 128}[bits]


def _torchao(bits: int) -> Callable[[TensorGroup], int]:
    """exp_avg and exp_avg_sq as OptimState{8,4}bit (subclass_{8,4}bit.py `zeros`): `codes` (bits per element,
    uint8 storage), `scale` (one fp32 per block), `qmap` (2^bits fp32 entries) per state tensor; else
    `torch.zeros_like(p)`. Each storage as the caching allocator counts it (at least 512 bytes)."""
    block = torchao_block(bits)

    def state(g: TensorGroup) -> int:
        if g.numel >= TORCHAO_MIN_SIZE and g.numel % block == 0:
            per = allocated(g.numel * bits // 8) + allocated(g.numel // block * FP32) + allocated(2 ** bits * FP32)
        else:
            per = allocated(g.numel * DTYPE_BYTES[g.dtype])
        return 2 * g.count * per

    return state


# GaLore as Trainer builds it (transformers trainer_optimizer.py `_get_galore_optimizer`, optim_args defaults)
GALORE_RANK = 128
GALORE_UPDATE_GAP = 200  # ... "update_proj_gap": the projector recomputes its matrix when step % 200 == 0


def _galore_sides(g: TensorGroup) -> tuple[int, int, int, int]:
    """(m, n, k, long side) of a projected [m, n] weight: rank k = min(128, m, n) (Vh[:rank] / U[:, :rank] of
    a reduced SVD has at most min(m, n) rows / columns)."""
    m, n = g.shape
    return m, n, min(GALORE_RANK, m, n), max(m, n)


def _galore_state(g: TensorGroup) -> int:
    """galore_torch/adamw.py AdamW.step + galore_projector.py (proj_type 'std'): exp_avg and exp_avg_sq like
    the projected gradient (k x long side, gradient dtype), and the projector's orthogonal matrix: cast back to
    a 16-bit parameter's dtype (k x short side), or for fp32 a view of the SVD's Vh / U that keeps all of it
    (short side squared, fp32). Other tensors: exp_avg and exp_avg_sq like the parameter."""
    dt = DTYPE_BYTES[g.dtype]
    if not (g.linear_weight and len(g.shape) == 2):
        return 2 * g.total_numel * dt
    m, n, k, long = _galore_sides(g)
    projector = k * min(m, n) * dt if dt < FP32 else min(m, n) ** 2 * FP32
    return g.count * (2 * k * long * dt + projector)


def _galore_tensor(g: TensorGroup) -> int:
    """A steady step (no SVD refresh) on one tensor: the projected gradient, `denom` and `norm_grad` (k x long
    each), then project_back's matmul and its `* scale` (two m x n), all in the gradient dtype; an unprojected
    tensor: `denom` and `norm_grad` like it."""
    dt = DTYPE_BYTES[g.dtype]
    if not (g.linear_weight and len(g.shape) == 2):
        return 2 * g.numel * dt
    m, n, k, long = _galore_sides(g)
    return (3 * k * long + 2 * m * n) * dt


def _galore_refresh_tensor(g: TensorGroup) -> int:
    """A refresh step (state["step"] % update_proj_gap == 0, and the first step) on one tensor: galore_projector.py
    `get_orthogonal_matrix` runs inside `project`, before the projected gradient exists, while the old orthogonal
    matrix is still the projector's (it is replaced on return). For a projected [m, n] weight of dtype bytes dt,
    k = min(m, n), r = min(rank, k), long/short = max/min(m, n):
      `matrix = module_params.data.float()` (4mn, 16-bit gradients only), then torch.linalg.svd's buffers (svd.py:
      U, S, Vh; info and the column-major copy inside the call; cuSOLVER's workspace uncounted);
      after the call, with U, S, Vh and the copy of the gradient alive: 'right' (m >= n) `A = U[:, :rank] @
      torch.diag(s[:rank])` ([r, r] diag while the [m, r] product is made), `B = Vh[:rank, :]...type(original_type)`
      (the new matrix, [r, n], made while A lives); 'left' (m < n) `B = torch.diag(s[:rank]) @ Vh[:rank, :]` and
      `A = U[:, :rank]...type(...)`: an fp32 product r x long, then a diag r x r or the cast r x short x dt. fp32:
      no copy and no cast (the new matrix is a view of Vh / U).
    The step then goes on as a steady one (`_galore_tensor`): the tensor's peak is the larger of the two.
    Unprojected tensors: as in a steady step."""
    return max(_galore_svd_moment(g), _galore_tensor(g))


def _galore_svd_moment(g: TensorGroup) -> int:
    """The refresh's own buffers on one projected tensor at their largest (`_galore_refresh_tensor`); 0 unprojected."""
    if not (g.linear_weight and len(g.shape) == 2):
        return 0
    dt = DTYPE_BYTES[g.dtype]
    m, n, r, long = _galore_sides(g)
    short = min(m, n)
    copy = allocated(m * n * FP32) if dt < FP32 else 0
    svd = svd_buffers(m, n)
    cast = allocated(r * short * dt) if dt < FP32 else 0
    inside_svd = copy + svd.inside
    after_svd = copy + svd.outputs + allocated(r * long * FP32) + max(allocated(r * r * FP32), cast)
    return max(inside_svd, after_svd)


def _galore_leftover(g: TensorGroup) -> int:
    """What one tensor's update leaves bound when the loop moves on (galore_torch/adamw.py AdamW.step): the locals
    `denom` (like the projected gradient) and `norm_grad` (project_back's `full_rank_grad * self.scale`, like the
    weight) live until the next tensor rebinds them, after its `project` call; unprojected: two like the tensor."""
    dt = DTYPE_BYTES[g.dtype]
    if not (g.linear_weight and len(g.shape) == 2):
        return 2 * allocated(g.numel * dt)
    m, n, r, long = _galore_sides(g)
    return allocated(r * long * dt) + allocated(m * n * dt)


def _galore_refresh_temporaries(groups: list[TensorGroup]) -> int:
    """A refresh step's temporaries: the larger of a steady step's (the loop's largest tensor) and, for each projected
    tensor, its SVD moment (`_galore_svd_moment`) on top of what the tensor stepped before it left bound
    (`_galore_leftover`: rebound, so freed, before the tensor's own steady moments). The loop's order (trainer_optimizer.py `_get_galore_optimizer`: the unprojected parameters'
    group first, then the projected ones, each in model order): a block's first linear follows the last linear of
    the block before (or, in the first block, the last unprojected tensor: the final norm), a block's other linears
    the one listed before them, a linear outside the blocks (an untied LM head) the last block linear."""
    steady = max((_galore_tensor(g) for g in groups), default=0)
    projected = [g for g in groups if g.linear_weight and len(g.shape) == 2]
    if not projected:
        return steady
    others = [g for g in groups if not (g.linear_weight and len(g.shape) == 2)]
    last_other = _galore_leftover(others[-1]) if others else 0
    block = [g for g in projected if "*" in g.name]
    peak = steady
    for g in projected:
        i = next((j for j, b in enumerate(block) if b is g), None)
        if i:
            before = _galore_leftover(block[i - 1])
        elif i == 0:  # the first block linear: after the previous block's last one, or the unprojected group
            before = max(_galore_leftover(block[-1]) if g.count > 1 else 0, last_other)
        else:
            before = _galore_leftover(block[-1]) if block else last_other
        peak = max(peak, before + _galore_svd_moment(g))
    return peak


@dataclass(frozen=True)
class Optimizer:
    name: str
    description: str
    state_bytes: Callable[[TensorGroup], int]
    # what stepping one tensor of the group allocates besides the state (in place: 0)
    tensor_temporaries: Callable[[TensorGroup], int] = _none
    # how a step's temporaries add up: "foreach" (all tensors of a dtype at once, torch's _multi_tensor_*),
    # "loop" (one tensor after another: the largest one's), or a function of all groups
    combine: str | Callable[[list[TensorGroup]], int] = "loop"
    paged: bool = False  # states live in managed memory, outside torch's allocated counters
    aliases: tuple[str, ...] = ()  # other spellings (Trainer's `optim` names are accepted with underscores)
    # galore: an occasional step that allocates more per tensor than the steady one (GaLore's projector refresh,
    # every `refresh_every` steps and on the first), as `tensor_temporaries`; None: every step is the same
    refresh_temporaries: Callable[[TensorGroup], int] | None = None
    refresh_combine: str | Callable[[list[TensorGroup]], int] = "loop"  # how they add up (as `combine`)
    refresh_every: int = 0

    def refreshing(self) -> "Optimizer | None":
        """The optimizer as it runs on a refresh step (its per-tensor and combined temporaries), or None."""
        if self.refresh_temporaries is None:
            return None
        return replace(self, tensor_temporaries=self.refresh_temporaries, combine=self.refresh_combine,
                       refresh_temporaries=None)

    def step_temporaries(self, groups: list[TensorGroup]) -> int:
        """Bytes the step allocates on top of gradients and state, at its peak."""
        if callable(self.combine):
            return self.combine(groups)
        if self.combine == "foreach":
            per_dtype: dict[str, int] = {}
            for g in groups:
                per_dtype[g.dtype] = per_dtype.get(g.dtype, 0) + g.count * self.tensor_temporaries(g)
            return max(per_dtype.values(), default=0)
        return max((self.tensor_temporaries(g) for g in groups), default=0)


OPTIMIZERS: Registry[Optimizer] = Registry("optimizer", dashed)


def register_optimizer(opt: Optimizer) -> Optimizer:
    return OPTIMIZERS.register(opt, [opt.name, *opt.aliases])


def get_optimizer(name: str) -> Optimizer:
    return OPTIMIZERS.get(name)


def all_optimizers() -> dict[str, Optimizer]:
    """Every accepted name (aliases included) -> its optimizer."""
    return OPTIMIZERS.all()


def canonical_optimizers() -> dict[str, Optimizer]:
    """One entry per optimizer, under its canonical name."""
    return {name: opt for name, opt in OPTIMIZERS.all().items() if name == opt.name}


register_optimizer(Optimizer("adamw-torch", "torch.optim.AdamW (foreach): exp_avg + exp_avg_sq in the parameter dtype",
                             _adam, _foreach_sqrt, "foreach", aliases=("adamw",)))
register_optimizer(Optimizer("adamw-torch-fused", "torch.optim.AdamW(fused=True): exp_avg + exp_avg_sq in the parameter "
                             "dtype, a device `step` per tensor; in-place fused kernel", _fused_adam))
register_optimizer(Optimizer("sgd", "torch.optim.SGD(momentum=0.9): one momentum buffer, updated in place", _sgd))
register_optimizer(Optimizer("adafactor", "transformers Adafactor (no first moment): fp32 row + column second moments "
                             "for matrices, a full fp32 one for vectors", _adafactor, _adafactor_tensor,
                             _adafactor_temporaries))
register_optimizer(Optimizer("adamw-bnb-8bit", "bitsandbytes AdamW8bit: uint8 states + fp32 absmax per 256 (fp32 below "
                             "4096 elements)", _bnb(2, True), aliases=("adamw-8bit",)))
register_optimizer(Optimizer("paged-adamw-32bit", "bitsandbytes PagedAdamW32bit: fp32 states in CUDA managed memory",
                             _bnb(2, False), paged=True))
register_optimizer(Optimizer("paged-adamw-8bit", "bitsandbytes PagedAdamW8bit: 8-bit states in CUDA managed memory",
                             _bnb(2, True), paged=True))
register_optimizer(Optimizer("lion-8bit", "bitsandbytes Lion8bit: one uint8 state + fp32 absmax per 256 (fp32 below "
                             "4096 elements)", _bnb(1, True)))
register_optimizer(Optimizer("lion-32bit", "bitsandbytes Lion32bit: one fp32 state", _bnb(1, False)))
register_optimizer(Optimizer("paged-lion-8bit", "bitsandbytes PagedLion8bit: one 8-bit state in CUDA managed memory",
                             _bnb(1, True), paged=True))
register_optimizer(Optimizer("paged-lion-32bit", "bitsandbytes PagedLion32bit: one fp32 state in CUDA managed memory",
                             _bnb(1, False), paged=True))
register_optimizer(Optimizer("galore-adamw", "GaLore AdamW (galore_torch, rank 128, every nn.Linear weight): states of "
                             "the rank-128 projected gradient + the projector; AdamW states elsewhere; the first and every 200th "
                             "step SVD each projected gradient (memory.refresh)", _galore_state,
                             _galore_tensor, refresh_temporaries=_galore_refresh_tensor,
                             refresh_combine=_galore_refresh_temporaries, refresh_every=GALORE_UPDATE_GAP))
register_optimizer(Optimizer("adamw-torch-8bit", "torchao AdamW8bit: uint8 codes + fp32 scale per 256 + a 256-entry qmap "
                             "per state (>= 4096 elements dividing by 256; else like the parameter); its compiled update's "
                             "buffers not modelled", _torchao(8)))
register_optimizer(Optimizer("adamw-torch-4bit", "torchao AdamW4bit: 4-bit codes + fp32 scale per 128 + a 16-entry qmap "
                             "per state (>= 4096 elements dividing by 128; else like the parameter); its compiled update's "
                             "buffers not modelled", _torchao(4)))
