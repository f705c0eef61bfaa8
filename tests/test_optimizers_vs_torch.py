"""The analytic optimizer numbers against the real optimizers on CPU: state bytes after one real step,
and the step's temporaries measured by the trace's simulated allocator around the real step code."""

from __future__ import annotations

import importlib
import inspect

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from lora_cost.analytic.methods.base import TensorGroup  # noqa: E402
from lora_cost.analytic.optimizers import DEVICE_SCALAR_BYTES, allocated, get_optimizer  # noqa: E402

SHAPES = ((16, 256), (256, 16), (256,), (300, 70), (5000,))  # LoRA factors, a vector, an odd matrix, a long vector
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def groups(dtype: str) -> list[TensorGroup]:
    return [TensorGroup(f"p{i}", int(torch.Size(s).numel()), 1, dtype, shape=s) for i, s in enumerate(SHAPES)]


def real_step(name: str, dtype: str):
    from lora_cost.trace.optimizers import make_base

    params = [torch.nn.Parameter(torch.randn(s, dtype=DTYPES[dtype])) for s in SHAPES]
    opt = make_base(name, params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return params, opt


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_adamw_foreach_state(dtype):
    params, opt = real_step("adamw-torch", dtype)
    # exp_avg, exp_avg_sq; `step` is a CPU scalar (not fused, not capturable), on CUDA too
    got = sum(v.nbytes for st in opt.state.values() for k, v in st.items() if k != "step")
    assert all(st["step"].device.type == "cpu" and st["step"].dim() == 0 for st in opt.state.values())
    assert got == sum(get_optimizer("adamw-torch").state_bytes(g) for g in groups(dtype))


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_adamw_fused_state(dtype):
    params, opt = real_step("adamw-torch-fused", dtype)
    moments = sum(v.nbytes for st in opt.state.values() for k, v in st.items() if k != "step")
    steps = [st["step"] for st in opt.state.values()]
    # fused: each `step` is a 0-dim fp32 tensor on the parameter's device (a 512-byte block on CUDA)
    assert all(s.device == p.device and s.dim() == 0 and s.dtype == torch.float32 for s, p in zip(steps, params))
    assert moments + len(steps) * DEVICE_SCALAR_BYTES == sum(get_optimizer("adamw-torch-fused").state_bytes(g)
                                                             for g in groups(dtype))
    # the rule in torch's source: fused (or capturable) puts `step` on p.device
    src = inspect.getsource(importlib.import_module("torch.optim.adam").Adam._init_group)
    assert 'group["capturable"] or group["fused"]' in src and "device=p.device" in src


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_sgd_state(dtype):
    params, opt = real_step("sgd", dtype)
    got = sum(v.nbytes for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))
    assert got == sum(get_optimizer("sgd").state_bytes(g) for g in groups(dtype))


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_adafactor_state(dtype):
    params, opt = real_step("adafactor", dtype)
    st = opt.state[params[0]]
    assert set(st) == {"step", "exp_avg_sq_row", "exp_avg_sq_col", "RMS"}  # beta1=None: no exp_avg
    assert st["exp_avg_sq_row"].dtype == torch.float32 and st["exp_avg_sq_row"].shape == (16,)
    assert set(opt.state[params[2]]) == {"step", "exp_avg_sq", "RMS"}  # a vector: not factored
    # each tensor as the CUDA caching allocator counts it (rounded up to 512 B)
    got = sum(allocated(v.nbytes) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    assert got == sum(get_optimizer("adafactor").state_bytes(g) for g in groups(dtype))


@pytest.mark.parametrize("name", ["adamw-torch", "adamw-torch-fused", "sgd", "adafactor", "lion-8bit", "adamw-bnb-8bit"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_step_temporaries(name, dtype):
    """opt.step() of the real optimizer (the bitsandbytes stand-in for lion/8-bit) on fake tensors under the
    simulated allocator: the highest allocated memory above what existed before the step."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lora_cost.trace.allocator import AllocatorSim
    from lora_cost.trace.step import _get_value, init_state, make_optimizer
    from unittest import mock

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        params = [torch.nn.Parameter(torch.empty(s, dtype=DTYPES[dtype])) for s in SHAPES]
    opt = make_optimizer(name, params)
    init_state(opt, mode)
    with mode:
        for p in params:
            p.grad = torch.zeros_like(p)
    sim = AllocatorSim(lambda: ("", False))
    with mock.patch("torch.optim.adam._get_value", _get_value), mode, sim:
        for p in params:
            sim.adopt(p, "trainable_weights")
            sim.adopt(p.grad, "gradients")
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    sim.adopt(v, "optimizer_state")
        sim.start_phase("optimizer")
        opt.step()
    measured = sim.peaks["optimizer"][0] - sim.starts["optimizer"]
    predicted = get_optimizer(name).step_temporaries(groups(dtype))
    # the simulator rounds every buffer to 512 B and sees the scalars (norms, clamps) the analytic sum leaves out
    assert predicted <= measured <= predicted + 8 * 512 + 0.01 * predicted, (measured, predicted)


def test_profiler_recognises_the_optimizers():
    from transformers.optimization import Adafactor

    from lora_cost.profiler.introspect import _optimizer

    p = [torch.nn.Parameter(torch.zeros(4))]
    assert _optimizer(torch.optim.AdamW(p, fused=True))[0] == "adamw-torch-fused"
    assert _optimizer(torch.optim.AdamW(p))[0] == "adamw"
    assert _optimizer(Adafactor(p, lr=1e-3, relative_step=False, scale_parameter=False))[0] == "adafactor"
