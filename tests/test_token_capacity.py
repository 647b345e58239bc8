"""Token routes with a declared capacity: one batched, sync-free call per branch through attention.

`runtime.BranchRoute(mode="tokens", capacity_factor=f)` runs each branch once on [B, C, d]: per sample, the
first C = branch_capacity(L, k, P, f) tokens that chose the branch (in token order), zero-padded, with
`runtime.token_padding` marking the real tokens so that `SelfAttention` keeps the padding keys out.
Checked here: without overflow, values and gradients equal the exact tokens route (one sequence per
sample and branch, no padding), non-causal and causal; with overflow, they equal an independent per-sample
Python loop (attention over exactly the first C chosen tokens); forward + backward read nothing on the host;
torch.compile(fullgraph=True) equals eager; the Triton kernels (interpreter) equal the reference backend;
the compiler accepts attention branches and refuses (R136) a branch that mixes tokens another way.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from routec.codegen import layers, runtime
from routec.compiler import compile_source
from routec.dsl import RouteError
from host_reads import count_host_reads

P, B, L, D = 3, 3, 6, 8


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


class AttnBranch(nn.Module):
    """A token-mixing branch: LayerNorm → SelfAttention → tanh(Linear), plus a travelling per-token scale."""

    def __init__(self, seed, causal, dtype):
        super().__init__()
        torch.manual_seed(seed)
        self.norm = nn.LayerNorm(D).to(dtype)
        self.attn = layers.SelfAttention(D, 2, causal=causal).to(dtype)
        self.lin = nn.Linear(D, D).to(dtype)

    def forward(self, x, scale):  # x [B, n, D], scale [B, n, 1]
        return torch.tanh(self.lin(self.attn(self.norm(x)))) * scale


def _setup(kind="mix", k=1, causal=False, seed=0, dtype=torch.float32):
    g = _gen(seed)
    branches = [AttnBranch(seed=p, causal=causal, dtype=dtype) for p in range(P)]
    x = torch.randn(B, L, D, generator=g, dtype=dtype, requires_grad=True)
    weights = torch.rand(B, L, k, generator=g, dtype=dtype, requires_grad=True)
    if kind == "skewed":  # branch 0 takes most tokens, branch 2 none
        indices = (torch.rand(B, L, k, generator=g) < 0.3).to(torch.int64)
    else:
        indices = torch.randint(0, P, (B, L, k), generator=g)
    extra = [torch.rand(B, L, 1, generator=g, dtype=dtype, requires_grad=True) for _ in range(P)]
    return branches, x, weights, indices, extra


def _route(branches, factor=0.0):
    return runtime.BranchRoute(branches, mode="tokens", extras=[[True]] * P, capacity_factor=factor)


def _loop(branches, x, weights, indices, extra, capacity):
    """Independent reference: per sample and branch, the first `capacity` tokens that chose the branch run
    through it as one unpadded sequence; each adds its output times its weight."""
    out = torch.zeros_like(x)
    rows = []
    for b in range(B):
        total = torch.zeros(L, D, dtype=x.dtype)
        for p in range(P):
            chosen = [t for t in range(L) if bool((indices[b, t] == p).any())][:capacity]
            if not chosen:
                continue
            idx = torch.tensor(chosen)
            y = branches[p](x[b, idx][None], extra[p][b, idx][None])[0]  # [n, D]
            w = (weights[b, idx] * (indices[b, idx] == p)).sum(-1, keepdim=True)
            total = total.index_add(0, idx, y * w)
        rows.append(total)
    return out + torch.stack(rows)


def _grads(out, tensors, seed=11):
    cot = torch.randn(out.shape, generator=_gen(seed), dtype=out.dtype)
    return torch.autograd.grad(out, tensors, cot, allow_unused=True)


def _params(branches):
    return [p for b in branches for p in b.parameters()]


def _close(got, want, tol):
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def _close_grads(got, want, tol):
    for g, w in zip(got, want):
        g = torch.zeros_like(w) if g is None and w is not None else g
        w = torch.zeros_like(g) if w is None and g is not None else w
        if g is not None:
            _close(g, w, tol)


# ---------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind,k", [("mix", 1), ("mix", 2), ("skewed", 1)])
def test_no_overflow_equals_exact_tokens_route(reference_backend, causal, kind, k):
    branches, x, weights, indices, extra = _setup(kind, k, causal=causal, seed=1)
    inputs = [x, weights, *extra] + _params(branches)
    want = _route(branches)(x, weights, indices, *extra)
    capped = _route(branches, P / k)  # C = L: nothing can overflow
    assert capped.capacity(L, k) == L
    got = capped(x, weights, indices, *extra)
    _close(got, want, 1e-5)
    _close_grads(_grads(got, inputs), _grads(want, inputs), 1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind,k,factor", [("mix", 1, 0.5), ("mix", 2, 0.6), ("skewed", 1, 0.4)])
def test_overflow_equals_per_sample_loop(reference_backend, causal, kind, k, factor):
    branches, x, weights, indices, extra = _setup(kind, k, causal=causal, seed=2, dtype=torch.float64)
    cap = runtime.branch_capacity(L, k, P, factor)
    most = max(int((indices[b] == p).any(-1).sum()) for b in range(B) for p in range(P))
    assert most > cap, "the case should overflow"
    inputs = [x, weights, *extra] + _params(branches)
    got = _route(branches, factor)(x, weights, indices, *extra)
    want = _loop(branches, x, weights, indices, extra, cap)
    _close(got, want, 1e-10)
    _close_grads(_grads(got, inputs), _grads(want, inputs), 1e-10)


def test_loop_reference_without_capacity_is_the_exact_route(reference_backend):
    """The loop itself (no capacity) against the exact tokens route, written independently of it."""
    branches, x, weights, indices, extra = _setup("mix", 2, causal=True, seed=3, dtype=torch.float64)
    want = _route(branches)(x, weights, indices, *extra)
    _close(_loop(branches, x, weights, indices, extra, L), want, 1e-10)


def test_key_padding_mask_against_explicit_softmax():
    """SelfAttention under `token_padding` equals softmax attention written out over the real keys only."""
    torch.manual_seed(4)
    attn = layers.SelfAttention(D, 2, causal=True).double()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    real = torch.tensor([[True, True, True, False, False], [True, False, False, False, False]])
    runtime.token_padding.mask = real
    try:
        got = attn(x)
    finally:
        runtime.token_padding.mask = None
    for b in range(2):
        n = int(real[b].sum())
        q, k, v = (proj(x[b, :n]).reshape(n, 2, D // 2).transpose(0, 1) for proj in (attn.q, attn.k, attn.v))
        s = q @ k.transpose(-1, -2) / (D // 2) ** 0.5
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        y = (s.softmax(-1) @ v).transpose(0, 1).reshape(n, D)
        _close(got[b, :n], attn.o(y), 1e-12)
    assert torch.isfinite(got).all()  # padding queries keep their own key: no all-masked row


# ---------------------------------------------------------------------------------------------- no host read


def test_forward_backward_reads_nothing_on_the_host(reference_backend):
    branches, x, weights, indices, extra = _setup("skewed", 2, causal=True, seed=6)
    route = _route(branches, 0.5)
    with count_host_reads() as calls:
        out = route(x, weights, indices, *extra)
        out.sum().backward()
    assert calls == []
    assert x.grad is not None and weights.grad is not None
    with count_host_reads() as calls:  # the exact route reads the counts once (the contrast)
        _route(branches)(x, weights, indices, *extra)
    assert calls == ["tolist"]


# ---------------------------------------------------------------------------------------------- compile


def test_compile_fullgraph_equals_eager(reference_backend):
    branches, x, weights, indices, extra = _setup("mix", 1, causal=True, seed=7)
    route = _route(branches, 0.5)
    inputs = [x, weights, *extra]
    want = route(x, weights, indices, *extra)
    want_grads = _grads(want, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(route, fullgraph=True, backend="eager")
    got = compiled(x, weights, indices, *extra)
    _close(got, want, 1e-6)
    _close_grads(_grads(got, inputs), want_grads, 1e-6)
    assert runtime.token_padding.mask is None


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
    got = route(x, weights, indices, *extra)
    _close(got, want, 1e-6)
    _close_grads(_grads(got, inputs), want_grads, 1e-6)


# ---------------------------------------------------------------------------------------------- compiler


def _spec(body, cap=0.5, causal="false"):
    return f"""
model Net(d: int = 8, cap: float = {cap}) {{
    in x: [B, T, d]
    pre gate a = argmax(capacity=cap) of Linear(d, 2, bias=false)(x)
    out route x by a to {{
        skip: identity
        att: {body.replace("CAUSAL", causal)}
    }}
}}
"""


@pytest.mark.parametrize("body", ["x -> LayerNorm(d) -> SelfAttention(d, 2, causal=CAUSAL) -> Linear(d, d)",
                                  "TransformerBlock(d, 2, causal=CAUSAL)"])
def test_compiler_accepts_attention_branches(reference_backend, body):
    torch.manual_seed(0)
    net = compile_source(_spec(body, 0.5, "true"), "net.route").eval()
    (route,) = [m for m in net.modules() if isinstance(m, runtime.BranchRoute)]
    assert route.mode == "tokens" and route.capacity_factor == 0.5
    torch.manual_seed(0)
    exact = compile_source(_spec(body, 2.0, "true"), "net.route").eval()  # same weights, C = L
    x = torch.randn(2, 7, 8, generator=_gen(12))
    with torch.no_grad():
        capped = net(x)
        route.capacity_factor = 0.0  # the exact (host-reading) tokens route on the same model
        plain = net(x)
        full = exact(x)
    _close(full, plain, 1e-5)
    assert capped.shape == plain.shape and torch.isfinite(capped).all()
    assert not torch.allclose(capped, plain)  # C = ceil(0.5 * 7 / 2) = 2 < chosen tokens: some dropped


@pytest.mark.parametrize("body,mixer", [("x -> LayerNorm(d) -> Conv1d(d, d, 3)", "Conv1d"),
                                        ("x - x -> mean(dim=1, keepdim=true)", "mean")])
def test_compiler_refuses_other_token_mixing(body, mixer):
    with pytest.raises(RouteError, match=f"R136(.|\n)*`{mixer}`"):
        compile_source(_spec(body), "net.route")
