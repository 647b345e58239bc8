"""The functions `pad`, `std`, `var`, `clamp` and `leaky_relu`: their definitions (codegen.functions) against
independent formulas (loops, explicit masks, torch's own op), forward and gradients; their shape rules with
symbolic dims; compiled specs that use them (values and gradients, sizes bound at run time); the messages
and where they point; `routec compile -o` files that call them; the docs' function list."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from routec.codegen import functions
from routec.compiler import compile_source
from routec.compiler.emit import emit_module
from routec.compiler.layers import FUNCS, bind_args
from routec.dsl import RouteError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")


def _x(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- the functions against independent formulas


def pad_by_loop(x, amounts, value):
    """Constant padding by hand: a filled tensor of the new size, x copied in at the offsets (negative
    amounts crop: the copy starts inside x)."""
    amounts = list(amounts)
    sizes = list(x.shape)
    src = [slice(None)] * x.dim()
    dst = [slice(None)] * x.dim()
    for i in range(len(amounts) // 2):
        d = x.dim() - 1 - i
        left, right = amounts[2 * i], amounts[2 * i + 1]
        sizes[d] = x.shape[d] + left + right
        src[d] = slice(max(0, -left), x.shape[d] - max(0, -right))
        dst[d] = slice(max(0, left), max(0, left) + (src[d].stop - src[d].start))
    out = torch.full(sizes, value, dtype=x.dtype)
    out[tuple(dst)] = x[tuple(src)]
    return out


@pytest.mark.parametrize("amounts,value", [
    ([0, 3], 0.0),
    ([1, 2, 0, 3], -1.5),
    ([2, 0, 1, 1, 1, 0], 7.0),
    ([-1, 2, 0, -2], 0.25),  # negative amounts crop
])
def test_pad_matches_a_copy_into_a_filled_tensor(amounts, value):
    x = _x(2, 3, 5).requires_grad_()
    y = functions.pad(x, amounts, value)
    expected = pad_by_loop(x.detach(), amounts, value)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(y, F.pad(x, amounts, value=value))
    g = _x(*y.shape, seed=1)
    (grad,) = torch.autograd.grad(y, x, g)
    # the gradient of x is the output gradient read back at x's positions (cropped elements get 0)
    mask = pad_by_loop(torch.ones_like(x), amounts, 0.0)
    back = torch.zeros_like(x)
    flat_positions = pad_by_loop(torch.arange(x.numel(), dtype=torch.float64).reshape(x.shape) + 1, amounts, 0.0)
    for pos, gv, m in zip(flat_positions.flatten().tolist(), g.flatten().tolist(), mask.flatten().tolist()):
        if m:
            back.view(-1)[int(pos) - 1] += gv
    torch.testing.assert_close(grad, back)


def _spread_by_loop(x, dim, unbiased):
    """Variance along `dim` with plain Python sums over each fibre."""
    moved = x.movedim(dim, -1)
    rows = moved.reshape(-1, moved.shape[-1]).tolist()
    out = []
    for row in rows:
        m = sum(row) / len(row)
        out.append(sum((v - m) ** 2 for v in row) / (len(row) - (1 if unbiased else 0)))
    return torch.tensor(out, dtype=x.dtype).reshape(moved.shape[:-1])


@pytest.mark.parametrize("dim,keepdim,unbiased", [(0, False, True), (-1, True, False), (1, True, True), (2, False, False)])
def test_std_and_var_match_sums_over_each_fibre(dim, keepdim, unbiased):
    x = _x(4, 3, 6)
    var = _spread_by_loop(x, dim, unbiased)
    if keepdim:
        var = var.unsqueeze(dim)
    torch.testing.assert_close(functions.var(x, dim, keepdim, unbiased), var)
    torch.testing.assert_close(functions.std(x, dim, keepdim, unbiased), var.sqrt())
    torch.testing.assert_close(functions.std(x, dim, keepdim, unbiased),
                               torch.std(x, dim, correction=int(unbiased), keepdim=keepdim))


def test_std_and_var_gradients_match_their_formulas():
    x = _x(3, 5).requires_grad_()
    g = _x(3, seed=2)
    for unbiased in (True, False):
        n = 5 - int(unbiased)
        # d var / d x_i = 2 (x_i - mean) / n; d std = d var / (2 std)
        centred = (x - x.mean(1, keepdim=True)).detach()
        (dv,) = torch.autograd.grad(functions.var(x, 1, unbiased=unbiased), x, g)
        torch.testing.assert_close(dv, g[:, None] * 2 * centred / n)
        s = functions.std(x, 1, unbiased=unbiased)
        (ds,) = torch.autograd.grad(s, x, g)
        torch.testing.assert_close(ds, g[:, None] * centred / (n * s.detach()[:, None]))


@pytest.mark.parametrize("low,high", [(-0.5, 0.75), (None, 0.3), (-0.2, None), (0.1, 0.1)])
def test_clamp_matches_a_mask_and_passes_gradient_inside(low, high):
    x = _x(4, 7).requires_grad_()
    x.data[0, 0] = 0.1  # on a bound: torch's clamp passes the gradient there
    y = functions.clamp(x, low, high)
    lo = float("-inf") if low is None else low
    hi = float("inf") if high is None else high
    expected = torch.where(x < lo, lo, torch.where(x > hi, hi, x)).detach()
    torch.testing.assert_close(y, expected)
    g = _x(4, 7, seed=3)
    (grad,) = torch.autograd.grad(y, x, g)
    inside = (x >= lo) & (x <= hi)
    torch.testing.assert_close(grad, torch.where(inside, g, 0.0))


@pytest.mark.parametrize("slope", [0.01, 0.2, -0.5, 0.0])
def test_leaky_relu_matches_its_formula(slope):
    x = _x(5, 6).requires_grad_()
    y = functions.leaky_relu(x, slope)
    torch.testing.assert_close(y, torch.where(x > 0, x, slope * x).detach())
    torch.testing.assert_close(y, torch.relu(x) - slope * torch.relu(-x))
    g = _x(5, 6, seed=4)
    (grad,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(grad, torch.where(x > 0, g, slope * g))


def test_elu_in_a_spec_matches_its_formula():
    """`elu` (a torch activation, so only the language binding is ours): x where x > 0, else exp(x) - 1,
    and DSF's φ(x) = elu(x) + 1 equals the relu form the spec used before."""
    from routec.compiler import compile_source

    net = compile_source("model M(d: int = 5) {\n    in x: [B, d]\n    out elu(x) + 1.0\n}\n")
    x = _x(4, 5)
    y = net(x)
    torch.testing.assert_close(y, torch.where(x > 0, x, torch.exp(x) - 1.0) + 1.0)
    torch.testing.assert_close(y, torch.relu(x) + torch.exp(-torch.relu(-x)))


def test_gradcheck_in_float64():
    x = _x(3, 4).requires_grad_()
    x2 = (_x(3, 4) * 3).requires_grad_()  # away from the bounds of the clamp (gradcheck needs smoothness)
    x2.data[(x2.data - 0.5).abs() < 0.05] += 0.2
    x2.data[(x2.data + 0.5).abs() < 0.05] += 0.2
    x3 = _x(3, 4, seed=5)
    x3.data[x3.data.abs() < 0.05] += 0.2
    x3.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: functions.pad(t, [1, 2, 0, 1], 3.0), (x,))
    assert torch.autograd.gradcheck(lambda t: functions.std(t, 1, True), (x,))
    assert torch.autograd.gradcheck(lambda t: functions.var(t, 0, False, False), (x,))
    assert torch.autograd.gradcheck(lambda t: functions.clamp(t, -0.5, 0.5), (x2,))
    assert torch.autograd.gradcheck(lambda t: functions.leaky_relu(t, 0.1), (x3,))


# ---------------------------------------------------------------- shape rules


SHAPE_CASES = [
    ("pad", [[1, 2]], {}, [("B", "T", 4)], ("B", "T", 7)),
    ("pad", [[0, 1, 2, 3]], {"value": 1.0}, [("B", "T", 4)], ("B", "T + 5", 5)),
    ("pad", [[0, 0, 0, 0, 1, 0]], {}, [("B", "T", 4)], ("B + 1", "T", 4)),
    ("pad", [[0, 0, -1, 0]], {}, [("B", "T", 4)], ("B", "T - 1", 4)),
    ("pad", [[1, 1]], {}, [("B", "T + 1")], ("B", "T + 3")),
    ("std", [1], {}, [("B", "T", 4)], ("B", 4)),
    ("std", [-1], {"keepdim": True}, [("B", "T", 4)], ("B", "T", 1)),
    ("var", [0], {"unbiased": False}, [("B", "T")], ("T",)),
    ("var", [1], {"unbiased": False}, [("B", 1)], ("B",)),  # one element, divided by n: allowed
    ("clamp", [], {"min": 0}, [("B", "T")], ("B", "T")),
    ("clamp", [-1.0, 1.0], {}, [("B",)], ("B",)),
    ("leaky_relu", [], {}, [("B", "T", 3)], ("B", "T", 3)),
    ("leaky_relu", [0.2], {}, [(2,)], (2,)),
]


@pytest.mark.parametrize("name,args,kwargs,in_shapes,expected", SHAPE_CASES)
def test_shape_rules_and_the_results_agree(name, args, kwargs, in_shapes, expected):
    defn = FUNCS[name]
    bound, errors = bind_args(defn, args, kwargs)
    assert errors == []
    assert defn.shape(in_shapes, bound) == expected
    sizes = {"B": 2, "T": 5}
    x = torch.randn(*[eval(str(d), {}, sizes) for d in in_shapes[0]])
    y = defn.apply(x, **bound)
    assert tuple(y.shape) == tuple(eval(str(d), {}, sizes) for d in expected)


ERROR_CASES = [
    ("pad", [[1, 2, 3]], {}, [("B", 4)], "pad", "needs a (left, right) pair of amounts per padded dimension"),
    ("pad", [[]], {}, [("B", 4)], "pad", "an even number of amounts, got 0"),
    ("pad", [[1, 1, 1, 1, 1, 1]], {}, [("B", 4)], "pad", "pads 3 dimensions, but [B, 4] has 2 (at most 4 amounts)"),
    ("pad", [[-3, -2]], {}, [("B", 4)], "pad", "crops dimension 1 of [B, 4] to -1 elements"),
    ("pad", [[0, "T"]], {}, [("B", 4)], "pad", "`T` is a size known only at run time"),
    ("pad", [3], {}, [("B", 4)], "pad", "must be a list of ints [left, right, top, bottom, …], got int 3"),
    ("pad", [[1.5, 1]], {}, [("B", 4)], "pad", "must be a list of ints"),
    ("std", [2], {}, [("B", 4)], "dim", "`std(2)`: dimension 2 is out of range for [B, 4] (valid: -2 to 1)"),
    ("var", [-1], {}, [("B", 1)], "dim", "has one element, and the unbiased estimate divides by n - 1 = 0"),
    ("clamp", [], {}, [("B",)], None, "`clamp` needs a bound: `min=…`, `max=…` or both"),
    ("clamp", [], {"min": 1, "max": 0.5}, [("B",)], "max", "`clamp(min=1.0, max=0.5)` needs min ≤ max"),
]


@pytest.mark.parametrize("name,args,kwargs,in_shapes,param,message", ERROR_CASES)
def test_shape_rule_messages_name_the_argument(name, args, kwargs, in_shapes, param, message):
    defn = FUNCS[name]
    bound, errors = bind_args(defn, args, kwargs)
    assert errors == []
    result = defn.shape(in_shapes, bound)
    assert isinstance(result, str) and message in result, result
    assert getattr(result, "param", None) == param


def test_argument_type_errors_name_the_argument():
    _, errors = bind_args(FUNCS["leaky_relu"], [], {"slope": "steep"})
    assert errors == ['`leaky_relu` argument `slope` must be float, got str "steep"']
    assert errors[0].param == "slope"
    _, errors = bind_args(FUNCS["std"], [1], {"unbiased": 1})
    assert errors[0].param == "unbiased"
    _, errors = bind_args(FUNCS["clamp"], [], {"low": 1.0})
    assert errors == ["`clamp` has no argument `low`; it takes `min`, `max`"]


# ---------------------------------------------------------------- compiled specs

SPEC = """
model Net(d: int = 4, m: int = 2) {
    in x: [B, T, d]
    h = x -> pad([1, m, 0, 1], value=-0.5) -> clamp(min=-1, max=1.5) -> leaky_relu(0.2)
    s = std(h, 1, keepdim=true)
    v = var(h, -1, unbiased=false)
    out y = h * s
    out v = v
}
"""


def spec_by_hand(x, m=2):
    """SPEC written with torch ops only: pad by concatenation, clamp/leaky_relu by where, the spread by sums."""
    b, t, d = x.shape
    h = torch.cat([torch.full((b, t, 1), -0.5, dtype=x.dtype), x, torch.full((b, t, m), -0.5, dtype=x.dtype)], -1)
    h = torch.cat([h, torch.full((b, 1, d + 1 + m), -0.5, dtype=x.dtype)], 1)
    h = torch.where(h < -1, -1.0, torch.where(h > 1.5, 1.5, h))
    h = torch.where(h > 0, h, 0.2 * h)
    mu = h.mean(1, keepdim=True)
    s = (((h - mu) ** 2).sum(1, keepdim=True) / (h.shape[1] - 1)).sqrt()
    v = ((h - h.mean(-1, keepdim=True)) ** 2).mean(-1)
    return h * s, v


@pytest.mark.parametrize("length", [3, 6])
def test_a_compiled_spec_matches_the_same_model_by_hand(length):
    net = compile_source(SPEC, "net.route").double()
    x = (_x(2, length, 4) * 1.5).requires_grad_()
    y, v = net(x)
    assert y.shape == (2, length + 1, 7) and v.shape == (2, length + 1)
    ref_y, ref_v = spec_by_hand(x)
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(v, ref_v)
    gy, gv = _x(*y.shape, seed=7), _x(*v.shape, seed=8)
    (grad,) = torch.autograd.grad((y * gy).sum() + (v * gv).sum(), x)
    (ref_grad,) = torch.autograd.grad((ref_y * gy).sum() + (ref_v * gv).sum(), x)
    torch.testing.assert_close(grad, ref_grad)


def test_symbolic_pad_sizes_flow_to_later_layers():
    # the padded length T + 3 reaches a reshape and the last dim d + 2 a Linear: both are checked statically
    spec = """
model Net(d: int = 4) {
    in x: [B, T, d]
    out x -> pad([1, 1, 2, 1]) -> Linear(d + 2, 3) -> reshape(B, T + 3, 3)
}
"""
    net = compile_source(spec, "net.route")
    for length in (1, 4):
        assert net(torch.randn(2, length, 4)).shape == (2, length + 3, 3)
    with pytest.raises(RouteError) as info:
        compile_source(spec.replace("Linear(d + 2, 3)", "Linear(d + 1, 3)"), "net.route")
    assert "expects the last dimension to be 5, got [B, T + 3, 6]" in str(info.value)


def error_of(text):
    with pytest.raises(RouteError) as info:
        compile_source(text, "e.route")
    (diag,) = info.value.diagnostics
    return diag


def test_errors_point_at_the_argument():
    head = "model Net(d: int = 8) {\n    in x: [B, T, d]\n"
    line = "    out x -> pad([0, 2, 1], value=1.0)\n"
    diag = error_of(head + line + "}\n")
    assert (diag.span.line, diag.span.col, diag.span.end_col) == (3, line.index("[") + 1, line.index("]") + 2)
    line = "    out std(x, 4, keepdim=true)\n"
    diag = error_of(head + line + "}\n")
    assert diag.span.col == line.index("4") + 1
    line = "    out clamp(x, max=-1, min=1)\n"
    diag = error_of(head + line + "}\n")
    assert diag.span.col == line.index("max=") + 1 and "needs min ≤ max" in diag.message
    line = "    out x -> leaky_relu(slope=\"x\")\n"
    diag = error_of(head + line + "}\n")
    assert diag.span.col == line.index("slope=") + 1 and diag.code == "R110"
    line = "    out x -> var(0, keepdims=true)\n"
    diag = error_of(head + line + "}\n")
    assert diag.span.col == line.index("keepdims") + 1 and "did you mean `keepdim`?" in diag.message
    line = "    out clamp(x, min=x)\n"
    diag = error_of(head + line + "}\n")
    assert diag.message == "`clamp` argument `min` must be float, got a tensor [B, T, 8]"
    # a message about no single argument points at the call
    line = "    out x -> clamp()\n"
    diag = error_of(head + line + "}\n")
    assert diag.span.col == line.index("clamp") + 1


def test_a_function_name_can_still_be_a_local_name():
    net = compile_source("model Net(d: int = 3) {\n    in x: [B, d]\n    var = var(x, 0)\n    out var\n}\n", "v.route")
    x = torch.randn(4, 3)
    torch.testing.assert_close(net(x), x.var(0))


def test_compile_o_writes_a_module_that_calls_them(tmp_path):
    net = compile_source(SPEC, "net.route")
    source = emit_module(net, "net.route")
    for name in ("pad", "clamp", "leaky_relu", "std", "var"):
        assert f"functions.{name}(" in source
    path = tmp_path / "net_routec.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("emitted_functions_more", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rebuilt = module.Net()
    rebuilt.load_state_dict(net.state_dict())
    x = torch.randn(2, 5, 4)
    for a, b in zip(net(x), rebuilt(x)):
        torch.testing.assert_close(a, b)


def test_torch_compile_traces_them():
    net = compile_source(SPEC, "net.route")
    x = torch.randn(2, 5, 4)
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    for a, b in zip(net(x), compiled(x)):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- the fusion pass

needs_triton = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="runs Triton kernels: set TRITON_INTERPRET=1 (or use a GPU)",
)

FUSABLE = """
model Net(d: int = 8) {
    in x: [B, T, d]
    param b: [d] = 0.1
    h = x -> Linear(d, d)
    y = leaky_relu(h + b, 0.2) * 2.0 - clamp(h, min=-0.5) + clamp(x * h, min=-1, max=1) + clamp(h, max=0.3)
    out y
}
"""


@pytest.fixture
def kernel_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ROUTEC_CACHE", str(tmp_path_factory.getbasetemp() / "kernels"))


def test_fusion_takes_clamp_and_leaky_relu(kernel_cache):
    from routec.compiler.passes.fusion import count_elementwise, find_regions

    plain = compile_source(FUSABLE, "f.route", fuse=False)
    targets = {n.target for n in plain.graph.nodes if n.op == "call_function"}
    assert {functions.clamp, functions.leaky_relu} <= targets
    (region,) = find_regions(plain.graph)
    assert {n.target for n in region} >= {functions.clamp, functions.leaky_relu}
    assert count_elementwise(plain.graph) == len(region) == 10  # + leaky * - clamp x*h clamp + clamp +
    fused = compile_source(FUSABLE, "f.route", fuse=True)
    assert count_elementwise(fused.graph) == 0
    assert not {functions.clamp, functions.leaky_relu} & {n.target for n in fused.graph.nodes}
    # a bound that is not a number (none on both sides never compiles) keeps the call out of the region
    from routec.compiler.passes.fusion import rule_of

    clamp_node = next(n for n in plain.graph.nodes if n.target is functions.clamp)
    clamp_node.kwargs = {"min": None, "max": None}
    assert rule_of(clamp_node) is None


@needs_triton
@pytest.mark.parametrize("batch,length", [(1, 17), (3, 5)])
def test_fused_kernels_equal_the_unfused_functions(batch, length, kernel_cache, monkeypatch):
    monkeypatch.setenv("ROUTEC_POISON", "1")
    torch.manual_seed(0)
    plain = compile_source(FUSABLE, "f.route", fuse=False)
    torch.manual_seed(0)
    fused = compile_source(FUSABLE, "f.route", fuse=True)
    x = torch.randn(batch, length, 8) * 2
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = plain(x_ref)
    monkeypatch.setenv("ROUTEC_BACKEND", "triton")
    got = fused(x_fused)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(want)
    got.backward(g)
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")
    want.backward(g)
    torch.testing.assert_close(x_fused.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for (name, p), (_, q) in zip(plain.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=name)


@needs_triton
@pytest.mark.parametrize("kwargs", [{"slope": 0.2}, {"slope": -0.3}, {"min": -0.5, "max": 1.0},
                                    {"min": 0.25, "max": None}, {"min": None, "max": -0.75}])
def test_each_keyword_rule_against_torch(kwargs, kernel_cache, monkeypatch):
    from routec.compiler.passes.kernelgen import Region, Step, keyword_rule, load, op_of

    monkeypatch.setenv("ROUTEC_BACKEND", "triton")
    monkeypatch.setenv("ROUTEC_POISON", "1")
    fn = functions.leaky_relu if "slope" in kwargs else functions.clamp
    rule, constants = keyword_rule(fn, kwargs)
    region = Region(1, (Step(rule, (("x", 0), *(("c", c) for c in constants))),), (0,))
    module, path = load(region)
    assert "@triton.jit" in path.read_text(encoding="utf-8")
    x = torch.randn(5, 17) * 2
    x[0, 0] = float("nan")  # NaN stays NaN, as in torch
    want_in, got_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = fn(want_in, **kwargs)
    got = op_of(module)(got_in)
    torch.testing.assert_close(got, want, equal_nan=True)
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g)
    torch.testing.assert_close(got_in.grad[1:], want_in.grad[1:])


# ---------------------------------------------------------------- docs


def test_the_language_reference_lists_every_function():
    doc = (ROOT / "docs" / "language.md").read_text(encoding="utf-8")
    section = doc.split("## Functions", 1)[1].split("\n## ", 1)[0]
    listed = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            listed |= set(re.findall(r"`([a-z_0-9]+)\(", line.split(" | ")[0]))
    assert listed == set(FUNCS)
