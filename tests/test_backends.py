"""A compiled model run end to end on the Triton kernels (in the interpreter) equals the reference backend."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from routec.compiler import compile_source, load

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")

SCAN_MODEL = """
model Scans(d: int = 6, n: int = 5) {
    in x: [B, T, d]
    param tau: [n] = 2.0
    a = x -> Linear(d, d) -> sigmoid
    scan h over x.T init zeros([B, d]) {
        h = a.t * h + x.t
        emit y = h
    }
    scan r over x.T init zeros([B, n]) {
        r = r + (tanh(Linear(n, n)(r) + Linear(d, n)(x.t)) - r) / tau
        emit z = r
    }
    scan g over x.T init zeros([B, n]) {
        g = GRUCell(d, n)(x.t, g)
        emit u = g
    }
    out (y -> Linear(d, n)) + z + u + (x -> Linear(d, n) -> lif(beta=0.9, threshold=0.5))
}
"""


def run(net, xs, backend, monkeypatch):
    monkeypatch.setenv("ROUTEC_BACKEND", backend)
    with torch.no_grad():
        out = net(*xs)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("source", ["moe", "scans", "selective"])
def test_triton_backend_equals_reference(source, monkeypatch):
    torch.manual_seed(0)
    if source == "scans":
        net = compile_source(SCAN_MODEL, "scans.route")
        xs = [torch.randn(2, 7, 6)]
    elif source == "moe":
        net = load(ROOT / "examples" / "moe.route", d=16)
        xs = [torch.randint(0, 100, (2, 5))]
    else:
        net = load(ROOT / "examples" / "selective.route", d=8, depth=1)
        xs = [torch.randn(2, 5, 8)]
    net.eval()
    state = torch.random.get_rng_state()
    want = run(net, xs, "reference", monkeypatch)
    torch.random.set_rng_state(state)  # the same random shuffle path in both runs
    got = run(net, xs, "triton", monkeypatch)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
