"""linear_scan and selective_scan: Triton kernels (interpreter) vs references, references vs closed forms."""

import math

import pytest
import torch
import torch.nn.functional as F

from routec.codegen import ops, scan
from routec.codegen.backend import reference_vjp


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ROUTEC_BACKEND", "triton")
    monkeypatch.setenv("ROUTEC_POISON", "1")  # launchers allocate outputs full of NaN


def _close(x, y, tol=2e-5):
    assert x.shape == y.shape
    assert torch.isfinite(x).all(), "kernel left elements unwritten (NaN) or overflowed"
    scale = y.abs().max().item() + 1.0
    assert (x.double() - y.double()).abs().max().item() <= tol * scale


def _linear_inputs(bsz, length, dim, with_h0, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(bsz, length, dim, generator=g) * 0.6 + 0.5  # some |a| > 1 too
    b = torch.randn(bsz, length, dim, generator=g)
    h0 = torch.randn(bsz, dim, generator=g) if with_h0 else None
    return a, b, h0


def _linear_closed_form(a, b, h0, reverse):
    """h[t] = sum_s (prod of a over (s, t]) b[s] + (prod of a over [0, t]) h0, with explicit products."""
    if reverse:
        flip = lambda x: x.flip(1)  # noqa: E731
        return flip(_linear_closed_form(flip(a), flip(b), h0, False))
    bsz, length, dim = a.shape
    h = torch.zeros(bsz, length, dim, dtype=torch.float64)
    for t in range(length):
        for s in range(t + 1):
            h[:, t] += a[:, s + 1 : t + 1].prod(dim=1) * b[:, s]
        if h0 is not None:
            h[:, t] += a[:, : t + 1].prod(dim=1) * h0
    return h


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_h0", [False, True])
def test_linear_reference_matches_closed_form(reverse, with_h0):
    a, b, h0 = (None if x is None else x.double() for x in _linear_inputs(2, 9, 3, with_h0))
    _close(scan.linear_scan_reference(a, b, h0, reverse=reverse), _linear_closed_form(a, b, h0, reverse), 1e-12)


@pytest.mark.parametrize(
    "length, dim, reverse, with_h0",
    [(1, 5, False, True), (17, 5, False, False), (17, 33, True, True), (64, 3, True, False), (1000, 7, False, True),
     (1000, 2, True, True)],
)
def test_linear_triton_matches_reference(triton_backend, length, dim, reverse, with_h0):
    a, b, h0 = _linear_inputs(2, length, dim, with_h0, seed=length + dim)
    leaves = [x.clone().requires_grad_(True) for x in (a, b) + ((h0,) if with_h0 else ())]
    h = ops.linear_scan(leaves[0], leaves[1], leaves[2] if with_h0 else None, reverse=reverse)
    ref_inputs = tuple(None if x is None else x.double() for x in (a, b, h0))
    ref = scan.linear_scan_reference(*ref_inputs, reverse=reverse)
    _close(h, ref, 1e-4)
    dh = torch.randn_like(h)
    h.backward(dh)
    ref_grads = reference_vjp(lambda *x: scan.linear_scan_reference(*x, reverse=reverse), ref_inputs, (dh.double(),))
    for leaf, expected in zip(leaves, ref_grads):
        _close(leaf.grad, expected, 1e-4)


def test_linear_launcher_writes_every_element_with_small_blocks(monkeypatch):
    """Several chunks and channel blocks, none full: every output element must come back written."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ROUTEC_POISON", "1")
    a, b, h0 = _linear_inputs(3, 37, 19, True)
    h = scan.linear_scan_forward(a, b, h0, False, chunk=16, block_d=8)
    _close(h, scan.linear_scan_reference(a.double(), b.double(), h0.double()), 1e-5)
    da, db, dh0 = scan.linear_scan_backward(a, h0, h, torch.ones_like(h), False, chunk=16, block_d=8)
    for grad in (da, db, dh0):
        assert torch.isfinite(grad).all()


def test_linear_gradcheck_reference(reference_backend):
    a, b, h0 = (x.double().requires_grad_(True) for x in _linear_inputs(2, 6, 3, True))
    for reverse in (False, True):
        assert torch.autograd.gradcheck(lambda a, b, h0: ops.linear_scan(a, b, h0, reverse=reverse), (a, b, h0))


def test_linear_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="must both be"):
        ops.linear_scan(torch.zeros(1, 4, 3), torch.zeros(1, 4, 2))


def _selective_inputs(bsz, length, dim, n_state, *, with_d=True, with_z=True, with_bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(bsz, length, dim, generator=g)
    delta = torch.randn(bsz, length, dim, generator=g) * 0.5
    A = -(torch.rand(dim, n_state, generator=g) + 0.2)
    B = torch.randn(bsz, length, n_state, generator=g)
    C = torch.randn(bsz, length, n_state, generator=g)
    D = torch.randn(dim, generator=g) if with_d else None
    z = torch.randn(bsz, length, dim, generator=g) if with_z else None
    bias = torch.randn(dim, generator=g) * 0.3 if with_bias else None
    return u, delta, A, B, C, D, z, bias


def _selective_closed_form(u, delta, A, B, C, D, z, bias, softplus, reverse):
    """y[t, d] = sum_n C[t, n] sum_{s<=t} exp(A[d, n] * sum_{s<r<=t} dt[r, d]) dt[s, d] B[s, n] u[s, d], scalar loops."""
    bsz, length, dim = u.shape
    n_state = A.shape[1]
    y = torch.zeros(bsz, length, dim, dtype=torch.float64)
    for b in range(bsz):
        for d in range(dim):
            dt = [float(delta[b, t, d]) + (float(bias[d]) if bias is not None else 0.0) for t in range(length)]
            if softplus:
                dt = [math.log1p(math.exp(x)) for x in dt]
            order = list(range(length - 1, -1, -1)) if reverse else list(range(length))
            for i, t in enumerate(order):
                total = 0.0
                for j in range(i + 1):
                    s = order[j]
                    decay = sum(dt[order[k]] for k in range(j + 1, i + 1))
                    for n in range(n_state):
                        total += math.exp(float(A[d, n]) * decay) * dt[s] * float(B[b, s, n]) * float(u[b, s, d]) * float(C[b, t, n])
                if D is not None:
                    total += float(D[d]) * float(u[b, t, d])
                if z is not None:
                    zz = float(z[b, t, d])
                    total *= zz / (1.0 + math.exp(-zz))
                y[b, t, d] = total
    return y


@pytest.mark.parametrize("softplus, reverse", [(True, False), (False, True)])
def test_selective_reference_matches_closed_form(softplus, reverse):
    inputs = tuple(None if x is None else x.double() for x in _selective_inputs(2, 6, 3, 2, seed=3))
    if not softplus:
        inputs = (inputs[0], inputs[1].abs()) + inputs[2:]
    y = scan.selective_scan_reference(*inputs, delta_softplus=softplus, reverse=reverse)
    _close(y, _selective_closed_form(*inputs, softplus, reverse), 1e-10)


@pytest.mark.parametrize(
    "length, dim, n_state, flags, softplus, reverse",
    [
        (1, 5, 4, (True, True, True), True, False),
        (17, 5, 4, (True, True, True), True, False),
        (17, 19, 3, (False, False, False), False, True),
        (64, 6, 16, (True, False, True), True, True),
        (1000, 2, 2, (False, True, False), True, False),
    ],
)
def test_selective_triton_matches_reference(triton_backend, length, dim, n_state, flags, softplus, reverse):
    with_d, with_z, with_bias = flags
    bsz = 1 if length >= 1000 else 2
    inputs = _selective_inputs(bsz, length, dim, n_state, with_d=with_d, with_z=with_z, with_bias=with_bias, seed=length)
    if not softplus:
        inputs = (inputs[0], inputs[1].abs()) + inputs[2:]
    leaves = tuple(None if x is None else x.clone().requires_grad_(True) for x in inputs)
    y = ops.selective_scan(*leaves, delta_softplus=softplus, reverse=reverse)
    ref_inputs = tuple(None if x is None else x.double() for x in inputs)
    ref = scan.selective_scan_reference(*ref_inputs, delta_softplus=softplus, reverse=reverse)
    _close(y, ref, 1e-4)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref_grads = reference_vjp(
        lambda *x: scan.selective_scan_reference(*x, delta_softplus=softplus, reverse=reverse), ref_inputs, (dy.double(),)
    )
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    for name, leaf, expected in zip(names, leaves, ref_grads):
        if leaf is None:
            continue
        assert leaf.grad is not None, name
        _close(leaf.grad, expected, 2e-4)


def test_selective_gradcheck_reference(reference_backend):
    inputs = tuple(x.double().requires_grad_(True) for x in _selective_inputs(1, 5, 3, 2, seed=7))
    for reverse in (False, True):
        assert torch.autograd.gradcheck(
            lambda *x: ops.selective_scan(*x, delta_softplus=True, reverse=reverse), inputs, atol=1e-6
        )


def test_compile_fullgraph_through_ops(reference_backend):
    a, b, h0 = (x.requires_grad_(True) for x in _linear_inputs(2, 7, 3, True))
    sel = tuple(x.requires_grad_(True) for x in _selective_inputs(2, 7, 3, 2))

    def model(a, b, h0, *sel_inputs):
        h = ops.linear_scan(a, b, h0, reverse=True)
        y = ops.selective_scan(*sel_inputs, delta_softplus=True)
        return h.sum() + y.sum()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(a, b, h0, *sel)
    expected = model(a, b, h0, *sel)
    torch.testing.assert_close(out, expected)
    out.backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (a, b, h0) + sel)


def test_compile_fullgraph_triton_path(triton_backend):
    """The compiled graphs run the Triton kernels and trace their backward ops (fake impls included)."""
    inputs = _selective_inputs(1, 9, 3, 2, seed=4)
    leaves = tuple(x.clone().requires_grad_(True) for x in inputs)
    compiled = torch.compile(lambda *x: ops.selective_scan(*x, delta_softplus=True), fullgraph=True, backend="aot_eager")
    y = compiled(*leaves)
    ref_inputs = tuple(x.double() for x in inputs)
    _close(y, scan.selective_scan_reference(*ref_inputs, delta_softplus=True), 1e-4)
    y.sum().backward()
    ref_grads = reference_vjp(lambda *x: scan.selective_scan_reference(*x, delta_softplus=True), ref_inputs,
                              (torch.ones(y.shape, dtype=torch.float64),))
    for leaf, expected in zip(leaves, ref_grads):
        _close(leaf.grad, expected, 2e-4)

    a, b, h0 = (x.requires_grad_(True) for x in _linear_inputs(2, 11, 3, True))
    h = torch.compile(lambda *x: ops.linear_scan(*x, reverse=True), fullgraph=True, backend="aot_eager")(a, b, h0)
    _close(h, scan.linear_scan_reference(a.double(), b.double(), h0.double(), reverse=True), 1e-5)
    h.sum().backward()
    ref_grads = reference_vjp(lambda *x: scan.linear_scan_reference(*x, reverse=True),
                              (a.double(), b.double(), h0.double()), (torch.ones(h.shape, dtype=torch.float64),))
    for leaf, expected in zip((a, b, h0), ref_grads):
        _close(leaf.grad, expected, 1e-5)


def test_fake_shapes(reference_backend):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a, b, h0 = torch.empty(3, 11, 5), torch.empty(3, 11, 5), torch.empty(3, 5)
        assert torch.ops.routec.linear_scan(a, b, h0, False).shape == (3, 11, 5)
        u = torch.empty(2, 11, 5, dtype=torch.bfloat16)
        A, B = torch.empty(5, 4), torch.empty(2, 11, 4, dtype=torch.bfloat16)
        y, ckpt = torch.ops.routec.selective_scan(u, u, A, B, B, None, u, None, True, False)
        assert y.shape == (2, 11, 5) and y.dtype == torch.bfloat16
        assert ckpt.shape == (2, 0, 5, 4) and ckpt.dtype == torch.float32  # reference path: no checkpoints


def test_fake_shapes_triton_path(triton_backend):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        u, A, B = torch.empty(2, 17, 5), torch.empty(5, 4), torch.empty(2, 17, 4)
        y, ckpt = torch.ops.routec.selective_scan(u, u, A, B, B, None, None, None, False, True)
        chunk = scan._selective_chunk_size(u.device)
        assert y.shape == (2, 17, 5) and ckpt.shape == (2, -(-17 // chunk), 5, 4)


def test_selective_reference_against_softplus_identity():
    """delta_softplus with delta_bias equals passing softplus(delta + bias) precomputed, without either flag."""
    u, delta, A, B, C, D, z, bias = (x.double() for x in _selective_inputs(2, 8, 4, 3, seed=11))
    y1 = scan.selective_scan_reference(u, delta, A, B, C, D, z, bias, delta_softplus=True)
    y2 = scan.selective_scan_reference(u, F.softplus(delta + bias), A, B, C, D, z)
    _close(y1, y2, 1e-12)


def test_bf16_inputs_accumulate_in_fp32(triton_backend):
    """bf16 in, bf16 out, fp32 inside (the kernels cast right after loading, so the interpreter's bf16
    arithmetic is never used): within bf16 rounding of the float64 reference."""
    a, b, h0 = _linear_inputs(2, 40, 7, True, seed=5)
    h = ops.linear_scan(a.bfloat16(), b.bfloat16(), h0.bfloat16())
    assert h.dtype == torch.bfloat16
    ref = scan.linear_scan_reference(*(x.bfloat16().double() for x in (a, b, h0)))
    _close(h, ref, 2e-2)
    inputs = _selective_inputs(2, 19, 6, 4, seed=9)
    y = ops.selective_scan(*(x.bfloat16() for x in inputs), delta_softplus=True)
    assert y.dtype == torch.bfloat16
    ref = scan.selective_scan_reference(*(x.bfloat16().double() for x in inputs), delta_softplus=True)
    _close(y, ref, 2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reverse", [False, True])
def test_cuda_kernels_match_reference(monkeypatch, dtype, reverse):
    """On a GPU: compiled kernels (default launch configs, several chunks and channel blocks), fp32 and bf16."""
    monkeypatch.setenv("ROUTEC_POISON", "1")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    a, b, h0 = (x.cuda().to(dtype) for x in _linear_inputs(3, 1000, 77, True))
    leaves = [x.clone().requires_grad_(True) for x in (a, b, h0)]
    h = ops.linear_scan(*leaves, reverse=reverse)
    ref_inputs = tuple(x.double() for x in (a, b, h0))
    _close(h, scan.linear_scan_reference(*ref_inputs, reverse=reverse), tol)
    dh = torch.randn_like(h)
    h.backward(dh)
    ref_grads = reference_vjp(lambda *x: scan.linear_scan_reference(*x, reverse=reverse), ref_inputs, (dh.double(),))
    for leaf, expected in zip(leaves, ref_grads):
        _close(leaf.grad, expected, tol)

    inputs = tuple(x.cuda().to(dtype) for x in _selective_inputs(2, 300, 70, 16, seed=1))
    leaves = tuple(x.clone().requires_grad_(True) for x in inputs)
    y = ops.selective_scan(*leaves, delta_softplus=True, reverse=reverse)
    ref_inputs = tuple(x.double() for x in inputs)
    _close(y, scan.selective_scan_reference(*ref_inputs, delta_softplus=True, reverse=reverse), tol)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref_grads = reference_vjp(
        lambda *x: scan.selective_scan_reference(*x, delta_softplus=True, reverse=reverse), ref_inputs, (dy.double(),)
    )
    for leaf, expected in zip(leaves, ref_grads):
        _close(leaf.grad, expected, 2 * tol)
