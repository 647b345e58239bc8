"""linear_combine: the Triton GEMM with the path combine in its epilogue vs the reference (TRITON_INTERPRET=1),
the reference vs a hand loop, every gradient, gradcheck, poisoned outputs, torch.compile, the fake impl and an
sm_90 build of the kernel."""

import itertools

import pytest
import torch

from routec.codegen import linear_combine as lc
from routec.codegen.ops import linear_combine


# (x shape [*S, K], N, P, mode, weights shape [*S', P] or None, bias?)
CASES = [
    ((2, 5, 17), 19, 3, "gate", (2, 3), True),  # per-sample gate, N-D input
    ((3, 7, 9), 63, 2, "gate", (3, 7, 2), False),  # per-token gate, no bias
    ((1, 1), 1, 2, "gate", (1, 2), True),  # one row, one feature, one output
    ((17, 33), 5, 4, "gate", (1, 4), True),  # 2-D input, broadcast sample dim
    ((2, 5, 9), 17, 3, "gate", (2, 1, 3), True),  # broadcast token dim
    ((70, 65), 66, 2, "sum", None, True),  # every dim above one 64-tile
    ((2, 5, 9), 17, 3, "mean", None, True),
    ((4, 9), 7, 1, "mean", None, False),  # a single path: just the Linear
]


def _inputs(x_shape, n_out, n_paths, weights_shape, bias, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=g, dtype=dtype)
    weight = torch.randn(n_out, x_shape[-1], generator=g, dtype=dtype) / x_shape[-1] ** 0.5
    b = torch.randn(n_out, generator=g, dtype=dtype) if bias else None
    others = torch.randn(n_paths - 1, *x_shape[:-1], n_out, generator=g, dtype=dtype)
    weights = torch.rand(weights_shape, generator=g, dtype=dtype) if weights_shape else None
    return x, weight, b, others, weights


def _grads(fn, tensors, dy):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in tensors]
    y = fn(*leaves)
    wrt = [t for t in leaves if t is not None]
    return y.detach(), torch.autograd.grad(y, wrt, dy)


@pytest.mark.parametrize("x_shape,n_out,n_paths,mode,weights_shape,bias", CASES)
def test_triton_matches_reference(triton_backend, monkeypatch, x_shape, n_out, n_paths, mode, weights_shape, bias):
    tensors = _inputs(x_shape, n_out, n_paths, weights_shape, bias)
    dy = torch.randn(*x_shape[:-1], n_out, generator=torch.Generator().manual_seed(1))
    y, grads = _grads(lambda *t: linear_combine(*t, mode=mode), tensors, dy)
    ref_y, ref_grads = _grads(lambda *t: lc.linear_combine_reference(*t, mode=mode), tensors, dy)
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    assert len(grads) == len(ref_grads) == sum(t is not None for t in tensors)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_kernel_writes_every_element(triton_backend):
    """A NaN-filled `out=` buffer, small tiles so that the grid has partial tiles in both dims."""
    x, weight, bias, others, weights = _inputs((2, 9, 20), 35, 3, (2, 9, 3), True)
    out = torch.full((2, 9, 35), float("nan"))
    y = lc.linear_combine_forward(x, weight, bias, others, weights, mode="gate", out=out, blocks=(16, 16, 16))
    assert y is out and not torch.isnan(out).any()
    torch.testing.assert_close(out, lc.linear_combine_reference(x, weight, bias, others, weights), rtol=1e-5,
                               atol=1e-5)


def _hand_loop(x, weight, bias, others, weights, mode):
    """y[s, n] = Σ_p c[s', p] * path_p[s, n] with path_{P-1}[s, n] = Σ_k x[s, k] weight[n, k] + bias[n]."""
    inner, n_out, n_paths = x.shape[:-1], weight.shape[0], others.shape[0] + 1
    y = torch.zeros(*inner, n_out, dtype=torch.float64)
    for s in itertools.product(*[range(n) for n in inner]):
        for n in range(n_out):
            lin = sum(float(x[s + (k,)]) * float(weight[n, k]) for k in range(x.shape[-1]))
            lin += float(bias[n]) if bias is not None else 0.0
            values = [float(others[(p,) + s + (n,)]) for p in range(n_paths - 1)] + [lin]
            for p, v in enumerate(values):
                if mode == "gate":
                    w_index = tuple(0 if size == 1 else i for i, size in zip(s, weights.shape[:-1]))
                    c = float(weights[w_index + (p,)])
                else:
                    c = 1.0 if mode == "sum" else 1.0 / n_paths
                y[s + (n,)] += c * v
    return y


@pytest.mark.parametrize("case", [0, 3, 4, 6, 7])
def test_reference_matches_hand_loop(case):
    x_shape, n_out, n_paths, mode, weights_shape, bias = CASES[case]
    tensors = _inputs(x_shape, n_out, n_paths, weights_shape, bias, dtype=torch.float64)
    want = _hand_loop(*tensors, mode)
    torch.testing.assert_close(lc.linear_combine_reference(*tensors, mode=mode), want)


@pytest.mark.parametrize("mode,weights_shape", [("gate", (2, 3)), ("gate", (2, 4, 3)), ("sum", None),
                                                ("mean", None)])
def test_gradcheck_reference_backend(reference_backend, mode, weights_shape):
    tensors = _inputs((2, 4, 5), 3, 3, weights_shape, True, dtype=torch.float64)
    leaves = tuple(t.requires_grad_() for t in tensors if t is not None)

    def fn(x, w, b, o, *g):
        return linear_combine(x, w, b, o, g[0] if g else None, mode=mode)

    assert torch.autograd.gradcheck(fn, leaves)


def test_triton_backward_formulas_in_float64():
    """The Triton path's torch-op backward (run directly in float64) against autograd of the reference."""
    tensors = _inputs((3, 4, 6), 5, 3, (3, 1, 3), True, dtype=torch.float64)
    dy = torch.randn(3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = lc.linear_combine_backward(*tensors, "gate", dy)
    _, want = _grads(lambda *t: lc.linear_combine_reference(*t, mode="gate"), tensors, dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_bias_free_and_one_dim_input(reference_backend):
    x, weight, _, others, weights = _inputs((6,), 4, 2, (2,), False)
    y = linear_combine(x, weight, None, others, weights, mode="gate")
    want = weights[0] * others[0] + weights[1] * (weight @ x)
    torch.testing.assert_close(y, want)


def test_torch_compile_fullgraph(reference_backend):
    tensors = _inputs((2, 5, 8), 6, 3, (2, 3), True)
    leaves = [t.clone().requires_grad_() for t in tensors]

    def fn(x, w, b, o, g):
        return linear_combine(x, w, b, o, g, mode="gate") * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    y = compiled(*leaves)
    y.sum().backward()
    torch.testing.assert_close(y, fn(*tensors))
    assert all(t.grad is not None for t in leaves)


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 9, 6)
        weight, bias = torch.empty(5, 6), torch.empty(5)
        others = torch.empty(2, 4, 9, 5)
        weights = torch.empty(4, 3, dtype=torch.float64)
        y = torch.ops.routec.linear_combine(x, weight, bias, others, weights, "gate")
        assert y.shape == (4, 9, 5) and y.dtype == torch.float64
        y = torch.ops.routec.linear_combine(x, weight, None, others, None, "mean")
        assert y.shape == (4, 9, 5) and y.dtype == torch.float32


@pytest.mark.parametrize("bad", ["mode", "K", "others", "weights", "missing"])
def test_shape_errors(bad):
    x, weight, bias, others, weights = _inputs((2, 5, 4), 3, 3, (2, 3), True)
    mode = "gate"
    if bad == "mode":
        mode = "max"
    elif bad == "K":
        weight = torch.zeros(3, 5)
    elif bad == "others":
        others = torch.zeros(2, 2, 5, 4)
    elif bad == "weights":
        weights = torch.zeros(2, 2)
    else:
        weights = None
    with pytest.raises(ValueError, match="linear_combine"):
        lc.linear_combine_reference(x, weight, bias, others, weights, mode=mode)


@pytest.mark.slow
def test_kernel_compiles_for_sm90(compile_for_sm90):
    specs = [("_linear_combine_fwd_kernel",
              dict(Q=2, MODE=mode, HAS_BIAS=True, UPCAST=False, PRECISION=prec, BLOCK_M=64, BLOCK_N=64,
                   BLOCK_K=32), types)
             for mode in (0, 2)
             for prec, types in (("ieee", {}), (None, {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16"}))]
    compile_for_sm90("routec.codegen.linear_combine", specs)
    compile_for_sm90("routec.codegen.linear_combine", [("_linear_combine_fwd_kernel", dict(
        Q=1, MODE=1, HAS_BIAS=False, UPCAST=False, PRECISION=None, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
        {"x_ptr": "*bf16", "w_ptr": "*bf16", "others_ptr": "*bf16", "y_ptr": "*bf16"})], num_warps=8)


# ------------------------------------------------------------------------------------ the lowering (elaborate)

from torch import fx  # noqa: E402

from routec.codegen import ops  # noqa: E402
from routec.compiler import compile_source, load  # noqa: E402

SPEC_SUM = """
model S(d: int = 8) {
    in x: [B, L, d]
    m = Linear(d, d)
    paths p(x) {
        a: m(x)
        b: x -> flip(1) -> m -> flip(1)
        c: x -> Linear(d, 5) -> gelu -> Linear(5, d)
    } combine AGG
    out p
}
"""

SPEC_GATE = """
model G(d: int = 8) {
    in x: [B, L, d]
    gate g = GATE of Linear(d, 3)(x)
    paths p(x) {
        a: x -> gelu
        b: x -> Linear(d, d, bias=false) -> tanh
        c: x -> Linear(d, d)
    } combine gate g
    out p
}
"""

SPEC_2D = """
model T(d: int = 8) {
    in x: [B, d]
    gate g = softmax of Linear(d, 2)(x)
    paths p(x) {
        a: x -> gelu
        b: x -> Linear(d, 6) -> relu -> Linear(6, d)
    } combine gate g
    out p
}
"""


def _fused_nodes(net):
    modules = [*net.graph_module.modules(), *net.modules()]
    steps = [getattr(m, "_step", None) for m in modules]  # scan bodies are held outside the module registry
    graphs = {id(m.graph): m.graph for m in modules + steps if isinstance(m, fx.GraphModule)}.values()
    return [n for g in graphs for n in g.nodes if n.op == "call_function" and n.target is ops.linear_combine]


def _run(net, inputs, seed=3):
    leaves = [t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    torch.manual_seed(seed)  # the same gate / path samples in both builds
    y = net(*leaves)
    ys = y if isinstance(y, tuple) else (y,)
    ys = [v for v in ys if isinstance(v, torch.Tensor) and v.is_floating_point()]
    g = torch.Generator().manual_seed(seed)
    loss = sum((v * torch.randn(v.shape, generator=g)).sum() for v in ys)
    loss.backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    return [v.detach() for v in ys], [t.grad for t in leaves if t.is_floating_point()], grads


def _fused_vs_unfused(monkeypatch, build, inputs, expect_fused=1):
    monkeypatch.setenv("ROUTEC_COMBINE_FUSION", "0")
    torch.manual_seed(0)
    plain = build()
    assert not _fused_nodes(plain)
    monkeypatch.setenv("ROUTEC_COMBINE_FUSION", "1")
    torch.manual_seed(0)
    fused = build()
    assert len(_fused_nodes(fused)) == expect_fused
    assert sorted(fused.state_dict()) == sorted(plain.state_dict())  # same names (the order may differ in scans)
    fused.load_state_dict(plain.state_dict())
    want, want_dx, want_dp = _run(plain, inputs)
    got, got_dx, got_dp = _run(fused, inputs)
    for a, b in zip(got + got_dx, want + want_dx):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert set(got_dp) == set(want_dp)
    for name in want_dp:
        assert (got_dp[name] is None) == (want_dp[name] is None), name
        if want_dp[name] is not None:
            torch.testing.assert_close(got_dp[name], want_dp[name], rtol=1e-5, atol=1e-6)
    return fused


@pytest.mark.parametrize("agg", ["sum", "mean"])
def test_lowering_sum_mean(reference_backend, monkeypatch, agg):
    x = torch.randn(2, 5, 8)
    _fused_vs_unfused(monkeypatch, lambda: compile_source(SPEC_SUM.replace("AGG", agg), "s.route"), [x])


@pytest.mark.parametrize("gate", ["softmax", "topk(2)"])
def test_lowering_gate(reference_backend, monkeypatch, gate):
    x = torch.randn(2, 5, 8)
    _fused_vs_unfused(monkeypatch, lambda: compile_source(SPEC_GATE.replace("GATE", gate), "g.route"), [x])


SPEC_SHARED = """
model H(d: int = 8) {
    in x: [B, L, d]
    m = Linear(d, d)
    paths p(x) {
        a: x -> flip(1) -> m -> flip(1)
        b: m(x)
    } combine mean
    out p
}
"""


def test_lowering_shared_linear(reference_backend, monkeypatch):
    """The last path's Linear instance also runs in another path: both reach its weight's gradient."""
    _fused_vs_unfused(monkeypatch, lambda: compile_source(SPEC_SHARED, "h.route"), [torch.randn(2, 5, 8)])


def test_lowering_per_token_gate_on_triton_kernel(triton_backend, monkeypatch):
    x = torch.randn(2, 5, 8)
    _fused_vs_unfused(monkeypatch, lambda: compile_source(SPEC_GATE.replace("GATE", "softmax"), "g.route",
                                                          fuse=False), [x])


def test_lowering_two_dim_input_on_triton_kernel(triton_backend, monkeypatch):
    x = torch.randn(3, 8)
    _fused_vs_unfused(monkeypatch, lambda: compile_source(SPEC_2D, "t.route", fuse=False), [x])


NOT_FUSED = {
    "softmax_gate reads the paths": SPEC_SUM.replace("AGG", "softmax_gate(Linear(3 * d, 3), on=mean(1))"),
    "sample(drop)": SPEC_SUM.replace("AGG", "sum sample(drop=0.2)"),
    "concat": SPEC_SUM.replace("AGG", "concat(-1)"),
    "max": SPEC_SUM.replace("AGG", "max"),
    "last path is no Linear": SPEC_SUM.replace("Linear(5, d)\n", "Linear(5, d) -> gelu\n").replace("AGG", "sum"),
    "Linear output named and read later": """
model N(d: int = 8) {
    in x: [B, L, d]
    y = x -> Linear(d, d)
    paths p(x) {
        a: x -> gelu
        b: y
    } combine sum
    out p + y
}
""",
}


@pytest.mark.parametrize("why", list(NOT_FUSED))
def test_not_fused(reference_backend, why):
    net = compile_source(NOT_FUSED[why], "n.route")
    assert not _fused_nodes(net)


def test_stdlib_global_workspace_fused_vs_unfused(reference_backend, monkeypatch):
    """`output: w -> read_out -> Linear(classes, dw)` ends the last path of `combine gate g` in a scan body."""
    small = dict(digits=10, classes=19, dw=8, n=12, n_in=1, hidden=16)
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 10, generator=g)
    x = torch.randn(3, 4, 1, generator=g)
    _fused_vs_unfused(monkeypatch, lambda: load("stdlib:global_workspace", **small), [a, x])


@pytest.mark.parametrize("train", [True, False])
def test_example_paths_fused_vs_unfused(reference_backend, monkeypatch, train):
    """examples/paths.route: GatedPair's `wide: … -> Linear(2 * d, d)` ends the last path of `combine gate g`."""
    from pathlib import Path

    spec = Path(__file__).resolve().parents[1] / "examples" / "paths.route"

    def build():
        return load(spec, d=16, depth=1).train(train)

    _fused_vs_unfused(monkeypatch, build, [torch.randn(2, 5, 16)])
