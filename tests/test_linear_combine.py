"""linear_combine: the Triton GEMM with the path combine in its epilogue vs the reference (TRITON_INTERPRET=1),
the reference vs a hand loop, every gradient, gradcheck, poisoned outputs, torch.compile, the fake impl and an
sm_90 build of the kernel."""

import itertools

import pytest
import torch

from routec.codegen import linear_combine as lc
from routec.codegen.ops import linear_combine


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ROUTEC_BACKEND", "triton")
    monkeypatch.setenv("ROUTEC_POISON", "1")


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")


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
