"""Scan fusion (compiler/scans.py): selective (S6), integrate-and-fire and permuted linear `scan` bodies are
lowered to their fused ops; each lowering is checked against the step loop of the SAME spec text
(ROUTEC_SCAN_FUSION=0), forward and every gradient. Also lif_scan's surrogate="none" and threshold_scan."""

import pytest
import torch

from routec.codegen import lif as lif_mod
from routec.codegen import runtime
from routec.compiler import compile_source, load

FUSED_OPS = {"selective_scan", "multi_route_selective_scan", "multi_route_linear_scan", "linear_scan",
             "threshold_scan"}


def build(monkeypatch, src, fused, **params):
    monkeypatch.setenv("ROUTEC_SCAN_FUSION", "1" if fused else "0")
    return compile_source(src, "fusion_test.route", **params)


def loops(m):
    return [n for n, x in m.graph_module.named_modules() if isinstance(x, runtime.ScanLoop)]


def fused_ops(m):
    return sorted(getattr(n.target, "__name__", "") for n in m.graph_module.graph.nodes
                  if n.op == "call_function" and getattr(n.target, "__name__", "") in FUSED_OPS)


def outputs(y):
    if isinstance(y, torch.Tensor):
        return [y]
    return [t for t in y if isinstance(t, torch.Tensor)]


def pair(monkeypatch, src, **params):
    """The fused and the step-loop lowering of `src`, with the same parameters, in float64."""
    torch.manual_seed(0)
    fused = build(monkeypatch, src, True, **params)
    loop = build(monkeypatch, src, False, **params)
    loop.load_state_dict(fused.state_dict())
    assert not loops(fused) and fused_ops(fused), (loops(fused), fused_ops(fused))
    assert loops(loop) and not fused_ops(loop)
    return fused.double(), loop.double()


def check_same(fused, loop, *inputs, atol=1e-10):
    """Forward outputs, every parameter's and every input's gradient (None counts as zero)."""
    ins_f = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    ins_l = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    ys_f, ys_l = outputs(fused(*ins_f)), outputs(loop(*ins_l))
    assert len(ys_f) == len(ys_l)
    for a, b in zip(ys_f, ys_l):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-9)
    ys_f = [y for y in ys_f if y.is_floating_point()]
    ys_l = [y for y in ys_l if y.is_floating_point()]
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(y.shape, generator=gen, dtype=y.dtype) for y in ys_l]
    loss_f = sum((y * w).sum() for y, w in zip(ys_f, weights))
    loss_l = sum((y * w).sum() for y, w in zip(ys_l, weights))
    leaves_f = list(fused.parameters()) + [x for x in ins_f if x.requires_grad]
    leaves_l = list(loop.parameters()) + [x for x in ins_l if x.requires_grad]
    gf = torch.autograd.grad(loss_f, leaves_f, allow_unused=True)
    gl = torch.autograd.grad(loss_l, leaves_l, allow_unused=True)
    names = [n for n, _ in fused.named_parameters()] + [f"input{i}" for i in range(len(leaves_f))]
    nonzero = 0
    for name, a, b, leaf in zip(names, gf, gl, leaves_f):
        a = torch.zeros_like(leaf) if a is None else a
        b = torch.zeros_like(leaf) if b is None else b
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-9, msg=lambda m: f"gradient of {name}: {m}")
        nonzero += bool(b.abs().sum() > 0)
    return nonzero


# ---------------------------------------------------------------- selective scan (S6)

S6 = """
model Sel(d: int = 3, state: int = 2, H: int = 2, W: int = 3) {{
    in u: [B, L, d]
    param A_log: [d, state] = s4d_real()
    param D: [d] = 1.0
    dt, Bm, Cm = u -> Linear(d, 1 + 2 * state, bias=false) -> split([1, state, state])
    delta = dt -> Linear(1, d) -> softplus
    A = -exp(A_log)
    scan h over u.T {order} init zeros([B, d, state]) {{
        dt_t = delta.t
        u_t = u.t
        b_t = Bm.t
        c_t = Cm.t
        h = exp(unsqueeze(dt_t, -1) * A) * h + unsqueeze(dt_t * u_t, -1) * unsqueeze(b_t, 1)
        emit y = sum(h * unsqueeze(c_t, 1), -1) + D * u_t
    }}
    out y
}}
"""


@pytest.mark.parametrize("order,ops", [
    ("", ["selective_scan"]), ("reverse", ["selective_scan"]),
    ("order bidirectional", ["selective_scan", "selective_scan"]),
    ('order route_table("snake", H, W)', ["multi_route_selective_scan"]),
    ('reverse order route_table("spiral", H, W)', ["multi_route_selective_scan"]),
])
def test_selective_with_locals(monkeypatch, reference_backend, order, ops):
    fused, loop = pair(monkeypatch, S6.format(order=order))
    assert fused_ops(fused) == ops
    u = torch.randn(2, 6, 3, dtype=torch.float64)
    assert check_same(fused, loop, u) >= 4


S6_DIRECT = """
model SelDirect(d: int = 3, state: int = 2) {
    in u: [B, L, d]
    param A: [d, state] = uniform(-1.0, -0.2)
    param D: [d] = 0.5
    delta = u -> Linear(d, d) -> softplus
    Bm = u -> Linear(d, state)
    Cm = u -> Linear(d, state)
    C2 = u -> Linear(d, state)
    scan h over u.T init zeros([B, d, state]) {
        h = unsqueeze(u.t * delta.t, -1) * unsqueeze(Bm.t, -2) + h * exp(A * unsqueeze(delta.t, -1))
        emit y = u.t * D + sum(unsqueeze(Cm.t, 1) * h, -1)
        emit z = sum(h * unsqueeze(C2.t, 1), 2)
        emit w = sum(h * unsqueeze(Cm.t, 1), -1) + D * u.t
    }
    out y
    out z
    out w
    out last = h
}
"""


def test_selective_commuted_forms_several_emits_and_final_state(monkeypatch, reference_backend):
    fused, loop = pair(monkeypatch, S6_DIRECT)
    assert fused_ops(fused) == ["selective_scan", "selective_scan"]  # y and w share one call, z has its own C
    u = torch.randn(2, 5, 3, dtype=torch.float64)
    assert check_same(fused, loop, u) >= 6


S6_PIPE = """
model SelPipe(d: int = 3, state: int = 2) {
    in u: [B, L, d]
    param A: [d, state] = uniform(-1.0, -0.2)
    raw = u -> Linear(d, d)
    Bm = u -> Linear(d, state)
    scan h over u.T reverse init zeros([B, d, state]) {
        dt = raw.t -> softplus
        drive = unsqueeze(dt * u.t, -1)
        h = drive * unsqueeze(Bm.t, 1) + exp(unsqueeze(dt, -1) * A) * h
        emit y = sum(h * unsqueeze(Bm.t, 1), -1)
    }
    out y
}
"""


def test_selective_pipe_locals_reverse_no_skip(monkeypatch, reference_backend):
    fused, loop = pair(monkeypatch, S6_PIPE)
    assert fused_ops(fused) == ["selective_scan"]
    assert check_same(fused, loop, torch.randn(3, 4, 3, dtype=torch.float64)) >= 4


def test_selective_final_state_is_dead_code_when_unused(monkeypatch, reference_backend):
    fused, _ = pair(monkeypatch, S6.format(order=""))
    names = [getattr(n.target, "__name__", "") for n in fused.graph_module.graph.nodes]
    assert "linear_scan_nd" not in names and "linear_scan" not in names


# ---------------------------------------------------------------- linear recurrence in a route order

ROUTED_LINEAR = """
model Routed(d: int = 3) {{
    in x: [B, L, d]
    a = x -> Linear(d, d) -> sigmoid
    b = x -> Linear(d, d)
    scan h over x.T {order} init zeros([B, d]) {{
        a_t = a.t
        h = a_t * h + b.t
        emit y = h
    }}
    out y
    out last = h
}}
"""


@pytest.mark.parametrize("order", ['order route_table("column_snake", 2, 3)',
                                   'reverse order route_table("diagonal", 2, 3)'])
def test_linear_in_route_order(monkeypatch, reference_backend, order):
    fused, loop = pair(monkeypatch, ROUTED_LINEAR.format(order=order))
    assert fused_ops(fused) == ["multi_route_linear_scan"]
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    assert check_same(fused, loop, x) >= 4


def test_linear_with_locals_still_linear_scan(monkeypatch, reference_backend):
    fused, loop = pair(monkeypatch, ROUTED_LINEAR.format(order=""))
    assert fused_ops(fused) == ["linear_scan"]
    check_same(fused, loop, torch.randn(2, 5, 3, dtype=torch.float64))


# ---------------------------------------------------------------- integrate-and-fire

IF_NEURON = """
model IF(c: int = 2) {
    in x: [B, T, c, H, W]
    param theta: [1] = 0.8
    z = x -> flatten(0, 1) -> Conv2d(c, c, 1) -> reshape(B, T, c, H, W)
    scan v over z.T init z[:, 0] * 0.0 + theta / 2.0 {
        u = v + z.t
        s = theta * (u >= theta)
        v = u - s
        emit spikes = s
        emit membrane = v
    }
    out spikes
    out membrane
    out last = v
}
"""


def test_if_neuron_learned_threshold(monkeypatch, reference_backend):
    fused, loop = pair(monkeypatch, IF_NEURON)
    assert fused_ops(fused) == ["threshold_scan"]
    x = torch.randn(2, 5, 2, 3, 4, dtype=torch.float64)
    assert check_same(fused, loop, x) >= 3  # theta, the conv and the input get gradients


LIF_VARIANTS = {
    # constants exact in fp32: `bool * 0.625` is fp32 in the step loop even in a float64 model
    "leak_float_bool_spikes": ("param beta: [1] = 0.5", "u = 0.875 * v + z.t", "s = (u >= 0.625)",
                               "v = u - s * 0.625"),
    "leak_per_channel": ("param beta: [c] = 0.7", "u = z.t + v * beta", "s = (u >= 1.0) * 1.0", "v = u - s"),
    "zero_reset": ("param beta: [c] = 0.7", "u = beta * v + z.t", "s = 1.0 * (0.5 <= u)", "v = u * (1 - s)"),
    "learned_theta_bool": ("param theta: [1] = 0.7", "u = v + z.t", "s = (u >= theta)", "v = u - theta * s"),
}


@pytest.mark.parametrize("name", sorted(LIF_VARIANTS))
def test_lif_variants(monkeypatch, reference_backend, name):
    param, integrate, spike, reset = LIF_VARIANTS[name]
    src = f"""
model LIF(c: int = 3) {{
    in x: [B, T, c]
    {param}
    z = x -> Linear(c, c)
    scan v over z.T init zeros([B, c]) {{
        {integrate}
        {spike}
        {reset}
        emit spikes = s
        emit membrane = v
    }}
    out spikes
    out membrane
}}
"""
    fused, loop = pair(monkeypatch, src)
    assert fused_ops(fused) == ["threshold_scan"]
    x = 2 * torch.randn(3, 7, 3, dtype=torch.float64)
    spikes = outputs(fused(x))[0]
    assert (spikes.dtype == torch.bool) == ("bool" in name)
    assert spikes.any() and not spikes.all()  # it spikes, and not at every step
    assert check_same(fused, loop, x) >= 2


NEAR_MISSES = {
    "strict_comparison": """
    scan v over z.T init zeros([B, c]) {
        u = v + z.t
        s = 1.0 * (u > 1.0)
        v = u - s
        emit spikes = s
    }""",
    "reset_amount_differs": """
    scan v over z.T init zeros([B, c]) {
        u = v + z.t
        s = 1.0 * (u >= 1.0)
        v = u - 0.5 * s
        emit spikes = s
    }""",
    "emits_membrane_before_reset": """
    scan v over z.T init zeros([B, c]) {
        u = v + z.t
        s = 1.0 * (u >= 1.0)
        v = u - s
        emit spikes = u
    }""",
    "local_assigned_twice": """
    scan v over z.T init zeros([B, c]) {
        u = v + z.t
        u = u * 0.5
        s = 1.0 * (u >= 1.0)
        v = u - s
        emit spikes = s
    }""",
    "local_builds_a_layer": """
    scan v over z.T init zeros([B, c]) {
        u = v + (z.t -> LayerNorm(c))
        s = 1.0 * (u >= 1.0)
        v = u - s
        emit spikes = s
    }""",
    "local_not_elementwise": """
    scan spikes over z.T init zeros([B, c]) {
        a_t = sum(g.t, 1, keepdim=true)
        spikes = a_t * spikes + z.t
    }""",
    "selective_different_dt": """
    scan h over z.T init zeros([B, c, 2]) {
        h = exp(unsqueeze(z.t, -1) * A) * h + unsqueeze(g.t * g.t, -1) * unsqueeze(Bm.t, 1)
        emit spikes = sum(h * unsqueeze(Bm.t, 1), -1)
    }""",
    "selective_nonzero_init": """
    scan h over z.T init ones([B, c, 2]) {
        h = exp(unsqueeze(g.t, -1) * A) * h + unsqueeze(g.t * z.t, -1) * unsqueeze(Bm.t, 1)
        emit spikes = sum(h * unsqueeze(Bm.t, 1), -1)
    }""",
    "selective_emit_of_old_state": """
    scan h over z.T init zeros([B, c, 2]) {
        emit spikes = sum(h * unsqueeze(Bm.t, 1), -1)
        h = exp(unsqueeze(g.t, -1) * A) * h + unsqueeze(g.t * z.t, -1) * unsqueeze(Bm.t, 1)
    }""",
    "linear_route_nonzero_init": """
    scan v over z.T order route_table("snake", 2, 2) init ones([B, c]) {
        v = g.t * v + z.t
        emit spikes = v
    }""",
}


@pytest.mark.parametrize("name", sorted(NEAR_MISSES))
def test_near_misses_stay_step_loops(monkeypatch, reference_backend, name):
    src = f"""
model Near(c: int = 3) {{
    in x: [B, T, c]
    param A: [c, 2] = uniform(-1.0, -0.2)
    z = x -> Linear(c, c)
    g = x -> Linear(c, c) -> sigmoid
    Bm = x -> Linear(c, 2)
    {NEAR_MISSES[name]}
    out spikes
}}
"""
    m = build(monkeypatch, src, True)
    assert loops(m) and not fused_ops(m)
    x = torch.randn(2, 4, 3)
    y = m(x)
    assert torch.isfinite(y.float()).all()


# ---------------------------------------------------------------- the stdlib models


def test_stdlib_models_use_the_fused_kernels(monkeypatch):
    monkeypatch.delenv("ROUTEC_SCAN_FUSION", raising=False)
    mhs = load("stdlib:mhs_vm", device="meta", d=12, depth=1, state=4, size=16)
    assert not loops(mhs)
    # 3 heads x 4 routes lowered to multi-route selective scans (the multiroute pass may merge them)
    assert "multi_route_selective_scan" in fused_ops(mhs)
    snn = load("stdlib:dynamic_confidence_snn", device="meta", width=4, classes=3, size=8, steps=6)
    assert loops(snn) == ["o_scan"]  # the confidence scan has an exit: a step loop by design
    assert fused_ops(snn).count("threshold_scan") == 17


def test_stdlib_snn_matches_step_loop(monkeypatch, reference_backend):
    torch.manual_seed(0)
    fused = build_stdlib(monkeypatch, "dynamic_confidence_snn", True, width=4, classes=3, size=8, steps=4)
    loop = build_stdlib(monkeypatch, "dynamic_confidence_snn", False, width=4, classes=3, size=8, steps=4)
    loop.load_state_dict(fused.state_dict())
    check_same(fused.double(), loop.double(), 3 * torch.randn(2, 3, 8, 8, dtype=torch.float64))


def build_stdlib(monkeypatch, name, fused, **params):
    monkeypatch.setenv("ROUTEC_SCAN_FUSION", "1" if fused else "0")
    return load(f"stdlib:{name}", **params)


# ---------------------------------------------------------------- Triton (interpreter) vs reference


@pytest.mark.parametrize("src,inp", [
    (S6.format(order=""), (1, 6, 3)),
    (S6.format(order='order route_table("snake", H, W)'), (1, 6, 3)),
    (ROUTED_LINEAR.format(order='order route_table("row", 2, 3)'), (2, 6, 3)),
    (IF_NEURON, (1, 3, 2, 2, 2)),
], ids=["selective", "selective_route", "linear_route", "if_neuron"])
def test_triton_backend_equals_reference(monkeypatch, src, inp):
    torch.manual_seed(0)
    monkeypatch.setenv("ROUTEC_SCAN_FUSION", "1")
    m = compile_source(src, "fusion_test.route")
    assert fused_ops(m) and not loops(m)
    x = torch.randn(*inp)
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("ROUTEC_BACKEND", backend)
        if backend == "triton":
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            monkeypatch.setenv("ROUTEC_POISON", "1")
        m.zero_grad()
        ys = [y for y in outputs(m(x)) if y.is_floating_point()]
        sum((y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum() for y in ys).backward()
        results[backend] = ([y.detach() for y in ys],
                            [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in m.parameters()])
    for a, b in zip(*(results[k][0] + results[k][1] for k in ("triton", "reference"))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- lif_scan(surrogate="none"), threshold_scan


def hand_if(x, v0, theta, beta, reset):
    """Integrate-and-fire written out per step, the comparison without gradient."""
    v, spikes, vs = v0, [], []
    for t in range(x.shape[1]):
        u = beta * v + x[:, t]
        s = (u >= theta).to(x.dtype)
        v = u - s * theta if reset == "subtract" else u * (1 - s)
        spikes.append(s)
        vs.append(v)
    return torch.stack(spikes, 1), torch.stack(vs, 1)


@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_lif_no_surrogate_reference_vs_hand_loop(reference_backend, reset):
    torch.manual_seed(0)
    x = (2 * torch.randn(3, 9, 5, dtype=torch.float64)).requires_grad_()
    beta = torch.rand(5, dtype=torch.float64).requires_grad_()
    v0 = torch.randn(3, 5, dtype=torch.float64).requires_grad_()
    s, v = lif_mod.lif_scan(x, beta=beta, threshold=0.7, reset=reset, v0=v0, surrogate="none")
    hs, hv = hand_if(x, v0, 0.7, beta, reset)
    torch.testing.assert_close(s, hs)
    torch.testing.assert_close(v, hv)
    gv = torch.randn_like(v)
    got = torch.autograd.grad((v * gv).sum() + s.sum(), (x, beta, v0))
    want = torch.autograd.grad((hv * gv).sum(), (x, beta, v0))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_lif_no_surrogate_gradcheck(reference_backend):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    beta = torch.rand(3, dtype=torch.float64, requires_grad=True)
    v0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, b, v: lif_mod.lif_scan(x, beta=b, threshold=0.9, v0=v, surrogate="none"), (x, beta, v0))


@pytest.mark.parametrize("reset,shape", [("subtract", (1, 17, 1)), ("zero", (2, 5, 63)), ("subtract", (3, 4, 130))])
def test_lif_no_surrogate_triton_vs_reference(monkeypatch, reset, shape):
    torch.manual_seed(0)
    x = 2 * torch.randn(*shape)
    beta = torch.rand(shape[-1])
    v0 = torch.randn(shape[0], shape[-1])
    results = []
    for backend in ("reference", "triton"):
        monkeypatch.setenv("ROUTEC_BACKEND", backend)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("ROUTEC_POISON", "1")
        xs, bs, vs = (t.clone().requires_grad_() for t in (x, beta, v0))
        s, v = lif_mod.lif_scan(xs, beta=bs, threshold=0.8, reset=reset, v0=vs, surrogate="none")
        gen = torch.Generator().manual_seed(2)
        loss = (s * torch.randn(s.shape, generator=gen)).sum() + (v * torch.randn(v.shape, generator=gen)).sum()
        results.append([s, v, *torch.autograd.grad(loss, (xs, bs, vs))])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_lif_surrogate_rejects_unknown():
    with pytest.raises(ValueError, match="surrogate"):
        lif_mod.lif_scan(torch.zeros(1, 2, 3), beta=1.0, surrogate="sigmoid")


def test_threshold_scan_vs_hand_loop(reference_backend):
    """Tensor threshold (scale trick), [c, 1, 1]-shaped leak over [B, T, c, H, W] channels, v0 broadcast."""
    torch.manual_seed(0)
    x = (2 * torch.randn(2, 6, 3, 2, 4, dtype=torch.float64)).requires_grad_()
    theta = torch.tensor([0.6], dtype=torch.float64, requires_grad=True)
    beta = (0.5 + 0.5 * torch.rand(3, 1, 1, dtype=torch.float64)).requires_grad_()
    v0 = torch.randn(2, 3, 2, 4, dtype=torch.float64).requires_grad_()
    for reset in ("subtract", "zero"):
        s, v = lif_mod.threshold_scan(x, v0, theta, beta, reset=reset)
        hs, hv = hand_if(x, v0, theta, beta, reset)
        torch.testing.assert_close(s, hs)
        torch.testing.assert_close(v, hv)
        gv = torch.randn_like(v)
        leaves = (x, theta, beta, v0)
        got = torch.autograd.grad((v * gv).sum(), leaves, allow_unused=True)
        want = torch.autograd.grad((hv * gv).sum(), leaves, allow_unused=True)  # zero reset: theta unused
        for a, b, leaf in zip(got, want, leaves):
            torch.testing.assert_close(torch.zeros_like(leaf) if a is None else a,
                                       torch.zeros_like(leaf) if b is None else b)
    s, v = lif_mod.threshold_scan(x, v0, 0.6, 0.9)  # float threshold and leak: passed through
    hs, hv = hand_if(x, v0, 0.6, 0.9, "subtract")
    torch.testing.assert_close(v, hv)
    assert s.shape == x.shape and v.shape == x.shape


def test_threshold_scan_compiles_fullgraph(reference_backend):
    x = torch.randn(2, 4, 3, 2)
    theta = torch.tensor([0.5])
    fn = torch.compile(lambda x, t: lif_mod.threshold_scan(x, torch.zeros(2, 3, 2), t, 0.8),
                       backend="aot_eager", fullgraph=True)
    s, v = fn(x, theta)
    hs, hv = hand_if(x, torch.zeros(2, 3, 2), theta, 0.8, "subtract")
    torch.testing.assert_close(s, hs)
    torch.testing.assert_close(v, hv)


def test_fake_lif_no_surrogate_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 7, 5)
        s, v = torch.ops.routec.lif_scan(x, torch.empty(5), 1.0, "zero", None, "none")
    assert s.shape == (2, 7, 5) and v.shape == (2, 7, 5)


def test_fused_model_compiles_fullgraph(monkeypatch, reference_backend):
    """The fused lowerings trace without graph breaks (the final state of a permuted scan is read with
    index_select, not with a data-dependent index)."""
    monkeypatch.setenv("ROUTEC_SCAN_FUSION", "1")
    m = compile_source(ROUTED_LINEAR.format(order='reverse order route_table("snake", 2, 3)'), "fusion_test.route")
    x = torch.randn(2, 6, 3)
    eager = m(x)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)
