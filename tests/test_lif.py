"""lif_scan: Triton kernel vs reference (TRITON_INTERPRET=1), reference vs a hand loop, gradcheck, compile."""

import math


import pytest
import torch

from routec.codegen import lif as lif_mod
from routec.codegen.ops import lif_scan


class _ATanSpike(torch.autograd.Function):
    """SpikingJelly's ATan surrogate (alpha=2), written out by hand as an independent check."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        alpha = 2.0
        return g * (alpha / 2) / (1 + (math.pi / 2 * alpha * x) ** 2)


def _hand_loop(x, beta, threshold, reset, v0):
    B, T, D = x.shape
    v = torch.zeros(B, D, dtype=x.dtype) if v0 is None else v0
    s_out, v_out = [], []
    for t in range(T):
        v = beta * v + x[:, t]
        s = _ATanSpike.apply(v - threshold)
        if reset == "subtract":
            v = v - s * threshold
        else:
            v = v - v * s
        s_out.append(s)
        v_out.append(v)
    return torch.stack(s_out, 1), torch.stack(v_out, 1)


def _inputs(B, T, D, per_channel, with_v0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(B, T, D, generator=g, dtype=dtype) * 1.2).requires_grad_()
    beta = (0.5 + 0.5 * torch.rand(D, generator=g, dtype=dtype)).requires_grad_() if per_channel else 0.9
    v0 = (torch.rand(B, D, generator=g, dtype=dtype) * 0.5).requires_grad_() if with_v0 else None
    return x, beta, v0


def _leaves(x, beta, v0):
    return [t for t in (x, beta, v0) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("reset", ["subtract", "zero"])
@pytest.mark.parametrize("B,T,D,per_channel,with_v0", [(1, 1, 1, False, False), (2, 17, 5, True, True), (3, 64, 130, True, False)])
def test_triton_matches_reference(triton_backend, reset, B, T, D, per_channel, with_v0):
    x, beta, v0 = _inputs(B, T, D, per_channel, with_v0)
    s, v = lif_scan(x, beta=beta, threshold=1.0, reset=reset, v0=v0)
    s_ref, v_ref = lif_mod.lif_scan_reference(x, beta, 1.0, reset, v0)
    assert not torch.isnan(s).any() and not torch.isnan(v).any()
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)
    assert s.numel() < 10 or s.sum() > 0, "test inputs should make neurons spike"
    g = torch.Generator().manual_seed(1)
    gs, gv = torch.randn(s.shape, generator=g), torch.randn(v.shape, generator=g)
    leaves = _leaves(x, beta, v0)
    got = torch.autograd.grad((s, v), leaves, (gs, gv))
    want = torch.autograd.grad((s_ref, v_ref), leaves, (gs, gv))
    for a, b in zip(got, want):
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_triton_long_sequence(triton_backend):
    x, beta, v0 = _inputs(1, 1000, 3, True, True, seed=7)
    s, v = lif_scan(x, beta=beta, reset="zero", v0=v0)
    s_ref, v_ref = lif_mod.lif_scan_reference(x, beta, 1.0, "zero", v0)
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)
    leaves = _leaves(x, beta, v0)
    gs, gv = torch.randn_like(s), torch.randn_like(v)
    for a, b in zip(torch.autograd.grad((s, v), leaves, (gs, gv)), torch.autograd.grad((s_ref, v_ref), leaves, (gs, gv))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_reference_matches_hand_loop(reset):
    x, beta, v0 = _inputs(2, 23, 7, True, True, dtype=torch.float64, seed=3)
    s, v = lif_mod.lif_scan_reference(x, beta, 0.8, reset, v0)
    s_h, v_h = _hand_loop(x, beta, 0.8, reset, v0)
    torch.testing.assert_close(s, s_h)
    torch.testing.assert_close(v, v_h)
    gs, gv = torch.randn_like(s), torch.randn_like(v)
    leaves = _leaves(x, beta, v0)
    for a, b in zip(torch.autograd.grad((s, v), leaves, (gs, gv)), torch.autograd.grad((s_h, v_h), leaves, (gs, gv))):
        torch.testing.assert_close(a, b)


def test_integrate_and_fire_counts():
    # beta=1 (integrate-and-fire), constant input 0.25 (exact in binary), threshold 1, subtract reset:
    # v reaches exactly 1.0 every 4th step and fires (>=), then restarts from 0.
    x = torch.full((1, 10, 1), 0.25, dtype=torch.float64)
    s, v = lif_mod.lif_scan_reference(x, 1.0, 1.0, "subtract")
    assert s.flatten().tolist() == [0, 0, 0, 1, 0, 0, 0, 1, 0, 0]
    assert v.flatten().tolist() == [0.25, 0.5, 0.75, 0.0, 0.25, 0.5, 0.75, 0.0, 0.25, 0.5]


def test_gradcheck_reference_subthreshold(reference_backend):
    # Far below threshold no neuron spikes, the dynamics are linear and the surrogate terms are ~1e-7, so
    # the analytic gradient must equal finite differences (the spiking regime has no true gradient).
    x, beta, v0 = _inputs(2, 6, 3, True, True, dtype=torch.float64)

    def f(x, beta, v0):
        return lif_scan(x, beta=beta, threshold=1e3, reset="zero", v0=v0)

    assert torch.autograd.gradcheck(f, (x, beta, v0))


def test_float_beta_gets_no_grad_and_scalar_tensor_beta(triton_backend):
    x, _, _ = _inputs(2, 5, 3, False, False)
    b = torch.tensor(0.8, requires_grad=True)
    s, v = lif_scan(x, beta=b, threshold=0.7)
    (v.sum() + s.sum()).backward()
    s_r, v_r = lif_mod.lif_scan_reference(x, b.detach().expand(3).clone().requires_grad_(), 0.7)
    torch.testing.assert_close(v, v_r)
    assert b.grad is not None and torch.isfinite(b.grad)


def test_compile_and_fake(reference_backend):
    x, beta, v0 = _inputs(2, 5, 3, True, True)
    f = torch.compile(lambda x, b, v0: lif_scan(x, beta=b, reset="zero", v0=v0), fullgraph=True, backend="aot_eager")
    s, v = f(x, beta, v0)
    s_r, v_r = lif_mod.lif_scan_reference(x, beta, 1.0, "zero", v0)
    torch.testing.assert_close(v, v_r)
    v.sum().backward()
    assert beta.grad is not None
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fx = torch.empty(4, 9, 6)
        fs, fv = torch.ops.routec.lif_scan(fx, torch.empty(6), 1.0, "subtract", None)
        assert fs.shape == (4, 9, 6) and fv.shape == (4, 9, 6)


@pytest.mark.slow
def test_kernels_compile_for_gpu(compile_for_sm90):
    types = {"threshold": "fp32"}
    specs = [(f"_lif_{d}_kernel", dict(HAS_V0=True, ZERO_RESET=zero, BLOCK_D=128), types)
             for d in ("fwd", "bwd") for zero in (False, True)]
    compile_for_sm90("routec.codegen.lif", specs)


def test_bad_reset():
    with pytest.raises(ValueError, match="reset"):
        lif_scan(torch.zeros(1, 2, 3), beta=0.5, reset="hard")
