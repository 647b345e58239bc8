"""Branch routes read their sizes from the device once per route call (runtime.BranchRoute, eager mode).

`compact_groups` (Triton kernel vs reference vs a hand loop, fake shapes, torch.compile), the number of host
reads in one route call (counted by patching every Tensor method that reads device data on the host), the
eager form against the traced `pack_rows` form (forced by patching `runtime.tracing`) bit for bit in value
and gradient for "rows", "tokens" and "samples" modes with branches that get no rows, all rows or some, both
against an independent dense formula, and a compiled routed model on the Triton kernels (interpreter)
against the reference backend.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from routec.codegen import compaction as comp
from routec.codegen import ops, runtime
from routec.compiler import compile_source
from host_reads import count_host_reads


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _hand_compact(row):
    kept = [i for i in range(len(row)) if row[i]]
    dropped = [i for i in range(len(row)) if not row[i]]
    return kept + dropped, len(kept)


def _masks(g, n, seed=0):
    keep = torch.rand(g, n, generator=_gen(seed)) < 0.4
    keep[0] = True  # a group that keeps every row
    if g > 1:
        keep[1] = False  # a group that keeps none
    return keep


# ---------------------------------------------------------------------------------------------- compact_groups


@pytest.mark.parametrize("g,n", [(1, 1), (3, 17), (5, 63), (2, 1000), (4, 2500)])
def test_compact_groups_matches_hand_loop(triton_backend, g, n):
    keep = _masks(g, n, seed=n)
    perm, count = ops.compact_groups(keep)
    for row in range(g):
        want_perm, want_count = _hand_compact(keep[row].tolist())
        assert perm[row].tolist() == want_perm and int(count[row]) == want_count
    ref_perm, ref_count = comp.compact_groups_reference(keep)
    assert torch.equal(perm, ref_perm) and torch.equal(count, ref_count)


def test_compact_groups_reference_matches_hand_loop(reference_backend):
    keep = _masks(4, 29, seed=1)
    perm, count = ops.compact_groups(keep)
    for row in range(4):
        want_perm, want_count = _hand_compact(keep[row].tolist())
        assert perm[row].tolist() == want_perm and count[row].item() == want_count


def test_compact_groups_writes_every_element_and_carries_offsets(triton_backend):
    keep = _masks(3, 70, seed=2)
    perm_out = torch.full((3, 70), -7, dtype=torch.int64)
    count_out = torch.full((3,), -7, dtype=torch.int64)
    perm, count = comp.compact_groups_forward(keep, perm_out=perm_out, count_out=count_out, block=16)
    assert perm is perm_out and count is count_out  # 70 rows in blocks of 16: the offset carries 4 times
    want_perm, want_count = comp.compact_groups_reference(keep)
    assert torch.equal(perm, want_perm) and torch.equal(count, want_count)


def test_compact_groups_empty_shapes(triton_backend):
    for shape in [(0, 5), (3, 0)]:
        perm, count = ops.compact_groups(torch.zeros(shape, dtype=torch.bool))
        assert perm.shape == shape and count.shape == shape[:1]
        assert (count == 0).all()


def test_compact_groups_rejects_bad_masks(reference_backend):
    with pytest.raises(ValueError, match="bool \\[G, N\\]"):
        ops.compact_groups(torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool \\[G, N\\]"):
        ops.compact_groups(torch.zeros(2, 4))


def test_compact_groups_fake_and_opcheck(reference_backend):
    keep = _masks(3, 12)
    torch.library.opcheck(torch.ops.routec.compact_groups, (keep,))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        perm, count = ops.compact_groups(mode.from_tensor(keep))
    assert perm.shape == (3, 12) and perm.dtype == torch.int64
    assert count.shape == (3,) and count.dtype == torch.int64


def test_compact_groups_compiles_fullgraph(triton_backend):
    def f(keep, x):
        perm, count = ops.compact_groups(keep)
        return ops.gather_rows(x, perm[1], count[1:2], 8)  # a static capacity: no host read in the graph

    keep, x = _masks(3, 11, seed=3), torch.randn(11, 4, generator=_gen(3))
    keep[1] = torch.rand(11, generator=_gen(4)) < 0.5
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(keep, x)
    assert torch.equal(got, f(keep, x))


# ---------------------------------------------------------------------------------------------- host reads

class RowBranch(nn.Module):
    """A row-wise branch that reads a travelling per-row tensor and a fixed outside tensor."""

    def __init__(self, d, out, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(d, out)

    def forward(self, x, scale, shift):  # x [n, d], scale [n, 1], shift [out]
        return torch.tanh(self.lin(x)) * scale + shift


class TokenBranch(nn.Module):
    """A token-mixing branch (softmax attention over one sample's chosen tokens) on [1, n, d]."""

    def __init__(self, d, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.q, self.v = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, bias):  # x [1, n, d], bias [1, n, 1]
        att = torch.softmax(self.q(x) @ x.transpose(-1, -2) / x.shape[-1] ** 0.5, dim=-1)
        return att @ self.v(x) + bias


class SampleBranch(nn.Module):
    """A per-sample branch on whole samples [n, T, d]."""

    def __init__(self, d, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return self.lin(x).cumsum(1)


P, B, T, D = 3, 3, 5, 4


def _indices(kind, lead, k, seed):
    """[*lead, k] branch choices: "mix" (random), "zero" (branch P-1 never chosen), "all" (every row on
    branch 0 only)."""
    g = _gen(seed)
    if kind == "all":
        return torch.zeros(*lead, k, dtype=torch.int64)
    high = P - 1 if kind == "zero" else P
    return torch.randint(0, high, (*lead, k), generator=g)


def _route(mode):
    if mode == "rows":
        branches = [RowBranch(D, D, seed=p) for p in range(P)]
        return runtime.BranchRoute(branches, mode="rows", extras=[[True, False]] * P), branches
    if mode == "tokens":
        branches = [TokenBranch(D, seed=p) for p in range(P)]
        return runtime.BranchRoute(branches, mode="tokens", extras=[[True]] * P), branches
    branches = [SampleBranch(D, seed=p) for p in range(P)]
    return runtime.BranchRoute(branches, mode="samples", extras=[[]] * P), branches


def _inputs(mode, kind, seed):
    g = _gen(seed)
    x = torch.randn(B, T, D, generator=g, requires_grad=True)
    k = 1 if kind == "all" else 2
    lead = (B,) if mode == "samples" else (B, T)
    weights = torch.rand(*lead, k, generator=g, requires_grad=True)
    indices = _indices(kind, lead, k, seed)
    if mode == "rows":  # per branch: a per-token scale [B, T, 1] travelling with the rows, a fixed shift [D]
        extra = []
        for _ in range(P):
            extra += [torch.rand(B, T, 1, generator=g, requires_grad=True),
                      torch.randn(D, generator=g, requires_grad=True)]
    elif mode == "tokens":  # per branch: a per-token bias [B, T, 1] travelling with the tokens
        extra = [torch.randn(B, T, 1, generator=g, requires_grad=True) for _ in range(P)]
    else:
        extra = []
    return x, weights, indices, extra


def _dense(mode, branches, x, weights, indices, extra):
    """Independent formula: every branch on every row (masked per sample by hand for token sets), weighted
    by the sum of the weights that chose it."""
    out = torch.zeros_like(x)
    for p, branch in enumerate(branches):
        wp = (weights * (indices == p)).sum(-1)
        if mode == "rows":
            y = branch(x.reshape(-1, D), extra[2 * p].reshape(-1, 1), extra[2 * p + 1]).reshape(B, T, D)
            out = out + y * wp[..., None]
        elif mode == "samples":
            out = out + branch(x) * wp[:, None, None]
        else:
            for b in range(B):
                chosen = [t for t in range(T) if (indices[b, t] == p).any()]
                if chosen:
                    sel = torch.tensor(chosen)
                    y = branch(x[b, sel][None], extra[p][b, sel][None])[0] * wp[b, sel][:, None]
                    out = out.index_put((torch.full_like(sel, b), sel), y, accumulate=True)
    return out


def _forward_and_grads(route, branches, args):
    x, weights, indices, extra = args
    out = route(x, weights, indices, *extra)
    leaves = [x, weights, *extra, *(q for br in branches for q in br.parameters())]
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum(),
                                leaves, allow_unused=True)
    return out, grads


@pytest.mark.parametrize("mode", ["rows", "tokens", "samples"])
@pytest.mark.parametrize("kind", ["mix", "zero", "all"])
def test_one_host_read_per_route_call_and_equal_to_pack_rows(reference_backend, monkeypatch, mode, kind):
    route, branches = _route(mode)
    args = _inputs(mode, kind, seed=10 * ["rows", "tokens", "samples"].index(mode) + ["mix", "zero", "all"].index(kind))
    with count_host_reads() as calls:
        out, grads = _forward_and_grads(route, branches, args)
        route(*args[:3], *args[3])
    assert calls == ["tolist", "tolist"], calls  # one forward + its backward, then one more forward
    with count_host_reads() as packed_calls:
        monkeypatch.setattr(runtime, "tracing", lambda *tensors: True)  # the traced form, run eagerly
        want, want_grads = _forward_and_grads(route, branches, args)
    groups = P * B if mode == "tokens" else P
    assert packed_calls.count("nonzero") == groups  # the counter sees pack_rows' per-branch reads
    assert torch.equal(out, want)
    for got, ref in zip(grads, want_grads):
        assert (got is None) == (ref is None)
        if got is not None:
            assert torch.equal(got, ref)
    with torch.no_grad():
        x, weights, indices, extra = args
        torch.testing.assert_close(out, _dense(mode, branches, x, weights, indices, extra))


def test_rows_mode_with_zero_rows_in_the_batch(reference_backend, monkeypatch):
    route, branches = _route("rows")
    x, weights, indices, extra = _inputs("rows", "mix", seed=5)
    x, weights, indices = x[:, :0], weights[:, :0], indices[:, :0]
    extra = [e[:, :0] if e.dim() == 3 else e for e in extra]
    out = route(x, weights, indices, *extra)
    assert out.shape == (B, 0, D)


# ---------------------------------------------------------------------------------------------- compiled models

ROUTED = """
block Ffn(d: int, h: int) {
    in x: [N, d]
    out x -> LayerNorm(d) -> Linear(d, h) -> gelu -> Linear(h, d)
}

model Routed(d: int = 8) {
    in x: [B, T, d]
    pre gate r = argmax of Linear(d, 3, bias=false)(x)
    h = route x by r to {
        skip: identity
        small: Ffn(d, 8)
        big: Ffn(d, 16)
    }
    pre gate a = argmax of Linear(d, 2)(h)
    out route h by a to {
        skip: identity
        att: h -> LayerNorm(d) -> SelfAttention(d, 2)
    }
}
"""


def _routed_model():
    torch.manual_seed(0)
    net = compile_source(ROUTED, "routed.route").eval()
    modes = sorted(m.mode for m in net.modules() if isinstance(m, runtime.BranchRoute))
    assert modes == ["rows", "tokens"]
    return net


def test_compiled_model_one_read_per_route_and_traced_form_agrees(reference_backend, monkeypatch):
    net = _routed_model()
    x = torch.randn(3, 7, 8, generator=_gen(7))
    with torch.no_grad():
        with count_host_reads() as calls:
            out = net(x)
        assert calls == ["tolist", "tolist"]  # two route calls, one read each, nothing else in the model
        monkeypatch.setattr(runtime, "tracing", lambda *tensors: True)
        assert torch.equal(net(x), out)  # the pack_rows form, run eagerly


def test_rows_route_compiles_fullgraph(reference_backend):
    # the token route's SelfAttention cannot run on an unbacked token count under torch.compile (SDPA
    # guards on it), so the compiled check takes the row route alone
    spec = ROUTED[: ROUTED.index("    pre gate a")] + "    out h\n}\n"
    torch.manual_seed(0)
    net = compile_source(spec, "rows.route").eval()
    x = torch.randn(3, 7, 8, generator=_gen(9))
    torch._dynamo.reset()
    with torch.no_grad():
        want = net(x)
        got = torch.compile(net, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, want)


def test_compiled_model_triton_interpreter_equals_reference(monkeypatch):
    net = _routed_model()
    x = torch.randn(2, 5, 8, generator=_gen(8), requires_grad=True)
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")
    want = net(x)
    want_grad, = torch.autograd.grad(want.sum(), x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ROUTEC_BACKEND", "triton")
    monkeypatch.setenv("ROUTEC_POISON", "1")
    launched = []
    launcher = comp.compact_groups_forward

    def spy(keep, **kwargs):
        launched.append(tuple(keep.shape))
        return launcher(keep, **kwargs)

    monkeypatch.setattr(comp, "compact_groups_forward", spy)
    got = net(x)
    got_grad, = torch.autograd.grad(got.sum(), x)
    assert launched == [(3, 10), (2 * 2, 5)]  # the kernel ran: P groups of B * T rows, P * B groups of T tokens
    assert torch.equal(got, want)  # compaction and gathers move values exactly
    assert torch.equal(got_grad, want_grad)
