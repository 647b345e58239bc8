"""leaky_rnn_scan / gru_scan / lstm_scan: Triton (TRITON_INTERPRET=1) vs reference, reference vs
torch.nn.GRUCell / LSTMCell loops and a hand loop, gradcheck of the reference op, torch.compile, fake shapes."""


import pytest
import torch

from routec.codegen import rnn
from routec.codegen.ops import gru_scan, leaky_rnn_scan, lstm_scan


def _rand(g, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()


def _leaky_inputs(B, T, n, with_h0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = _rand(g, B, T, n, dtype=dtype)
    w = _rand(g, n, n, scale=0.8 / n**0.5, dtype=dtype)
    tau = (1.0 + 3.0 * torch.rand(n, generator=g, dtype=dtype)).requires_grad_()
    h0 = _rand(g, B, n, dtype=dtype) if with_h0 else None
    return x, w, tau, h0


def _gated_inputs(B, T, n, gates, with_state, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = _rand(g, B, T, gates * n, dtype=dtype)
    w = _rand(g, gates * n, n, scale=1.0 / n**0.5, dtype=dtype)
    b = _rand(g, gates * n, scale=0.3, dtype=dtype)
    h0 = _rand(g, B, n, dtype=dtype) if with_state else None
    c0 = _rand(g, B, n, dtype=dtype) if with_state else None
    return x, w, b, h0, c0


def _assert_grads_match(outs, refs, leaves, seed=1):
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g) for o in outs]
    leaves = [t for t in leaves if t is not None]
    got = torch.autograd.grad(outs, leaves, cot)
    want = torch.autograd.grad(refs, leaves, cot)
    for a, b in zip(got, want):
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", rnn.ACTIVATIONS)
@pytest.mark.parametrize("B,T,n,with_h0", [(1, 1, 1, False), (17, 17, 5, True)])
def test_leaky_triton_matches_reference(triton_backend, activation, B, T, n, with_h0):
    x, w, tau, h0 = _leaky_inputs(B, T, n, with_h0)
    h = leaky_rnn_scan(x, w, tau, h0, activation=activation)
    h_ref = rnn.leaky_rnn_scan_reference(x, w, tau, h0, activation)
    assert not torch.isnan(h).any()
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    _assert_grads_match((h,), (h_ref,), (x, w, tau, h0))


@pytest.mark.parametrize("B,T,n", [(3, 64, 37), pytest.param(1, 1000, 3, marks=pytest.mark.slow)])
def test_leaky_triton_long_and_wide(triton_backend, B, T, n):
    x, w, tau, h0 = _leaky_inputs(B, T, n, True, seed=2)
    h = leaky_rnn_scan(x, w, tau, h0)
    h_ref = rnn.leaky_rnn_scan_reference(x, w, tau, h0, "tanh")
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    _assert_grads_match((h,), (h_ref,), (x, w, tau, h0))


@pytest.mark.parametrize("B,T,n,with_h0", [(1, 1, 1, False), (17, 17, 5, True), (2, 64, 20, True)])
def test_gru_triton_matches_reference(triton_backend, B, T, n, with_h0):
    x, w, b, h0, _ = _gated_inputs(B, T, n, 3, with_h0)
    h = gru_scan(x, w, b, h0)
    h_ref = rnn.gru_scan_reference(x, w, b, h0)
    assert not torch.isnan(h).any()
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    _assert_grads_match((h,), (h_ref,), (x, w, b, h0))


@pytest.mark.parametrize("B,T,n,with_state", [(1, 1, 1, False), (17, 17, 5, True), (2, 64, 20, True)])
def test_lstm_triton_matches_reference(triton_backend, B, T, n, with_state):
    x, w, b, h0, c0 = _gated_inputs(B, T, n, 4, with_state)
    h, c = lstm_scan(x, w, b, h0, c0)
    h_ref, c_ref = rnn.lstm_scan_reference(x, w, b, h0, c0)
    assert not torch.isnan(h).any() and not torch.isnan(c).any()
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c, c_ref, rtol=1e-5, atol=1e-5)
    _assert_grads_match((h, c), (h_ref, c_ref), (x, w, b, h0, c0))


def test_lstm_triton_grad_of_h_only(triton_backend):
    x, w, b, h0, c0 = _gated_inputs(3, 9, 6, 4, True, seed=4)
    h, _ = lstm_scan(x, w, b, h0, c0)
    h_ref, _ = rnn.lstm_scan_reference(x, w, b, h0, c0)
    _assert_grads_match((h,), (h_ref,), (x, w, b, h0, c0))


def test_gru_reference_matches_grucell():
    torch.manual_seed(0)
    B, T, d, n = 4, 11, 6, 5
    cell = torch.nn.GRUCell(d, n).double()
    x = torch.randn(B, T, d, dtype=torch.float64)
    h0 = torch.randn(B, n, dtype=torch.float64)
    h, hs = h0, []
    for t in range(T):
        h = cell(x[:, t], h)
        hs.append(h)
    want = torch.stack(hs, 1)
    x_proj = x @ cell.weight_ih.T + cell.bias_ih
    got = rnn.gru_scan_reference(x_proj, cell.weight_hh, cell.bias_hh, h0)
    torch.testing.assert_close(got, want)


def test_lstm_reference_matches_lstmcell():
    torch.manual_seed(0)
    B, T, d, n = 4, 11, 6, 5
    cell = torch.nn.LSTMCell(d, n).double()
    x = torch.randn(B, T, d, dtype=torch.float64)
    h, c = torch.randn(B, n, dtype=torch.float64), torch.randn(B, n, dtype=torch.float64)
    h0, c0 = h, c
    hs, cs = [], []
    for t in range(T):
        h, c = cell(x[:, t], (h, c))
        hs.append(h)
        cs.append(c)
    x_proj = x @ cell.weight_ih.T + cell.bias_ih
    got_h, got_c = rnn.lstm_scan_reference(x_proj, cell.weight_hh, cell.bias_hh, h0, c0)
    torch.testing.assert_close(got_h, torch.stack(hs, 1))
    torch.testing.assert_close(got_c, torch.stack(cs, 1))


def test_leaky_reference_matches_scalar_loop():
    x, w, tau, h0 = _leaky_inputs(2, 6, 3, True, dtype=torch.float64, seed=5)
    x, w, tau, h0 = (t.detach() for t in (x, w, tau, h0))
    got = rnn.leaky_rnn_scan_reference(x, w, tau, h0, "tanh")
    B, T, n = x.shape
    for b in range(B):
        h = [float(v) for v in h0[b]]
        for t in range(T):
            pre = [sum(float(w[j, k]) * h[k] for k in range(n)) + float(x[b, t, j]) for j in range(n)]
            h = [h[j] + (torch.tanh(torch.tensor(pre[j], dtype=torch.float64)).item() - h[j]) / float(tau[j]) for j in range(n)]
            assert got[b, t].tolist() == pytest.approx(h, abs=1e-12)


def test_gradcheck_reference_ops(reference_backend):
    x, w, tau, h0 = _leaky_inputs(2, 4, 3, True, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: leaky_rnn_scan(*a, activation="sigmoid"), (x, w, tau, h0))
    x, w, b, h0, c0 = _gated_inputs(2, 4, 3, 3, True, dtype=torch.float64)
    assert torch.autograd.gradcheck(gru_scan, (x, w, b, h0))
    x, w, b, h0, c0 = _gated_inputs(2, 4, 3, 4, True, dtype=torch.float64)
    assert torch.autograd.gradcheck(lstm_scan, (x, w, b, h0, c0))


def test_compile_and_fake(reference_backend):
    x, w, b, h0, c0 = _gated_inputs(2, 5, 3, 4, True)
    f = torch.compile(lambda *a: lstm_scan(*a)[0].sum(), fullgraph=True, backend="aot_eager")
    f(x, w, b, h0, c0).backward()
    assert w.grad is not None and w.grad.shape == w.shape
    x, w, tau, h0 = _leaky_inputs(2, 5, 3, True)
    f = torch.compile(lambda *a: leaky_rnn_scan(*a, activation="relu"), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x, w, tau, h0), rnn.leaky_rnn_scan_reference(x, w, tau, h0, "relu"))
    x, w, b, h0, _ = _gated_inputs(2, 5, 3, 3, True)
    f = torch.compile(gru_scan, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x, w, b, h0), rnn.gru_scan_reference(x, w, b, h0))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert torch.ops.routec.gru_scan(torch.empty(4, 7, 15), torch.empty(15, 5), torch.empty(15), None).shape == (4, 7, 5)
        h, c = torch.ops.routec.lstm_scan(torch.empty(4, 7, 20), torch.empty(20, 5), torch.empty(20), None, None)
        assert h.shape == c.shape == (4, 7, 5)
        h = torch.ops.routec.leaky_rnn_scan(torch.empty(4, 7, 5), torch.empty(5, 5), torch.empty(5), None, "tanh")
        assert h.shape == (4, 7, 5)


def test_large_n_falls_back_with_warning(triton_backend):
    """leaky_rnn_scan streams W for MAX_N < n <= MAX_STREAM_N (tests/test_rnn_leaky.py); above, the reference;
    the GRU falls back above MAX_N."""
    n = rnn.MAX_STREAM_N + 1
    x, w, tau, h0 = _leaky_inputs(1, 2, n, False)
    with pytest.warns(UserWarning, match="would not fit"):
        h = leaky_rnn_scan(x, w, tau)
    torch.testing.assert_close(h, rnn.leaky_rnn_scan_reference(x, w, tau, None, "tanh"))
    n = rnn.MAX_N + 1
    x, w, b, h0, _ = _gated_inputs(1, 2, n, 3, False)
    with pytest.warns(UserWarning, match="do not fit on chip"):
        h = gru_scan(x, w, b)
    torch.testing.assert_close(h, rnn.gru_scan_reference(x, w, b, None))


@pytest.mark.slow
def test_kernels_compile_for_gpu(compile_for_sm90):
    cfg = dict(NP=16, BLOCK_B=rnn.BLOCK_B, PREC="tf32x3")
    specs = [(f"_{cell}_{d}_kernel", dict(HAS_H0=True, ACT=0, POST=False, **cfg) if cell == "leaky" else dict(HAS_H0=True, **cfg),
              {"slope": "fp32"}) for cell in ("leaky", "gru") for d in ("fwd", "bwd")]
    specs += [(f"_lstm_{d}_kernel", dict(HAS_H0=True, HAS_C0=False, **cfg), {}) for d in ("fwd", "bwd")]
    compile_for_sm90("routec.codegen.rnn", specs)


def test_shape_errors():
    with pytest.raises(ValueError, match=r"recurrent weight must be \[15, 5\]"):
        gru_scan(torch.zeros(1, 2, 15), torch.zeros(5, 5), None)
    with pytest.raises(ValueError, match="activation"):
        leaky_rnn_scan(torch.zeros(1, 2, 3), torch.zeros(3, 3), torch.ones(3), activation="gelu")
