"""leaky_rnn_scan forms ("pre", "post"), the leaky_relu activation and the streaming kernels (n > MAX_N):
Triton (TRITON_INTERPRET=1, outputs NaN-poisoned) vs the reference, forward and every gradient; the reference
vs a scalar hand loop; gradcheck of the reference op; torch.compile; fake shapes; sm_90 compilation."""

import math

import pytest
import torch

from routec.codegen import rnn
from routec.codegen.ops import leaky_rnn_scan


class _Forbidden:
    """Stands in for a kernel that must not run."""

    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        raise AssertionError(f"{self.name} ran")


@pytest.fixture
def streaming(monkeypatch):
    """Force the streaming kernels at small n, with 16-wide tiles so odd n gives several ragged tiles."""
    monkeypatch.setattr(rnn, "STREAM_MIN_N", 0)
    monkeypatch.setattr(rnn, "STREAM_BLOCK", 16)
    monkeypatch.setattr(rnn, "_leaky_fwd_kernel", _Forbidden("_leaky_fwd_kernel"))
    monkeypatch.setattr(rnn, "_leaky_bwd_kernel", _Forbidden("_leaky_bwd_kernel"))


def _inputs(B, T, n, with_h0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, n, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(n, n, generator=g, dtype=dtype) * 0.8 / n**0.5).requires_grad_()
    tau = (1.0 + 3.0 * torch.rand(n, generator=g, dtype=dtype)).requires_grad_()
    h0 = torch.randn(B, n, generator=g, dtype=dtype).requires_grad_() if with_h0 else None
    return x, w, tau, h0


def _check(x, w, tau, h0, activation, form, slope=0.1, seed=1):
    h = leaky_rnn_scan(x, w, tau, h0, activation=activation, form=form, slope=slope)
    ref = rnn.leaky_rnn_scan_reference(x, w, tau, h0, activation, form, slope)
    assert not torch.isnan(h).any()
    torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-5)
    cot = torch.randn(h.shape, generator=torch.Generator().manual_seed(seed))
    leaves = [t for t in (x, w, tau, h0) if t is not None]
    got = torch.autograd.grad(h, leaves, cot)
    want = torch.autograd.grad(ref, leaves, cot)
    for name, a, b in zip(("x_proj", "w_rec", "tau", "h0"), got, want):
        assert not torch.isnan(a).any(), name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("form", rnn.FORMS)
@pytest.mark.parametrize("activation", rnn.ACTIVATIONS)
def test_register_kernel_forms(triton_backend, form, activation):
    _check(*_inputs(17, 5, 5, True), activation, form)


@pytest.mark.parametrize("B,T,n,with_h0", [(1, 1, 1, False), (3, 9, 20, True)])
def test_register_kernel_post_leaky_relu_sizes(triton_backend, B, T, n, with_h0):
    _check(*_inputs(B, T, n, with_h0, seed=3), "leaky_relu", "post", slope=0.01)


@pytest.mark.parametrize("form,activation", [("post", "leaky_relu"), ("pre", "tanh"), ("post", "sigmoid"),
                                             ("pre", "relu")])
@pytest.mark.parametrize("B,T,n,with_h0", [(17, 4, 37, True), (1, 1, 1, False), (2, 3, 16, False)])
def test_streaming_kernels(triton_backend, streaming, form, activation, B, T, n, with_h0):
    _check(*_inputs(B, T, n, with_h0, seed=4), activation, form)


def test_streaming_is_the_default_above_max_n(triton_backend, recwarn, monkeypatch):
    """n = MAX_N + 1 runs the streaming kernels (default tiles), no fallback warning."""
    monkeypatch.setattr(rnn, "_leaky_fwd_kernel", _Forbidden("_leaky_fwd_kernel"))
    monkeypatch.setattr(rnn, "_leaky_bwd_kernel", _Forbidden("_leaky_bwd_kernel"))
    _check(*_inputs(2, 2, rnn.MAX_N + 1, True, seed=5), "leaky_relu", "post", slope=0.01)
    assert not [w for w in recwarn if "leaky_rnn_scan" in str(w.message)]


def test_streaming_backward_falls_back_when_partials_too_large(triton_backend, streaming, monkeypatch):
    """The streaming forward still runs; the backward warns and takes the reference VJP."""
    monkeypatch.setattr(rnn, "MAX_STREAM_SCRATCH", 1000)
    monkeypatch.setattr(rnn, "_leaky_stream_bwd_kernel", _Forbidden("_leaky_stream_bwd_kernel"))
    with pytest.warns(UserWarning, match="dW partials"):
        _check(*_inputs(3, 3, 20, True, seed=10), "leaky_relu", "post")


@pytest.mark.parametrize("B,T", [(0, 3), (2, 0)])
def test_empty_batch_or_sequence(triton_backend, B, T):
    x, w, tau, h0 = _inputs(B, T, 5, True)
    h = leaky_rnn_scan(x, w, tau, h0, activation="leaky_relu", form="post")
    assert h.shape == (B, T, 5)
    h.sum().backward()  # no kernel launch with an empty grid
    for leaf in (x, w, tau, h0):
        assert leaf.grad is None or (leaf.grad.shape == leaf.shape and not leaf.grad.any())


def _leaky_relu(v, slope):
    return v if v > 0 else slope * v


@pytest.mark.parametrize("activation", ["leaky_relu", "tanh"])
def test_post_reference_matches_scalar_loop(activation):
    x, w, tau, h0 = (t.detach() for t in _inputs(2, 6, 3, True, dtype=torch.float64, seed=6))
    slope = 0.2
    got = rnn.leaky_rnn_scan_reference(x, w, tau, h0, activation, "post", slope)
    act = (lambda v: _leaky_relu(v, slope)) if activation == "leaky_relu" else math.tanh
    B, T, n = x.shape
    for b in range(B):
        h = [float(v) for v in h0[b]]
        for t in range(T):
            rec = [sum(float(w[j, k]) * h[k] for k in range(n)) for j in range(n)]
            h = [act((1 - 1 / float(tau[j])) * h[j] + (rec[j] + float(x[b, t, j])) / float(tau[j])) for j in range(n)]
            assert got[b, t].tolist() == pytest.approx(h, abs=1e-12)


def test_pre_leaky_relu_reference_matches_scalar_loop():
    x, w, tau, h0 = (t.detach() for t in _inputs(2, 5, 3, True, dtype=torch.float64, seed=7))
    got = rnn.leaky_rnn_scan_reference(x, w, tau, h0, "leaky_relu", "pre", 0.3)
    B, T, n = x.shape
    for b in range(B):
        h = [float(v) for v in h0[b]]
        for t in range(T):
            pre = [sum(float(w[j, k]) * h[k] for k in range(n)) + float(x[b, t, j]) for j in range(n)]
            h = [h[j] + (_leaky_relu(pre[j], 0.3) - h[j]) / float(tau[j]) for j in range(n)]
            assert got[b, t].tolist() == pytest.approx(h, abs=1e-12)


@pytest.mark.parametrize("form,activation", [("post", "leaky_relu"), ("post", "tanh"), ("pre", "leaky_relu")])
def test_gradcheck_reference_op(reference_backend, form, activation):
    x, w, tau, h0 = _inputs(2, 4, 3, True, dtype=torch.float64, seed=8)
    assert torch.autograd.gradcheck(
        lambda *a: leaky_rnn_scan(*a, activation=activation, form=form, slope=0.05), (x, w, tau, h0))


def test_old_call_defaults_to_pre_tanh(reference_backend):
    """The op called with the old five arguments is the pre form with tanh, gradients included."""
    x, w, tau, h0 = _inputs(2, 3, 4, True, dtype=torch.float64, seed=9)
    h = torch.ops.routec.leaky_rnn_scan(x, w, tau, h0, "tanh")
    ref = rnn.leaky_rnn_scan_reference(x, w, tau, h0, "tanh")
    torch.testing.assert_close(h, ref)
    got = torch.autograd.grad(h.sum(), (x, w, tau, h0))
    want = torch.autograd.grad(ref.sum(), (x, w, tau, h0))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_compile_and_fake(reference_backend):
    x, w, tau, h0 = _inputs(2, 5, 3, True)
    f = torch.compile(lambda *a: leaky_rnn_scan(*a, activation="leaky_relu", form="post", slope=0.02),
                      fullgraph=True, backend="aot_eager")
    h = f(x, w, tau, h0)
    torch.testing.assert_close(h, rnn.leaky_rnn_scan_reference(x, w, tau, h0, "leaky_relu", "post", 0.02))
    h.sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape and tau.grad.shape == tau.shape
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        h = torch.ops.routec.leaky_rnn_scan(torch.empty(4, 7, 5), torch.empty(5, 5), torch.empty(5), None,
                                            "leaky_relu", "post", 0.01)
        assert h.shape == (4, 7, 5)


def test_errors():
    with pytest.raises(ValueError, match="form must be"):
        leaky_rnn_scan(torch.zeros(1, 2, 3), torch.zeros(3, 3), torch.ones(3), form="inside")


@pytest.mark.slow
def test_streaming_kernels_compile_for_gpu(compile_for_sm90):
    cfg = dict(BLOCK_B=rnn.BLOCK_B, BN=64, PREC="tf32x3")
    specs = [(f"_leaky_stream_{d}_kernel", dict(HAS_H0=h0, ACT=act, POST=post, **cfg), {"slope": "fp32"})
             for d in ("fwd", "bwd") for h0, act, post in ((True, 4, True), (False, 0, False))]
    specs += [(f"_leaky_{d}_kernel", dict(HAS_H0=True, ACT=4, POST=True, NP=128, BLOCK_B=rnn.BLOCK_B, PREC="tf32x3"),
               {"slope": "fp32"}) for d in ("fwd", "bwd")]
    compile_for_sm90("routec.codegen.rnn", specs)
