"""Compaction (compact / gather_rows / scatter_rows), the exit rules (exit_scores, linear_exit) and
select_first_exit: Triton kernels vs references under TRITON_INTERPRET=1, references vs hand loops,
gradcheck, torch.compile, fake implementations, the compaction policy, and compacted early-exit eval
against "run every exit, then select"."""

import math

import pytest
import torch

from routec.codegen import compaction as comp
from routec.codegen import exits as ex
from routec.codegen import ops
from routec.codegen.ops import (
    bucket_capacity,
    compact,
    exit_merge,
    exit_scores,
    gather_rows,
    linear_exit,
    scatter_rows,
    select_first_exit,
    should_compact,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _keep(n, kind, seed=0):
    if kind == "all":
        return torch.ones(n, dtype=torch.bool)
    if kind == "none":
        return torch.zeros(n, dtype=torch.bool)
    return torch.rand(n, generator=_gen(seed)) < 0.4


def _hand_compact(keep):
    kept = [i for i in range(len(keep)) if keep[i]]
    dropped = [i for i in range(len(keep)) if not keep[i]]
    return torch.tensor(kept + dropped, dtype=torch.int64), len(kept)


# ---------------------------------------------------------------------------------------------- compact


@pytest.mark.parametrize("n", [1, 17, 63, 1000, 2500])
@pytest.mark.parametrize("kind", ["random", "all", "none"])
def test_compact_matches_hand_loop(triton_backend, n, kind):
    keep = _keep(n, kind)
    perm, count = compact(keep)
    want_perm, want_count = _hand_compact(keep)
    assert perm.dtype == torch.int64 and count.shape == (1,)
    assert torch.equal(perm, want_perm) and int(count) == want_count
    ref_perm, ref_count = comp.compact_reference(keep)
    assert torch.equal(ref_perm, want_perm) and int(ref_count) == want_count


def test_compact_carries_offset_across_blocks(triton_backend):
    keep = _keep(333, "random", seed=3)
    perm, count = comp.compact_forward(keep, block=16)  # 21 blocks, last one partial
    want_perm, want_count = _hand_compact(keep)
    assert torch.equal(perm, want_perm) and int(count) == want_count


# -------------------------------------------------------------------------------- gather / scatter rows


def _hand_gather(x, perm, count, capacity):
    out = torch.zeros((capacity, *x.shape[1:]), dtype=x.dtype)
    for j in range(min(count, capacity, x.shape[0])):
        out[j] = x[perm[j]]
    return out


def _hand_scatter(packed, perm, count, base):
    out = base.clone()
    for j in range(min(count, packed.shape[0])):
        out[perm[j]] = packed[j]
    return out


ROW_CASES = [  # (n, feature shape, keep kind, capacity rule)
    (1, (5,), "all", "bucket"),
    (1, (3,), "none", "bucket"),
    (17, (3, 7), "random", "bucket"),
    (63, (33,), "all", "n"),
    (63, (33,), "none", "n"),
    (200, (9,), "random", "short"),  # capacity below the live count: the tail is not packed
    (40, (600,), "random", "over"),  # capacity above n
]


def _capacity(rule, n, live):
    return {"bucket": bucket_capacity(live, n), "n": n, "short": max(live // 2, 1), "over": n + 5}[rule]


@pytest.mark.parametrize("n,feat,kind,cap_rule", ROW_CASES)
def test_gather_scatter_match_reference(triton_backend, n, feat, kind, cap_rule):
    g = _gen(1)
    keep = _keep(n, kind)
    perm, count = compact(keep)
    capacity = _capacity(cap_rule, n, int(count))
    x = torch.randn(n, *feat, generator=g)
    base = torch.randn(n, *feat, generator=g)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    packed = gather_rows(x1, perm, count, capacity)
    packed_ref = comp.gather_rows_reference(x2, perm, count, capacity)
    assert torch.equal(packed, packed_ref)
    assert torch.equal(packed_ref.detach(), _hand_gather(x, perm, int(count), capacity))

    y = torch.randn(capacity, *feat, generator=g)
    y1, y2 = y.clone().requires_grad_(), y.clone().requires_grad_()
    b1, b2 = base.clone().requires_grad_(), base.clone().requires_grad_()
    out = scatter_rows(y1, perm, count, b1)
    out_ref = comp.scatter_rows_reference(y2, perm, count, b2)
    assert torch.equal(out, out_ref)
    assert torch.equal(out_ref.detach(), _hand_scatter(y, perm, int(count), base))

    dp = torch.randn(capacity, *feat, generator=g)
    packed.backward(dp)
    packed_ref.backward(dp)
    assert torch.equal(x1.grad, x2.grad)
    do = torch.randn(n, *feat, generator=g)
    out.backward(do)
    out_ref.backward(do)
    assert torch.equal(y1.grad, y2.grad) and torch.equal(b1.grad, b2.grad)


def test_launchers_write_every_element(triton_backend):
    keep = _keep(50, "random")
    perm = torch.full((50,), -1, dtype=torch.int64)
    perm, count = comp.compact_forward(keep, perm_out=perm)
    assert sorted(perm.tolist()) == list(range(50))
    x = torch.randn(50, 6)
    packed = comp.gather_rows_forward(x, perm, count, 64, out=torch.full((64, 6), float("nan")))
    assert torch.isfinite(packed).all() and (packed[int(count):] == 0).all()
    out = comp.scatter_rows_forward(packed, perm, count, x, out=torch.full((50, 6), float("nan")))
    assert torch.isfinite(out).all()


def test_round_trip_is_a_masked_update(triton_backend):
    """scatter(f(gather(x)), base=x) == where(keep, f(x), x) for a row-wise f."""
    keep = _keep(45, "random", seed=5)
    x = torch.randn(45, 8, generator=_gen(2))
    perm, count = compact(keep)
    packed = gather_rows(x, perm, count, bucket_capacity(int(count), 45))
    out = scatter_rows(torch.tanh(packed) * 3.0, perm, count, x)
    assert torch.equal(out, torch.where(keep[:, None], torch.tanh(x) * 3.0, x))


def test_gradcheck_reference_ops(reference_backend):
    keep = _keep(9, "random", seed=7)
    perm, count = compact(keep)
    x = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: gather_rows(x, perm, count, 8), (x,))
    packed = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    base = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, b: scatter_rows(p, perm, count, b), (packed, base))


def test_compile_fullgraph_compaction(triton_backend):
    w = torch.randn(8, 8, generator=_gen(3))

    def skip_block(x, keep):
        perm, count = compact(keep)
        packed = gather_rows(x, perm, count, 32)  # the capacity is the static shape the graph sees
        return scatter_rows(torch.relu(packed @ w), perm, count, x)

    x = torch.randn(40, 8, generator=_gen(4))
    keep = _keep(40, "random")
    compiled = torch.compile(skip_block, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, keep), skip_block(x, keep))


def test_opcheck_compaction_ops(reference_backend):
    keep = _keep(12, "random")
    torch.library.opcheck(torch.ops.routec.compact, (keep,))
    perm, count = compact(keep)
    x = torch.randn(12, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.routec.gather_rows, (x, perm, count, 8))
    torch.library.opcheck(torch.ops.routec.scatter_rows, (torch.randn(8, 5, requires_grad=True), perm, count, x))


def test_bucket_capacity():
    assert [bucket_capacity(n, 8192) for n in (0, 1, 17, 256, 257, 5000, 8192)] == [1, 1, 32, 256, 512, 8192, 8192]
    assert bucket_capacity(90, 100) == 100
    assert [bucket_capacity(n, 8192, steps_per_octave=16) for n in (7700, 4097, 4096, 17, 1)] == [8192, 4608, 4096, 18, 1]
    with pytest.raises(ValueError, match="power of two"):
        bucket_capacity(5, 10, steps_per_octave=3)


def test_policy(monkeypatch):
    assert should_compact(1, 4096, "cpu") is True
    assert bool(should_compact(torch.tensor([1]), 4096, "cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert comp.compaction_threshold(4096, "cuda") == 170
    assert comp.compaction_threshold(1024, "cuda") == 680
    assert comp.compaction_threshold(8192, "cuda") == 170
    assert should_compact(169, 4096, "cuda") is False and should_compact(170, 4096, "cuda") is True
    assert should_compact(torch.tensor([300, 700]), 1024, "cuda").tolist() == [False, True]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert comp.compaction_threshold(4096, "cuda") == 250


# -------------------------------------------------------------------------------------------- exit rules


def _hand_scores(logits, rule):
    out = []
    for row in logits.double().tolist():
        m = max(row)
        z = sum(math.exp(v - m) for v in row)
        probs = [math.exp(v - m) / z for v in row]
        out.append(max(probs) if rule == "confidence" else -sum(p * math.log(p) for p in probs if p > 0))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("rule", ex.RULES)
@pytest.mark.parametrize("n,c", [(1, 1), (1, 7), (37, 100), (5, 2500)])
def test_exit_scores_match_reference(triton_backend, rule, n, c):
    logits = torch.randn(n, c, generator=_gen(n + c)) * 3
    l1, l2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    score = exit_scores(l1, rule=rule)
    score_ref = ex.exit_scores_reference(l2, rule=rule)
    torch.testing.assert_close(score, score_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn(n, generator=_gen(1))
    score.backward(g)
    score_ref.backward(g)
    torch.testing.assert_close(l1.grad, l2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ex.RULES)
def test_exit_scores_reference_matches_hand_formula(rule):
    logits = torch.randn(6, 11, generator=_gen(2), dtype=torch.float64) * 4
    torch.testing.assert_close(ex.exit_scores_reference(logits, rule=rule), _hand_scores(logits, rule))


@pytest.mark.parametrize("rule", ex.RULES)
def test_gradcheck_exit_scores(reference_backend, rule):
    logits = torch.randn(4, 6, dtype=torch.float64, generator=_gen(3), requires_grad=True)
    assert torch.autograd.gradcheck(lambda lg: exit_scores(lg, rule=rule), (logits,))


LINEAR_CASES = [  # (n, d, c, bias)
    (1, 7, 5, True),
    (37, 33, 100, False),
    (20, 64, 1000, True),  # every class in one 1024-wide tile
    (3, 8, 1500, True),  # above the fused limit: matmul + score kernel
]


@pytest.mark.parametrize("rule,threshold", [("confidence", 0.3), ("entropy", 1.5)])
@pytest.mark.parametrize("n,d,c,bias", LINEAR_CASES)
def test_linear_exit_matches_reference(triton_backend, rule, threshold, n, d, c, bias):
    g = _gen(n * d)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(c, d, generator=g) / math.sqrt(d) * 3
    b = torch.randn(c, generator=g) if bias else None
    leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()] + ([b.clone().requires_grad_()] if bias else [])
    refs = [t.clone().detach().requires_grad_() for t in leaves]
    logits, score, leave = linear_exit(
        leaves[0], leaves[1], leaves[2] if bias else None, rule=rule, threshold=threshold
    )
    r_logits, r_score, r_leave = ex.linear_exit_reference(
        refs[0], refs[1], refs[2] if bias else None, rule=rule, threshold=threshold
    )
    torch.testing.assert_close(logits, r_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(score, r_score, rtol=1e-5, atol=1e-6)
    assert leave.dtype == torch.bool and (leave.view(torch.uint8) <= 1).all()
    near = (r_score - threshold).abs() < 1e-4  # a decision within rounding of the threshold may differ
    assert torch.equal(leave[~near], r_leave[~near])
    dl = torch.randn(n, c, generator=g)
    logits.backward(dl)
    r_logits.backward(dl)
    for got, want in zip(leaves, refs):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4)


def test_linear_exit_all_and_none_exit(triton_backend):
    x = torch.randn(19, 16, generator=_gen(4))
    w = torch.randn(10, 16, generator=_gen(5))
    assert linear_exit(x, w, rule="confidence", threshold=0.0)[2].all()
    assert not linear_exit(x, w, rule="confidence", threshold=1.01)[2].any()
    assert linear_exit(x, w, rule="entropy", threshold=math.log(10) + 0.01)[2].all()
    assert not linear_exit(x, w, rule="entropy", threshold=-0.01)[2].any()


def test_linear_exit_decisions_are_not_differentiable(reference_backend):
    x = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(3, 4, requires_grad=True)
    logits, score, leave = linear_exit(x, w, rule="confidence", threshold=0.5)
    assert logits.requires_grad and not score.requires_grad and not leave.requires_grad


def test_gradcheck_linear_exit(reference_backend):
    g = _gen(6)
    x = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: linear_exit(x, w, b, rule="entropy", threshold=1.0)[0], (x, w, b))


# ------------------------------------------------------------------------------------- select_first_exit


def _hand_select(stack, masks):
    n_exits, n, _ = stack.shape
    out, index = torch.empty(stack.shape[1:], dtype=stack.dtype), torch.empty(n, dtype=torch.int64)
    for i in range(n):
        e = next((e for e in range(n_exits) if masks[e, i]), n_exits - 1)
        out[i], index[i] = stack[e, i], e
    return out, index


@pytest.mark.parametrize("n_exits,n,c,kind", [(1, 3, 4, "random"), (4, 37, 9, "random"), (3, 17, 1100, "random"),
                                              (3, 20, 5, "all"), (3, 20, 5, "none")])
def test_select_first_exit(triton_backend, n_exits, n, c, kind):
    g = _gen(n)
    stack = torch.randn(n_exits, n, c, generator=g)
    masks = {"random": torch.rand(n_exits, n, generator=g) < 0.3,
             "all": torch.ones(n_exits, n, dtype=torch.bool),
             "none": torch.zeros(n_exits, n, dtype=torch.bool)}[kind]
    s1, s2 = stack.clone().requires_grad_(), stack.clone().requires_grad_()
    out, index = select_first_exit(s1, masks)
    out_ref, index_ref = ex.select_first_exit_reference(s2, masks)
    hand_out, hand_index = _hand_select(stack, masks)
    assert torch.equal(out, out_ref) and torch.equal(index, index_ref)
    assert torch.equal(out_ref.detach(), hand_out) and torch.equal(index_ref, hand_index)
    if kind == "all":
        assert (index == 0).all()
    if kind == "none":
        assert (index == n_exits - 1).all()
    dout = torch.randn(n, c, generator=g)
    out.backward(dout)
    out_ref.backward(dout)
    assert torch.equal(s1.grad, s2.grad)


def test_gradcheck_select_first_exit(reference_backend):
    stack = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    masks = torch.rand(3, 5, generator=_gen(1)) < 0.4
    assert torch.autograd.gradcheck(lambda s: select_first_exit(s, masks)[0], (stack,))


def test_opcheck_exit_ops(reference_backend):
    logits = torch.randn(6, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.routec.exit_scores, (logits, "entropy"))
    x, w = torch.randn(6, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.routec.linear_exit, (x, w, None, "confidence", 0.5))
    stack, masks = torch.randn(3, 6, 5, requires_grad=True), torch.rand(3, 6) < 0.5
    torch.library.opcheck(torch.ops.routec.select_first_exit, (stack, masks))


# -------------------------------------------------------------------------------------------- exit_merge


def _merge_inputs(n, m, c, seed=0):
    g = _gen(seed)
    out = torch.randn(n, c, generator=g)
    index = torch.randint(0, 5, (n,), generator=g)
    logits = torch.randn(m, c, generator=g)
    rows = torch.randperm(n, generator=g)[:m]
    alive = torch.rand(m, generator=g) < 0.6
    return out, index, logits, rows, alive


def _hand_merge(out, index, logits, rows, alive, i):
    out, index = out.clone(), index.clone()
    for j in range(len(rows)):
        if alive[j]:
            out[rows[j]] = logits[j]
            index[rows[j]] = i
    return out, index


@pytest.mark.parametrize("n,m,c", [(1, 1, 1), (37, 20, 9), (70, 70, 1100)])
def test_exit_merge(triton_backend, n, m, c):
    out, index, logits, rows, alive = _merge_inputs(n, m, c)
    o1, l1 = out.clone().requires_grad_(), logits.clone().requires_grad_()
    o2, l2 = out.clone().requires_grad_(), logits.clone().requires_grad_()
    got_out, got_index = exit_merge(o1, index, l1, rows, alive, 3)
    ref_out, ref_index = ex.exit_merge_reference(o2, index, l2, rows, alive, 3)
    hand_out, hand_index = _hand_merge(out, index, logits, rows, alive, 3)
    assert torch.equal(got_out, ref_out) and torch.equal(got_index, ref_index)
    assert torch.equal(ref_out.detach(), hand_out) and torch.equal(ref_index, hand_index)
    g = torch.randn(n, c, generator=_gen(1))
    got_out.backward(g)
    ref_out.backward(g)
    assert torch.equal(o1.grad, o2.grad) and torch.equal(l1.grad, l2.grad)


def test_gradcheck_exit_merge(reference_backend):
    out, index, logits, rows, alive = _merge_inputs(9, 6, 3)
    out, logits = out.double().requires_grad_(), logits.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda o, lg: exit_merge(o, index, lg, rows, alive, 1)[0], (out, logits))


def test_opcheck_exit_merge(reference_backend):
    out, index, logits, rows, alive = _merge_inputs(9, 6, 3)
    torch.library.opcheck(torch.ops.routec.exit_merge, (out.requires_grad_(), index, logits, rows, alive, 2))


# ------------------------------------------------------------------- compacted early-exit eval vs select


def _blocks(depth, d, seed=0):
    g = _gen(seed)
    return [(torch.randn(d, generator=g), torch.randn(d, generator=g)) for _ in range(depth)]


def _block(h, params):
    scale, shift = params
    return h + torch.tanh(h * scale + shift)  # row-wise, so the packed batch computes the same bits


def _run_all_exits(x, blocks, heads, threshold):
    h, stack, masks = x, [], []
    for params, (w, b) in zip(blocks, heads):
        h = _block(h, params)
        logits, _, leave = linear_exit(h, w, b, rule="confidence", threshold=threshold)
        stack.append(logits)
        masks.append(leave)
    return select_first_exit(torch.stack(stack), torch.stack(masks))


def _run_compacted(x, blocks, heads, threshold):
    """Eval-mode exit lowering: exited rows leave, survivors go on packed, results are written back by
    exit_merge. Only the capacity is read on the host (a test may sync; a model uses a lagged bound)."""
    n = x.shape[0]
    out = torch.zeros(n, heads[0][0].shape[0])
    index = torch.zeros(n, dtype=torch.int64)
    h, rows, alive = x, torch.arange(n), torch.ones(n, dtype=torch.bool)  # rows: original row of each packed row
    for i, (params, (w, b)) in enumerate(zip(blocks, heads)):
        h = _block(h, params)
        logits, _, leave = linear_exit(h, w, b, rule="confidence", threshold=threshold)
        out, index = exit_merge(out, index, logits, rows, alive, i)
        alive = alive & ~leave
        perm, count = compact(alive)
        capacity = bucket_capacity(int(count), h.shape[0])
        h = gather_rows(h, perm, count, capacity)
        rows = rows.index_select(0, perm[:capacity])
        alive = torch.arange(capacity) < count
    return out, index


@pytest.mark.parametrize("threshold", [0.0, 0.35, 1.01])  # all leave at the first exit / some / none
def test_compacted_eval_equals_select(triton_backend, threshold):
    n, d, c, depth = 37, 16, 10, 3
    x = torch.randn(n, d, generator=_gen(9))
    blocks = _blocks(depth, d)
    g = _gen(10)
    heads = [(torch.randn(c, d, generator=g) / 2, torch.randn(c, generator=g)) for _ in range(depth)]
    want_out, want_index = _run_all_exits(x, blocks, heads, threshold)
    got_out, got_index = _run_compacted(x, blocks, heads, threshold)
    assert torch.equal(got_index, want_index)
    assert torch.equal(got_out, want_out)
    if threshold == 0.0:
        assert (want_index == 0).all()
    if threshold > 1:
        assert (want_index == depth - 1).all()


@pytest.mark.parametrize("n,min_rows", [(1, 0), (17, 0), (17, 8), (5, 8)])
def test_pack_rows_triton_matches_boolean_indexing(n, min_rows, monkeypatch):
    monkeypatch.setenv("ROUTEC_BACKEND", "triton")
    g = torch.Generator().manual_seed(n)
    keep = torch.rand(n, generator=g) < 0.3
    keep[0] = True
    x = torch.randn(n, 3, 2, generator=g, requires_grad=True)
    ids = torch.arange(n) * 10
    rows, px, pids = ops.pack_rows(keep, [x, ids], min_rows=min_rows)
    want = keep.nonzero().squeeze(-1)  # independent: boolean indexing, then the padding rule by hand
    if 0 < want.numel() < min(min_rows, n):
        want = torch.cat([want, want[-1:].repeat(min(min_rows, n) - want.numel())])
    assert torch.equal(rows, want) and torch.equal(px, x.detach()[want]) and torch.equal(pids, ids[want])
    px.sum().backward()  # padding copies are detached: each kept row gets its gradient once
    assert torch.equal(x.grad, keep[:, None, None].float().expand_as(x))


def test_pack_rows_compiles_fullgraph_with_a_data_dependent_size(monkeypatch):
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")

    def f(keep, x):
        rows, px = ops.pack_rows(keep, [x])
        return px * 2, rows

    keep, x = torch.tensor([True, False, True]), torch.randn(3, 4)
    torch._dynamo.reset()
    got, rows = torch.compile(f, fullgraph=True, backend="aot_eager")(keep, x)
    assert torch.equal(rows, torch.tensor([0, 2])) and torch.equal(got, x[[0, 2]] * 2)
