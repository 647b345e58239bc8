"""The elementwise fusion pass (compiler/passes/fusion.py) and its generated kernels (kernelgen.py).

Before/after in the surface language: each spec is compiled without and with the pass (same weights); the
tests count the elementwise nodes, compare outputs and every gradient between the fused graph running the
generated Triton kernels (TRITON_INTERPRET=1, ROUTEC_BACKEND=triton, outputs NaN-poisoned) and the unfused
graph on the reference backend, and read the generated files. Kernel-level tests check every rule against
torch's own function, broadcasting and strided inputs, the fallbacks, gradcheck in float64, the fake
implementation and torch.compile(fullgraph=True).
"""

from __future__ import annotations

import math
import operator
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from routec.compiler import compile_source
from routec.compiler.passes import count_elementwise, count_launches, find_regions
from routec.compiler.passes.fusion import FUSED_KERNELS
from routec.compiler.passes.kernelgen import POWERS, RULES, Region, Step, load, op_of

needs_triton = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="runs Triton kernels: set TRITON_INTERPRET=1 (or use a GPU)",
)


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    folder = tmp_path_factory.getbasetemp() / "kernels"
    monkeypatch.setenv("ROUTEC_CACHE", str(folder))
    return folder


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("ROUTEC_BACKEND", "triton")
    monkeypatch.setenv("ROUTEC_POISON", "1")


GATE = """
model Gated(d: int = 8) {
    in x: [B, T, d]
    param bias: [d] = 0.1
    g = x -> mean(1, keepdim=true) -> Linear(d, 1) -> sigmoid
    h = x -> Linear(d, d)
    y = gelu(h + bias) * g + x
    out y
}
"""

CHAINS = """
model Chains(d: int = 8) {
    in x: [B, T, d]
    a = silu(x -> Linear(d, d)) * 2.0
    b = a -> Linear(d, d)
    c = a - b
    out (c * a) ** 2
}
"""

PATHS = """
model Paths(d: int = 8) {
    in x: [B, L, d]
    paths p(x) {
        a: x -> Linear(d, d) -> tanh
        b: x -> Linear(d, d)
    } combine softmax_gate(Linear(2 * d, 2, bias=false), on=mean(1))
    out x + relu(p) * 0.5
}
"""

REORDER = """
model Reorder(d: int = 8) {
    in x: [B, T, d]
    param tau: [d] = 2.0
    a = x * 2.0
    out first = a -> Linear(d, d)
    e = x -> Linear(d, d)
    out second = (a + 1.0) * e / tau - abs(e)
}
"""

# spec, elementwise nodes before, after, regions
SPECS = {
    "gate": (GATE, 5, 0, 1),
    "chains": (CHAINS, 5, 0, 2),
    "paths": (PATHS, 4, 1, 1),
    "reorder": (REORDER, 6, 0, 1),
}


def build(src: str, fuse: bool):
    torch.manual_seed(0)
    return compile_source(src, fuse=fuse)


def outputs(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, tuple) else [result]


@pytest.mark.parametrize("name", list(SPECS))
def test_elementwise_nodes_before_and_after(name):
    src, before, after, regions = SPECS[name]
    plain, fused = build(src, False), build(src, True)
    assert count_elementwise(plain.graph) == before
    assert count_elementwise(fused.graph) == after
    assert len(fused.graph_module.meta[FUSED_KERNELS]) == regions
    fused.graph.lint()
    calls = [n for n in fused.graph.nodes if n.op == "call_function" and str(n.target).startswith("routec_fused.")]
    assert len(calls) == regions
    assert sorted(n.name for n in plain.graph.nodes if n.op == "call_module") == \
        sorted(n.name for n in fused.graph.nodes if n.op == "call_module")


def test_regions_stay_convex():
    # `a` feeds Linear `b`, and `c = a - b` needs b: a and c must not share a kernel (it would need itself).
    plain = build(CHAINS, False)
    regions = [[n.name for n in r] for r in find_regions(plain.graph)]
    assert regions == [["silu", "mul"], ["sub", "mul_1", "pow_1"]]


def test_regions_read_at_most_max_inputs(monkeypatch):
    from routec.compiler.passes.fusion import MAX_INPUTS

    n = 40
    params = "\n".join(f"    param p{i}: [d] = {i / 10}" for i in range(n))
    total = " + ".join(["x"] + [f"p{i}" for i in range(n)])
    src = f"model Many(d: int = 4) {{\n    in x: [B, d]\n{params}\n    out {total}\n}}\n"
    plain, fused = build(src, False), build(src, True)
    regions = find_regions(plain.graph)
    assert [len(r) for r in regions] == [MAX_INPUTS - 1, n - MAX_INPUTS + 1]
    assert count_elementwise(fused.graph) == 0
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")
    x = torch.randn(3, 4)
    torch.testing.assert_close(fused(x), plain(x))


@needs_triton
@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("batch,length", [(1, 17), (3, 5)])
def test_fused_equals_unfused(name, batch, length, monkeypatch, triton_backend):
    src = SPECS[name][0]
    plain, fused = build(src, False), build(src, True)
    torch.manual_seed(1)
    x = torch.randn(batch, length, 8)
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")
    x_ref = x.clone().requires_grad_(True)
    want = outputs(plain(x_ref))
    monkeypatch.setenv("ROUTEC_BACKEND", "triton")
    x_fused = x.clone().requires_grad_(True)
    got = outputs(fused(x_fused))
    for w, g in zip(want, got):
        assert not torch.isnan(g).any()
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    cotangents = [torch.randn_like(w) for w in want]
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")
    torch.autograd.backward(want, cotangents)
    monkeypatch.setenv("ROUTEC_BACKEND", "triton")
    torch.autograd.backward(got, cotangents)
    torch.testing.assert_close(x_fused.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for (pname, p), (qname, q) in zip(plain.named_parameters(), fused.named_parameters()):
        assert pname == qname
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=pname)


@needs_triton
def test_example_multitask(triton_backend, monkeypatch):
    """examples/multitask.route: `h + MLP(d, 2 * d)(h) * scale` after a keyed route becomes one kernel."""
    from pathlib import Path

    from routec.compiler import load

    spec = Path(__file__).resolve().parents[1] / "examples" / "multitask.route"
    torch.manual_seed(0)
    plain = load(spec, fuse=False)
    torch.manual_seed(0)
    fused = load(spec, fuse=True)
    assert (count_elementwise(plain.graph), count_elementwise(fused.graph)) == (2, 0)
    x, task = torch.randn(3, 5, 32), torch.tensor([0, 2, 1])
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")
    want = plain(x, task)
    monkeypatch.setenv("ROUTEC_BACKEND", "triton")
    got = fused(x, task)
    for name in want._fields:
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5)


@needs_triton
def test_gate_against_a_hand_written_formula(triton_backend):
    """The fused model against the spec's formula computed element by element with `math`."""
    net = build(GATE, True)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        y = net(x)
        h = net.linear_1(x)
        g = torch.sigmoid(net.linear(x.mean(1, keepdim=True)))
    for b in range(2):
        for t in range(3):
            for c in range(8):
                z = h[b, t, c].item() + net.bias[c].item()
                gelu = 0.5 * z * (1.0 + math.erf(z / math.sqrt(2.0)))
                want = gelu * g[b, 0, 0].item() + x[b, t, c].item()
                assert y[b, t, c].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_generated_file_is_real_triton_source(cache):
    net = build(GATE, True)
    (path,) = net.graph_module.meta[FUSED_KERNELS]
    assert path.parent == cache and path.suffix == ".py" and path.is_file()
    text = path.read_text()
    assert "@triton.jit\ndef fused_fwd(" in text and "@triton.jit\ndef fused_bwd(" in text
    assert "exec(" not in text
    compile(text, str(path), "exec")  # syntax check only; the module itself was imported by importlib
    assert "gelu(h + bias) * g + x" in text  # provenance: the statement the region came from
    module = sys.modules[f"routec_fused_{path.stem.split('_')[1]}"]
    assert module.__file__ == str(path)
    assert module.fused_fwd.fn.__module__ == module.__name__


@needs_triton
def test_launches_per_forward(triton_backend, monkeypatch):
    monkeypatch.delenv("ROUTEC_POISON")  # filling the outputs with NaN would be a launch of its own
    plain, fused = build(GATE, False), build(GATE, True)
    x = torch.randn(2, 3, 8)
    before, after = count_launches(plain, [x]), count_launches(fused, [x])
    # five elementwise kernels become one generated kernel
    assert before - after == 4


@needs_triton
def test_run_stats_cli(tmp_path, cache):
    spec = tmp_path / "gate.route"
    spec.write_text(GATE)
    env = dict(os.environ, ROUTEC_BACKEND="triton", TRITON_INTERPRET="1", ROUTEC_CACHE=str(cache))
    env.pop("ROUTEC_POISON", None)
    done = subprocess.run([sys.executable, "-m", "routec.compiler.cli", "run", str(spec), "--stats", "--repeats", "1",
                           "--batch", "2", "--length", "3"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    line = next(li for li in done.stdout.splitlines() if "launches per forward" in li)
    found = re.search(r"(\d+) as elaborated, (\d+) after the graph passes, (\d+) fused", line)
    assert found, line
    raw, merged, fused = (int(g) for g in found.groups())
    assert raw == merged  # nothing here for batch_calls / multiroute
    assert merged - fused == 4
    assert "elementwise nodes 5 → 0" in line


def single(rule, n_inputs: int, constant=None) -> Region:
    operands = tuple(("x", i) for i in range(n_inputs)) + ((("c", constant),) if constant is not None else ())
    return Region(n_inputs, (Step(rule, operands),), (0,))


TORCH_OF = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv, "neg": operator.neg,
    "relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
    "exp": torch.exp, "log": torch.log, "abs": torch.abs, "softplus": F.softplus,
    "square": lambda x: x * x, "cube": lambda x: x * x * x, "sqrt": torch.sqrt, "reciprocal": lambda x: 1 / x,
}
ALL_RULES = {r.name: r for r in list(RULES.values()) + list(POWERS.values())}


@needs_triton
@pytest.mark.parametrize("name", sorted(ALL_RULES))
def test_every_rule_against_torch(name, triton_backend):
    """Forward and backward kernel of each rule against torch's own op (a different implementation)."""
    rule = ALL_RULES[name]
    arity = len(rule.grads)
    module, _ = load(single(rule, arity))
    op = op_of(module)
    torch.manual_seed(0)
    xs = [torch.randn(5, 17) * 3 for _ in range(arity)]
    if name in ("log", "sqrt"):
        xs = [x.abs() + 0.1 for x in xs]
    if name in ("div", "reciprocal"):
        xs[-1] = xs[-1].sign() * (xs[-1].abs() + 0.5)
    if name == "abs":
        xs[0][0, :3] = 0.0  # the subgradient at 0 is 0 in torch too
    want_in = [x.clone().requires_grad_(True) for x in xs]
    want = TORCH_OF[name](*want_in)
    got_in = [x.clone().requires_grad_(True) for x in xs]
    got = op(*got_in)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g)
    for a, b in zip(got_in, want_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def broadcast_region() -> Region:
    """v0 = x0 * x1 + x2 (a gate and a bias), v1 = tanh(v0), v2 = v1 - x0 / 3; outputs v0 and v2."""
    rules = {r.name: r for r in RULES.values()}
    steps = (
        Step(rules["mul"], (("x", 0), ("x", 1))),
        Step(rules["add"], (("v", 0), ("x", 2))),
        Step(rules["tanh"], (("v", 1),)),
        Step(rules["div"], (("x", 0), ("c", 3))),
        Step(rules["sub"], (("v", 2), ("v", 3))),
    )
    return Region(3, steps, (1, 4))


def broadcast_formula(x, w, b):
    """The same region as a Python loop over elements (x [B, L, D], w [B, 1, 1], b [D])."""
    out0, out1 = torch.empty_like(x), torch.empty_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            for k in range(x.shape[2]):
                v = x[i, j, k].item() * w[i, 0, 0].item() + b[k].item()
                out0[i, j, k] = v
                out1[i, j, k] = math.tanh(v) - x[i, j, k].item() / 3
    return out0, out1


@needs_triton
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 17, 3), (3, 5, 63)])
def test_broadcast_inputs_by_index_arithmetic(shape, triton_backend):
    module, _ = load(broadcast_region())
    op = op_of(module)
    B, L, D = shape
    torch.manual_seed(0)
    x = torch.randn(B, L, D, requires_grad=True)  # [B, L, D]
    w = torch.rand(B, 1, 1, requires_grad=True)  # a per-sample gate weight
    b = torch.randn(D, requires_grad=True)  # a per-channel bias
    v0, v2 = op(x, w, b)
    w0, w2 = broadcast_formula(x.detach(), w.detach(), b.detach())
    torch.testing.assert_close(v0, w0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v2, w2, rtol=1e-5, atol=1e-5)
    ref = module.reference(x, w, b)
    gs = (torch.randn_like(v0), torch.randn_like(v2))
    want = torch.autograd.grad(ref, (x, w, b), gs)
    got = torch.autograd.grad((v0, v2), (x, w, b), gs)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


@needs_triton
def test_backward_kernel_runs(triton_backend):
    """With outputs as large as the iteration space the gradient comes from `fused_bwd`, not the recompute."""
    module, _ = load(broadcast_region())
    op = op_of(module)
    x = torch.randn(2, 3, 4, requires_grad=True)
    w, b = torch.rand(2, 1, 1, requires_grad=True), torch.randn(4, requires_grad=True)
    v0, v2 = op(x, w, b)
    with torch.profiler.profile() as prof:
        (v0.sum() + v2.sum()).backward()
    names = [e.name for e in prof.events()]
    assert "triton::fused_bwd" in names


@needs_triton
def test_strided_and_smaller_outputs(triton_backend):
    """A transposed input, and an output smaller than the iteration space (v0 of x0 * x1 with x0 [B, 1, D])."""
    rules = {r.name: r for r in RULES.values()}
    region = Region(2, (Step(rules["mul"], (("x", 0), ("c", 2.0))), Step(rules["add"], (("v", 0), ("x", 1)))), (0, 1))
    module, _ = load(region)
    op = op_of(module)
    x0 = torch.randn(3, 1, 5)
    x1 = torch.randn(3, 5, 7).transpose(1, 2)  # [3, 7, 5], not contiguous
    v0, v1 = op(x0, x1)
    assert v0.shape == (3, 1, 5) and v1.shape == (3, 7, 5)
    torch.testing.assert_close(v0, x0 * 2.0)
    torch.testing.assert_close(v1, x0 * 2.0 + x1)
    a = x0.clone().requires_grad_(True)
    v0, v1 = op(a, x1)
    (v0.sum() * 3 + v1.sum()).backward()  # v0 is smaller: the recompute path sums correctly
    torch.testing.assert_close(a.grad, torch.full_like(x0, 2.0 * 3 + 2.0 * 7))


@needs_triton
@pytest.mark.parametrize("rank", [4, 5, 6])
def test_deep_iteration_spaces(rank, triton_backend):
    """Inputs laid out so that no dimensions merge: the kernel walks all `rank` of them."""
    module, _ = load(broadcast_region())
    op = op_of(module)
    sizes = [2, 3, 2, 3, 2, 3][:rank]
    x = torch.randn(sizes[::-1]).permute(*reversed(range(rank)))  # strides grow inwards
    w = torch.rand(sizes[0], *[1] * (rank - 1))
    b = torch.randn(sizes[-1])
    v0, v2 = op(x, w, b)
    torch.testing.assert_close(v0, x * w + b)
    torch.testing.assert_close(v2, torch.tanh(x * w + b) - x / 3, rtol=1e-5, atol=1e-5)


@needs_triton
def test_fallbacks_compute_the_reference(triton_backend):
    rules = {r.name: r for r in RULES.values()}
    region = Region(2, (Step(rules["mul"], (("x", 0), ("x", 1))), Step(rules["add"], (("v", 0), ("c", 1)))), (1,))
    op = op_of(load(region)[0])
    ints = torch.arange(6).reshape(2, 3)
    assert torch.equal(op(ints, ints), ints * ints + 1)  # integer inputs: the reference keeps their dtype
    deep = torch.randn([2] * 8).permute(7, 6, 5, 4, 3, 2, 1, 0)  # 8 dims that cannot merge
    other = torch.randn(2)
    torch.testing.assert_close(op(deep, other), deep * other + 1)
    mixed = op(torch.ones(3), torch.ones(3, dtype=torch.float64))
    assert mixed.dtype == torch.float64


def test_gradcheck_float64_reference_backend(monkeypatch):
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")
    op = op_of(load(broadcast_region())[0])
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, 1, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: op(*a), (x, w, b))


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = op_of(load(broadcast_region())[0])
    with FakeTensorMode():
        x, w, b = torch.empty(4, 9, 6), torch.empty(4, 1, 1), torch.empty(6)
        v0, v2 = op(x, w, b)
        assert v0.shape == (4, 9, 6) and v2.shape == (4, 9, 6) and v0.dtype == torch.float32
        v0, v2 = op(torch.empty(5, dtype=torch.bfloat16), torch.empty(1, dtype=torch.bfloat16), torch.empty(5, dtype=torch.bfloat16))
        assert v0.shape == (5,) and v2.dtype == torch.bfloat16


@needs_triton
def test_torch_compile_fullgraph(triton_backend):
    net = build(GATE, True)
    x = torch.randn(2, 5, 8, requires_grad=True)
    want = net(x)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    got = compiled(x)
    torch.testing.assert_close(got, want)
    (gx,) = torch.autograd.grad(got.sum(), x)
    (wx,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(gx, wx, rtol=1e-5, atol=1e-5)


def test_auto_fuse_follows_the_backend(monkeypatch):
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")
    assert count_elementwise(compile_source(GATE).graph) == 5
    monkeypatch.setenv("ROUTEC_BACKEND", "triton")
    assert count_elementwise(compile_source(GATE).graph) == 0
