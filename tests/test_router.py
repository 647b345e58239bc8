"""topk_gate / route_tokens: Triton kernels vs references (TRITON_INTERPRET=1), references vs a per-token
Python loop, gradients, gradcheck, torch.compile and fake shapes."""

import math

import pytest
import torch

from routec.codegen import router as router_mod
from routec.codegen.backend import interpreting
from routec.codegen.ops import RouterOutput, route_tokens, topk_gate

needs_triton = pytest.mark.skipif(not interpreting(), reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(interpreting() or not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("ROUTEC_BACKEND", "triton")
    monkeypatch.setenv("ROUTEC_POISON", "1")


def _logits(T, E, seed=0, dtype=torch.float32, dead=(), ties=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g, dtype=dtype)
    for e in dead:  # experts that no token picks
        logits[:, e] -= 50.0
    if ties and T > 1 and E > 3:
        logits[0, 1] = logits[0, 3] = 10.0  # tie for first place: expert 1 must win
        logits[1, :] = 0.0  # all tied: experts 0, 1, ... in index order
    return logits


def _noise(T, E, seed=7, dtype=torch.float32):
    return 0.3 * torch.randn(T, E, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _loop_router(logits, k, normalize=False, noise=None, capacity=None):
    """Per-token Python loop with math.exp and sorted(): the independent oracle for the references."""
    z = logits if noise is None else logits + noise
    T, E = z.shape
    rows = z.tolist()
    weights, indices = [], []
    for row in rows:
        m = max(row)
        ex = [math.exp(v - m) for v in row]
        s = sum(ex)
        p = [v / s for v in ex]
        top = sorted(range(E), key=lambda e: (-row[e], e))[:k]
        w = [p[e] for e in top]
        if normalize:
            tot = sum(w)
            w = [v / tot for v in w]
        weights.append(w)
        indices.append(top)
    seen = [0] * E
    kept, order_by_expert = [], [[] for _ in range(E)]
    for t in range(T):
        keep_row = []
        for j in range(k):
            e = indices[t][j]
            keep_row.append(capacity is None or seen[e] < capacity)
            seen[e] += 1
            order_by_expert[e].append(t * k + j)
        kept.append(keep_row)
    counts = [len(g) for g in order_by_expert]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    mean_p = [0.0] * E
    for row in rows:
        m = max(row)
        ex = [math.exp(v - m) for v in row]
        for e in range(E):
            mean_p[e] += ex[e] / sum(ex) / T
    aux = E * sum(counts[e] / (T * k) * mean_p[e] for e in range(E))
    weights = [[w if keep else 0.0 for w, keep in zip(wr, kr)] for wr, kr in zip(weights, kept)]
    return dict(weights=weights, indices=indices, counts=counts, order=sum(order_by_expert, []), offsets=offsets,
                aux_loss=aux, kept=kept)


CASES = [  # T, E, k, normalize, noise, capacity, dead experts
    (1, 4, 1, False, False, None, ()),
    (17, 5, 2, True, False, None, (2,)),
    (40, 6, 6, False, False, None, ()),
    (33, 6, 3, True, True, 4, (0, 5)),
    (37, 4, 1, False, True, 3, ()),
    (23, 3, 2, False, False, 0, ()),
]


@pytest.mark.parametrize("T,E,k,normalize,noisy,capacity,dead", CASES)
def test_reference_matches_loop(T, E, k, normalize, noisy, capacity, dead):
    logits = _logits(T, E, dtype=torch.float64, dead=dead, ties=True)
    noise = _noise(T, E, dtype=torch.float64) if noisy else None
    out = router_mod.route_tokens_reference(logits, k, normalize, noise, capacity)
    want = _loop_router(logits, k, normalize, noise, capacity)
    for name in RouterOutput._fields:
        got = getattr(out, name)
        expected = torch.tensor(want[name], dtype=got.dtype)
        if got.is_floating_point():
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        else:
            assert torch.equal(got, expected), name


def test_reference_tie_break_goes_to_lower_index():
    logits = torch.tensor([[1.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0]])
    _, idx = router_mod.topk_gate_reference(logits, 3)
    assert idx.tolist() == [[1, 3, 0], [0, 1, 2]]


@needs_triton
@pytest.mark.parametrize("T,E,k,normalize,noisy,capacity,dead", CASES)
def test_route_tokens_triton_matches_reference(triton_backend, T, E, k, normalize, noisy, capacity, dead):
    logits = _logits(T, E, dead=dead, ties=True).requires_grad_()
    noise = _noise(T, E).requires_grad_() if noisy else None
    out = route_tokens(logits, k, normalize=normalize, noise=noise, capacity=capacity)
    ref = router_mod.route_tokens_reference(logits, k, normalize, noise, capacity)
    for name in RouterOutput._fields:
        got, want = getattr(out, name), getattr(ref, name)
        assert got.shape == want.shape and got.dtype == want.dtype, name
        if got.is_floating_point():
            assert not torch.isnan(got).any(), name
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(got, want), name
    if capacity is not None:
        assert (out.counts > capacity).any() and not out.kept.all(), "the case should overflow"
    g = torch.cos(torch.arange(T * k, dtype=torch.float32)).reshape(T, k)
    leaves = [logits] + ([noise] if noisy else [])
    got = torch.autograd.grad((out.weights * g).sum() + 0.7 * out.aux_loss, leaves)
    want = torch.autograd.grad((ref.weights * g).sum() + 0.7 * ref.aux_loss, leaves)
    for a, b in zip(got, want):
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("T,E,k,normalize", [(1, 2, 1, False), (17, 5, 2, True), (40, 6, 6, False), (19, 8, 3, True)])
def test_topk_gate_triton_matches_reference(triton_backend, T, E, k, normalize):
    logits = _logits(T, E, seed=3, ties=True).requires_grad_()
    w, idx = topk_gate(logits, k, normalize=normalize)
    w_ref, idx_ref = router_mod.topk_gate_reference(logits, k, normalize)
    assert torch.equal(idx, idx_ref) and idx.dtype == torch.int64
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
    g = torch.sin(torch.arange(T * k, dtype=torch.float32)).reshape(T, k)
    (got,) = torch.autograd.grad((w * g).sum(), logits)
    (want,) = torch.autograd.grad((w_ref * g).sum(), logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@needs_triton
def test_sort_kernel_spans_several_blocks(triton_backend):
    """Many row blocks: each block's per-expert prefix comes from the histograms of the blocks before it."""
    T, E, k = 300, 5, 2
    _, indices = router_mod.topk_gate_reference(_logits(T, E, seed=4, dead=(3,)), k)
    counts, offsets, order, kept = router_mod.sort_by_expert(indices, E, capacity=70)
    flat = indices.reshape(-1)
    assert counts.tolist() == [int((flat == e).sum()) for e in range(E)]
    assert offsets.tolist() == [0] + torch.cumsum(counts, 0).tolist()
    assert order.tolist() == [a for e in range(E) for a in range(T * k) if flat[a] == e]
    rank = torch.stack([torch.cumsum((flat == e).long(), 0) - 1 for e in range(E)])[flat, torch.arange(T * k)]
    assert torch.equal(kept.reshape(-1), rank < 70)


def test_gradcheck_reference(reference_backend):
    T, E, k = 6, 5, 2
    logits = _logits(T, E, seed=5, dtype=torch.float64).requires_grad_()
    noise = _noise(T, E, dtype=torch.float64).requires_grad_()
    torch.autograd.gradcheck(lambda z: topk_gate(z, k, normalize=True)[0], (logits,))
    torch.autograd.gradcheck(lambda z: topk_gate(z, k)[0], (logits,))

    def weights_and_aux(z, n):
        out = route_tokens(z, k, noise=n, capacity=3)
        return out.weights, out.aux_loss

    torch.autograd.gradcheck(weights_and_aux, (logits, noise))


def test_torch_compile_fullgraph(reference_backend):
    T, E, k = 12, 4, 2
    logits, noise = _logits(T, E, seed=6), _noise(T, E)

    def fn(z, n):
        out = route_tokens(z, k, normalize=True, noise=n, capacity=5)
        w, _ = topk_gate(z, 1)
        return out.weights.sum() + out.aux_loss + w.sum(), out.order, out.counts

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    z1 = logits.clone().requires_grad_()
    z2 = logits.clone().requires_grad_()
    loss1, order1, counts1 = compiled(z1, noise)
    loss2, order2, counts2 = fn(z2, noise)
    torch.testing.assert_close(loss1, loss2)
    assert torch.equal(order1, order2) and torch.equal(counts1, counts2)
    loss1.backward()
    loss2.backward()
    torch.testing.assert_close(z1.grad, z2.grad)


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits = torch.empty(9, 6)
        out = RouterOutput(*torch.ops.routec.route_tokens(logits, 4, False, None, 2))
        w, idx = torch.ops.routec.topk_gate(logits, 4, True)
    assert [tuple(t.shape) for t in out] == [(9, 4), (9, 4), (6,), (36,), (7,), (), (9, 4)]
    assert [t.dtype for t in out] == [torch.float32, torch.int64, torch.int64, torch.int64, torch.int64,
                                      torch.float32, torch.bool]
    assert (tuple(w.shape), tuple(idx.shape), idx.dtype) == ((9, 4), (9, 4), torch.int64)


def test_opcheck(reference_backend):
    logits = _logits(7, 4, seed=8).requires_grad_()
    torch.library.opcheck(torch.ops.routec.topk_gate.default, (logits, 2, True))
    torch.library.opcheck(torch.ops.routec.route_tokens.default, (logits, 2, False, _noise(7, 4), 3))


@pytest.mark.parametrize("k,noise_shape,capacity", [(0, None, None), (5, None, None), (2, (3, 4), None), (2, None, -1)])
def test_bad_arguments(k, noise_shape, capacity):
    logits = torch.zeros(5, 4)
    noise = None if noise_shape is None else torch.zeros(noise_shape)
    with pytest.raises(ValueError):
        route_tokens(logits, k, noise=noise, capacity=capacity)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,E,k,normalize,noisy,capacity", [
    (1000, 8, 2, False, True, None), (777, 64, 8, True, False, 100), (4099, 16, 4, True, True, 300),
    (16384, 64, 8, False, False, None),
])
def test_cuda_kernels_match_reference(monkeypatch, dtype, T, E, k, normalize, noisy, capacity):
    """The compiled router kernels on a GPU against the reference on the same (rounded) inputs."""
    monkeypatch.setenv("ROUTEC_POISON", "1")
    logits = _logits(T, E, seed=9).to("cuda", dtype)
    noise = _noise(T, E).to("cuda", dtype) if noisy else None
    g = torch.sin(torch.arange(T * k, dtype=torch.float32, device="cuda")).reshape(T, k)
    results = []
    for backend in ("triton", "reference"):
        monkeypatch.setenv("ROUTEC_BACKEND", backend)
        z = logits.clone().requires_grad_()
        out = route_tokens(z, k, normalize=normalize, noise=noise, capacity=capacity)
        (dz,) = torch.autograd.grad((out.weights.float() * g).sum() + out.aux_loss.float(), z)
        results.append((out, dz))
    (out, dz), (ref, dz_ref) = results
    for name in ("indices", "counts", "order", "offsets", "kept"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
    for got, want in ((out.weights, ref.weights), (out.aux_loss, ref.aux_loss), (dz, dz_ref)):
        torch.testing.assert_close(got.float(), want.float(), **tol)
