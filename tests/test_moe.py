"""moe_ffn: Triton grouped-GEMM kernels vs the reference (TRITON_INTERPRET=1), the reference vs a per-token
Python loop, every gradient, gradcheck, torch.compile through router + MoE, and fake shapes."""

import math

import pytest
import torch

from routec.codegen import moe as moe_mod
from routec.codegen.backend import interpreting
from routec.codegen.ops import moe_ffn, route_tokens

needs_triton = pytest.mark.skipif(not interpreting(), reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(interpreting() or not torch.cuda.is_available(), reason="needs a CUDA device")

GLU = ("swiglu", "geglu")


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("ROUTEC_BACKEND", "triton")
    monkeypatch.setenv("ROUTEC_POISON", "1")


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")


def _problem(T, d, h, E, k, activation, dead=(), seed=0, dtype=torch.float32):
    """Random x, routing (distinct experts per token, none routed to `dead`) and expert weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=dtype)
    scores = torch.randn(T, E, generator=g, dtype=dtype)
    for e in dead:
        scores[:, e] = -1e9
    indices = scores.topk(k, dim=1).indices  # [T, k]
    weights = torch.rand(T, k, generator=g, dtype=dtype)
    w1 = torch.randn(E, d, h, generator=g, dtype=dtype) / math.sqrt(d)
    w2 = torch.randn(E, h, d, generator=g, dtype=dtype) / math.sqrt(h)
    w3 = torch.randn(E, d, h, generator=g, dtype=dtype) / math.sqrt(d) if activation in GLU else None
    return x, weights, indices, w1, w2, w3


def _act(z, activation):
    erf_gelu = 0.5 * z * (1 + math.erf(z / math.sqrt(2)))
    return {"gelu": erf_gelu, "geglu": erf_gelu, "silu": z / (1 + math.exp(-z)), "swiglu": z / (1 + math.exp(-z)),
            "relu": max(z, 0.0)}[activation]


def _token_loop(x, weights, indices, w1, w2, activation, w3):
    """One token, one slot, one hidden unit at a time, in Python floats: the independent oracle."""
    T, d = x.shape
    h = w1.shape[2]
    y = [[0.0] * d for _ in range(T)]
    for t in range(T):
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            hidden = []
            for c in range(h):
                z1 = sum(float(x[t, i]) * float(w1[e, i, c]) for i in range(d))
                a = _act(z1, activation)
                if w3 is not None:
                    a *= sum(float(x[t, i]) * float(w3[e, i, c]) for i in range(d))
                hidden.append(a)
            for o in range(d):
                y[t][o] += float(weights[t, j]) * sum(hidden[c] * float(w2[e, c, o]) for c in range(h))
    return torch.tensor(y, dtype=torch.float64)


@pytest.mark.parametrize("activation", ["gelu", "silu", "relu", "swiglu", "geglu"])
def test_reference_matches_token_loop(activation):
    args = _problem(7, 4, 5, 4, 2, activation, dead=(1,), dtype=torch.float64)
    y = moe_mod.moe_ffn_reference(*args[:5], activation, args[5])
    torch.testing.assert_close(y, _token_loop(*args[:5], activation, args[5]), rtol=1e-10, atol=1e-10)


CASES = [  # T, d, h, E, k, activation, dead experts
    (17, 16, 32, 5, 2, "gelu", (1, 3)),
    (1, 16, 16, 3, 3, "silu", ()),  # one token, k = E
    (37, 32, 16, 6, 1, "relu", (0,)),  # k = 1: the slot sum is skipped
    (23, 16, 32, 4, 2, "swiglu", (2,)),
    (9, 32, 32, 4, 4, "geglu", ()),  # k = E
    (40, 16, 16, 6, 2, "silu", (5,)),
]


@needs_triton
@pytest.mark.parametrize("T,d,h,E,k,activation,dead", CASES)
def test_triton_matches_reference(triton_backend, T, d, h, E, k, activation, dead):
    x, weights, indices, w1, w2, w3 = _problem(T, d, h, E, k, activation, dead=dead, seed=T)
    leaves = [t.requires_grad_() for t in (x, weights, w1, w2, w3) if t is not None]
    y = moe_ffn(x, weights, indices, w1, w2, activation=activation, w3=w3)
    y_ref = moe_mod.moe_ffn_reference(x, weights, indices, w1, w2, activation, w3)
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    gy = torch.cos(torch.arange(T * d, dtype=torch.float32)).reshape(T, d)
    got = torch.autograd.grad(y, leaves, gy)
    want = torch.autograd.grad(y_ref, leaves, gy)
    for name, a, b in zip(["x", "weights", "w1", "w2", "w3"], got, want):
        assert not torch.isnan(a).any(), name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    for e in dead:  # experts without tokens get exactly zero weight gradients
        assert got[2][e].abs().max() == 0 and got[3][e].abs().max() == 0


@needs_triton
def test_router_then_moe_with_capacity_drops(triton_backend):
    """route_tokens (noisy, capacity overflow) feeding moe_ffn: dropped assignments contribute nothing."""
    T, d, h, E, k = 29, 16, 16, 4, 2
    x, _, _, w1, w2, _ = _problem(T, d, h, E, k, "gelu", seed=11)
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(T, E, generator=g).requires_grad_()
    noise = 0.5 * torch.randn(T, E, generator=g)
    x.requires_grad_()
    r = route_tokens(logits, k, normalize=True, noise=noise, capacity=12)
    assert not r.kept.all() and (r.weights[~r.kept] == 0).all()
    y = moe_ffn(x, r.weights, r.indices, w1, w2)
    y_ref = moe_mod.moe_ffn_reference(x, r.weights, r.indices, w1, w2)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    got = torch.autograd.grad(y.square().sum() + r.aux_loss, (x, logits), retain_graph=True)
    want = torch.autograd.grad(y_ref.square().sum() + r.aux_loss, (x, logits))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "swiglu", "relu"])
def test_gradcheck_reference(reference_backend, activation):
    x, weights, indices, w1, w2, w3 = _problem(5, 4, 3, 3, 2, activation, seed=2, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x, weights, w1, w2, w3) if t is not None]

    def fn(x, weights, w1, w2, w3=None):
        return moe_ffn(x, weights, indices, w1, w2, activation=activation, w3=w3)

    torch.autograd.gradcheck(fn, inputs)


def _compiled_vs_eager(monkeypatch, T, d, h, E, k):
    """torch.compile(fullgraph) of router + MoE (current backend) against eager on the reference backend."""
    x, _, _, w1, w2, w3 = _problem(T, d, h, E, k, "swiglu", seed=3)
    gate = torch.randn(d, E, generator=torch.Generator().manual_seed(4)) / math.sqrt(d)

    def layer(x, gate, w1, w2, w3):
        r = route_tokens(x @ gate, k, normalize=True)
        return moe_ffn(x, r.weights, r.indices, w1, w2, activation="swiglu", w3=w3).sum() + r.aux_loss

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    a = [t.clone().requires_grad_() for t in (x, gate, w1, w2, w3)]
    b = [t.clone().requires_grad_() for t in (x, gate, w1, w2, w3)]
    la = compiled(*a)
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")
    lb = layer(*b)
    torch.testing.assert_close(la, lb)
    la.backward()  # the compiled backward runs on the backend it was traced with
    lb.backward()
    for ta, tb in zip(a, b):
        torch.testing.assert_close(ta.grad, tb.grad, rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph(reference_backend, monkeypatch):
    _compiled_vs_eager(monkeypatch, 11, 8, 8, 4, 2)


@needs_triton
def test_torch_compile_fullgraph_triton(triton_backend, monkeypatch):
    """Compiled with the Triton kernels (forward and backward ops traced through their fake impls)."""
    _compiled_vs_eager(monkeypatch, 11, 16, 16, 4, 2)


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, weights = torch.empty(13, 24), torch.empty(13, 3)
        indices = torch.empty(13, 3, dtype=torch.int64)
        y = torch.ops.routec.moe_ffn(x, weights, indices, torch.empty(5, 24, 40), torch.empty(5, 40, 24), "gelu", None)
    assert tuple(y.shape) == (13, 24) and y.dtype == torch.float32


def test_opcheck(reference_backend):
    x, weights, indices, w1, w2, w3 = _problem(6, 4, 4, 3, 2, "geglu", seed=5)
    args = (x.requires_grad_(), weights.requires_grad_(), indices, w1.requires_grad_(), w2, "geglu", w3)
    torch.library.opcheck(torch.ops.routec.moe_ffn.default, args)


@pytest.mark.parametrize("activation,with_w3", [("tanh", False), ("swiglu", False), ("gelu", True)])
def test_bad_arguments(activation, with_w3):
    x, weights, indices, w1, w2, w3 = _problem(3, 4, 4, 2, 1, "swiglu")
    with pytest.raises(ValueError):
        moe_ffn(x, weights, indices, w1, w2, activation=activation, w3=w3 if with_w3 else None)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,d,h,E,k,activation,dead", [
    (300, 128, 96, 8, 2, "gelu", (3,)), (257, 64, 160, 8, 1, "relu", ()), (333, 128, 128, 16, 4, "swiglu", (0, 9)),
    (150, 64, 64, 5, 5, "geglu", ()), (2048, 256, 512, 64, 8, "silu", ()),
])
def test_cuda_kernels_match_float64_reference(monkeypatch, dtype, T, d, h, E, k, activation, dead):
    """The compiled kernels on a GPU (tensor-core tiles, bf16 operands) against the float64 reference."""
    monkeypatch.setenv("ROUTEC_POISON", "1")
    args = [None if t is None else t.to("cuda") for t in _problem(T, d, h, E, k, activation, dead=dead, seed=T)]
    x, weights, indices, w1, w2, w3 = args
    gy = torch.cos(torch.arange(T * d, dtype=torch.float64, device="cuda")).reshape(T, d)
    results = []
    for backend, cast in (("triton", dtype), ("reference", torch.float64)):
        monkeypatch.setenv("ROUTEC_BACKEND", backend)
        leaves = [None if t is None else t.to(dtype).to(cast).requires_grad_() for t in (x, weights, w1, w2, w3)]
        y = moe_ffn(leaves[0], leaves[1], indices, leaves[2], leaves[3], activation=activation, w3=leaves[4])
        grads = torch.autograd.grad(y, [t for t in leaves if t is not None], gy.to(y.dtype))
        results.append([y, *grads])
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    for got, want in zip(*results):
        assert not torch.isnan(got).any()
        err = (got.double() - want).abs().max().item()
        assert err <= tol * max(1.0, want.abs().max().item()), err
