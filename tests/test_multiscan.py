"""Multi-route scans: Triton (TRITON_INTERPRET=1) vs reference, reference vs gather -> single-route scan ->
scatter built from plain torch ops and the scan module's references, route tables, gradcheck, compile, fake."""


import pytest
import torch

from routec.codegen import multiscan as ms
from routec.codegen.ops import multi_route_linear_scan, multi_route_selective_scan, route_table
from routec.codegen.scan import linear_scan_reference, selective_scan_reference


def _routes(L, kinds=("forward", "reverse", "random"), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([route_table(k, L, generator=g) for k in kinds])


def _weights(kind, Bt, L, R, g, dtype=torch.float32):
    if kind is None:
        return None
    shape = (Bt, R) if kind == "sample" else (Bt, L, R)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()


def _linear_inputs(Bt, L, D, R, per_route, weights, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (R, Bt, L, D) if per_route else (Bt, L, D)
    a = (0.05 + 0.9 * torch.rand(*shape, generator=g, dtype=dtype)).requires_grad_()
    b = torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()
    return a, b, _weights(weights, Bt, L, R, g, dtype)


def _selective_inputs(Bt, L, D, N, R, per_route, weights, extras=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = (R,) if per_route else ()

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()

    u, delta = rnd(*pre, Bt, L, D), rnd(*pre, Bt, L, D, scale=0.5)
    A = (-0.2 - torch.rand(*pre, D, N, generator=g, dtype=dtype)).requires_grad_()
    B, C = rnd(*pre, Bt, L, N), rnd(*pre, Bt, L, N)
    D_, z, bias = (rnd(D), rnd(*pre, Bt, L, D), rnd(D, scale=0.3)) if extras else (None, None, None)
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D_, z=z, delta_bias=bias), _weights(weights, Bt, L, R, g, dtype)


def _leaves(*groups):
    out = []
    for grp in groups:
        items = grp.values() if isinstance(grp, dict) else (grp if isinstance(grp, tuple) else (grp,))
        out += [t for t in items if isinstance(t, torch.Tensor) and t.requires_grad]
    return out


def _assert_close_with_grads(out, ref, leaves, tol=1e-4, seed=1):
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    got = torch.autograd.grad(out, leaves, cot)
    want = torch.autograd.grad(ref, leaves, cot)
    for x, a, b in zip(leaves, got, want):
        assert a.shape == x.shape and not torch.isnan(a).any()
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "Bt,L,D,per_route,weights",
    [(1, 1, 1, False, None), (2, 17, 5, False, "sample"), (1, 17, 37, True, "token"), (1, 64, 3, False, "token"),
     (3, 200, 2, True, None), (1, 1000, 2, False, "token")],
)
def test_linear_triton_matches_reference(triton_backend, Bt, L, D, per_route, weights):
    routes = _routes(L)
    a, b, w = _linear_inputs(Bt, L, D, 3, per_route, weights)
    y = multi_route_linear_scan(a, b, routes, w)
    y_ref = ms.multi_route_linear_scan_reference(a, b, routes, w)
    _assert_close_with_grads(y, y_ref, _leaves((a, b, w)))


@pytest.mark.parametrize(
    "Bt,L,D,N,per_route,weights,extras,softplus",
    [(1, 17, 5, 4, False, None, True, True), (1, 17, 3, 3, True, "token", False, False),
     (2, 1, 2, 2, False, "sample", True, False)],
)
def test_selective_triton_matches_reference(triton_backend, Bt, L, D, N, per_route, weights, extras, softplus):
    routes = _routes(L)
    x, w = _selective_inputs(Bt, L, D, N, 3, per_route, weights, extras)
    y = multi_route_selective_scan(**x, routes=routes, weights=w, delta_softplus=softplus)
    y_ref = ms.multi_route_selective_scan_reference(**x, routes=routes, weights=w, delta_softplus=softplus)
    _assert_close_with_grads(y, y_ref, _leaves(x, w))


def test_selective_triton_long_two_chunks(triton_backend):
    # L = 66 > CHUNK (64): checkpoints, chunk recomputation and a short last chunk; 2-D snake routes
    L, H, W = 66, 6, 11
    routes = torch.stack([route_table("snake", L, H, W), route_table("column_snake_reverse", L, H, W)])
    x, w = _selective_inputs(1, L, 3, 2, 2, False, "sample", extras=True, seed=3)
    y = multi_route_selective_scan(**x, routes=routes, weights=w, delta_softplus=True)
    y_ref = ms.multi_route_selective_scan_reference(**x, routes=routes, weights=w, delta_softplus=True)
    _assert_close_with_grads(y, y_ref, _leaves(x, w))


def test_linear_reference_is_gather_scan_scatter_sum():
    Bt, L, D, R = 2, 12, 3, 3
    routes = _routes(L, seed=4)
    a, b, w = _linear_inputs(Bt, L, D, R, False, "token", dtype=torch.float64)
    want = torch.zeros(Bt, L, D, dtype=torch.float64)
    for r in range(R):
        idx = routes[r]
        h = linear_scan_reference(a[:, idx], b[:, idx])  # gather, single-route scan
        y_r = torch.empty_like(h)
        y_r[:, idx] = h  # scatter back
        want += w[:, :, r, None] * y_r
    torch.testing.assert_close(ms.multi_route_linear_scan_reference(a, b, routes, w), want)


def test_selective_reference_is_gather_scan_scatter_sum():
    Bt, L, D, N, R = 2, 9, 3, 4, 2
    routes = _routes(L, kinds=("reverse", "random"), seed=5)
    x, w = _selective_inputs(Bt, L, D, N, R, True, "sample", dtype=torch.float64)
    want = torch.zeros(Bt, L, D, dtype=torch.float64)
    for r in range(R):
        idx = routes[r]
        y = selective_scan_reference(
            x["u"][r][:, idx], x["delta"][r][:, idx], x["A"][r], x["B"][r][:, idx], x["C"][r][:, idx], x["D"],
            x["z"][r][:, idx], x["delta_bias"], delta_softplus=True,
        )
        y_r = torch.empty_like(y)
        y_r[:, idx] = y
        want += w[:, r, None, None] * y_r
    got = ms.multi_route_selective_scan_reference(**x, routes=routes, weights=w, delta_softplus=True)
    torch.testing.assert_close(got, want)


def test_forward_plus_reverse_route_equals_bidirectional_scan():
    # two routes forward and reverse == linear_scan + linear_scan(reverse=True): what a bidirectional model uses
    a, b, _ = _linear_inputs(2, 11, 4, 2, False, None, dtype=torch.float64)
    y = ms.multi_route_linear_scan_reference(a, b, _routes(11, ("forward", "reverse")))
    torch.testing.assert_close(y, linear_scan_reference(a, b) + linear_scan_reference(a, b, reverse=True))


def test_route_tables():
    H, W = 3, 4
    grid = torch.arange(12).reshape(H, W)
    assert route_table("row", 12, H, W).tolist() == grid.flatten().tolist()
    assert route_table("column", 12, H, W).tolist() == grid.T.flatten().tolist()
    assert route_table("snake", 12, H, W).tolist() == [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11]
    assert route_table("column_snake", 12, H, W).tolist() == [0, 4, 8, 9, 5, 1, 2, 6, 10, 11, 7, 3]
    assert route_table("snake_reverse", 12, H, W).tolist() == [11, 10, 9, 8, 4, 5, 6, 7, 3, 2, 1, 0]
    assert route_table("reverse", 5).tolist() == [4, 3, 2, 1, 0]
    for kind in ms.ROUTE_KINDS:
        r = route_table(kind, 12, H, W, generator=torch.Generator().manual_seed(0))
        assert r.dtype == torch.int64 and sorted(r.tolist()) == list(range(12)), kind
    with pytest.raises(ValueError, match="H \\* W == L"):
        route_table("snake", 12, 5, 2)
    with pytest.raises(ValueError, match="kind must be one of"):
        route_table("zigzag", 12, H, W)


def test_gradcheck_reference_ops(reference_backend):
    routes = _routes(5, seed=6)
    a, b, w = _linear_inputs(2, 5, 2, 3, True, "token", dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, w: multi_route_linear_scan(a, b, routes, w), (a, b, w))
    x, w = _selective_inputs(1, 5, 2, 2, 3, False, "sample", dtype=torch.float64)
    names = list(x)

    def f(*args):
        kw = dict(zip(names, args[:-1]))
        return multi_route_selective_scan(**kw, routes=routes, weights=args[-1], delta_softplus=True)

    assert torch.autograd.gradcheck(f, (*x.values(), w))


def test_compile_and_fake(reference_backend):
    routes = _routes(6)
    a, b, w = _linear_inputs(2, 6, 3, 3, False, "sample")
    f = torch.compile(multi_route_linear_scan, fullgraph=True, backend="aot_eager")
    y = f(a, b, routes, w)
    torch.testing.assert_close(y, ms.multi_route_linear_scan_reference(a, b, routes, w))
    y.sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape
    x, w = _selective_inputs(2, 6, 3, 2, 3, True, "token")
    g = torch.compile(
        lambda x, w: multi_route_selective_scan(**x, routes=routes, weights=w, delta_softplus=True),
        fullgraph=True, backend="aot_eager",
    )
    torch.testing.assert_close(
        g(x, w), ms.multi_route_selective_scan_reference(**x, routes=routes, weights=w, delta_softplus=True)
    )
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fr = torch.empty(3, 7, dtype=torch.int64)
        assert torch.ops.routec.multi_route_linear_scan(torch.empty(3, 2, 7, 5), torch.empty(3, 2, 7, 5), fr, None).shape == (2, 7, 5)
        y = torch.ops.routec.multi_route_selective_scan(
            torch.empty(2, 7, 5), torch.empty(2, 7, 5), torch.empty(3, 5, 4), torch.empty(2, 7, 4),
            torch.empty(2, 7, 4), None, None, None, fr, torch.empty(2, 3), False,
        )
        assert y.shape == (2, 7, 5)


@pytest.mark.slow
def test_kernels_compile_for_gpu(compile_for_sm90):
    routes = {"routes_ptr": "*i64"}
    specs = []
    for split in (False, True):  # combine="sum" (weighted) and combine="none" (route as a grid axis)
        linear = dict(HAS_W=not split, SPLIT=split, BLOCK_L=16, BLOCK_D=16)
        flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, HAS_W=not split, SPLIT=split, SOFTPLUS=True,
                     BLOCK_D=16, NP=4)
        specs += [
            ("_mr_linear_fwd_kernel", linear, routes), ("_mr_linear_bwd_kernel", linear, routes),
            ("_mr_selective_fwd_kernel", flags, routes), ("_mr_selective_bwd_kernel", dict(flags, CHUNK=8), routes),
        ]
    compile_for_sm90("routec.codegen.multiscan", specs)


def test_shape_errors():
    a = torch.zeros(2, 5, 3)
    with pytest.raises(ValueError, match="routes must be int64"):
        multi_route_linear_scan(a, a, torch.zeros(2, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"weights must be \[Bt, R\]"):
        multi_route_linear_scan(a, a, _routes(5), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"a must be \[2, 5, 3\] or \[3, 2, 5, 3\]"):
        multi_route_linear_scan(torch.zeros(2, 2, 5, 3), a, _routes(5))


def test_mhs_vm_route_tables_on_a_3x3_grid():
    # raster positions 0 1 2 / 3 4 5 / 6 7 8, worked by hand
    assert route_table("diagonal", 9, 3, 3).tolist() == [0, 1, 3, 6, 4, 2, 5, 7, 8]
    assert route_table("antidiagonal", 9, 3, 3).tolist() == [2, 1, 5, 8, 4, 0, 3, 7, 6]
    assert route_table("spiral", 9, 3, 3).tolist() == [0, 1, 2, 5, 8, 7, 6, 3, 4]
    assert route_table("spiral_mirrored", 9, 3, 3).tolist() == [6, 7, 8, 5, 2, 1, 0, 3, 4]
    assert route_table("spiral_reverse", 9, 3, 3).tolist() == [4, 3, 6, 7, 8, 5, 2, 1, 0]
    for kind in ("diagonal", "antidiagonal", "spiral", "spiral_mirrored"):
        for h, w in [(1, 5), (4, 2), (5, 7)]:
            assert sorted(route_table(kind, h * w, h, w).tolist()) == list(range(h * w))
