"""gated_combine: Triton kernel vs reference (TRITON_INTERPRET=1), reference vs a hand loop, gradcheck,
torch.compile and the fake implementation."""

import itertools

import pytest
import torch

from routec.codegen import combine as combine_mod
from routec.codegen.ops import gated_combine


# (paths shape [P, *S, D], weights shape [*S', P]): per sample, per token, global, broadcast dims, odd D.
CASES = [
    ((3, 2, 5, 17), (2, 3)),  # [P, B, L, D], per sample [B, P]
    ((2, 3, 7, 63), (3, 7, 2)),  # per token [B, L, P]
    ((4, 1, 1, 1), (4,)),  # one row, one channel, global [P]
    ((3, 2, 5, 17), (3,)),  # global weights over a [B, L] batch
    ((2, 3, 5, 9), (1, 5, 2)),  # a broadcast (size-1) sample dim
    ((2, 3, 5, 9), (3, 1, 2)),  # a broadcast token dim
    ((1, 9, 300), (9, 1)),  # one path, D above the block
]


def _inputs(paths_shape, weights_shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    paths = torch.randn(paths_shape, generator=g, dtype=dtype)
    weights = torch.randn(weights_shape, generator=g, dtype=dtype)
    return paths, weights


def _hand_loop(paths, weights):
    """y[s, d] = Σ_p weights[s', p] * paths[p, s, d], with s' the left prefix of s (1-dims read index 0)."""
    n_paths, inner, depth = paths.shape[0], paths.shape[1:-1], paths.shape[-1]
    lead = weights.shape[:-1]
    y = torch.zeros(*inner, depth, dtype=torch.float64)
    for s in itertools.product(*[range(n) for n in inner]):
        w_index = tuple(0 if size == 1 else i for i, size in zip(s, lead))
        for p in range(n_paths):
            for d in range(depth):
                y[s + (d,)] += float(weights[w_index + (p,)]) * float(paths[(p,) + s + (d,)])
    return y


@pytest.mark.parametrize("paths_shape,weights_shape", CASES)
def test_triton_matches_reference(triton_backend, paths_shape, weights_shape):
    paths, weights = _inputs(paths_shape, weights_shape)
    p1, w1 = paths.clone().requires_grad_(), weights.clone().requires_grad_()
    y = gated_combine(p1, w1)
    p2, w2 = paths.clone().requires_grad_(), weights.clone().requires_grad_()
    y_ref = combine_mod.gated_combine_reference(p2, w2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y_ref)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-4, atol=1e-4)
    assert w1.grad.shape == weights.shape


def test_launchers_write_every_element(triton_backend):
    paths, weights = _inputs((3, 2, 5, 17), (2, 3))
    out = torch.full((2, 5, 17), float("nan"))
    combine_mod.gated_combine_forward(paths, weights, out=out)
    dpaths_out = torch.full_like(paths, float("nan"))
    dpaths, dweights = combine_mod.gated_combine_backward(paths, weights, torch.ones(2, 5, 17), dpaths_out=dpaths_out)
    assert torch.isfinite(out).all() and torch.isfinite(dpaths).all() and torch.isfinite(dweights).all()


@pytest.mark.parametrize("paths_shape,weights_shape", CASES[:6])
def test_reference_matches_hand_loop(paths_shape, weights_shape):
    paths, weights = _inputs(paths_shape, weights_shape, dtype=torch.float64)
    y = combine_mod.gated_combine_reference(paths, weights)
    torch.testing.assert_close(y, _hand_loop(paths, weights), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("paths_shape,weights_shape", [((3, 2, 4, 5), (2, 3)), ((2, 3, 4, 3), (1, 4, 2))])
def test_gradcheck_reference_op(reference_backend, paths_shape, weights_shape):
    paths, weights = _inputs(paths_shape, weights_shape, dtype=torch.float64)
    assert torch.autograd.gradcheck(gated_combine, (paths.requires_grad_(), weights.requires_grad_()))


def test_compile_fullgraph(triton_backend):
    paths, weights = _inputs((3, 2, 5, 17), (2, 3))

    def model(paths, weights):
        return gated_combine(paths, torch.softmax(weights, dim=-1)) * 2.0

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(paths, weights), model(paths, weights))


def test_opcheck_fake_and_autograd(reference_backend):
    paths, weights = _inputs((3, 2, 5, 7), (2, 3))
    torch.library.opcheck(torch.ops.routec.gated_combine, (paths, weights.requires_grad_()))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake = gated_combine(torch.empty(3, 2, 5, 7), torch.empty(2, 5, 3, dtype=torch.float64))
    assert fake.shape == (2, 5, 7) and fake.dtype == torch.float64


def test_rejects_weights_that_do_not_broadcast():
    paths, _ = _inputs((3, 2, 5, 7), (2, 3))
    with pytest.raises(ValueError, match=r"do not broadcast from the left"):
        gated_combine(paths, torch.ones(5, 3))
    with pytest.raises(ValueError, match=r"must end with the path axis P=3"):
        gated_combine(paths, torch.ones(2, 4))
