"""moe_ffn: Triton grouped-GEMM kernels vs the reference (TRITON_INTERPRET=1), the reference vs a per-token
Python loop, every gradient (biases b1, b2 and an output width other than d included), gradcheck,
torch.compile through router + MoE, and fake shapes."""

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


def _problem(T, d, h, E, k, activation, dead=(), seed=0, dtype=torch.float32, out=None):
    """Random x, routing (distinct experts per token, none routed to `dead`) and expert weights
    (w2 [E, h, out], out = d by default)."""
    out = d if out is None else out
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=dtype)
    scores = torch.randn(T, E, generator=g, dtype=dtype)
    for e in dead:
        scores[:, e] = -1e9
    indices = scores.topk(k, dim=1).indices  # [T, k]
    weights = torch.rand(T, k, generator=g, dtype=dtype)
    w1 = torch.randn(E, d, h, generator=g, dtype=dtype) / math.sqrt(d)
    w2 = torch.randn(E, h, out, generator=g, dtype=dtype) / math.sqrt(h)
    w3 = torch.randn(E, d, h, generator=g, dtype=dtype) / math.sqrt(d) if activation in GLU else None
    return x, weights, indices, w1, w2, w3


def _biases(which, E, h, out, seed=0, dtype=torch.float32):
    """b1 [E, h] and b2 [E, out], each present when its name is in `which` ("", "b1", "b2", "b1b2")."""
    g = torch.Generator().manual_seed(100 + seed)
    b1 = torch.randn(E, h, generator=g, dtype=dtype) if "b1" in which else None
    b2 = torch.randn(E, out, generator=g, dtype=dtype) if "b2" in which else None
    return b1, b2


def _act(z, activation):
    erf_gelu = 0.5 * z * (1 + math.erf(z / math.sqrt(2)))
    return {"gelu": erf_gelu, "geglu": erf_gelu, "silu": z / (1 + math.exp(-z)), "swiglu": z / (1 + math.exp(-z)),
            "relu": max(z, 0.0)}[activation]


def _token_loop(x, weights, indices, w1, w2, activation, w3, b1=None, b2=None):
    """One token, one slot, one hidden unit at a time, in Python floats: the independent oracle."""
    T, d = x.shape
    h, out = w1.shape[2], w2.shape[2]
    y = [[0.0] * out for _ in range(T)]
    for t in range(T):
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            hidden = []
            for c in range(h):
                z1 = sum(float(x[t, i]) * float(w1[e, i, c]) for i in range(d))
                a = _act(z1 + (0.0 if b1 is None else float(b1[e, c])), activation)
                if w3 is not None:
                    a *= sum(float(x[t, i]) * float(w3[e, i, c]) for i in range(d))
                hidden.append(a)
            for o in range(out):
                z2 = sum(hidden[c] * float(w2[e, c, o]) for c in range(h)) + (0.0 if b2 is None else float(b2[e, o]))
                y[t][o] += float(weights[t, j]) * z2
    return torch.tensor(y, dtype=torch.float64)


@pytest.mark.parametrize("biases,out", [("", 4), ("b1b2", 6), ("b1", 3), ("b2", 1)])
@pytest.mark.parametrize("activation", ["gelu", "silu", "relu", "swiglu", "geglu"])
def test_reference_matches_token_loop(activation, biases, out):
    args = _problem(7, 4, 5, 4, 2, activation, dead=(1,), dtype=torch.float64, out=out)
    b1, b2 = _biases(biases, 4, 5, out, dtype=torch.float64)
    y = moe_mod.moe_ffn_reference(*args[:5], activation, args[5], b1, b2)
    assert y.shape == (7, out)
    torch.testing.assert_close(y, _token_loop(*args[:5], activation, args[5], b1, b2), rtol=1e-10, atol=1e-10)


CASES = [  # T, d, h, E, k, activation, dead experts, out width, biases
    (17, 16, 32, 5, 2, "gelu", (1, 3), 16, "b1b2"),
    (1, 16, 16, 3, 3, "silu", (), 63, "b1b2"),  # one token, k = E, out > d
    (37, 32, 16, 6, 1, "relu", (0,), 17, "b2"),  # k = 1: the slot sum is skipped; out < d
    (23, 16, 32, 4, 2, "swiglu", (2,), 40, "b1b2"),
    (9, 32, 32, 4, 4, "geglu", (), 32, "b1"),  # k = E
    (40, 16, 16, 6, 2, "silu", (5,), 16, ""),
    (19, 16, 16, 4, 2, "gelu", (0,), 1, "b1b2"),  # one output column
]


@needs_triton
@pytest.mark.parametrize("T,d,h,E,k,activation,dead,out,biases", CASES)
def test_triton_matches_reference(triton_backend, T, d, h, E, k, activation, dead, out, biases):
    """Forward and every gradient against the reference; outputs are NaN-poisoned (ROUTEC_POISON=1) before
    the kernels write them."""
    x, weights, indices, w1, w2, w3 = _problem(T, d, h, E, k, activation, dead=dead, seed=T, out=out)
    b1, b2 = _biases(biases, E, h, out, seed=T)
    names = [n for n, t in zip(["x", "weights", "w1", "w2", "w3", "b1", "b2"], (x, weights, w1, w2, w3, b1, b2))
             if t is not None]
    leaves = [t.requires_grad_() for t in (x, weights, w1, w2, w3, b1, b2) if t is not None]
    y = moe_ffn(x, weights, indices, w1, w2, activation=activation, w3=w3, b1=b1, b2=b2)
    y_ref = moe_mod.moe_ffn_reference(x, weights, indices, w1, w2, activation, w3, b1, b2)
    assert y.shape == (T, out) and not torch.isnan(y).any()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    gy = torch.cos(torch.arange(T * out, dtype=torch.float32)).reshape(T, out)
    got = dict(zip(names, torch.autograd.grad(y, leaves, gy)))
    want = dict(zip(names, torch.autograd.grad(y_ref, leaves, gy)))
    for name in names:
        assert not torch.isnan(got[name]).any(), name
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    for e in dead:  # experts without tokens get exactly zero weight and bias gradients
        for name in {"w1", "w2", "w3", "b1", "b2"} & set(names):
            assert got[name][e].abs().max() == 0, name
    if "b2" in names:  # db2[e] = sum of weight * dy over e's assignments, written out independently
        db2 = torch.zeros(E, out)
        for t in range(T):
            for j in range(k):
                db2[indices[t, j]] += weights[t, j].detach() * gy[t]
        torch.testing.assert_close(got["b2"], db2, rtol=1e-4, atol=1e-5)


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


@pytest.mark.parametrize("activation,biases,out", [("gelu", "", 4), ("swiglu", "b1b2", 6), ("relu", "b1b2", 2),
                                                   ("silu", "b2", 4)])
def test_gradcheck_reference(reference_backend, activation, biases, out):
    x, weights, indices, w1, w2, w3 = _problem(5, 4, 3, 3, 2, activation, seed=2, dtype=torch.float64, out=out)
    b1, b2 = _biases(biases, 3, 3, out, dtype=torch.float64)
    given = {n: t for n, t in zip(["x", "weights", "w1", "w2", "w3", "b1", "b2"], (x, weights, w1, w2, w3, b1, b2))
             if t is not None}

    def fn(*tensors):
        kw = dict(zip(given, tensors))
        return moe_ffn(kw["x"], kw["weights"], indices, kw["w1"], kw["w2"], activation=activation, w3=kw.get("w3"),
                       b1=kw.get("b1"), b2=kw.get("b2"))

    torch.autograd.gradcheck(fn, [t.requires_grad_() for t in given.values()])


def _compiled_vs_eager(monkeypatch, T, d, h, E, k, out):
    """torch.compile(fullgraph) of router + MoE with biases (current backend) against eager on the reference
    backend."""
    x, _, _, w1, w2, w3 = _problem(T, d, h, E, k, "swiglu", seed=3, out=out)
    b1, b2 = _biases("b1b2", E, h, out, seed=3)
    gate = torch.randn(d, E, generator=torch.Generator().manual_seed(4)) / math.sqrt(d)

    def layer(x, gate, w1, w2, w3, b1, b2):
        r = route_tokens(x @ gate, k, normalize=True)
        y = moe_ffn(x, r.weights, r.indices, w1, w2, activation="swiglu", w3=w3, b1=b1, b2=b2)
        return (y * y).sum() + r.aux_loss

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    a = [t.clone().requires_grad_() for t in (x, gate, w1, w2, w3, b1, b2)]
    b = [t.clone().requires_grad_() for t in (x, gate, w1, w2, w3, b1, b2)]
    la = compiled(*a)
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")
    lb = layer(*b)
    torch.testing.assert_close(la, lb)
    la.backward()  # the compiled backward runs on the backend it was traced with
    lb.backward()
    for ta, tb in zip(a, b):
        torch.testing.assert_close(ta.grad, tb.grad, rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph(reference_backend, monkeypatch):
    _compiled_vs_eager(monkeypatch, 11, 8, 8, 4, 2, 5)


@needs_triton
def test_torch_compile_fullgraph_triton(triton_backend, monkeypatch):
    """Compiled with the Triton kernels (forward and backward ops traced through their fake impls)."""
    _compiled_vs_eager(monkeypatch, 11, 16, 16, 4, 2, 20)


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, weights = torch.empty(13, 24), torch.empty(13, 3)
        indices = torch.empty(13, 3, dtype=torch.int64)
        w1, w2 = torch.empty(5, 24, 40), torch.empty(5, 40, 24)
        y = torch.ops.routec.moe_ffn(x, weights, indices, w1, w2, "gelu", None)
        w2_wide, b1, b2 = torch.empty(5, 40, 7), torch.empty(5, 40), torch.empty(5, 7)
        y_wide = torch.ops.routec.moe_ffn(x, weights, indices, w1, w2_wide, "gelu", None, b1, b2)
        grads = torch.ops.routec.moe_ffn_backward(torch.empty(13, 7), x, weights, indices, w1, w2_wide, "gelu",
                                                  None, b1, b2)
        no_bias = torch.ops.routec.moe_ffn_backward(y, x, weights, indices, w1, w2, "gelu", None)
    assert tuple(y.shape) == (13, 24) and y.dtype == torch.float32
    assert tuple(y_wide.shape) == (13, 7)
    assert [tuple(g.shape) for g in grads] == [(13, 24), (13, 3), (5, 24, 40), (5, 40, 7), (0,), (5, 40), (5, 7)]
    assert [tuple(g.shape) for g in no_bias[4:]] == [(0,), (0,), (0,)]


def test_opcheck(reference_backend):
    x, weights, indices, w1, w2, w3 = _problem(6, 4, 4, 3, 2, "geglu", seed=5, out=5)
    b1, b2 = _biases("b1b2", 3, 4, 5)
    args = (x.requires_grad_(), weights.requires_grad_(), indices, w1.requires_grad_(), w2, "geglu", w3,
            b1.requires_grad_(), b2)
    torch.library.opcheck(torch.ops.routec.moe_ffn.default, args)


@pytest.mark.parametrize("activation,with_w3", [("tanh", False), ("swiglu", False), ("gelu", True)])
def test_bad_arguments(activation, with_w3):
    x, weights, indices, w1, w2, w3 = _problem(3, 4, 4, 2, 1, "swiglu")
    with pytest.raises(ValueError):
        moe_ffn(x, weights, indices, w1, w2, activation=activation, w3=w3 if with_w3 else None)


@pytest.mark.parametrize("b1_shape,b2_shape,dtype,match", [
    ((2, 5), None, torch.float32, "b1 must be"), ((4,), None, torch.float32, "b1 must be"),
    (None, (2, 4), torch.float32, "b2 must be"), ((2, 4), (2, 6), torch.float64, "dtype"),
])
def test_bad_biases(b1_shape, b2_shape, dtype, match):
    x, weights, indices, w1, w2, _ = _problem(3, 4, 4, 2, 1, "gelu", out=6)  # h = 4, out = 6
    b1 = None if b1_shape is None else torch.zeros(b1_shape, dtype=dtype)
    b2 = None if b2_shape is None else torch.zeros(b2_shape, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        moe_ffn(x, weights, indices, w1, w2, b1=b1, b2=b2)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,d,h,E,k,activation,dead,out,biases", [
    (300, 128, 96, 8, 2, "gelu", (3,), 128, ""), (257, 64, 160, 8, 1, "relu", (), 100, "b1b2"),
    (333, 128, 128, 16, 4, "swiglu", (0, 9), 128, "b1b2"), (150, 64, 64, 5, 5, "geglu", (), 192, "b2"),
    (2048, 256, 512, 64, 8, "silu", (), 256, ""),
])
def test_cuda_kernels_match_float64_reference(monkeypatch, dtype, T, d, h, E, k, activation, dead, out, biases):
    """The compiled kernels on a GPU (tensor-core tiles, bf16 operands) against the float64 reference."""
    monkeypatch.setenv("ROUTEC_POISON", "1")
    problem = _problem(T, d, h, E, k, activation, dead=dead, seed=T, out=out) + _biases(biases, E, h, out, seed=T)
    x, weights, indices, w1, w2, w3, b1, b2 = [None if t is None else t.to("cuda") for t in problem]
    gy = torch.cos(torch.arange(T * out, dtype=torch.float64, device="cuda")).reshape(T, out)
    results = []
    for backend, cast in (("triton", dtype), ("reference", torch.float64)):
        monkeypatch.setenv("ROUTEC_BACKEND", backend)
        leaves = [None if t is None else t.to(dtype).to(cast).requires_grad_()
                  for t in (x, weights, w1, w2, w3, b1, b2)]
        y = moe_ffn(leaves[0], leaves[1], indices, leaves[2], leaves[3], activation=activation, w3=leaves[4],
                    b1=leaves[5], b2=leaves[6])
        grads = torch.autograd.grad(y, [t for t in leaves if t is not None], gy.to(y.dtype))
        results.append([y, *grads])
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    for got, want in zip(*results):
        assert not torch.isnan(got).any()
        err = (got.double() - want).abs().max().item()
        assert err <= tol * max(1.0, want.abs().max().item()), err
