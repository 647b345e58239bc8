"""compiler.passes.multiroute: independent multi-route scans merge into one combine="none" launch.

Before/after on small fx graphs that call the ops directly (what the compiler's scan lowering emits: one
single-route call per `scan … order route_table(…)`): how many calls remain, which inputs stay shared, the
graph lints, and the merged graph computes what the unmerged one did — forward and every gradient, on the
reference backend and with the kernels in the Triton interpreter (NaN-poisoned outputs). Calls that depend
on each other, differ in sizes, optional arguments, flags or dtypes, take weights or sum several routes
are left alone. End to end: stdlib:mhs_vm, whose 12 S6 scans (3 ScanHeads x 4 routes) the scan lowering
emits as single-route calls, runs them as one launch and computes what the unmerged graph does.
"""

import copy
import operator

import pytest
import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from routec.codegen import multiscan as ms
from routec.codegen.functions import expand_steps
from routec.compiler import load
from routec.compiler.meta import ROUTE_SHAPE
from routec.compiler.passes import multiroute as mr
from routec.compiler.passes.fusion import verify


class Builder:
    """An fx graph of placeholders with symbolic shapes (as the elaborator records them) and, beside it, a
    random example value for each, in placeholder order."""

    def __init__(self, seed=0):
        self.graph = fx.Graph()
        self.values: list[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(seed)
        self.sizes = {"B": 2}

    def input(self, name, shape, kind="randn", record=True, dtype=torch.float32):
        node = self.graph.placeholder(name)
        if record:
            node.meta[ROUTE_SHAPE] = tuple(shape)
        dims = [self.sizes.get(d, d) for d in shape]
        if kind == "perm":
            value = torch.randperm(dims[0], generator=self.gen)
        elif kind == "decay":  # A < 0, a in (0, 1): stable scans
            value = -0.2 - torch.rand(*dims, generator=self.gen, dtype=dtype)
        elif kind == "gate":
            value = 0.05 + 0.9 * torch.rand(*dims, generator=self.gen, dtype=dtype)
        else:
            value = torch.randn(*dims, generator=self.gen, dtype=dtype)
        self.values.append(value)
        return node

    def route(self, L):
        return self.graph.call_function(torch.unsqueeze, (self.input(f"p{len(self.values)}", (L,), "perm"), 0))

    def s6(self, u, L, D, N, extras=False, **kw):
        """One single-route S6 call as the scan lowering writes it; its own dt, A, B, C (and D, z, bias)."""
        i = len(self.values)
        dt = self.input(f"dt{i}", ("B", L, D), "gate")
        A = self.input(f"A{i}", (D, N), "decay")
        B = self.input(f"B{i}", ("B", L, N))
        C = self.input(f"C{i}", ("B", L, N))
        skip = self.input(f"D{i}", (D,))
        z, bias = (self.input(f"z{i}", ("B", L, D)), self.input(f"bias{i}", (D,))) if extras else (None, None)
        return self.graph.call_function(ms.multi_route_selective_scan, (u, dt, A, B, C, skip, z, bias),
                                        {"routes": self.route(L), "weights": None, **kw})

    def module(self, outputs):
        self.graph.output(tuple(outputs))
        return fx.GraphModule(torch.nn.Module(), self.graph)


def _inputs(values, grad=True):
    return [v.clone().requires_grad_(grad and v.is_floating_point()) for v in values]


def _check_same(before, after, values, tol=1e-5):
    """`after` (merged) computes what `before` did: outputs and the gradient of every floating input."""
    xs, ys = _inputs(values), _inputs(values)
    out0, out1 = before(*xs), after(*ys)
    leaves0 = [x for x in xs if x.requires_grad]
    leaves1 = [y for y in ys if y.requires_grad]
    cot = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(out0)]
    for o0, o1 in zip(out0, out1):
        assert not torch.isnan(o1).any()
        torch.testing.assert_close(o1, o0, rtol=tol, atol=tol)
    g0 = torch.autograd.grad(out0, leaves0, cot)
    g1 = torch.autograd.grad(out1, leaves1, cot)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _merged(gm):
    """A copy of `gm` after the pass (the original keeps the unmerged graph)."""
    merged = copy.deepcopy(gm)  # node meta (shapes) is copied with the graph
    removed = mr.merge_graph(merged)
    verify(merged)
    return merged, removed


def _calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in mr.TARGETS]


def mhs_head(L=9, D=3, N=4, routes=4, seed=0):
    """A ScanHead: `routes` S6 scans of one input u, each with its own parameters."""
    b = Builder(seed)
    u = b.input("u", ("B", L, D))
    return b, b.module([b.s6(u, L, D, N) for _ in range(routes)])


def test_head_of_four_routes_becomes_one_call(reference_backend):
    b, gm = mhs_head()
    merged, removed = _merged(gm)
    assert removed == 3 and len(_calls(gm)) == 4
    (call,) = _calls(merged)
    assert call.kwargs == {"delta_softplus": False, "combine": "none"}
    u, dt, A, B, C, D, z, bias, routes = call.args
    assert u.op == "placeholder" and u.target == "u"  # the shared input stays shared
    for stacked in (dt, A, B, C, D):
        assert stacked.target is torch.stack and len(stacked.args[0]) == 4
    assert z is None and bias is None and routes.target is torch.cat
    outputs = merged.graph.output_node().args[0]
    assert [(o.target, o.args[1]) for o in outputs] == [(operator.getitem, r) for r in range(4)]
    assert merged.meta[mr.MERGED] == [(4, 4)]
    _check_same(gm, merged, b.values, tol=0)  # the same arithmetic on the same values


@pytest.mark.parametrize("broadcast", [False, True])
def test_full_shape_expand_steps_wrappers_are_seen_through(reference_backend, broadcast):
    # the scan lowering passes each coefficient through expand_steps(x, sizes); at x's own shape that is x,
    # so a head's u stays shared (and the unused wrappers go), while a real broadcast is stacked
    b = Builder(9)
    L, D, N = 6, 2, 3
    u = b.input("u", ("B", L, D))
    sources = [u, u] + ([b.input("v", ("B", D))] if broadcast else [])  # v [B, D]: the same at every step
    ys = []
    for x in sources:
        wrapped = b.graph.call_function(expand_steps, (x, [2, L, D]))
        wrapped.meta[ROUTE_SHAPE] = ("B", L, D)
        ys.append(b.s6(wrapped, L, D, N))
    gm = b.module(ys)
    merged, removed = _merged(gm)
    assert removed == len(sources) - 1
    shared = _calls(merged)[0].args[0]
    if broadcast:
        assert shared.target is torch.stack and [p.target for p in shared.args[0]] == ["u", "u", expand_steps]
    else:
        assert shared.op == "placeholder" and shared.target == "u"
        assert not any(n.target is expand_steps for n in merged.graph.nodes)
    _check_same(gm, merged, b.values)


def test_heads_merge_with_each_other_and_keep_extras(reference_backend):
    # two heads (different inputs u), z and delta_bias given, softplus: one group of 4 routes, u stacked
    b = Builder(1)
    u1, u2 = b.input("u1", ("B", 7, 3)), b.input("u2", ("B", 7, 3))
    ys = [b.s6(u, 7, 3, 2, extras=True, delta_softplus=True) for u in (u1, u1, u2, u2)]
    gm = b.module(ys)
    merged, removed = _merged(gm)
    assert removed == 3
    (call,) = _calls(merged)
    assert call.args[0].target is torch.stack and call.kwargs["delta_softplus"] is True
    assert all(a is not None for a in call.args[:8])
    _check_same(gm, merged, b.values)


def test_dependent_calls_are_not_merged(reference_backend):
    b = Builder(2)
    u = b.input("u", ("B", 6, 2))
    y1 = b.s6(u, 6, 2, 2)
    y2 = b.s6(b.graph.call_function(torch.tanh, (y1,)), 6, 2, 2)  # reads y1
    y3 = b.s6(u, 6, 2, 2)  # independent of y1: merges with it, y2 stays on its own after them
    gm = b.module([y2, y3])
    merged, removed = _merged(gm)
    assert removed == 1 and len(_calls(merged)) == 2
    first, second = _calls(merged)
    assert first.kwargs["combine"] == "none" and "combine" not in second.kwargs
    _check_same(gm, merged, b.values)


def test_crossing_dependencies_give_an_acyclic_graph(reference_backend):
    # a1 -> a2 and b2 -> b1, with a1, b1 of one size and a2, b2 of another: merging {a1, b1} and {a2, b2}
    # together would be a cycle; the groups are merged one at a time on the current graph
    b = Builder(3)
    u, v = b.input("u", ("B", 5, 2)), b.input("v", ("B", 5, 3))
    a1 = b.s6(u, 5, 2, 2)
    b2 = b.s6(v, 5, 3, 2)
    widened = b.graph.call_function(torch.nn.functional.pad, (a1, (0, 1)))  # [B, 5, 3]
    narrowed = b.graph.call_function(operator.getitem, (b2, (slice(None), slice(None), slice(0, 2))))  # [B, 5, 2]
    widened.meta[ROUTE_SHAPE], narrowed.meta[ROUTE_SHAPE] = ("B", 5, 3), ("B", 5, 2)
    a2 = b.s6(widened, 5, 3, 2)
    b1 = b.s6(narrowed, 5, 2, 2)
    gm = b.module([a2, b1])
    merged, removed = _merged(gm)
    assert removed == 1 and len(_calls(merged)) == 3
    _check_same(gm, merged, b.values)


@pytest.mark.parametrize("change", ["size", "state", "pattern", "softplus", "weights", "two_routes_summed",
                                    "unknown_shape", "unknown_routes"])
def test_calls_that_differ_are_not_merged(reference_backend, change):
    b = Builder(4)
    u = b.input("u", ("B", 6, 2))
    y1 = b.s6(u, 6, 2, 2)
    if change == "size":
        y2 = b.s6(b.input("w", ("B", 6, 3)), 6, 3, 2)
    elif change == "state":
        y2 = b.s6(u, 6, 2, 3)
    elif change == "pattern":
        y2 = b.s6(u, 6, 2, 2, extras=True)
    elif change == "softplus":
        y2 = b.s6(u, 6, 2, 2, delta_softplus=True)
    else:
        y2 = b.s6(u, 6, 2, 2)
        kw = dict(y2.kwargs)
        if change == "weights":
            kw["weights"] = b.input("w", ("B", 1))
        elif change == "two_routes_summed":
            kw["routes"] = b.graph.call_function(torch.stack, ([kw["routes"].args[0]] * 2,))
            kw["routes"].meta[ROUTE_SHAPE] = (2, 6)
        elif change == "unknown_routes":
            kw["routes"] = b.graph.call_function(torch.reshape, (kw["routes"].args[0], (1, -1)))
        else:
            del y2.args[1].meta[ROUTE_SHAPE]
        y2.kwargs = kw
    gm = b.module([y1, y2])
    assert mr.merge_graph(gm) == 0 and len(_calls(gm)) == 2


def test_linear_calls_and_a_combine_none_call(reference_backend):
    # a gate a shared by all: two single-route calls and one call of 2 routes returning both merge into 4
    # routes; the 2-route call's b (shared by its routes) is expanded to them, its result is its slice
    b = Builder(5)
    L, D = 8, 3
    a = b.input("a", ("B", L, D), "gate")
    y1 = b.graph.call_function(ms.multi_route_linear_scan, (a, b.input("b1", ("B", L, D)), b.route(L)))
    y2 = b.graph.call_function(ms.multi_route_linear_scan, (a, b.input("b2", ("B", L, D)), b.route(L)))
    routes2 = b.graph.call_function(torch.stack, ([b.input("q1", (L,), "perm"), b.input("q2", (L,), "perm")],))
    routes2.meta[ROUTE_SHAPE] = (2, L)
    b3 = b.input("b3", ("B", L, D))
    y3 = b.graph.call_function(ms.multi_route_linear_scan, (a, b3, routes2), {"combine": "none"})
    gm = b.module([y1, y2, y3])
    merged, removed = _merged(gm)
    assert removed == 2
    (call,) = _calls(merged)
    a_arg, b_arg, routes = call.args
    assert a_arg.op == "placeholder" and b_arg.target is torch.cat
    assert [p.target for p in b_arg.args[0]] == [torch.unsqueeze, torch.unsqueeze, "expand"]
    assert [o.args[1] for o in merged.graph.output_node().args[0]] == [0, 1, slice(2, 4)]
    assert merged.meta[mr.MERGED] == [(3, 4)]
    _check_same(gm, merged, b.values)


def test_torch_ops_targets_and_traced_shapes(reference_backend):
    # calls of torch.ops.routec.… with shapes from ShapeProp (no symbolic ones); a float64 call is not
    # merged with float32 ones (traced shapes record dtypes)
    b = Builder(6)
    L, D = 5, 2
    a = b.input("a", ("B", L, D), "gate", record=False)
    ys = []
    for i, dtype in enumerate((torch.float32, torch.float32, torch.float64)):
        bi = b.input(f"b{i}", ("B", L, D), record=False, dtype=dtype)
        p = b.input(f"p{i}", (L,), "perm", record=False)
        routes = b.graph.call_function(torch.unsqueeze, (p, 0))
        ys.append(b.graph.call_function(torch.ops.routec.multi_route_linear_scan.default, (a, bi, routes, None)))
    gm = b.module(ys)
    assert mr.merge_graph(gm) == 0  # no shapes known yet
    ShapeProp(gm).propagate(*b.values)
    merged, removed = _merged(gm)
    assert removed == 1 and len(_calls(merged)) == 2
    _check_same(gm, merged, b.values)


def test_merged_head_in_the_triton_interpreter(triton_backend, monkeypatch):
    # the merged launch (route as a grid axis) against the unmerged graph on the reference backend
    b, gm = mhs_head(L=7, D=3, N=2, routes=3, seed=7)
    merged, _ = _merged(gm)
    xs, ys = _inputs(b.values), _inputs(b.values)
    out1 = merged(*ys)
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")
    out0 = gm(*xs)
    cot = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(out0)]
    g0 = torch.autograd.grad(out0, [x for x in xs if x.requires_grad], cot)
    monkeypatch.setenv("ROUTEC_BACKEND", "triton")
    g1 = torch.autograd.grad(out1, [y for y in ys if y.requires_grad], cot)
    for o0, o1 in zip(out0, out1):
        assert not torch.isnan(o1).any()
        torch.testing.assert_close(o1, o0, rtol=1e-5, atol=1e-5)
    for a, c in zip(g1, g0):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


def test_merged_graph_compiles(reference_backend):
    b, gm = mhs_head(L=5, D=2, N=2, routes=2, seed=8)
    merged, _ = _merged(gm)
    f = torch.compile(merged, fullgraph=True, backend="aot_eager")
    xs = _inputs(b.values, grad=False)
    for o1, o0 in zip(f(*xs), gm(*xs)):
        torch.testing.assert_close(o1, o0)


def _mhs_vm(seed=0, **sizes):
    """stdlib:mhs_vm at test sizes as elaborated (no passes), and the same weights with this pass run."""
    from routec import stdlib
    from routec.compiler.build import elaborate
    from routec.dsl import read_source

    path = stdlib.path("mhs_vm")
    nets = []
    for merge in (False, True):
        torch.manual_seed(seed)
        net = elaborate(str(path), read_source(path), {**MHS_VM, **sizes})
        if merge:
            mr.merge_routes(net)
            verify(net.graph_module)
        nets.append(net)
    return nets


MHS_VM = dict(d=12, depth=1, state=4, size=16)  # 3 heads (ScanHeads) of 4 routes, 4 channels each, a 4x4 map


def test_mhs_vm_scans_merge_into_one_launch(reference_backend):
    plain, net = _mhs_vm()
    assert mr.count_calls(plain.graph) == 12  # one single-route S6 call per (head, route)
    (call,) = _calls(net.graph_module)  # the block's three ScanHeads are independent and of one size
    assert call.kwargs["combine"] == "none" and call.args[8].target is torch.cat and len(call.args[8].args[0]) == 12
    assert net.graph_module.meta[mr.MERGED] == [(12, 12)]
    assert mr.count_calls(load("stdlib:mhs_vm", **MHS_VM).graph) == 1  # compile_source runs the pass
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(net(x), plain(x), rtol=0, atol=0)
    # gradients in float64: the CV gate makes this block ill-conditioned (fp32 gradients are ~1e-2 off
    # fp64 ones), so fp32 would only show summation-order noise
    plain, net, x = plain.double(), net.double(), x.double()
    y0, y1 = plain(x), net(x)
    g0 = torch.autograd.grad((y0 * y0).sum(), list(plain.parameters()))
    g1 = torch.autograd.grad((y1 * y1).sum(), list(net.parameters()))
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_mhs_vm_merged_in_the_triton_interpreter(triton_backend, monkeypatch):
    # tiny: a 2x2 map; the merged launch in the interpreter against the unmerged graph on the reference
    plain, net = _mhs_vm(seed=2, size=8)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    y1 = net(x)
    g1 = torch.autograd.grad(y1.sum(), list(net.parameters()))
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")
    y0 = plain(x)
    g0 = torch.autograd.grad(y0.sum(), list(plain.parameters()))
    assert not torch.isnan(y1).any()
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g0):
        assert (a - b).norm() <= 1e-3 * b.norm()


def test_run_stats_shows_the_merge(capsys, reference_backend):
    from routec.compiler.cli import main

    params = [f"--param={k}={v}" for k, v in {**MHS_VM, "size": 8}.items()]
    assert main(["run", "stdlib:mhs_vm", "--stats", "--repeats", "1", "--batch", "1", *params]) == 0
    out = capsys.readouterr().out
    assert "multi-route scans: 12 calls → 1 launch (merged: 12 calls of 12 routes;" in out
