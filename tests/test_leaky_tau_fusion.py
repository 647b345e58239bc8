"""Leaky-τ scan fusion (compiler/scans.py, match_leaky / lower_leaky): the post form
`h = act((1 - 1/t) * h + (R + b + u) / t)` of stdlib:leaky_rnn_tau and hand-written variants lower to
ops.leaky_rnn_scan(form="post"); each is checked against the step loop of the SAME spec text
(ROUTEC_SCAN_FUSION=0) in float64, forward and every parameter's and input's gradient. Near misses stay step
loops. The fused stdlib model on the Triton kernels (interpreter) equals the reference backend."""

from pathlib import Path

import pytest
import torch

from routec.codegen import rnn, runtime
from routec.compiler import compile_source

STDLIB = Path(rnn.__file__).resolve().parent.parent / "stdlib" / "leaky_rnn_tau.route"
SMALL = dict(n_in=1, n=12, heads=3, classes=2)


def build(monkeypatch, src, fused, **params):
    monkeypatch.setenv("ROUTEC_SCAN_FUSION", "1" if fused else "0")
    return compile_source(src, "leaky_tau_test.route", **params)


def loops(m):
    return [n for n, x in m.graph_module.named_modules() if isinstance(x, runtime.ScanLoop)]


def leaky_calls(m):
    return [n for n in m.graph_module.graph.nodes
            if n.op == "call_function" and getattr(n.target, "__name__", "") == "leaky_rnn_scan"]


def pair(monkeypatch, src, **params):
    """The fused and the step-loop lowering of `src` with the same parameters, in float64."""
    torch.manual_seed(0)
    fused = build(monkeypatch, src, True, **params)
    loop = build(monkeypatch, src, False, **params)
    loop.load_state_dict(fused.state_dict())
    assert not loops(fused) and leaky_calls(fused), loops(fused)
    assert loops(loop) and not leaky_calls(loop)
    return fused.double(), loop.double()


def outputs(y):
    return [y] if isinstance(y, torch.Tensor) else [t for t in y if isinstance(t, torch.Tensor)]


def check_same(fused, loop, *inputs, atol=1e-10):
    """Forward outputs and the gradients of every parameter and input agree; returns how many are nonzero."""
    ins_f = [x.clone().requires_grad_() for x in inputs]
    ins_l = [x.clone().requires_grad_() for x in inputs]
    ys_f, ys_l = outputs(fused(*ins_f)), outputs(loop(*ins_l))
    assert len(ys_f) == len(ys_l)
    for a, b in zip(ys_f, ys_l):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-9)
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(y.shape, generator=gen, dtype=y.dtype) for y in ys_l]
    loss_f = sum((y * w).sum() for y, w in zip(ys_f, weights))
    loss_l = sum((y * w).sum() for y, w in zip(ys_l, weights))
    params_l = dict(loop.named_parameters())  # the same names; the registration order may differ
    names = [n for n, _ in fused.named_parameters()]
    leaves_f = [p for _, p in fused.named_parameters()] + ins_f
    leaves_l = [params_l[n] for n in names] + ins_l
    gf = torch.autograd.grad(loss_f, leaves_f, allow_unused=True)
    gl = torch.autograd.grad(loss_l, leaves_l, allow_unused=True)
    names += [f"input{i}" for i in range(len(ins_f))]
    nonzero = 0
    for name, a, b, leaf in zip(names, gf, gl, leaves_f):
        a = torch.zeros_like(leaf) if a is None else a
        b = torch.zeros_like(leaf) if b is None else b
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-9, msg=lambda m: f"gradient of {name}: {m}")
        nonzero += bool(b.abs().sum() > 0)
    return nonzero


def test_stdlib_leaky_rnn_tau_fuses_and_matches_step_loop(monkeypatch, reference_backend):
    fused, loop = pair(monkeypatch, STDLIB.read_text(), **SMALL)
    (call,) = leaky_calls(fused)
    assert call.kwargs == {"activation": "leaky_relu", "form": "post", "slope": 0.01}
    torch.manual_seed(3)
    x = torch.randint(0, 2, (4, 7, 1)).double()
    h0 = 0.1 * torch.rand(4, SMALL["n"], dtype=torch.float64)
    nonzero = check_same(fused, loop, x, h0)
    assert nonzero == len(list(fused.parameters())) + 2  # tau, w_rec, b_rec, w_in, readout, x, h0
    w = dict(fused.named_parameters())["leakytaurnn.w_rec"]  # the mask zeroes the diagonal's gradient
    loss = fused(x, h0).logits.sum()
    (gw,) = torch.autograd.grad(loss, [w])
    assert torch.all(gw.diagonal() == 0) and gw.abs().sum() > 0


def test_stdlib_leaky_rnn_tau_graph_at_paper_size():
    """n = 500: the scan is one leaky_rnn_scan (the streaming kernels on CUDA), no step loop."""
    from routec.compiler import load

    m = load("stdlib:leaky_rnn_tau", device="meta")
    assert not loops(m) and len(leaky_calls(m)) == 1
    assert 500 <= rnn.MAX_STREAM_N


VARIANTS = {
    # Linear(n, n)(h) as the recurrent term, the input Linear built in the body, tanh
    "linear_layer": """
model V(d: int = 3, n: int = 5) {
    in x: [B, T, d]
    param tau: [n] = uniform(1.0, 3.0)
    scan h over x.T init zeros([B, n]) {
        h = tanh((1.0 - 1.0 / tau) * h + (Linear(n, n)(h) + Linear(d, n)(x.t)) / tau)
        emit y = h
    }
    out y
}
""",
    # h @ M with M a transposed parameter, bias first, recurrent term last, a local, sigmoid pipe, h * c1,
    # the division first
    "matrix_reordered": """
model V(d: int = 3, n: int = 5) {
    in x: [B, T, d]
    in h0: [B, n]
    param tau: [n] = uniform(1.0, 3.0)
    param w: [n, n] = kaiming()
    param b: [n] = 0.1
    w_in = Linear(d, n)
    scan h over x.T init h0 {
        r = b + w_in(x.t) + h @ transpose(w, 0, 1)
        h = (r / tau + h * (1.0 - 1.0 / tau)) -> sigmoid
    }
    out h
}
""",
    # leaky_relu with a keyword slope, relu-like identity check of the number form of tau
    "leaky_keyword_scalar_tau": """
model V(d: int = 3, n: int = 4) {
    in x: [B, T, d]
    param w: [n, n] = kaiming()
    scan h over x.T init zeros([B, n]) {
        h = leaky_relu((1 - 1 / 2.5) * h + (h @ w + (x.t -> Linear(d, n))) / 2.5, slope=0.2)
        emit y = h
    }
    out y
}
""",
    # identity and relu through a pipe with an argument-less leaky form, per-neuron tau clamped outside
    "identity_clamped": """
model V(d: int = 3, n: int = 6) {
    in x: [B, T, d]
    param tau: [n] = uniform(0.5, 3.0)
    param w: [n, n] = kaiming()
    t = clamp(tau, min=1)
    w_in = Linear(d, n)
    scan h over x.T init zeros([B, n]) {
        h = identity((1.0 - 1.0 / t) * h + (w_in(x.t) + h @ (0.5 * w)) / t)
        emit y = h
    }
    out y
}
""",
    # the pre form with h @ M and leaky_relu
    "pre_matrix_leaky": """
model V(d: int = 3, n: int = 5) {
    in x: [B, T, d]
    param tau: [n] = uniform(1.0, 3.0)
    param w: [n, n] = kaiming()
    w_in = Linear(d, n)
    scan h over x.T init zeros([B, n]) {
        h = h + (leaky_relu(h @ transpose(w, 0, 1) + w_in(x.t), 0.3) - h) / tau
        emit y = h
    }
    out y
}
""",
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_fuses_and_matches_step_loop(monkeypatch, reference_backend, name):
    src = VARIANTS[name]
    fused, loop = pair(monkeypatch, src)
    torch.manual_seed(4)
    inputs = [torch.randn(3, 6, 3, dtype=torch.float64)]
    if "in h0" in src:
        inputs.append(torch.randn(3, 5, dtype=torch.float64))
    nonzero = check_same(fused, loop, *inputs)
    assert nonzero == len(list(fused.parameters())) + len(inputs)


def test_variant_activations_and_forms_reach_the_op(monkeypatch):
    expected = {
        "linear_layer": {"activation": "tanh", "form": "post"},
        "matrix_reordered": {"activation": "sigmoid", "form": "post"},
        "leaky_keyword_scalar_tau": {"activation": "leaky_relu", "form": "post", "slope": 0.2},
        "identity_clamped": {"activation": "identity", "form": "post"},
        "pre_matrix_leaky": {"activation": "leaky_relu", "slope": 0.3},
    }
    for name, kwargs in expected.items():
        calls = leaky_calls(build(monkeypatch, VARIANTS[name], True))
        assert calls and all(c.kwargs == kwargs for c in calls), (name, [c.kwargs for c in calls])


NEAR_MISSES = {
    "other_tau_in_leak": "h = tanh((1.0 - 1.0 / tau2) * h + (h @ w + w_in(x.t)) / tau)",
    "not_one_minus": "h = tanh((1.0 - 0.5 / tau) * h + (h @ w + w_in(x.t)) / tau)",
    "gelu": "h = gelu((1.0 - 1.0 / tau) * h + (h @ w + w_in(x.t)) / tau)",
    "two_recurrent_terms": "h = tanh((1.0 - 1.0 / tau) * h + (h @ w + h @ w + w_in(x.t)) / tau)",
    "input_reads_state": "h = tanh((1.0 - 1.0 / tau) * h + (h @ w + w_in(x.t) * h) / tau)",
    "leak_on_h_squared": "h = tanh((1.0 - 1.0 / tau) * (h * h) + (h @ w + w_in(x.t)) / tau)",
    "matrix_on_the_left":
        "h = tanh((1.0 - 1.0 / tau) * h + (transpose(w @ transpose(h, 0, 1), 0, 1) + w_in(x.t)) / tau)",
    "inline_time_reduction":
        "h = tanh((1.0 - 1.0 / tau) * h + (h @ w + w_in(x.t) + mean(w_in(x.t), 1, keepdim=true)) / tau)",
    "time_reduction_in_input": "h = tanh((1.0 - 1.0 / tau) * h + (h @ w + u) / tau)",
    "no_input": "h = tanh((1.0 - 1.0 / tau) * h + (h @ w) / tau)",
}


@pytest.mark.parametrize("name", sorted(NEAR_MISSES))
def test_near_misses_stay_step_loops(monkeypatch, reference_backend, name):
    update = NEAR_MISSES[name]
    local = "        u = w_in(x.t) - mean(w_in(x.t), 1, keepdim=true)\n" if "u)" in update else ""
    src = f"""
model V(d: int = 3, n: int = 4) {{
    in x: [B, T, d]
    param tau: [n] = uniform(1.0, 3.0)
    param tau2: [n] = uniform(1.0, 3.0)
    param w: [n, n] = kaiming()
    w_in = Linear(d, n)
    scan h over x.T init zeros([B, n]) {{
{local}        {update}
        emit y = h
    }}
    out y
}}
"""
    m = build(monkeypatch, src, True)
    assert loops(m) and not leaky_calls(m)
    assert m(torch.randn(2, 3, 3)).shape == (2, 3, 4)


def _train_step_grads(net, x, h0):
    out = net(x, h0).logits
    loss = (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum()
    params = list(net.parameters())
    grads = torch.autograd.grad(loss, params + [h0])
    return out.detach(), grads


@pytest.mark.parametrize("stream", [False, True])
def test_stdlib_on_triton_kernels_equals_reference_backend(monkeypatch, stream):
    """fp32, tiny shapes: the fused stdlib model with the Triton kernels in the interpreter (the W-in-registers
    kernels, or the streaming ones forced at n = 12 with 16-wide tiles) equals the reference backend."""
    monkeypatch.setenv("ROUTEC_SCAN_FUSION", "1")
    torch.manual_seed(5)
    net = compile_source(STDLIB.read_text(), "leaky_rnn_tau.route", **SMALL)
    assert leaky_calls(net) and not loops(net)
    x = torch.randint(0, 2, (3, 5, 1)).float()
    h0 = (0.1 * torch.rand(3, SMALL["n"])).requires_grad_()
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")
    want_out, want = _train_step_grads(net, x, h0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ROUTEC_BACKEND", "triton")
    monkeypatch.setenv("ROUTEC_POISON", "1")
    launched = []
    kernels = ("_leaky_stream_fwd_kernel", "_leaky_stream_bwd_kernel") if stream else \
        ("_leaky_fwd_kernel", "_leaky_bwd_kernel")
    if stream:
        monkeypatch.setattr(rnn, "STREAM_MIN_N", 0)
        monkeypatch.setattr(rnn, "STREAM_BLOCK", 16)
    for name in kernels:
        kernel = getattr(rnn, name)

        class Spy:
            def __getitem__(self, grid, kernel=kernel, name=name):
                launched.append(name)
                return kernel[grid]

        monkeypatch.setattr(rnn, name, Spy())
    got_out, got = _train_step_grads(net, x, h0)
    assert sorted(set(launched)) == sorted(kernels)
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
    names = [n for n, _ in net.named_parameters()] + ["h0"]
    for name, a, b in zip(names, got, want):
        assert not torch.isnan(a).any(), name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"gradient of {name}: {m}")
