"""Branch routes with a declared capacity (`argmax(capacity=f)`, …): static shapes, no host read.

`runtime.BranchRoute(capacity_factor=f)` in "rows" mode runs each branch on C = ceil(f · rows · k / P) rows
(`runtime.branch_capacity`). Checked here: with a capacity no branch overflows, values and gradients equal
the exact route (no capacity); with overflow, they equal an independent Python loop over the rows (the first
C rows of each branch in row order are kept, the others contribute 0); one forward + backward reads nothing
on the host; torch.compile(fullgraph=True) equals eager and torch.export gives a graph without unbacked
sizes; the Triton kernels (interpreter) equal the reference backend; the compiler builds the capacity from
the gate option (topk too, where it agrees with the router's drops), the emitter rebuilds it, and
`routec run` reports dropped rows. The diagnostics are golden cases (tests/golden/semantic/*capacity*).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from routec.codegen import compaction as comp
from routec.codegen import runtime
from routec.compiler import compile_source
from routec.dsl import RouteError
from host_reads import count_host_reads

P, B, T, D = 3, 3, 5, 4


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


class RowBranch(nn.Module):
    """A row-wise branch that reads a travelling per-row tensor and a fixed outside tensor."""

    def __init__(self, d, seed, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(d, d).to(dtype)

    def forward(self, x, scale, shift):  # x [n, d], scale [n, 1], shift [d]
        return torch.tanh(self.lin(x)) * scale + shift


def _setup(kind="mix", k=1, seed=0, dtype=torch.float32, rows=(B, T)):
    """Branches, inputs (x [*rows, D], weights/indices [*rows, k], per-branch extras) for a "rows" route."""
    g = _gen(seed)
    branches = [RowBranch(D, seed=p, dtype=dtype) for p in range(P)]
    x = torch.randn(*rows, D, generator=g, dtype=dtype, requires_grad=True)
    weights = torch.rand(*rows, k, generator=g, dtype=dtype, requires_grad=True)
    if kind == "all":  # every row on branch 0
        indices = torch.zeros(*rows, k, dtype=torch.int64)
    elif kind == "skewed":  # branch 0 takes most rows, branch 2 none
        indices = (torch.rand(*rows, k, generator=g) < 0.3).to(torch.int64)
    else:
        indices = torch.randint(0, P, (*rows, k), generator=g)
    extra = []
    for _ in range(P):
        extra += [torch.rand(*rows, 1, generator=g, dtype=dtype, requires_grad=True),
                  torch.randn(D, generator=g, dtype=dtype, requires_grad=True)]
    return branches, x, weights, indices, extra


def _route(branches, factor=0.0):
    return runtime.BranchRoute(branches, mode="rows", extras=[[True, False]] * P, capacity_factor=factor)


def _loop(branches, x, weights, indices, extra, capacity):
    """Independent reference: walk the rows in order; a row adds branch p's output times its weight for p
    while fewer than `capacity` earlier rows chose p (None: no capacity)."""
    flat, w, idx = x.reshape(-1, D), weights.reshape(-1, weights.shape[-1]), indices.reshape(-1, indices.shape[-1])
    seen = [0] * P
    rows = []
    for r in range(flat.shape[0]):
        total = torch.zeros(D, dtype=x.dtype)
        for p in range(P):
            hit = idx[r] == p
            if not bool(hit.any()):
                continue
            if capacity is None or seen[p] < capacity:
                scale = extra[2 * p].reshape(-1, 1)[r: r + 1]
                y = branches[p](flat[r: r + 1], scale, extra[2 * p + 1])[0]
                total = total + y * w[r][hit].sum()
            seen[p] += 1
        rows.append(total)
    return torch.stack(rows).reshape(x.shape)


def _grads(out, tensors, seed=11):
    cot = torch.randn(out.shape, generator=_gen(seed), dtype=out.dtype)
    return torch.autograd.grad(out, tensors, cot, allow_unused=True)


def _params(branches):
    return [p for b in branches for p in b.parameters()]


# ---------------------------------------------------------------------------------------------- capacity rule


def test_branch_capacity_rule():
    assert runtime.branch_capacity(21, 1, 3, 0.75) == 6  # ceil(5.25)
    assert runtime.branch_capacity(10, 2, 4, 1.0) == 5
    assert runtime.branch_capacity(10, 1, 4, 1e-6) == 1  # at least one row
    assert runtime.branch_capacity(10, 2, 2, 4.0) == 10  # at most every row
    assert runtime.branch_capacity(0, 1, 3, 2.0) == 0
    # the rule of TopKGate's router capacity
    for rows, k, e, f in [(24, 2, 4, 1.25), (7, 1, 3, 0.5), (100, 2, 8, 1.0)]:
        assert runtime.branch_capacity(rows, k, e, f) == min(rows, max(1, math.ceil(f * rows * k / e)))


def test_bad_capacity_factor():
    with pytest.raises(ValueError, match="capacity_factor"):
        runtime.BranchRoute([nn.Identity()], mode="rows", capacity_factor=-1.0)
    with pytest.raises(ValueError, match="mode 'rows' or 'tokens'"):
        runtime.BranchRoute([nn.Identity()], mode="samples", capacity_factor=1.0)


# ---------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("kind,k", [("mix", 1), ("mix", 2), ("all", 1), ("skewed", 1)])
def test_no_overflow_equals_exact_route(reference_backend, kind, k):
    branches, x, weights, indices, extra = _setup(kind, k, seed=1)
    factor = P / k  # C = rows: nothing can overflow
    exact, capped = _route(branches), _route(branches, factor)
    inputs = [x, weights, *extra] + _params(branches)
    want = exact(x, weights, indices, *extra)
    got = capped(x, weights, indices, *extra)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for g, w in zip(_grads(got, inputs), _grads(want, inputs)):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind,k,factor", [("mix", 1, 0.5), ("mix", 2, 0.4), ("all", 1, 1.0), ("skewed", 1, 0.3),
                                           ("skewed", 2, 0.01)])
def test_overflow_equals_row_loop(reference_backend, kind, k, factor):
    branches, x, weights, indices, extra = _setup(kind, k, seed=2, dtype=torch.float64)
    route = _route(branches, factor)
    capacity = runtime.branch_capacity(B * T, k, P, factor)
    counts = [int(((indices == p).any(-1)).sum()) for p in range(P)]
    assert max(counts) > capacity, "the case should overflow"
    inputs = [x, weights, *extra] + _params(branches)
    got = route(x, weights, indices, *extra)
    want = _loop(branches, x, weights, indices, extra, capacity)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(_grads(got, inputs), _grads(want, inputs)):
        g = torch.zeros_like(w) if g is None and w is not None else g
        w = torch.zeros_like(g) if w is None and g is not None else w
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_loop_reference_without_capacity_is_the_dense_formula(reference_backend):
    """The loop itself against an even simpler formula: every branch on every row, masked by its weight."""
    branches, x, weights, indices, extra = _setup("mix", 2, seed=3, dtype=torch.float64)
    dense = torch.zeros_like(x)
    for p, branch in enumerate(branches):
        wp = (weights * (indices == p)).sum(-1)
        y = branch(x.reshape(-1, D), extra[2 * p].reshape(-1, 1), extra[2 * p + 1]).reshape(x.shape)
        dense = dense + y * wp[..., None]
    torch.testing.assert_close(_loop(branches, x, weights, indices, extra, None), dense)


def test_padding_rows_add_exact_zero_even_for_inf_outputs(reference_backend):
    """A branch that gives inf on a zero (padding) row must not poison the output."""
    class Recip(nn.Module):
        def forward(self, x, scale, shift):
            return 1.0 / x + shift

    branches = [Recip() for _ in range(P)]
    x = torch.rand(2, 4, D) + 0.5
    weights = torch.ones(2, 4, 1)
    indices = torch.zeros(2, 4, 1, dtype=torch.int64)  # branch 0 only: branches 1, 2 run on padding alone
    extra = [t for _ in range(P) for t in (torch.ones(2, 4, 1), torch.zeros(D))]
    out = _route(branches, 3.0)(x, weights, indices, *extra)
    torch.testing.assert_close(out, 1.0 / x)


def test_empty_batch(reference_backend):
    branches, x, weights, indices, extra = _setup("mix", 1, seed=4, rows=(2, 0))
    out = _route(branches, 1.0)(x, weights, indices, *extra)
    assert out.shape == (2, 0, D)


def test_gradcheck_float64(reference_backend):
    branches, x, weights, indices, extra = _setup("skewed", 1, seed=5, dtype=torch.float64, rows=(2, 4))
    route = _route(branches, 0.75)

    def f(x, weights, *extra):
        return route(x, weights, indices, *extra)

    assert torch.autograd.gradcheck(f, (x, weights, *extra))


# ---------------------------------------------------------------------------------------------- no host read


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_forward_backward_reads_nothing_on_the_host(monkeypatch, backend):
    monkeypatch.setenv("ROUTEC_BACKEND", backend)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    branches, x, weights, indices, extra = _setup("skewed", 2, seed=6)
    route = _route(branches, 0.5)
    with count_host_reads() as calls:
        out = route(x, weights, indices, *extra)
        out.sum().backward()
    assert calls == []
    assert x.grad is not None and weights.grad is not None
    # the exact route reads the counts once (the contrast that makes the count meaningful)
    with count_host_reads() as calls:
        _route(branches)(x, weights, indices, *extra)
    assert calls == ["tolist"]


# ---------------------------------------------------------------------------------------------- compile / export


def test_compile_fullgraph_equals_eager(reference_backend):
    branches, x, weights, indices, extra = _setup("skewed", 1, seed=7)
    route = _route(branches, 0.6)
    inputs = [x, weights, *extra]
    want = route(x, weights, indices, *extra)
    want_grads = _grads(want, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(route, fullgraph=True, backend="eager")
    got = compiled(x, weights, indices, *extra)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for g, w in zip(_grads(got, inputs), want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


CAPPED = """
block Ffn(d: int, h: int) {
    in x: [N, d]
    out x -> LayerNorm(d) -> Linear(d, h) -> gelu -> Linear(h, d)
}

model Capped(d: int = 8, cap: float = 0.75) {
    in x: [B, T, d]
    pre gate r = argmax(capacity=cap) of Linear(d, 3, bias=false)(x)
    out route x by r to {
        skip: identity
        small: Ffn(d, 8)
        big: Ffn(d, 16)
    }
}
"""


def _capped(**params):
    torch.manual_seed(0)
    return compile_source(CAPPED, "capped.route", **params).eval()


def test_export_has_static_shapes(reference_backend):
    net = _capped()
    x = torch.randn(3, 7, 8, generator=_gen(8))
    ep = torch.export.export(net, (x,))
    sizes = [s for n in ep.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor) for s in n.meta["val"].shape]
    assert sizes and all(isinstance(s, int) for s in sizes)  # no unbacked (or any symbolic) size
    targets = [str(n.target) for n in ep.graph.nodes]
    assert "routec.pack_rows.default" not in targets and targets.count("routec.gather_rows.default") == 3
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), net(x))


def test_compiled_model_fullgraph_equals_eager(reference_backend):
    net = _capped()
    x = torch.randn(3, 7, 8, generator=_gen(9))
    torch._dynamo.reset()
    with torch.no_grad():
        want = net(x)
        got = torch.compile(net, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------- Triton


def test_triton_interpreter_equals_reference(monkeypatch):
    branches, x, weights, indices, extra = _setup("skewed", 2, seed=10)
    route = _route(branches, 0.5)
    inputs = [x, weights, *extra] + _params(branches)
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")
    want = route(x, weights, indices, *extra)
    want_grads = _grads(want, inputs)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ROUTEC_BACKEND", "triton")
    monkeypatch.setenv("ROUTEC_POISON", "1")
    launched = []
    gather, groups = comp.gather_rows_forward, comp.compact_groups_forward

    def spy_groups(keep, **kwargs):
        launched.append(("groups", tuple(keep.shape)))
        return groups(keep, **kwargs)

    def spy_gather(x, perm, count, capacity, **kwargs):
        launched.append(("gather", capacity))
        return gather(x, perm, count, capacity, **kwargs)

    monkeypatch.setattr(comp, "compact_groups_forward", spy_groups)
    monkeypatch.setattr(comp, "gather_rows_forward", spy_gather)
    got = route(x, weights, indices, *extra)
    got_grads = _grads(got, inputs)
    cap = runtime.branch_capacity(B * T, 2, P, 0.5)
    assert launched[0] == ("groups", (P, B * T)) and launched.count(("gather", cap)) == 2 * P  # x + scale
    assert torch.equal(got, want)  # the kernels move values exactly
    for g, w in zip(got_grads, want_grads):
        assert torch.equal(g, w)


# ---------------------------------------------------------------------------------------------- compiler


def test_compiler_builds_the_capacity_and_drops_overflow(reference_backend):
    net = _capped(cap=0.5)
    (route,) = [m for m in net.modules() if isinstance(m, runtime.BranchRoute)]
    assert route.mode == "rows" and route.capacity_factor == 0.5
    seen = []
    route.register_forward_pre_hook(lambda module, args: seen.append(args[2].reshape(-1)))
    x = torch.randn(2, 9, 8, generator=_gen(12))
    with torch.no_grad():
        capped = net(x).reshape(-1, 8)
        exact = _capped(cap=100.0)(x).reshape(-1, 8)  # same weights (same seed), C = rows
        torch.testing.assert_close(_capped(cap=3.0)(x).reshape(-1, 8), exact, rtol=0, atol=1e-6)
    choice, cap = seen[0].tolist(), runtime.branch_capacity(18, 1, 3, 0.5)
    assert max(choice.count(p) for p in range(3)) > cap, "the case should overflow"
    for r, p in enumerate(choice):  # argmax weights are 1: a kept row is the exact row, a dropped row is 0
        if choice[:r].count(p) < cap:
            torch.testing.assert_close(capped[r], exact[r], rtol=0, atol=1e-6)
        else:
            assert not capped[r].any()


def test_topk_capacity_agrees_with_router_drops(reference_backend):
    spec = """
model TopCap(d: int = 8) {
    in x: [B, T, d]
    pre gate g = topk(1, capacity=0.5) of Linear(d, 3)(x)
    out route x by g to {
        a: Linear(d, d)
        b: x -> Linear(d, d) -> gelu
        c: x -> Linear(d, d) -> tanh
    }
}
"""
    torch.manual_seed(0)
    net = compile_source(spec, "topcap.route").eval()
    (route,) = [m for m in net.modules() if isinstance(m, runtime.BranchRoute)]
    assert route.capacity_factor == 0.5
    x = torch.randn(2, 9, 8, generator=_gen(13))
    with torch.no_grad():
        got = net(x)
        route.capacity_factor = 0.0  # every row of a branch runs; the router's zero weights drop the same rows
        want = net(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_capacity_on_sample_route_is_an_error(reference_backend):
    spec = """
model PerSample(d: int = 8) {
    in x: [B, T, d]
    pre gate a = argmax(capacity=1.0) of Linear(d, 2)(x -> mean(dim=1))
    out route x by a to {
        small: Linear(d, d)
        big: x -> Linear(d, d) -> gelu
    }
}
"""
    with pytest.raises(RouteError, match="R136|declares a capacity"):
        compile_source(spec, "persample.route")


def test_emitted_module_rebuilds_the_capacity(reference_backend, tmp_path):
    from routec.compiler import load
    from routec.compiler.emit import emit_module

    spec = tmp_path / "capped.route"
    spec.write_text(CAPPED, encoding="utf-8")
    torch.manual_seed(0)
    net = load(spec, cap=0.5).eval()
    source = emit_module(net, spec, {"cap": 0.5})
    assert "capacity_factor=0.5" in source
    path = tmp_path / "capped_routec.py"
    path.write_text(source, encoding="utf-8")
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("capped_routec_emitted", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    rebuilt = module.Capped().eval()
    rebuilt.load_state_dict(net.state_dict())
    (route,) = [m for m in rebuilt.modules() if isinstance(m, runtime.BranchRoute)]
    assert route.capacity_factor == 0.5
    x = torch.randn(2, 9, 8, generator=_gen(14))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), net(x), rtol=0, atol=0)


def test_run_reports_dropped_rows(reference_backend, tmp_path, capsys):
    from routec.compiler.cli import main

    spec = tmp_path / "capped.route"
    spec.write_text(CAPPED, encoding="utf-8")
    assert main(["run", str(spec), "--batch", "2", "--length", "9", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "dropped" in ln)
    cap = runtime.branch_capacity(18, 1, 3, 0.75)
    assert f"route route_r capacity {cap} rows/branch: dropped " in line
    loads = next(ln for ln in out.splitlines() if ln.strip().startswith("gate r"))
    assert loads  # the gate's statistics are still there
    per_branch = [int(v) for v in line.split("(")[1].split(" per branch")[0].split()]
    assert len(per_branch) == 3 and int(line.split("dropped ")[1].split()[0]) == sum(per_branch)


def test_capacity_drops_counts_by_hand():
    from routec.compiler.cli import capacity_drops

    route = runtime.BranchRoute([nn.Identity()] * 3, mode="rows", capacity_factor=0.5)
    indices = torch.tensor([0, 0, 0, 0, 1, 0, 2, 0]).reshape(2, 4, 1)  # C = ceil(0.5 * 8 / 3) = 2
    want = "route r capacity 2 rows/branch: dropped 4 of 8 rows (4 0 0 per branch)"
    assert capacity_drops("r", route, indices) == want
    two = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 2]])  # k = 2: C = ceil(0.5 * 4 * 2 / 3) = 2
    assert capacity_drops("r", route, two) == "route r capacity 2 rows/branch: dropped 2 of 4 rows (1 1 0 per branch)"
