"""Gradients of compiled routed modules in float64 (reference backend) against finite differences."""

from __future__ import annotations

import pytest
import torch

from routec.compiler import compile_source

SPECS = {
    "paths_softmax_gate": """
model P(d: int = 4) {
    in x: [B, L, d]
    m = Linear(d, d)
    paths p(x) {
        a: m(x)
        b: x -> flip(1) -> m -> flip(1)
        c: x -> Linear(d, d) -> tanh
    } combine softmax_gate(Linear(3 * d, 3), on=mean(1))
    out p
}
""",
    "topk_experts": """
model R(d: int = 4) {
    in x: [B, T, d]
    gate g = topk(2) of Linear(d, 3)(x)
    out route x by g to experts { Linear(d, 6, bias=false) -> silu -> Linear(6, d, bias=false) }
}
""",
    "scans": """
model S(d: int = 3) {
    in x: [B, T, d]
    param tau: [d] = 2.0
    a = x -> Linear(d, d) -> sigmoid
    scan h over x.T init zeros([B, d]) {
        h = a.t * h + x.t
        emit y = h
    }
    scan r over x.T init zeros([B, d]) {
        r = r + (tanh(Linear(d, d)(r) + x.t) - r) / tau
        emit z = r
    }
    scan q over x.T reverse init zeros([B, d]) {
        q = tanh(q * 0.5 + x.t)
        emit w = q
    }
    out y + z + w
}
""",
}


@pytest.mark.parametrize("name", list(SPECS))
def test_compiled_module_gradcheck(name, monkeypatch):
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")
    torch.manual_seed(0)
    net = compile_source(SPECS[name], f"{name}.route").double().eval()
    x = torch.randn(2, 3, net.inputs[0][1][-1], dtype=torch.float64, requires_grad=True)
    out = lambda v: net(v)[0] if isinstance(net(v), tuple) else net(v)  # noqa: E731
    assert torch.autograd.gradcheck(out, (x,), eps=1e-6, atol=1e-5)
    params = [p for p in net.parameters()]
    y = out(x).sum()
    grads = torch.autograd.grad(y, params, allow_unused=True)
    assert all(g is not None for g in grads)
