"""GaLore's projector refresh step (task "galore", issue 9): the first step and every update_proj_gap-th recompute each
projected gradient's orthogonal matrix by an SVD inside optimizer.step.

1. The rules, from the sources quoted in tests/data/galore_refresh_source.txt (galore-torch 1.0; torch's linalg.svd on
   CUDA), and the trace's stand-in (lora_cost/trace/galore.py) transcribing them.
2. The analytic per-tensor formula (analytic/optimizers.py, analytic/svd.py) by hand.
3. The stand-in's step on fake tensors under the trace's allocator, per tensor, against the analytic formula; and
   against the real galore_torch code run the same way (when galore-torch is installed: it is not a CI dependency, its
   wheel requires bitsandbytes).
4. Trace vs analytic on tiny models: the refresh step's peak (memory.refresh vs refresh_peak_bytes).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_cost import estimate  # noqa: E402
from lora_cost.analytic.methods.base import TensorGroup  # noqa: E402
from lora_cost.analytic.optimizers import (_galore_leftover, _galore_refresh_temporaries,  # noqa: E402
                                           _galore_refresh_tensor, _galore_svd_moment, _galore_tensor, get_optimizer)
from lora_cost.analytic.svd import SVD_WARNING, svd_buffers  # noqa: E402

SOURCE = (Path(__file__).parent / "data" / "galore_refresh_source.txt").read_text()
STAND_IN = (Path(__file__).resolve().parents[1] / "lora_cost" / "trace" / "galore.py").read_text()


def _section(name: str) -> str:
    return SOURCE.split(f"[{name}]\n")[1].split("\n[")[0]


# ---- 1. the rules, from the sources
@pytest.mark.fast
def test_rules_are_the_sources():
    project = _section("galore_torch/galore_projector.py GaLoreProjector.project")
    # the refresh: no matrix yet (the first step) or step % update_proj_gap == 0; the new matrix replaces the old one
    # only when get_orthogonal_matrix returns (the old is alive throughout), before the projected gradient is made
    assert "if self.ortho_matrix is None or iter % self.update_proj_gap == 0:" in project
    assert "self.ortho_matrix = self.get_orthogonal_matrix(full_rank_grad, self.rank, type='right')" in project
    assert project.index("get_orthogonal_matrix(full_rank_grad") < project.index("low_rank_grad = torch.matmul")
    ortho = _section("galore_torch/galore_projector.py GaLoreProjector.get_orthogonal_matrix")
    for line in ("matrix = module_params.data.float()",  # a 16-bit gradient's fp32 copy
                 "U, s, Vh = torch.linalg.svd(matrix, full_matrices = False)",
                 "A = U[:, :rank] @ torch.diag(s[:rank])",  # 'right': made and dropped
                 "B = Vh[:rank, :]", "B = B.to(original_device).type(original_type)",
                 "B = torch.diag(s[:rank]) @ Vh[:rank, :]",  # 'left': made and dropped
                 "A = A.to(original_device).type(original_type)"):
        assert line in ortho, line
    step = _section("galore_torch/adamw.py AdamW.step")
    # the projection (and so the SVD) comes before this tensor's denom and norm_grad are rebound: the previous
    # tensor's are still alive during it
    assert step.index('grad = state["projector"].project(grad, state["step"])') < step.index("denom = exp_avg_sq.sqrt()")
    assert "norm_grad = exp_avg / denom" in step and "norm_grad = state[\"projector\"].project_back(norm_grad)" in step
    # torch: the outputs first (U F-contiguous, Vh C-contiguous on cuSOLVER, S real), used in place; an int32 info
    meta = _section("aten/src/ATen/native/BatchLinearAlgebra.cpp TORCH_META_FUNC(_linalg_svd)")
    assert "sizes.back() = full_matrices ? m : k;" in meta and "sizes.end()[-2] = full_matrices ? n : k;" in meta
    assert "/*f-contig*=*/!use_cusolver" in meta
    impl = _section("aten/src/ATen/native/BatchLinearAlgebra.cpp TORCH_IMPL_FUNC(_linalg_svd_out)")
    assert "const auto info = at::zeros(IntArrayRef(A.sizes().begin(), A.sizes().end() - 2), A.options().dtype(kInt));" in impl
    assert "(use_cusolver && Vh.is_contiguous())" in impl
    assert "svd_cusolver(A, full_matrices, compute_uv, driver, U, S, compute_uv ? Vh.mT() : Vh, info);" in \
        _section("aten/src/ATen/native/cuda/linalg/BatchLinearAlgebra.cpp svd_kernel")
    # the default driver gesvdj, on a column-major copy of A in both branches; lwork from a run-time query
    drv = _section("aten/src/ATen/native/cuda/linalg/BatchLinearAlgebraLib.cpp svd_cusolver")
    assert 'const auto driver_v = driver.value_or("gesvdj");' in drv
    assert "svd_cusolver_gesvdjBatched(cloneBatchedColumnMajor(A)" in drv and "svd_cusolver_gesvdj(cloneBatchedColumnMajor(A)" in drv
    assert "if (m <= 32 && n <= 32) {" in drv and "svd_cusolver_gesvd(A, U, S, V, info" in drv  # the fallback: warned
    work = _section("aten/src/ATen/native/cuda/linalg/BatchLinearAlgebraLib.cpp apply_svd_cusolver_gesvdj")
    assert "at::cuda::solver::gesvdj_buffersize<scalar_t>(" in work and "allocator.allocate(sizeof(scalar_t)*lwork)" in work
    assert "sizes.end()[-1] = m;" in _section("aten/src/ATen/native/cuda/linalg/BatchLinearAlgebraLib.cpp "
                                              "svd_cusolver_gesvdjBatched")
    # what is only known at run time is named in the warning every GaLore estimate carries
    assert "cusolverDnSgesvdj_bufferSize" in SVD_WARNING and "gesvd" in SVD_WARNING
    # the stand-in transcribes get_orthogonal_matrix and adds the CUDA kernel's buffers
    for line in ("matrix = weights if float_data else weights.float()", "A = U[:, : self.rank] @ torch.diag(s[: self.rank])",
                 "B = torch.diag(s[: self.rank]) @ Vh[: self.rank, :]", "B if float_data else B.type(weights.dtype)",
                 "A if float_data else A.type(weights.dtype)", "torch.zeros((), dtype=torch.int32",
                 "column_major = matrix.mT.contiguous()"):
        assert line in STAND_IN, line


# ---- 2. by hand
@pytest.mark.fast
def test_refresh_by_hand():
    MiB = 2 ** 20
    # Llama-3.1-8B's gate_proj [14336, 4096] in bf16 ('right': m >= n), r = 128:
    g = TensorGroup("layers.*.gate_proj.weight", 14336 * 4096, 32, "bf16", shape=(14336, 4096), linear_weight=True)
    copy = 14336 * 4096 * 4  # 224 MiB: the gradient's float()
    outputs = 14336 * 4096 * 4 + 4096 * 4 + 4096 * 4096 * 4  # U [m, k] + S [k] + Vh [k, n], k = 4096
    inside = copy + outputs + 512 + 14336 * 4096 * 4  # + info (a 512-byte block) + the column-major copy
    assert svd_buffers(14336, 4096).inside == outputs + 512 + 224 * MiB
    after = copy + outputs + 128 * 14336 * 4 + max(128 * 128 * 4, 128 * 4096 * 2)  # A [m, r] + the cast B [r, n]
    assert inside > after
    assert _galore_svd_moment(g) == inside == 736 * MiB + 16 * 2 ** 10 + 512
    # the steady moment on it: the projected gradient, denom and norm_grad (3 x [128, 14336]) and project_back's
    # two [14336, 4096], bf16: 234.5 MiB, below the SVD's, so the refresh takes the SVD's
    assert _galore_tensor(g) == (3 * 128 * 14336 + 2 * 14336 * 4096) * 2 == 245_891_072
    assert _galore_refresh_tensor(g) == inside
    # fp32 (master weights): no copy and no cast
    g32 = TensorGroup("x", 14336 * 4096, 1, "fp32", shape=(14336, 4096), linear_weight=True)
    assert _galore_svd_moment(g32) == outputs + 512 + 224 * MiB
    # a small matrix: r = short side, and the product moment wins over the SVD's
    small = TensorGroup("s", 256 * 64, 1, "bf16", shape=(64, 256), linear_weight=True)  # 'left', k = r = 64
    copy, out = 64 * 256 * 4, 64 * 64 * 4 + 512 + 64 * 256 * 4
    assert _galore_svd_moment(small) == max(copy + out + 512 + 64 * 256 * 4, copy + out + 64 * 256 * 4 + 64 * 64 * 4)
    # gesvdjBatched (m, n <= 32, m != n): the square [32, 32] V_ besides the copy
    assert svd_buffers(16, 32).square == 32 * 32 * 4 and svd_buffers(32, 32).square == 0
    # the loop: a block's first linear after the previous block's last one (its denom and norm_grad still bound)
    q = TensorGroup("layers.*.q_proj.weight", 4096 * 4096, 32, "bf16", shape=(4096, 4096), linear_weight=True)
    down = TensorGroup("layers.*.down_proj.weight", 4096 * 14336, 32, "bf16", shape=(4096, 14336), linear_weight=True)
    norm = TensorGroup("norm", 4096, 1, "bf16", shape=(4096,))
    assert _galore_leftover(down) == 128 * 14336 * 2 + 4096 * 14336 * 2
    # q_proj [4096, 4096]: the fp32 copy (64 MiB) + U, S, Vh (64 MiB + 16 KiB + 64 MiB) + info + the column-major
    # copy (64 MiB) = 256 MiB + 16 KiB + 512; down_proj [4096, 14336] ('left'): as gate_proj's, 736 MiB + 16 KiB + 512
    assert _galore_svd_moment(q) == 256 * MiB + 16 * 2 ** 10 + 512
    assert _galore_svd_moment(down) == 736 * MiB + 16 * 2 ** 10 + 512
    # in the loop, on top of what the tensor before left bound (denom [128, long] + norm_grad [m, n], bf16): q after
    # the previous block's down (3.5 + 112 MiB): 371.5 MiB; gate after q (1 + 32 MiB): 769 MiB; down after gate
    # (3.5 + 112 MiB): 851.5 MiB + 16 KiB + 512, the largest (steady: 234.5 MiB)
    assert _galore_refresh_temporaries([norm, q, g, down]) == int((3.5 + 112 + 736) * MiB) + 16 * 2 ** 10 + 512
    assert get_optimizer("galore_adamw").refresh_every == 200 and get_optimizer("adamw").refreshing() is None


@pytest.mark.fast
def test_estimate_reports_the_refresh_step():
    e = estimate("llama-3.1-8b", "full", optimizer="galore-adamw", seq=512, gpu="h100-80gb")
    r = e.memory.refresh
    # the LM head [128256, 4096]: its SVD (fp32 copy, U, clone: 3 x 2 GiB) over the steady step's 2 GiB temporaries
    assert r.every_steps == 200 and r.peak_phase == "optimizer" and r.peak_bytes > e.memory.peak_bytes
    assert r.above_steady_bytes == r.peak_bytes - e.memory.peak_bytes
    assert sum(t.value for t in r.components) == r.peak_bytes
    assert any(t.name == "projector_refresh" for t in r.components)
    assert e.gpu.headroom_bytes == e.gpu.memory_bytes - r.device_bytes  # the fit takes the larger step
    assert any(SVD_WARNING in w for w in e.warnings)
    assert estimate("llama-3.2-1b", "full", seq=64).memory.refresh is None  # AdamW: every step alike


@pytest.mark.fast
def test_plan_sizes_the_refresh_step():
    """A budget between the steady step's device figure and the refresh step's: the run does not fit (its first step
    refreshes), and the plan's point reports the refresh step's figure."""
    from lora_cost.analytic.planner import plan

    e = estimate("llama-3.1-8b", "full", optimizer="galore-adamw", seq=512)
    steady, refresh = e.memory.device_bytes, e.memory.refresh.device_bytes
    assert refresh > steady
    m = plan("llama-3.1-8b", budget_bytes=(steady + refresh) // 2, methods=("full",), seq=512, optimizer="galore-adamw",
             batch_range=(1, 4)).methods[0]
    assert m.max_batch is None and not any(p.fits for p in m.rank_curve)
    assert m.rank_curve[0].device_bytes == refresh
    fits = plan("llama-3.1-8b", budget_bytes=refresh, methods=("full",), seq=512, optimizer="galore-adamw",
                batch_range=(1, 4)).methods[0]
    assert fits.max_batch is not None and fits.max_batch.batch >= 1


# ---- 3. the stand-in per tensor, on fake tensors under the trace's allocator
def _step_peak(make_opt, shape, dtype, real_svd=None) -> tuple[int, list[int]]:
    """(peak above what exists before, sizes allocated) of one refresh step on one [m, n] parameter."""
    torch = pytest.importorskip("torch")
    from torch._subclasses.fake_tensor import FakeTensorMode
    from lora_cost.trace.allocator import AllocatorSim
    from lora_cost.trace.optimizers import state_tensors, warm_state

    mode = FakeTensorMode()
    with mode:
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
    opt = make_opt(p)
    warm_state(opt, mode)
    for st in opt.state.values():  # the step at update_proj_gap: every state made, the old matrix alive
        st["step"] = 200
    with mode:
        p.grad = torch.zeros_like(p)
    sim = AllocatorSim(lambda: ("", False))
    with mode, sim:
        sim.adopt(p, "trainable_weights")
        sim.adopt(p.grad, "gradients")
        for v in state_tensors(opt):
            sim.adopt(v, "optimizer_state")
        for st in opt.state.values():
            if "projector" in st:
                sim.adopt(st["projector"].ortho_matrix, "optimizer_state")
        sim.start_phase("optimizer")
        first = len(sim.blocks)
        opt.step()
    return sim.peaks["optimizer"][0] - sim.starts["optimizer"], [b.size for b in sim.blocks[first:]]


SHAPES = [((384, 160), "bfloat16"), ((160, 384), "bfloat16"), ((384, 160), "float32"), ((96, 256), "float16"),
          ((256, 96), "float32"), ((24, 16), "bfloat16")]


@pytest.mark.parametrize("shape,dtype", SHAPES, ids=[f"{s[0]}x{s[1]}-{d}" for s, d in SHAPES])
def test_stand_in_matches_the_formula(shape, dtype):
    torch = pytest.importorskip("torch")
    from lora_cost.trace.galore import GaLoreAdamWStandIn

    peak, _ = _step_peak(lambda p: GaLoreAdamWStandIn([p], {id(p)}), shape, getattr(torch, dtype))
    g = TensorGroup("w", shape[0] * shape[1], 1, {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype],
                    shape=shape, linear_weight=True)
    assert peak == _galore_refresh_tensor(g)


def _real_galore():
    """galore_torch's AdamW, imported without its package __init__ (which imports bitsandbytes for AdamW8bit)."""
    spec = importlib.util.find_spec("galore_torch")
    if spec is None:
        pytest.skip("galore-torch is not installed (not a CI dependency)")
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "galore_torch" or k.startswith("galore_torch.")}
    package = types.ModuleType("galore_torch")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["galore_torch"] = package
    try:
        adamw = importlib.import_module("galore_torch.adamw")
    finally:
        for k in [k for k in sys.modules if k == "galore_torch" or k.startswith("galore_torch.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return adamw.AdamW


@pytest.mark.parametrize("shape,dtype", SHAPES[:4], ids=[f"{s[0]}x{s[1]}-{d}" for s, d in SHAPES[:4]])
def test_stand_in_allocates_as_galore_torch(shape, dtype, monkeypatch):
    """The real galore_torch step, its torch.linalg.svd given the CUDA kernel's buffers (galore.py cuda_svd), allocates
    the same blocks in the same order as the stand-in (Trainer's optim_args: rank 128, gap 200, scale 0.25, 'std')."""
    torch = pytest.importorskip("torch")
    from lora_cost.trace import galore

    real = _real_galore()
    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda m, full_matrices=True: _cuda_svd_with(svd, m))

    def make_real(p):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return real([{"params": [p], "rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}],
                        lr=1e-5, no_deprecation_warning=True)

    dt = getattr(torch, dtype)
    real_peak, real_sizes = _step_peak(make_real, shape, dt)
    monkeypatch.setattr(torch.linalg, "svd", svd)
    stand_peak, stand_sizes = _step_peak(lambda p: galore.GaLoreAdamWStandIn([p], {id(p)}), shape, dt)
    assert (real_peak, real_sizes) == (stand_peak, stand_sizes)


def _cuda_svd_with(svd, matrix):
    """galore.py cuda_svd's buffers around the original torch.linalg.svd (the patched name would recurse)."""
    import torch
    U, s, Vh = svd(matrix, full_matrices=False)
    m, n = matrix.shape
    info = torch.zeros((), dtype=torch.int32, device=matrix.device)
    column_major = matrix.mT.contiguous()
    square = matrix.new_empty((max(m, n), max(m, n))) if m <= 32 and n <= 32 and m != n else None
    del info, column_major, square
    return U, s, Vh


# ---- 4. trace vs analytic on tiny models
CASES = [("llama", "bf16", None, False, False), ("qwen2", "fp16", None, False, False), ("llama", "bf16", None, True, False),
         ("llama", "bf16", "fp32", False, False), ("mistral", "fp32", None, False, False),
         # a tied LM head stepped in backward: the refresh in a block's hook, bounded (peaks.py _hook_moments)
         ("qwen2", "bf16", None, True, True)]


@pytest.mark.parametrize("case", CASES, ids=[f"{f}-{p}{'-master' if m else ''}{'-inbwd' if b else ''}{'-ckpt' if c else ''}"
                                             for f, p, m, b, c in CASES])
def test_engines_agree_on_the_refresh_step(tmp_path_factory, case):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_grid_optimizers import config_path
    from lora_cost.trace import trace

    family, precision, master, in_backward, ckpt = case
    kw = dict(optimizer="galore-adamw", precision=precision, batch=2, seq=64, master_weights=master,
              optimizer_in_backward=in_backward, grad_checkpointing=ckpt)
    model = config_path(tmp_path_factory.getbasetemp() / "galore-refresh", family)
    e, t = estimate(model, "full", **kw), trace(model, "full", **kw)
    a, tr = e.memory.refresh.peak_bytes, t.refresh_peak_bytes
    assert any("refresh" in w for w in t.warnings)
    if in_backward and ckpt:  # the hook moment is a bound: above the trace, within 2% (without it: 4.3% below)
        assert tr <= a <= 1.02 * tr, f"refresh step: analytic {a} vs trace {tr}"
        assert tr > t.peak_bytes  # the refresh step is the higher one here
        return
    assert abs(a - tr) <= 0.005 * tr, f"refresh step: analytic {a} vs trace {tr}"
    # the refresh's own increment over the steady step, where there is one, agrees too
    da, dt = a - e.memory.peak_bytes, tr - t.peak_bytes
    assert abs(da - dt) <= 0.02 * max(dt, 1) + 4 * 2 ** 16, f"increment: analytic {da} vs trace {dt}"


@pytest.mark.fast
def test_numbers_only_and_batch_sweep_take_the_refresh_step():
    """The fast path's device bytes are the ones the GPU fit takes (memory.fit_device_bytes): the refresh step's
    when it is above the steady step, for one estimate and for a batch sweep alike."""
    from lora_cost.analytic.fast import batch_sweep
    from lora_cost.profiles import load_model
    from lora_cost.spec import RunConfig

    full = [estimate("llama-3.1-8b", "full", optimizer="galore-adamw", seq=512, batch=b) for b in (1, 4)]
    assert all(e.memory.fit_device_bytes == e.memory.refresh.device_bytes > e.memory.device_bytes for e in full)
    quick = [estimate("llama-3.1-8b", "full", optimizer="galore-adamw", seq=512, batch=b, numbers_only=True)
             for b in (1, 4)]
    assert [q.device_bytes for q in quick] == [e.memory.fit_device_bytes for e in full]
    swept = batch_sweep(load_model("llama-3.1-8b"), RunConfig(method="full", optimizer="galore-adamw", seq=512), (1, 4))
    assert [n.device_bytes for n in swept] == [e.memory.fit_device_bytes for e in full]
