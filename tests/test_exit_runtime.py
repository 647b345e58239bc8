"""The compiler's exits at run time: the fused exit head (`linear_exit` in the graph), sync-free eval
compaction in ExitPoint/ExitFinal and the exit-over-time loop (bucketed capacities from a LiveBound,
`compact` + `gather_rows` or masked by the policy, `exit_merge` write-back), checked against
run-all-then-select written here by hand, on the reference backend and on the Triton kernels
(TRITON_INTERPRET=1)."""

from __future__ import annotations

import operator
from pathlib import Path

import numpy as np
import pytest
import torch

from routec.codegen import functions, ops, runtime
from routec.compiler import compile_source, load

ROOT = Path(__file__).resolve().parents[1]

SPEC = """
model Exits(d: int = 16, depth: int = 4, classes: int = 5, t: float = 0.3) {
    in x: [B, d]
    h = x
    repeat i in depth {
        h = h + (h -> Linear(d, d) -> tanh)
        exit head[i] = h -> Linear(d, classes) when confidence(head[i]) >= t
    }
}
"""

ENTROPY_SPEC = """
model EntropyExits(d: int = 16, classes: int = 5, t: float = 1.2) {
    in x: [B, d]
    h = x + (x -> Linear(d, d) -> tanh)
    exit first = h -> Linear(d, classes) when entropy(first) <= t
    h = h + (h -> Linear(d, d) -> tanh)
    out h -> Linear(d, classes)
}
"""

TIME_SPEC = """
model RNNExit(n_in: int = 3, n: int = 8, classes: int = 4, t: float = 0.5) {
    in x: [B, T, n_in]
    scan h over x.T init zeros([B, n]) {
        h = tanh(Linear(n_in, n)(x.t) + Linear(n, n)(h))
        exit e = h -> Linear(n, classes) when confidence(e) >= t
    }
}
"""


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")
    monkeypatch.delenv("ROUTEC_EXIT_POLICY", raising=False)


def _targets(net):
    return [n.target for n in net.graph.nodes if n.op in ("call_function", "call_module")]


def _inputs(n=37, d=16, seed=0, scale=3.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * scale


def _select_by_hand(heads, threshold, rule="confidence"):
    """Run-all-then-select: per sample the first head whose rule holds (else the last), by a Python loop."""
    n = heads[0].shape[0]
    out, index = torch.empty_like(heads[0]), torch.empty(n, dtype=torch.int64)
    for row in range(n):
        for i, h in enumerate(heads):
            p = torch.softmax(h[row].double(), -1)
            score = p.max().item() if rule == "confidence" else -(p * p.log()).sum().item()
            holds = score >= threshold if rule == "confidence" else score <= threshold
            if holds or i == len(heads) - 1:
                out[row], index[row] = h[row], i
                break
    return out, index


def _margin(heads, threshold):
    """Smallest distance of any confidence score to the threshold (decisions nearer may flip by rounding)."""
    return min((torch.softmax(h.double(), -1).amax(-1) - threshold).abs().min().item() for h in heads)


# ------------------------------------------------------------------------------------- the fused head


def test_early_exit_example_lowers_every_head_to_linear_exit():
    for model in ("EarlyExitViT", "TwoExits"):
        net = load(ROOT / "examples" / "early_exit.route", model=model)
        targets = _targets(net)
        n_exits = len(net.exit_names) - (1 if "final" in net.exit_names else 0)
        assert targets.count(ops.linear_exit) == n_exits >= 2
        assert functions.confidence not in targets and functions.entropy not in targets
        assert not any(isinstance(t, str) and t.endswith("head.linear") for t in targets)
        calls = [n for n in net.graph.nodes if n.target is ops.linear_exit]
        assert {n.kwargs["rule"] for n in calls} == ({"confidence"} if model == "EarlyExitViT" else {"confidence", "entropy"})
        # the head's weights keep their spec names
        names = set(net.state_dict())
        assert any(k.endswith("head.linear.weight") or k.endswith("early.linear.weight") for k in names)


def test_fused_head_keeps_state_dict_names_and_loads():
    net = compile_source(SPEC, "e.route")
    names = set(net.state_dict())
    for i in range(4):
        assert f"layers.{i}.head.linear.weight" in names and f"layers.{i}.head.linear.bias" in names
    clone = compile_source(SPEC, "e.route")
    clone.load_state_dict(net.state_dict())
    x = _inputs()
    net.eval(), clone.eval()
    with torch.no_grad():
        a, b = net(x), clone(x)
    assert torch.equal(a.out, b.out) and torch.equal(a.exit_index, b.exit_index)


@pytest.mark.parametrize("rule,fused", [
    ("confidence(head[i]) >= t", True),
    ("t <= confidence(head[i])", True),
    ("confidence(head[i]) > t", False),  # linear_exit decides >=: a strict rule keeps the unfused lowering
    ("entropy(head[i]) <= t", True),
    ("entropy(head[i]) < t", False),
    ("entropy(head[i]) >= t", False),  # not the entropy rule's direction
])
def test_only_exactly_equal_rules_are_fused(rule, fused):
    net = compile_source(SPEC.replace("confidence(head[i]) >= t", rule), "e.route")
    targets = _targets(net)
    assert (ops.linear_exit in targets) == fused
    if not fused:
        assert any(t in targets for t in (operator.gt, operator.lt, operator.ge, operator.le))


def test_head_read_elsewhere_or_not_a_linear_is_not_fused():
    shared = """
    model M(d: int = 8, classes: int = 3) {
        in x: [B, d]
        logits = x -> Linear(d, classes)
        exit e = logits when confidence(e) >= 0.5
        out (x -> Linear(d, classes)) + logits
    }
    """
    assert ops.linear_exit not in _targets(compile_source(shared, "m.route"))
    mlp_head = """
    model M(d: int = 8, classes: int = 3) {
        in x: [B, d]
        exit e = x -> Linear(d, d) -> tanh when confidence(e) >= 0.5
        out x -> Linear(d, d)
    }
    """
    assert ops.linear_exit not in _targets(compile_source(mlp_head, "m.route"))


def test_training_keeps_every_head_and_a_differentiable_score():
    net = compile_source(SPEC, "e.route").train()
    x = _inputs()
    out = net(x)
    for head, score, i in zip(out.exits, out.exit_scores, range(4)):
        layer = net.get_submodule(f"layers.{i}.head.linear")
        assert score.requires_grad
        torch.testing.assert_close(score, torch.softmax(head, -1).amax(-1))
    (sum(out.exit_scores).sum() + sum(h.sum() for h in out.exits)).backward()
    for i in range(4):
        w = net.get_submodule(f"layers.{i}.head.linear").weight
        assert w.grad is not None and w.grad.abs().sum() > 0
    assert layer is not None


def test_fused_score_and_rule_equal_the_spec_functions_in_bf16():
    """linear_exit decides on the score as returned (rounded to bf16), against the threshold rounded to bf16:
    what `confidence(head) >= t` on a bf16 head computes."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 12, generator=g).bfloat16()
    w = (torch.randn(7, 12, generator=g) * 0.3).bfloat16()
    for rule, t in (("confidence", 0.3), ("entropy", 1.6)):
        logits, score, leave = ops.linear_exit(x, w, None, rule=rule, threshold=t)
        fn = functions.confidence if rule == "confidence" else functions.entropy
        want_score = fn(torch.nn.functional.linear(x, w))
        assert torch.equal(score, want_score)
        want = want_score >= t if rule == "confidence" else want_score <= t
        assert torch.equal(leave, want) and 0 < int(want.sum()) < 300


def test_kernel_decides_on_the_returned_score(monkeypatch):
    monkeypatch.setenv("ROUTEC_BACKEND", "triton")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(45, 20, generator=g)
    w = torch.randn(9, 20, generator=g) * 0.4
    for rule, t in (("confidence", 0.31), ("entropy", 1.7)):
        _, score, leave = ops.linear_exit(x, w, None, rule=rule, threshold=t)
        want = score >= t if rule == "confidence" else score <= t  # torch compares in fp32, as the kernel must
        assert torch.equal(leave, want) and 0 < int(want.sum()) < 45


# ------------------------------------------------------------------------ eval: equal to run-all-then-select


def _eval_pair(net, x):
    net.train()
    with torch.no_grad():
        heads = list(net(x).exits)
    net.eval()
    with torch.no_grad():
        got = net(x)
    return heads, got


@pytest.mark.parametrize("policy", ["auto", "compact", "masked"])
@pytest.mark.parametrize("threshold", [0.0, 0.6, 1.1])  # all leave at the first exit / a mix / none
def test_eval_equals_run_all_then_select(monkeypatch, policy, threshold):
    monkeypatch.setenv("ROUTEC_EXIT_POLICY", policy)
    torch.manual_seed(1)
    net = compile_source(SPEC, "e.route", t=threshold)
    x = _inputs()
    heads, got = _eval_pair(net, x)
    want_out, want_index = _select_by_hand(heads, threshold)
    assert torch.equal(got.exit_index, want_index)
    assert torch.equal(got.out, want_out)  # bit for bit: compaction changes which rows run, not their values
    if threshold == 0.0:
        assert (want_index == 0).all()
    elif threshold > 1:
        assert (want_index == 3).all()
    else:
        assert len(set(want_index.tolist())) >= 3


@pytest.mark.parametrize("policy", ["compact", "masked"])
def test_entropy_exit_with_a_final_out(monkeypatch, policy):
    monkeypatch.setenv("ROUTEC_EXIT_POLICY", policy)
    torch.manual_seed(2)
    net = compile_source(ENTROPY_SPEC, "e.route")
    x = _inputs(seed=5, scale=2.0)
    heads, got = _eval_pair(net, x)
    assert len(heads) == 2  # the exit and the final out
    want_out, want_index = _select_by_hand(heads, 1.2, rule="entropy")
    assert torch.equal(got.exit_index, want_index) and torch.equal(got.out, want_out)
    assert 0 < int((want_index == 0).sum()) < x.shape[0]


class _Spy:
    """Counts the calls of the runtime ops ExitPoint uses and records the packed capacities."""

    def __init__(self, monkeypatch):
        self.calls = {"compact": 0, "gather_rows": 0, "exit_merge": 0, "pack_rows": 0}
        self.rows_in: list[tuple[int, int]] = []  # (rows of the exit's head, true live count) per exit
        for name in self.calls:
            original = getattr(ops, name)

            def wrapped(*args, _name=name, _original=original, **kwargs):
                self.calls[_name] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(ops, name, wrapped)
        forward = runtime.ExitPoint.forward

        def spy_forward(module, logits, decision, out, index, alive, *live):
            self.rows_in.append((logits.shape[0], int((alive >= 0).sum())))
            return forward(module, logits, decision, out, index, alive, *live)

        monkeypatch.setattr(runtime.ExitPoint, "forward", spy_forward)


@pytest.mark.parametrize("policy", ["compact", "masked"])
def test_policy_picks_packing_or_masking(monkeypatch, policy):
    monkeypatch.setenv("ROUTEC_EXIT_POLICY", policy)
    torch.manual_seed(1)
    net = compile_source(SPEC, "e.route", t=0.6).eval()
    spy = _Spy(monkeypatch)
    x = _inputs(n=64)
    with torch.no_grad():
        net(x)
    assert spy.calls["exit_merge"] == 5 and spy.calls["pack_rows"] == 0  # 4 exits + the final write-back
    if policy == "masked":
        assert spy.calls["compact"] == spy.calls["gather_rows"] == 0
        assert [rows for rows, _ in spy.rows_in] == [64] * 4
    else:
        assert spy.calls["compact"] >= 1 and spy.calls["gather_rows"] >= spy.calls["compact"]
        buckets = {ops.bucket_capacity(k, 64, steps_per_octave=runtime.EXIT_STEPS_PER_OCTAVE) for k in range(65)}
        for rows, live in spy.rows_in:
            assert live <= rows and (rows in buckets or rows == runtime.MIN_PACKED_ROWS)
        assert spy.rows_in[-1][0] < 64  # the batch did shrink


def test_auto_policy_on_cpu_compacts(monkeypatch):
    torch.manual_seed(1)
    net = compile_source(SPEC, "e.route", t=0.6).eval()
    spy = _Spy(monkeypatch)
    with torch.no_grad():
        net(_inputs(n=64))
    assert spy.calls["compact"] >= 1  # should_compact is always true on CPU


def test_bad_policy_is_refused(monkeypatch):
    monkeypatch.setenv("ROUTEC_EXIT_POLICY", "sometimes")
    net = compile_source(SPEC, "e.route").eval()
    with pytest.raises(ValueError, match="ROUTEC_EXIT_POLICY"):
        with torch.no_grad():
            net(_inputs())


@pytest.mark.parametrize("lag", ["never", "one exit"])
def test_a_stale_bound_changes_capacities_not_results(monkeypatch, lag):
    """The capacity only has to bound the live count: a bound that never lands (a GPU far behind the host)
    or lands one exit late gives the same outputs."""
    torch.manual_seed(1)
    net = compile_source(SPEC, "e.route", t=0.6)
    x = _inputs(n=64)
    heads, _ = _eval_pair(net, x)
    want_out, want_index = _select_by_hand(heads, 0.6)

    def push(self, count):
        self.pending.append((count.detach().reshape(1).numpy().copy(), _Event(lag)))

    monkeypatch.setattr(runtime.LiveBound, "push", push)
    spy = _Spy(monkeypatch)
    with torch.no_grad():
        got = net.eval()(x)
    assert torch.equal(got.exit_index, want_index) and torch.equal(got.out, want_out)
    if lag == "never":
        assert spy.calls["compact"] == 0 and {rows for rows, _ in spy.rows_in} == {64}
    else:
        assert spy.calls["compact"] >= 1


class _Event:
    """A stand-in for torch.cuda.Event: never completes, or completes on the second query."""

    def __init__(self, lag):
        self.lag, self.queries = lag, 0

    def query(self):
        self.queries += 1
        return self.lag != "never" and self.queries > 1


def test_live_bound_reads_only_landed_counts():
    bound = runtime.LiveBound(50)
    bound.pending.append((np.array([30]), _Event("never")))
    bound.pending.append((np.array([20]), None))
    assert bound.get() == 50  # the first copy has not landed: nothing after it is read either
    bound.pending.pop(0)
    assert bound.get() == 20
    bound.push(torch.tensor([7]))
    assert bound.get() == 7
    bound.push(torch.tensor([9]))  # counts only shrink; a larger one never raises the bound
    assert bound.get() == 7


def test_exit_rows_encoding():
    state = torch.tensor([3, -1 - 5, 0, -1])
    rows, running = runtime.exit_rows(state)
    assert rows.tolist() == [3, 5, 0, 0] and running.tolist() == [True, False, True, False]


# ------------------------------------------------------------------------------------------ no host sync


class _NoSync:
    """Makes every torch call that reads a tensor's value on the host raise while an exit module runs."""

    METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")

    def __init__(self, monkeypatch, classes):
        self.inside = 0
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._guard(name, original))
        monkeypatch.setattr(torch, "nonzero", self._guard("torch.nonzero", torch.nonzero))
        monkeypatch.setattr(torch, "masked_select", self._guard("torch.masked_select", torch.masked_select))
        getitem = torch.Tensor.__getitem__

        def checked_getitem(t, key):
            keys = key if isinstance(key, tuple) else (key,)
            if self.inside and any(isinstance(k, torch.Tensor) and k.dtype == torch.bool for k in keys):
                raise AssertionError("boolean indexing (a host sync) inside an exit")
            return getitem(t, key)

        monkeypatch.setattr(torch.Tensor, "__getitem__", checked_getitem)
        for cls, method in classes:
            monkeypatch.setattr(cls, method, self._enter(getattr(cls, method)))
        # the CPU LiveBound reads host memory (its count is there once computed): allowed, by name
        monkeypatch.setattr(runtime.LiveBound, "get", self._outside(runtime.LiveBound.get))
        monkeypatch.setattr(runtime.LiveBound, "push", self._outside(runtime.LiveBound.push))

    def _guard(self, name, original):
        def guarded(*args, **kwargs):
            if self.inside:
                raise AssertionError(f"{name} (a host sync) inside an exit")
            return original(*args, **kwargs)

        return guarded

    def _enter(self, fn):
        def inside(*args, **kwargs):
            self.inside += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.inside -= 1

        return inside

    def _outside(self, fn):
        def outside(*args, **kwargs):
            saved, self.inside = self.inside, 0
            try:
                return fn(*args, **kwargs)
            finally:
                self.inside = saved

        return outside


@pytest.mark.parametrize("policy", ["compact", "masked"])
def test_eval_exits_make_no_host_sync(monkeypatch, policy):
    monkeypatch.setenv("ROUTEC_EXIT_POLICY", policy)
    torch.manual_seed(1)
    net = compile_source(SPEC, "e.route", t=0.6).eval()
    x = _inputs(n=64)
    with torch.no_grad():
        want = net(x)
    guard = _NoSync(monkeypatch, [(runtime.ExitPoint, "forward"), (runtime.ExitFinal, "forward")])
    with torch.no_grad():
        got = net(x)
    assert torch.equal(got.out, want.out) and torch.equal(got.exit_index, want.exit_index)
    # the guard is live: the same calls raise inside an exit
    guard.inside = 1
    with pytest.raises(AssertionError, match="host sync"):
        x.sum().item()
    guard.inside = 0


def test_exit_over_time_makes_no_host_sync(monkeypatch):
    monkeypatch.setenv("ROUTEC_EXIT_POLICY", "compact")
    torch.manual_seed(0)
    net = compile_source(TIME_SPEC, "r.route", t=0.35).eval()
    x = torch.randn(37, 6, 3, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        want = net(x)
    spy = _Spy(monkeypatch)
    _NoSync(monkeypatch, [(runtime.ScanLoop, "_compacted")])
    with torch.no_grad():
        got = net(x)
    assert torch.equal(got.out, want.out) and torch.equal(got.exit_index, want.exit_index)
    assert spy.calls["compact"] >= 1 and spy.calls["pack_rows"] == 0


@pytest.mark.parametrize("policy", ["compact", "masked"])
@pytest.mark.parametrize("threshold", [0.0, 0.35, 1.1])
def test_exit_over_time_equals_every_step_then_select(monkeypatch, policy, threshold):
    monkeypatch.setenv("ROUTEC_EXIT_POLICY", policy)
    torch.manual_seed(0)
    net = compile_source(TIME_SPEC, "r.route", t=threshold)
    x = torch.randn(37, 6, 3, generator=torch.Generator().manual_seed(1)) * 2
    net.train()
    with torch.no_grad():
        (every,) = net(x).exits  # [B, T, C]
    net.eval()
    with torch.no_grad():
        got = net(x)
    want_out, want_index = _select_by_hand(list(every.unbind(1)), threshold)
    assert torch.equal(got.exit_index, want_index) and torch.equal(got.out, want_out)
    if threshold == 0.0:
        assert (want_index == 0).all()
    elif threshold > 1:
        assert (want_index == 5).all()
    else:
        assert len(set(want_index.tolist())) >= 2


# ---------------------------------------------------------------------- traced form and Triton kernels


def test_compiled_fullgraph_and_eager_agree(monkeypatch):
    torch.manual_seed(1)
    net = compile_source(SPEC, "e.route", t=0.6).eval()
    x = _inputs()
    torch._dynamo.reset()
    with torch.no_grad():
        want = net(x)
        got = torch.compile(net, fullgraph=True, backend="eager")(x)
    assert torch.equal(got.out, want.out) and torch.equal(got.exit_index, want.exit_index)


@pytest.mark.parametrize("threshold", [0.0, 0.6, 1.1])
def test_triton_backend_equals_reference_backend(monkeypatch, threshold):
    """The whole eval path on the Triton kernels (linear_exit, compact, gather_rows, exit_merge in the
    interpreter) against the reference backend: all leave at the first exit, a mix, none."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(1)
    net = compile_source(SPEC, "e.route", t=threshold, d=16, depth=3).eval()
    x = _inputs(n=37)
    with torch.no_grad():
        want = net(x)
    monkeypatch.setenv("ROUTEC_BACKEND", "triton")
    triton_net = compile_source(SPEC, "e.route", t=threshold, d=16, depth=3).eval()  # with the fusion pass
    triton_net.load_state_dict(net.state_dict())
    assert ops.linear_exit in _targets(triton_net)
    monkeypatch.setenv("ROUTEC_POISON", "1")
    spy = _Spy(monkeypatch)
    with torch.no_grad():
        got = triton_net(x)
    assert spy.calls["exit_merge"] == 4
    if threshold == 0.6:
        net.train()
        with torch.no_grad():
            heads = list(net(x).exits)
        assert _margin(heads, threshold) > 1e-4  # no decision within rounding of the threshold
        assert spy.calls["gather_rows"] >= 1
    assert torch.equal(got.exit_index, want.exit_index)
    torch.testing.assert_close(got.out, want.out, rtol=1e-5, atol=1e-5)
    if threshold == 0.0:
        assert (want.exit_index == 0).all()
    elif threshold > 1:
        assert (want.exit_index == 2).all()
    else:
        assert len(set(want.exit_index.tolist())) >= 2


# ------------------------------------------------------------------------- what the exits pack


def _live_counts(net):
    return [len(n.args) - 5 for n in net.graph.nodes
            if n.op == "call_module" and isinstance(net.get_submodule(str(n.target)), runtime.ExitPoint)]


def test_exits_pack_only_what_is_read_later():
    net = load(ROOT / "examples" / "early_exit.route")
    assert _live_counts(net) == [1, 1, 1, 0]  # the hidden state only: not the image, not the heads
    assert _live_counts(compile_source(SPEC, "e.route")) == [1, 1, 1, 0]


def test_an_input_read_after_an_exit_is_still_packed(monkeypatch):
    spec = ENTROPY_SPEC.replace("out h -> Linear(d, classes)", "out (h + x) -> Linear(d, classes)")
    torch.manual_seed(2)
    net = compile_source(spec, "e.route")
    assert _live_counts(net) == [2]
    monkeypatch.setenv("ROUTEC_EXIT_POLICY", "compact")
    x = _inputs(seed=5, scale=2.0)
    heads, got = _eval_pair(net, x)
    want_out, want_index = _select_by_hand(heads, 1.2, rule="entropy")
    assert torch.equal(got.exit_index, want_index) and torch.equal(got.out, want_out)
    assert 0 < int((want_index == 0).sum()) < x.shape[0]


def test_exit_over_time_triton_backend_equals_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ROUTEC_EXIT_POLICY", "compact")
    torch.manual_seed(0)
    net = compile_source(TIME_SPEC, "r.route", t=0.35).eval()
    x = torch.randn(37, 6, 3, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        want = net(x)
    monkeypatch.setenv("ROUTEC_BACKEND", "triton")
    spy = _Spy(monkeypatch)
    with torch.no_grad():
        got = net(x)
    assert spy.calls["compact"] >= 1 and spy.calls["gather_rows"] >= 1
    assert torch.equal(got.exit_index, want.exit_index) and len(set(want.exit_index.tolist())) >= 3
    torch.testing.assert_close(got.out, want.out, rtol=1e-5, atol=1e-5)
