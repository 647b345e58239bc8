"""The compiler end to end: every example builds, runs forward and backward, compiles with
torch.compile(fullgraph=True) and exports; routing semantics (exits, pre-gates, paths, scans) match
independently written PyTorch; semantic errors are reported with their spans."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from routec.compiler import compile_source, load
from routec.dsl import RouteError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.route"))


def inputs_for(net, batch=3, length=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = []
    for _, dims, dtype in net.inputs:
        shape = [d if isinstance(d, int) else (batch if i == 0 else length) for i, d in enumerate(dims)]
        if dtype in ("long", "int"):
            xs.append(torch.randint(0, 2, shape, generator=g))
        else:
            xs.append(torch.randn(shape, generator=g))
    return xs


def first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_trains_and_evaluates(path):
    torch.manual_seed(0)
    net = load(path)
    xs = inputs_for(net)
    net.train()
    out = net(*xs)
    loss = first(out).float().pow(2).mean()
    if hasattr(out, "exits"):
        loss = loss + sum(e.pow(2).mean() for e in out.exits)
    if hasattr(out, "aux_loss"):
        loss = loss + out.aux_loss
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert torch.isfinite(loss)
    net.eval()
    with torch.no_grad():
        y = first(net(*xs))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_compiles_fullgraph_and_exports(path):
    torch.manual_seed(0)
    net = load(path).eval()
    xs = inputs_for(net)
    torch._dynamo.reset()
    with torch.no_grad():
        want = net(*xs)
        got = torch.compile(net, fullgraph=True, backend="eager")(*xs)
    for a, b in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
        if isinstance(a, torch.Tensor) and "random" not in path.read_text():
            torch.testing.assert_close(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(net, tuple(xs))
    assert exported.graph_module is not None


def test_state_dict_names_follow_the_spec():
    net = load(ROOT / "examples" / "moe.route")
    names = set(net.state_dict())
    assert "embedding.weight" in names
    assert "layers.0.moemlp.g.linear.weight" in names
    assert "layers.1.moemlp.experts.w1" in names
    assert tuple(net.state_dict()["layers.1.moemlp.experts.w1"].shape) == (8, 32, 64)
    clone = load(ROOT / "examples" / "moe.route")
    clone.load_state_dict(net.state_dict())
    xs = inputs_for(net)
    net.eval(), clone.eval()
    torch.testing.assert_close(first(net(*xs)), first(clone(*xs)), rtol=0, atol=0)


EXIT_SPEC = """
model Exits(d: int = 64, depth: int = 4, classes: int = 5, t: float = 0.3) {
    in x: [B, d]
    h = x
    repeat i in depth {
        h = h + (h -> Linear(d, d) -> tanh)
        exit head[i] = h -> Linear(d, classes) when confidence(head[i]) >= t
    }
}
"""


@pytest.mark.parametrize("threshold", [0.0, 0.22, 0.25, 0.3, 0.5, 1.1])
def test_compacted_exits_equal_run_all_then_select(threshold):
    torch.manual_seed(1)
    net = compile_source(EXIT_SPEC, "exits.route", t=threshold)
    x = torch.randn(37, 64) * 3
    net.train()
    with torch.no_grad():
        heads = net(x).exits  # every exit on the full batch
    net.eval()
    with torch.no_grad():
        out, index = net(x)
    # independent selection: the first exit whose max softmax prob reaches the threshold, else the last
    want_index = torch.full((37,), len(heads) - 1)
    for i in reversed(range(len(heads))):
        hit = torch.softmax(heads[i], -1).max(-1).values >= threshold
        want_index = torch.where(hit, torch.tensor(i), want_index)
    want = torch.stack(heads)[want_index, torch.arange(37)]
    assert torch.equal(index, want_index)
    assert torch.equal(out, want)  # bit for bit: compaction changes which rows run, not their values
    if threshold == 0.0:
        assert (index == 0).all()
    if threshold > 1:
        assert (index == len(heads) - 1).all()


def test_pre_gate_routes_only_chosen_rows_and_matches_loop():
    spec = """
    model R(d: int = 8, h: int = 16, experts: int = 4, k: int = 2) {
        in x: [B, T, d]
        gate g = topk(k) of Linear(d, experts)(x)
        out route x by g to experts { Linear(d, h, bias=false) -> gelu -> Linear(h, d, bias=false) }
    }
    """
    torch.manual_seed(0)
    net = compile_source(spec, "r.route").eval()
    x = torch.randn(2, 5, 8)
    out = net(x)
    sd = net.state_dict()
    logits = x @ sd["g.linear.weight"].T + sd["g.linear.bias"]
    probs = torch.softmax(logits, -1)
    w, idx = probs.topk(2, dim=-1)
    want = torch.zeros_like(x)
    for b in range(2):
        for t in range(5):
            for j in range(2):
                e = idx[b, t, j]
                hid = torch.nn.functional.gelu(x[b, t] @ sd["experts.w1"][e])
                want[b, t] += w[b, t, j] * (hid @ sd["experts.w2"][e])
    torch.testing.assert_close(out.out, want, rtol=1e-5, atol=1e-5)
    assert out.aux_loss.ndim == 0


def test_shared_instance_shares_weights_and_two_instantiations_do_not():
    spec = """
    model S(d: int = 8) {
        in x: [B, L, d]
        m = Linear(d, d)
        paths p(x) {
            a: m(x)
            b: x -> flip(1) -> m -> flip(1)
            c: x -> Linear(d, d)
        } combine sum
        out p
    }
    """
    net = compile_source(spec, "s.route")
    names = [n for n, _ in net.named_parameters()]
    assert names.count("m.weight") == 1
    assert "p.c.linear.weight" in names
    x = torch.randn(2, 3, 8)
    sd = net.state_dict()
    lin = lambda v, p: v @ sd[f"{p}.weight"].T + sd[f"{p}.bias"]  # noqa: E731
    want = lin(x, "m") + lin(x.flip(1), "m").flip(1) + lin(x, "p.c.linear")
    torch.testing.assert_close(net(x), want)


def test_leaky_scan_uses_fused_op_and_matches_loop():
    spec = """
    model L(n_in: int = 3, n: int = 6) {
        in x: [B, T, n_in]
        param tau: [n] = 2.0
        scan h over x.T init zeros([B, n]) {
            h = h + (tanh(Linear(n, n)(h) + Linear(n_in, n)(x.t)) - h) / tau
            emit y = h
        }
        out y
    }
    """
    torch.manual_seed(0)
    net = compile_source(spec, "l.route")
    assert any(getattr(n.target, "__name__", "") == "leaky_rnn_scan" for n in net.graph.nodes)
    x = torch.randn(2, 7, 3)
    sd = net.state_dict()
    h = torch.zeros(2, 6)
    ys = []
    for t in range(7):
        pre = h @ sd["h.linear.weight"].T + sd["h.linear.bias"] + x[:, t] @ sd["h.linear_1.weight"].T \
            + sd["h.linear_1.bias"]
        h = h + (torch.tanh(pre) - h) / sd["tau"]
        ys.append(h)
    torch.testing.assert_close(net(x), torch.stack(ys, 1), rtol=1e-5, atol=1e-6)


def test_general_scan_matches_loop_and_linear_scan_is_fused():
    spec = """
    model G(d: int = 4) {
        in x: [B, T, d]
        a = x -> Linear(d, d) -> sigmoid
        scan h over x.T init zeros([B, d]) {
            h = a.t * h + x.t
            emit y = h
        }
        scan s over x.T reverse init zeros([B, d]) {
            s = tanh(s * 0.5 + x.t)
            emit z = s
        }
        out y + z
    }
    """
    torch.manual_seed(0)
    net = compile_source(spec, "g.route")
    targets = [getattr(n.target, "__name__", str(n.target)) for n in net.graph.nodes]
    assert "linear_scan" in targets and "s_scan_reverse" in targets
    x = torch.randn(2, 5, 4)
    sd = net.state_dict()
    a = torch.sigmoid(x @ sd["linear.weight"].T + sd["linear.bias"])
    h, s = torch.zeros(2, 4), torch.zeros(2, 4)
    ys, zs = [], [None] * 5
    for t in range(5):
        h = a[:, t] * h + x[:, t]
        ys.append(h)
    for t in reversed(range(5)):
        s = torch.tanh(s * 0.5 + x[:, t])
        zs[t] = s
    torch.testing.assert_close(net(x), torch.stack(ys, 1) + torch.stack(zs, 1), rtol=1e-5, atol=1e-6)


SEMANTIC_ERRORS = [
    ("model M(d: int = 4) {\n    in x: [B, d]\n    out x -> Lineer(d, d)\n}\n",
     "m.route:3:14: error[R101]: undefined name `Lineer`\n"
     "  3 |     out x -> Lineer(d, d)\n    |              ^~~~~~\n   = help: did you mean `Linear`?"),
    ("model M(d: int = 4) {\n    in x: [B, T, d]\n    paths p(x) {\n        a: x -> Linear(d, 8)\n"
     "        b: x -> Linear(d, 6)\n    } combine sum\n    out p\n}\n",
     "m.route:5:9: error[R144]: paths of `combine sum` must have equal shapes, got [B, T, 8] and [B, T, 6]"),
    ("model M(d: int = 4) {\n    in x: [B, T, d]\n    gate g = topk(4) of Linear(d, 3)(x)\n"
     "    out route x by g to experts { Linear(d, 8) -> gelu -> Linear(8, d) }\n}\n",
     "m.route:3:14: error[R132]: `topk(k=4)` needs at least 4 experts, got 3"),
    ("model M(d: int = 4) {\n    in x: [B, T, d]\n    exit e = x -> Linear(d, 3) when confidence(e) >= 0.5\n"
     "    out x\n}\n",
     "m.route:3:14: error[R150]: `exit` head must produce [B, C] logits, got [B, T, 3]"),
    ("model M(d: int = 4) {\n    in x: [B, T, d]\n    scan h over x.T init zeros([B, 8]) {\n"
     "        h = x.t -> Linear(d, 4)\n    }\n    out h\n}\n",
     "m.route:4:9: error[R166]: scan state `h` is [B, 8] but the body assigns [B, 4]"),
    ("model M(d: int = 4) {\n    in x: [B, T, d]\n    out x -> Linear(8, 2)\n}\n",
     "m.route:3:14: error[R121]: `Linear(8, …)` expects the last dimension to be 8, got [B, T, 4]"),
    ("model M(d: int = 4) {\n    in x: [B, T, d]\n    out x -> Linear(d, 2, bais=false)\n}\n",
     "m.route:3:14: error[R110]: `Linear` has no argument `bais`; did you mean `bias`?"),
]


@pytest.mark.parametrize("source,expected", SEMANTIC_ERRORS, ids=[e[1].split("]")[0][-4:] for e in SEMANTIC_ERRORS])
def test_semantic_errors_render_with_spans(source, expected):
    with pytest.raises(RouteError) as info:
        compile_source(source, "m.route")
    rendered = info.value.render()
    assert rendered.startswith(expected), rendered


def test_all_errors_are_collected():
    source = "model M(d: int = 4) {\n    in x: [B, d]\n    a = x -> Foo(d)\n    b = x -> Bar(d)\n    out a\n}\n"
    with pytest.raises(RouteError) as info:
        compile_source(source, "m.route")
    assert info.value.codes == ["R101", "R101"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "routec.compiler.cli", *args], capture_output=True, text=True)


def test_cli_run_and_graph(tmp_path):
    done = run_cli("run", str(ROOT / "examples" / "early_exit.route"), "--batch", "3", "--train", "--steps", "2")
    assert done.returncode == 0, done.stderr
    assert "exit rates:" in done.stdout and "train step 2" in done.stdout
    dot = tmp_path / "g.dot"
    done = run_cli("graph", str(ROOT / "examples" / "moe.route"), "-o", str(dot))
    assert done.returncode == 0, done.stderr
    text = dot.read_text()
    assert "shape=diamond" in text and "shape=box3d" in text


def test_cli_errors_have_no_traceback(tmp_path):
    bad = tmp_path / "bad.route"
    bad.write_text("model M(d: int = 4) {\n    in x: [B, d]\n    out x -> Lineer(d, d)\n}\n")
    done = run_cli("check", str(bad))
    assert done.returncode == 1
    assert "error[R101]" in done.stderr and "Traceback" not in done.stderr
    done = run_cli("run", "stdlib:no_such_spec")
    assert done.returncode == 1 and "Traceback" not in done.stderr


TIME_EXIT_SPEC = """
model RNNExit(n_in: int = 3, n: int = 8, classes: int = 4, t: float = 0.5) {
    in x: [B, T, n_in]
    scan h over x.T init zeros([B, n]) {
        h = GRUCell(n_in, n)(x.t, h)
        exit e = h -> Linear(n, classes) when confidence(e) >= t
    }
}
"""


@pytest.mark.parametrize("threshold", [0.0, 0.32, 0.35, 2.0])
def test_exit_over_time_equals_run_all_steps_then_select(threshold):
    torch.manual_seed(0)
    net = compile_source(TIME_EXIT_SPEC, "r.route", t=threshold)
    x = torch.randn(9, 6, 3) * 2
    net.train()
    with torch.no_grad():
        (heads,) = net(x).exits  # [B, T, C]: every step, every sample
    net.eval()
    with torch.no_grad():
        out, index = net(x)
    hit = torch.softmax(heads, -1).max(-1).values >= threshold
    want_index = torch.where(hit.any(1), hit.int().argmax(1), torch.tensor(5))
    assert torch.equal(index, want_index)
    assert torch.equal(out, heads[torch.arange(9), want_index])


def test_gru_and_lstm_cells_lower_to_fused_scans_and_match_torch_cells():
    spec = """
    model C(n_in: int = 3, n: int = 5) {
        in x: [B, T, n_in]
        scan h over x.T init zeros([B, n]) {
            h = GRUCell(n_in, n)(x.t * 2.0, h)
            emit y = h
        }
        scan (a, c) over x.T init (zeros([B, n]), zeros([B, n])) {
            a, c = LSTMCell(n_in, n)(x.t, (a, c))
        }
        out seq = y
        out last = a + c
    }
    """
    torch.manual_seed(0)
    net = compile_source(spec, "c.route")
    called = [getattr(n.target, "__name__", "") for n in net.graph.nodes if n.op == "call_function"]
    assert "gru_scan" in called and "lstm_scan" in called
    sd = net.state_dict()
    gru, lstm = torch.nn.GRUCell(3, 5), torch.nn.LSTMCell(3, 5)
    gru.load_state_dict({k[len("h.grucell."):]: v for k, v in sd.items() if k.startswith("h.grucell.")})
    lstm.load_state_dict({k[len("a.lstmcell."):]: v for k, v in sd.items() if k.startswith("a.lstmcell.")})
    x = torch.randn(2, 4, 3)
    h, a, c, ys = torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(2, 5), []
    for t in range(4):
        h = gru(x[:, t] * 2.0, h)
        a, c = lstm(x[:, t], (a, c))
        ys.append(h)
    out = net(x)
    torch.testing.assert_close(out.seq, torch.stack(ys, 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.last, a + c, rtol=1e-5, atol=1e-6)


def test_lif_function_matches_integrate_and_fire_loop():
    spec = "model S(d: int = 4) {\n    in x: [B, T, d, 2]\n    out x -> lif(beta=0.5, threshold=0.8)\n}\n"
    net = compile_source(spec, "s.route")
    x = torch.rand(2, 6, 4, 2)
    v, spikes = torch.zeros(2, 4, 2), []
    for t in range(6):
        v = 0.5 * v + x[:, t]
        s = (v >= 0.8).float()
        v = v - s * 0.8
        spikes.append(s)
    assert torch.equal(net(x), torch.stack(spikes, 1))


def test_weight_tying_constants_and_symbolic_reshape():
    spec = """
    model V(c: int = 3, n: int = 4) {
        in x: [B, c, 8, 8]
        in ids: [B, T] long
        h = x -> Conv2d(c, 8, 3, padding=1) -> BatchNorm2d(8) -> relu -> MaxPool2d(2) -> AdaptiveAvgPool2d(1)
        tok = Embedding(10, n)
        out logits = (ids -> tok) @ tok.weight.T
        out feats = (h -> reshape(B, 8)) @ eye(8)
    }
    """
    net = compile_source(spec, "v.route").eval()
    x, ids = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2, 5))
    out = net(x, ids)
    w = net.state_dict()["tok.weight"]
    torch.testing.assert_close(out.logits, w[ids] @ w.T)
    assert out.feats.shape == (2, 8)


def test_token_routing_to_a_token_mixing_branch_runs_each_samples_tokens_as_one_sequence():
    spec = """
    model T(d: int = 8, heads: int = 2) {
        in x: [B, N, d]
        gate g = argmax of Linear(d, 2)(x)
        out route x by g to {
            skip: identity
            attend: SelfAttention(d, heads)
        }
    }
    """
    torch.manual_seed(0)
    net = compile_source(spec, "t.route").eval()
    x = torch.randn(3, 5, 8)
    sd = net.state_dict()
    choice = (x @ sd["g.linear.weight"].T + sd["g.linear.bias"]).argmax(-1)
    attend = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    w = torch.cat([sd["attend.selfattention.q.weight"], sd["attend.selfattention.k.weight"],
                   sd["attend.selfattention.v.weight"]])
    b = torch.cat([sd["attend.selfattention.q.bias"], sd["attend.selfattention.k.bias"],
                   sd["attend.selfattention.v.bias"]])
    attend.load_state_dict({"in_proj_weight": w, "in_proj_bias": b,
                            "out_proj.weight": sd["attend.selfattention.o.weight"],
                            "out_proj.bias": sd["attend.selfattention.o.bias"]})
    want = x.clone()
    for i in range(3):
        sel = (choice[i] == 1).nonzero().squeeze(-1)
        if sel.numel():
            seq = x[i, sel][None]
            want[i, sel] = attend(seq, seq, seq, need_weights=False)[0][0]
    torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act,out", [("gelu", 8), ("swiglu", 8), ("relu", 5)])
def test_experts_with_biases_and_other_widths_match_a_per_token_loop(act, out):
    spec = f"""
    model E(d: int = 8, h: int = 12) {{
        in x: [B, T, d]
        gate g = topk(2) of Linear(d, 4)(x)
        out route x by g to experts {{ Linear(d, h) -> {act} -> Linear(h, {out}) }}
    }}
    """
    torch.manual_seed(0)
    net = compile_source(spec, "e.route").eval()
    x = torch.randn(2, 5, 8)
    sd = net.state_dict()
    probs = torch.softmax(x @ sd["g.linear.weight"].T + sd["g.linear.bias"], -1)
    w, idx = probs.topk(2, dim=-1)
    want = torch.zeros(2, 5, out)
    for b in range(2):
        for t in range(5):
            for j in range(2):
                e = idx[b, t, j]
                z = x[b, t] @ sd["experts.w1"][e] + sd["experts.b1"][e]
                if act == "swiglu":
                    hid = torch.nn.functional.silu(z) * (x[b, t] @ sd["experts.w3"][e])
                else:
                    hid = {"gelu": torch.nn.functional.gelu, "relu": torch.relu}[act](z)
                want[b, t] += w[b, t, j] * (hid @ sd["experts.w2"][e] + sd["experts.b2"][e])
    torch.testing.assert_close(net(x).out, want, rtol=1e-5, atol=1e-5)


def test_sinusoidal_embedding_group_norm_and_gate_as_channel_mask():
    spec = """
    model M(c: int = 4) {
        in x: [B, c, 4, 4]
        in t: [B]
        f = exp(arange(0, 3) * -0.5)
        e = t -> unsqueeze(1)
        out emb = concat([sin(e * f), cos(e * f)], dim=-1)
        gate m = threshold(0.5) of x -> mean(3) -> mean(2) -> Linear(c, c)
        out masked = (x -> GroupNorm(2, c)) * (m -> unsqueeze(2) -> unsqueeze(3))
    }
    """
    net = compile_source(spec, "m.route").eval()
    x, t = torch.randn(2, 4, 4, 4), torch.rand(2)
    out = net(x, t)
    f = torch.exp(torch.arange(3.0) * -0.5)
    torch.testing.assert_close(out.emb, torch.cat([torch.sin(t[:, None] * f), torch.cos(t[:, None] * f)], -1))
    sd = net.state_dict()
    keep = (torch.sigmoid(x.mean((2, 3)) @ sd["m.linear.weight"].T + sd["m.linear.bias"]) >= 0.5).float()
    want = torch.nn.functional.group_norm(x, 2, sd["groupnorm.weight"], sd["groupnorm.bias"]) * keep[:, :, None, None]
    torch.testing.assert_close(out.masked, want)


def test_route_branches_read_per_token_tensors_gathered_with_their_rows():
    spec = """
    model X(d: int = 6, r: int = 2) {
        in x: [B, T, d]
        in m: [B, T]
        gate g = topk(1) of Linear(d, 2)(x)
        out route x by g to {
            plain: x -> Linear(d, d)
            adapted: x + (x -> Linear(d, r) -> Linear(r, d)) * (m -> unsqueeze(-1))
        }
    }
    """
    torch.manual_seed(0)
    net = compile_source(spec, "x.route").eval()
    x, m = torch.randn(2, 5, 6), (torch.rand(2, 5) > 0.5).float()
    sd = net.state_dict()
    w, idx = torch.softmax(x @ sd["g.linear.weight"].T + sd["g.linear.bias"], -1).max(-1)
    lin = lambda v, p: v @ sd[p + ".weight"].T + sd[p + ".bias"]  # noqa: E731
    plain = lin(x, "plain.linear")
    adapted = x + lin(lin(x, "adapted.linear"), "adapted.linear_1") * m[..., None]
    want = torch.where((idx == 0)[..., None], plain, adapted) * w[..., None]
    torch.testing.assert_close(net(x, m).out, want)


def test_training_returns_the_scores_exit_rules_threshold():
    net = compile_source(EXIT_SPEC, "exits.route", t=0.3).train()
    x = torch.randn(5, 64)
    out = net(x)
    assert len(out.exit_scores) == len(out.exits) == 4
    for head, score in zip(out.exits, out.exit_scores):
        torch.testing.assert_close(score, torch.softmax(head, -1).max(-1).values)
    sum(out.exit_scores).sum().backward()  # differentiable: a loss on the exit decisions trains the heads
    assert net.state_dict(keep_vars=True)["layers.0.head.linear.weight"].grad is not None


def test_cli_run_prints_expert_load_and_path_weights():
    done = run_cli("run", str(ROOT / "examples" / "moe.route"), "--batch", "2")
    assert done.returncode == 0, done.stderr
    loads = [line for line in done.stdout.splitlines() if "gate g load:" in line]
    assert len(loads) == 2  # one gate per repeated layer
    shares = [float(p.rstrip("%")) for p in loads[0].split("load:")[1].split()]
    assert abs(sum(shares) - 100) <= len(shares)  # rounded percentages of all assignments
    done = run_cli("run", str(ROOT / "examples" / "paths.route"), "--batch", "2")
    assert "paths p mean weights:" in done.stdout


def test_indexing_a_parameter_by_a_per_sample_id():
    spec = """
    model T(d: int = 4, tasks: int = 3, e: int = 5) {
        in x: [B, d]
        in task: [B] long
        param w_gate: [tasks, d, e] = normal(0.1)
        out (x -> unsqueeze(1)) @ w_gate[task] -> squeeze(1)
    }
    """
    net = compile_source(spec, "t.route")
    x, task = torch.randn(2, 4), torch.tensor([0, 2])
    w = net.state_dict()["w_gate"]
    torch.testing.assert_close(net(x, task), torch.einsum("bd,bde->be", x, w[task]))
    with pytest.raises(RouteError) as info:
        compile_source(spec.replace("w_gate[task]", "w_gate[x]"), "t.route")
    assert info.value.codes == ["R107"]


def test_conv3d_tubelets_and_tanh_gelu():
    spec = "model V(c: int = 3) {\n    in x: [B, c, 4, 8, 8]\n    out x -> Conv3d(c, 6, [2, 4, 4], stride=[2, 4, 4]) -> gelu_tanh\n}\n"
    net = compile_source(spec, "v.route")
    x = torch.randn(2, 3, 4, 8, 8)
    sd = net.state_dict()
    want = torch.nn.functional.gelu(torch.nn.functional.conv3d(x, sd["conv3d.weight"], sd["conv3d.bias"],
                                                               stride=(2, 4, 4)), approximate="tanh")
    torch.testing.assert_close(net(x), want)


def test_step_loop_binds_slices_read_after_a_captured_parameter():
    spec = """
    model StepOrder(d: int = 3) {
        in u: [B, T, d]
        in g: [B, T, d]
        param a: [d] = 0.5
        scan h over u.T init zeros([B, d]) {
            h = tanh(exp(a * u.t) * h + g.t)
            emit y = h
        }
        out y
    }
    """
    net = compile_source(spec, "s.route")
    u, g = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    h, ys = torch.zeros(2, 3), []
    for t in range(5):
        h = torch.tanh(torch.exp(0.5 * u[:, t]) * h + g[:, t])
        ys.append(h)
    torch.testing.assert_close(net(u, g), torch.stack(ys, 1))


def test_path_ensemble_reruns_the_branches_in_eval():
    spec = """
    model E(d: int = 4) {
        in x: [B, L, d]
        paths p(x) {
            shuffled: x -> permute(1, random) -> Linear(d, d) -> mean(1)
        } combine mean ensemble(n=3)
        out p
    }
    """
    torch.manual_seed(0)
    net = compile_source(spec, "e.route").eval()
    x = torch.randn(2, 5, 4)
    drawn = []
    real = torch.randperm

    def recording(*args, **kwargs):
        perm = real(*args, **kwargs)
        drawn.append(perm)
        return perm

    torch.randperm = recording
    try:
        out = net(x)
    finally:
        torch.randperm = real
    assert len(drawn) == 3  # one fresh shuffle per ensemble pass
    sd = net.state_dict()
    want = torch.stack([(x[:, perm] @ sd["p.shuffled.linear.weight"].T + sd["p.shuffled.linear.bias"]).mean(1)
                        for perm in drawn]).mean(0)
    torch.testing.assert_close(out, want)


def test_cli_run_time_failures_point_at_the_statement_and_oversized_models_are_refused(tmp_path):
    bad = tmp_path / "bad.route"
    bad.write_text("model Bad(d: int = 4) {\n    in x: [B, T, d]\n    y = x -> reshape(B, 5, d)\n    out y\n}\n")
    done = run_cli("run", str(bad), "--batch", "2", "--length", "3")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"{bad}:3:5: error[R900]: the model failed at run time")
    done = run_cli("run", str(ROOT / "examples" / "moe.route"), "--param", "d=2000000")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "pass smaller sizes with --param" in done.stderr


def test_graph_draws_fused_constructs_as_their_construct():
    """Ops that stand for a construct keep its shape in `routec graph`: the merged multi-route S6 scan and the
    fused leaky-τ scan as scans, the fused exit head as an exit, the combine fused into a Linear as paths."""
    from routec.compiler import load
    from routec.compiler.graph import classify

    def kinds(net):
        gm = net.graph_module
        return {getattr(n.target, "__name__", str(n.target)): classify(gm, n)
                for n in gm.graph.nodes if n.op == "call_function"}

    mhs = kinds(load("stdlib:mhs_vm", device="meta", d=12, depth=1, state=4, size=16))
    assert mhs["multi_route_selective_scan"] == "scan"
    tau = kinds(load("stdlib:leaky_rnn_tau", device="meta", n=12, heads=2))
    assert tau["leaky_rnn_scan"] == "scan"
    exits = kinds(load(ROOT / "examples" / "early_exit.route", device="meta"))
    assert exits["linear_exit"] == "exit"
    paths = kinds(load(ROOT / "examples" / "paths.route", device="meta", model="GatedPair", d=8))
    assert paths["linear_combine"] == "paths"
