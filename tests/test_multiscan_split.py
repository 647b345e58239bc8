"""Multi-route scans with combine="none" (every route's output, [R, Bt, L, D]) and per-route D / delta_bias:
Triton (TRITON_INTERPRET=1, NaN-poisoned outputs) vs reference, forward and every gradient under a per-route
cotangent; reference vs gather -> single-route scan -> scatter written with the scan module's references;
gradcheck, torch.compile and fake shapes."""


import pytest
import torch

from routec.codegen import multiscan as ms
from routec.codegen.ops import multi_route_linear_scan, multi_route_selective_scan, route_table
from routec.codegen.scan import linear_scan_reference, selective_scan_reference


def _routes(L, R, seed=0):
    g = torch.Generator().manual_seed(seed)
    kinds = ("forward", "reverse", "random", "random")[:R]
    return torch.stack([route_table(k, L, generator=g) for k in kinds])


def _rnd(g, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()


def _linear_inputs(Bt, L, D, R, per_route_a, per_route_b, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = (0.05 + 0.9 * torch.rand(*((R,) if per_route_a else ()), Bt, L, D, generator=g, dtype=dtype)).requires_grad_()
    b = _rnd(g, *((R,) if per_route_b else ()), Bt, L, D, dtype=dtype)
    return a, b


def _selective_inputs(Bt, L, D, N, R, per_route, extras, dtype=torch.float32, seed=0):
    """per_route: the names given one tensor per route (the others are shared by all routes)."""
    g = torch.Generator().manual_seed(seed)

    def pre(name):
        return (R,) if name in per_route else ()

    x = dict(
        u=_rnd(g, *pre("u"), Bt, L, D, dtype=dtype),
        delta=_rnd(g, *pre("delta"), Bt, L, D, scale=0.5, dtype=dtype),
        A=(-0.2 - torch.rand(*pre("A"), D, N, generator=g, dtype=dtype)).requires_grad_(),
        B=_rnd(g, *pre("B"), Bt, L, N, dtype=dtype),
        C=_rnd(g, *pre("C"), Bt, L, N, dtype=dtype),
        D=None, z=None, delta_bias=None,
    )
    if extras:
        x.update(D=_rnd(g, *pre("D"), D, dtype=dtype), z=_rnd(g, *pre("z"), Bt, L, D, dtype=dtype),
                 delta_bias=_rnd(g, *pre("delta_bias"), D, scale=0.3, dtype=dtype))
    return x


def _leaves(x):
    items = x.values() if isinstance(x, dict) else x
    return [t for t in items if isinstance(t, torch.Tensor) and t.requires_grad]


def _assert_close_with_grads(out, ref, leaves, tol=1e-4, seed=1):
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))  # a different gy per route
    got = torch.autograd.grad(out, leaves, cot)
    want = torch.autograd.grad(ref, leaves, cot)
    for x, a, b in zip(leaves, got, want):
        assert a.shape == x.shape and not torch.isnan(a).any()
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "Bt,L,D,R,per_route_a,per_route_b",
    [(1, 1, 1, 1, False, False), (2, 17, 5, 3, False, True), (1, 63, 37, 2, True, True), (3, 200, 2, 4, True, False)],
)
def test_linear_split_triton_matches_reference(triton_backend, Bt, L, D, R, per_route_a, per_route_b):
    routes = _routes(L, R)
    a, b = _linear_inputs(Bt, L, D, R, per_route_a, per_route_b)
    y = multi_route_linear_scan(a, b, routes, combine="none")
    assert y.shape == (R, Bt, L, D)
    y_ref = ms.multi_route_linear_scan_reference(a, b, routes, combine="none")
    _assert_close_with_grads(y, y_ref, [a, b])


@pytest.mark.parametrize(
    "Bt,L,D,N,R,per_route,extras,softplus",
    [
        (1, 17, 5, 4, 3, ("delta", "A", "B", "C", "D", "delta_bias"), True, True),  # MHS-VM: shared u
        (2, 9, 3, 3, 2, ("u", "delta", "A", "B", "C", "z"), True, False),  # shared D and delta_bias
        (1, 1, 2, 2, 3, (), False, True),
        (1, 7, 33, 2, 2, ("A", "D"), True, True),  # two channel blocks
    ],
)
def test_selective_split_triton_matches_reference(triton_backend, Bt, L, D, N, R, per_route, extras, softplus):
    routes = _routes(L, R, seed=2)
    x = _selective_inputs(Bt, L, D, N, R, per_route, extras)
    y = multi_route_selective_scan(**x, routes=routes, delta_softplus=softplus, combine="none")
    assert y.shape == (R, Bt, L, D)
    y_ref = ms.multi_route_selective_scan_reference(**x, routes=routes, delta_softplus=softplus, combine="none")
    _assert_close_with_grads(y, y_ref, _leaves(x))


def test_selective_split_triton_two_chunks(triton_backend):
    # L = 66 > CHUNK (64): checkpoints and chunk recomputation with one route per program; 2-D routes
    L, H, W = 66, 6, 11
    routes = torch.stack([route_table(k, L, H, W) for k in ("spiral", "diagonal_reverse")])
    x = _selective_inputs(1, L, 2, 2, 2, ("delta", "A", "D"), extras=True, seed=3)
    y = multi_route_selective_scan(**x, routes=routes, delta_softplus=True, combine="none")
    y_ref = ms.multi_route_selective_scan_reference(**x, routes=routes, delta_softplus=True, combine="none")
    _assert_close_with_grads(y, y_ref, _leaves(x))


def test_selective_per_route_D_with_weights_triton(triton_backend):
    # per-route D and delta_bias also in the weighted sum (combine="sum")
    L, R = 13, 3
    routes = _routes(L, R, seed=4)
    x = _selective_inputs(2, L, 3, 2, R, ("A", "D", "delta_bias"), extras=True, seed=4)
    w = torch.randn(2, L, R, generator=torch.Generator().manual_seed(5)).requires_grad_()
    y = multi_route_selective_scan(**x, routes=routes, weights=w, delta_softplus=True)
    y_ref = ms.multi_route_selective_scan_reference(**x, routes=routes, weights=w, delta_softplus=True)
    _assert_close_with_grads(y, y_ref, _leaves(x) + [w])


def test_linear_split_reference_is_a_loop_of_single_scans():
    Bt, L, D, R = 2, 10, 3, 3
    routes = _routes(L, R, seed=6)
    a, b = _linear_inputs(Bt, L, D, R, True, False, dtype=torch.float64)
    want = []
    for r in range(R):
        idx = routes[r]
        h = linear_scan_reference(a[r][:, idx], b[:, idx])  # gather, single-route scan
        y_r = torch.empty_like(h)
        y_r[:, idx] = h  # scatter back
        want.append(y_r)
    torch.testing.assert_close(ms.multi_route_linear_scan_reference(a, b, routes, combine="none"), torch.stack(want))


def test_selective_split_reference_is_a_loop_of_single_scans():
    Bt, L, D, N, R = 2, 8, 3, 4, 3
    routes = _routes(L, R, seed=7)
    x = _selective_inputs(Bt, L, D, N, R, ("delta", "A", "B", "C", "D", "delta_bias", "z"), True, torch.float64)
    want = []
    for r in range(R):
        idx = routes[r]
        y = selective_scan_reference(
            x["u"][:, idx], x["delta"][r][:, idx], x["A"][r], x["B"][r][:, idx], x["C"][r][:, idx], x["D"][r],
            x["z"][r][:, idx], x["delta_bias"][r], delta_softplus=True,
        )
        y_r = torch.empty_like(y)
        y_r[:, idx] = y
        want.append(y_r)
    got = ms.multi_route_selective_scan_reference(**x, routes=routes, delta_softplus=True, combine="none")
    torch.testing.assert_close(got, torch.stack(want))


def test_gradcheck_split_reference_ops(reference_backend):
    routes = _routes(5, 3, seed=8)
    a, b = _linear_inputs(2, 5, 2, 3, False, True, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: multi_route_linear_scan(a, b, routes, combine="none"), (a, b))
    x = _selective_inputs(1, 5, 2, 2, 3, ("delta", "A", "D", "delta_bias"), True, torch.float64)
    names = list(x)

    def f(*args):
        return multi_route_selective_scan(**dict(zip(names, args)), routes=routes, delta_softplus=True, combine="none")

    assert torch.autograd.gradcheck(f, tuple(x.values()))


def test_compile_and_fake(reference_backend):
    routes = _routes(6, 3)
    a, b = _linear_inputs(2, 6, 3, 3, False, True)
    f = torch.compile(lambda a, b: multi_route_linear_scan(a, b, routes, combine="none"), fullgraph=True,
                      backend="aot_eager")
    y = f(a, b)
    torch.testing.assert_close(y, ms.multi_route_linear_scan_reference(a, b, routes, combine="none"))
    (y * torch.arange(3.0)[:, None, None, None]).sum().backward()
    assert a.grad is not None and b.grad is not None and b.grad[0].abs().sum() == 0  # route 0 has weight 0
    x = _selective_inputs(2, 6, 3, 2, 3, ("delta", "A", "D"), True)
    g = torch.compile(
        lambda x: multi_route_selective_scan(**x, routes=routes, delta_softplus=True, combine="none"),
        fullgraph=True, backend="aot_eager",
    )
    y = g(x)
    torch.testing.assert_close(
        y, ms.multi_route_selective_scan_reference(**x, routes=routes, delta_softplus=True, combine="none")
    )
    y.sum().backward()
    assert x["D"].grad is not None and x["D"].grad.shape == (3, 3)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fr = torch.empty(3, 7, dtype=torch.int64)
        y = torch.ops.routec.multi_route_linear_scan(torch.empty(2, 7, 5), torch.empty(3, 2, 7, 5), fr, None, True)
        assert y.shape == (3, 2, 7, 5)
        y = torch.ops.routec.multi_route_selective_scan(
            torch.empty(2, 7, 5), torch.empty(3, 2, 7, 5), torch.empty(3, 5, 4), torch.empty(2, 7, 4),
            torch.empty(2, 7, 4), torch.empty(3, 5), None, None, fr, None, False, True,
        )
        assert y.shape == (3, 2, 7, 5)


def test_combine_errors():
    a = torch.zeros(2, 5, 3)
    routes = _routes(5, 2)
    with pytest.raises(ValueError, match="combine must be 'sum' or 'none', got 'mean'"):
        multi_route_linear_scan(a, a, routes, combine="mean")
    with pytest.raises(ValueError, match="combine='none' returns every route's output and takes no weights"):
        multi_route_linear_scan(a, a, routes, torch.zeros(2, 2), combine="none")
    with pytest.raises(ValueError, match=r"D must be \[3\] or \[2, 3\], got \[3, 3\]"):
        multi_route_selective_scan(a, a, torch.zeros(3, 4), torch.zeros(2, 5, 4), torch.zeros(2, 5, 4),
                                   torch.zeros(3, 3), None, None, routes)
