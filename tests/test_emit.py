"""`routec compile -o out.py` (compiler.emit): the written module imports nothing from the compiler, loads the
compiled module's state_dict, and computes what `load(...)` computes — every example and two stdlib specs,
in eval mode, and in training (outputs and gradients) for deterministic ones; fused kernels travel with the
file, which runs in an interpreter where the compiler cannot be imported. Also the constructor records
(codegen.ctor) the emitter reads, and the CLI."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from routec.codegen.ctor import Ctor, construct, ctor_of, recorded
from routec.compiler import load
from routec.compiler.cli import main
from routec.compiler.emit import EmitError, emit_module

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.route"))
STDLIB = {  # small sizes, as their own tests use them
    "jei_dnn": dict(img=32, d=32, depth=4, heads=2, classes=5),
    "duo_llm": dict(vocab=50, context=16, d=32, layers=2, heads=2, small=16, big=128),
}
ALLOWED_ROOTS = {"torch", "triton", "__future__"} | set(sys.stdlib_module_names)


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")


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


def import_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def emitted(net, spec, tmp_path: Path):
    """(the emitted source, a fresh instance of its class holding `net`'s state_dict)."""
    source = emit_module(net, spec)
    path = tmp_path / f"{net.spec_name.lower()}_routec.py"
    path.write_text(source, encoding="utf-8")
    module = import_file(path, f"emitted_{net.spec_name}_{abs(hash(str(tmp_path)))}")
    rebuilt = getattr(module, net.spec_name)()
    rebuilt.load_state_dict(net.state_dict())  # strict: the same keys and shapes
    return source, rebuilt


def run_both(net, rebuilt, xs, seed=1):
    """Both modules on the same inputs, each from the same RNG state (gates and paths may sample)."""
    torch.manual_seed(seed)
    a = net(*xs)
    torch.manual_seed(seed)
    b = rebuilt(*xs)
    return a, b


def assert_same(a, b):
    assert type(a).__name__ == type(b).__name__
    if isinstance(a, tuple):
        assert getattr(a, "_fields", None) == getattr(b, "_fields", None)
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def imported_modules(source: str) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in an emitted file"
            names.append(node.module)
    return names


def assert_standalone_imports(source: str) -> None:
    names = imported_modules(source)
    assert any(n.startswith("routec.codegen") for n in names)
    for name in names:
        assert not name.startswith(("routec.compiler", "routec.dsl")), name
        assert name.startswith("routec.codegen") or name.split(".")[0] in ALLOWED_ROOTS, name


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_rebuilt_matches_load_in_eval(path, tmp_path):
    torch.manual_seed(0)
    net = load(path)
    source, rebuilt = emitted(net, path, tmp_path)
    assert_standalone_imports(source)
    assert list(rebuilt.state_dict()) == sorted(net.state_dict(), key=list(rebuilt.state_dict()).index)
    net.eval()
    rebuilt.eval()
    with torch.no_grad():
        a, b = run_both(net, rebuilt, inputs_for(net))
    assert_same(a, b)


@pytest.mark.parametrize("name", ["multitask", "early_exit"])
def test_rebuilt_trains_like_load(name, tmp_path):
    """Training mode (exits as a tuple): the same outputs and the same gradients."""
    torch.manual_seed(0)
    path = ROOT / "examples" / f"{name}.route"
    net = load(path)
    _, rebuilt = emitted(net, path, tmp_path)
    net.train()
    rebuilt.train()
    xs = inputs_for(net)
    a, b = run_both(net, rebuilt, xs)
    assert_same(a, b)
    grads = []
    for module, out in ((net, a), (rebuilt, b)):
        main_out = out[0] if isinstance(out, tuple) else out
        loss = main_out.float().pow(2).mean()
        for e in getattr(out, "exits", ()):
            loss = loss + e.pow(2).mean()
        if hasattr(out, "aux_loss"):
            loss = loss + out.aux_loss
        loss.backward()
        grads.append({k: p.grad for k, p in module.named_parameters(remove_duplicate=False)})
    assert grads[0].keys() == grads[1].keys()
    assert any(g is not None and g.abs().sum() > 0 for g in grads[0].values())
    for key, g in grads[0].items():
        if g is None:
            assert grads[1][key] is None, key
        else:
            torch.testing.assert_close(grads[1][key], g, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", sorted(STDLIB))
def test_stdlib_rebuilt_matches_load(name, tmp_path):
    torch.manual_seed(0)
    net = load(f"stdlib:{name}", **STDLIB[name])
    source, rebuilt = emitted(net, f"stdlib:{name}", tmp_path)
    assert_standalone_imports(source)
    net.eval()
    rebuilt.eval()
    with torch.no_grad():
        a, b = run_both(net, rebuilt, inputs_for(net, length=8))
    assert_same(a, b)


def test_emitted_source_reads_as_the_spec(tmp_path):
    """Constructors with literal arguments at spec paths, repeats as ModuleLists, nested graphs as helpers."""
    net = load(ROOT / "examples" / "moe.route")
    source = emit_module(net, ROOT / "examples" / "moe.route", {"d": 32})
    assert source.startswith('"""`MoETiny` from moe.route (d=32), written by routec ')
    assert "self.layers = nn.ModuleList(nn.Module() for _ in range(2))" in source
    assert "self.layers[0].moemlp.g.gate = runtime.TopKGate(2, 8, d=32, noisy=True" in source
    assert "self.embedding = nn.Embedding(100, 32)" in source
    assert "return MoETinyTrainOutput(outs[0], aux_loss)" in source
    multitask = emit_module(load(ROOT / "examples" / "multitask.route"), "multitask.route")
    assert "class _MultiTask_route_g_branch1(nn.Module):" in multitask
    assert "self.small.adapter.linear = root.small.adapter.linear" in multitask
    assert "self.route_g = runtime.BranchRoute(\n" in multitask
    assert "[_MultiTask_route_g_branch0(self), _MultiTask_route_g_branch1(self)," in multitask
    compile(source, "moe_routec.py", "exec")


def test_module_without_a_constructor_record_is_an_error():
    class Unrecorded(nn.Module):
        def forward(self, x):
            return x

    net = load(ROOT / "examples" / "multitask.route")
    net.add_module("extra", Unrecorded())
    with pytest.raises(EmitError, match="`extra` is a Unrecorded built without a constructor record"):
        emit_module(net, "multitask.route")


def test_constructor_records():
    linear = construct(nn.Linear, 3, 4, bias=False)
    assert ctor_of(linear) == Ctor(nn.Linear, (3, 4), {"bias": False})
    assert ctor_of(nn.Linear(3, 4)) is None

    @recorded
    class Scaled(nn.Module):
        def __init__(self, n: int, scale: float = 1.0):
            super().__init__()
            self.w = nn.Parameter(torch.full((n,), scale))

    class Shifted(Scaled):
        def __init__(self, n: int):
            super().__init__(n, 2.0)

    assert ctor_of(Scaled(3, scale=0.5)) == Ctor(Scaled, (3,), {"scale": 0.5})
    assert ctor_of(Shifted(3)) is None  # a subclass is not its parent: no record of the parent's call
    assert "_routec_ctor" not in Scaled(2).state_dict()


def test_cli_writes_the_module_and_dumps_it(tmp_path, capsys):
    spec = str(ROOT / "examples" / "leaky_rnn.route")
    out = tmp_path / "leaky_routec.py"
    assert main(["compile", spec, "--param", "n=8", "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    written = out.read_text(encoding="utf-8")
    assert main(["compile", spec, "--param", "n=8", "--dump-after", "emit"]) == 0
    assert capsys.readouterr().out == written
    assert "(n=8)" in written.splitlines()[0]
    assert "self.linear = nn.Linear(8, 5, bias=True)" in written
    assert main(["compile", spec, "--dump-after", "list"]) == 0
    assert "emit" in capsys.readouterr().out.split()


def test_fused_kernels_travel_with_the_file(tmp_path, monkeypatch):
    """A fused graph's generated kernels are embedded: in a fresh interpreter without the compiler (and with
    no kernel cache), the file registers them, runs them (Triton interpreter) and matches the fused model."""
    monkeypatch.setenv("ROUTEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ROUTEC_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    net = load(ROOT / "examples" / "multitask.route", fuse=True).eval()
    fused = [str(n.target).split(".")[1] for n in net.graph.nodes if str(n.target).startswith("routec_fused.")]
    assert fused
    source = emit_module(net, "multitask.route")
    assert_standalone_imports(source)
    for op in fused:
        assert f"if not hasattr(torch.ops.routec_fused, {op!r}):" in source
        assert f"def _{op}_fused_fwd(" in source
    path = tmp_path / "multitask_routec.py"
    path.write_text(source, encoding="utf-8")
    xs = inputs_for(net)
    with torch.no_grad():
        want = net(*xs)
    torch.save({"state": net.state_dict(), "xs": xs, "want": tuple(want)}, tmp_path / "case.pt")
    script = textwrap.dedent(f"""
        import importlib.abc, importlib.util, sys, torch

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.startswith(("routec.compiler", "routec.dsl")) or name.startswith("routec_fused_"):
                    raise ImportError(f"blocked: {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        spec = importlib.util.spec_from_file_location("multitask_routec", {str(path)!r})
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
        assert all(hasattr(m, f"_{{op}}_fused") for op in {fused!r})  # registered by the file itself
        case = torch.load({str(tmp_path / "case.pt")!r})
        net = m.MultiTask().eval()
        net.load_state_dict(case["state"])
        with torch.no_grad():
            got = net(*case["xs"])
        for a, b in zip(got, case["want"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_rebuilt_module_compiles_fullgraph(tmp_path):
    """The emitted module is as traceable as the compiled one: torch.compile(fullgraph=True) gives the same
    outputs (the routing modules and custom ops are the same objects of routec.codegen)."""
    path = ROOT / "examples" / "moe.route"
    net = load(path)
    _, rebuilt = emitted(net, path, tmp_path)
    rebuilt.eval()
    xs = inputs_for(net)
    with torch.no_grad():
        want = rebuilt(*xs)
        got = torch.compile(rebuilt, backend="eager", fullgraph=True)(*xs)
    assert_same(want, got)


def _sample(param):
    if not param.required:
        return None
    return {"int": 4, "float": 0.5, "bool": True, "str": "gelu"}.get(param.type, 4)


@pytest.mark.parametrize("name", sorted(__import__("routec.compiler.layers", fromlist=["LAYERS"]).LAYERS))
def test_every_layer_records_its_constructor(name):
    """`routec compile` can only write a layer whose construction was recorded: every LayerDef's factory
    goes through codegen.ctor.construct (torch layers) or builds a @recorded class (routec layers)."""
    from routec.compiler.layers import LAYERS

    defn = LAYERS[name]
    kwargs = {p.name: _sample(p) for p in defn.params if p.required}
    kwargs.update({"PosEmbed": {"length": 4}}.get(name, {}))  # a learned table needs its length
    module = defn.build(**kwargs)
    ctor = ctor_of(module)
    assert ctor is not None, f"{name}: built without a constructor record"
    rebuilt = ctor.cls(*ctor.args, **ctor.kwargs)
    assert type(rebuilt) is type(module)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", sorted(__import__("routec.compiler.layers", fromlist=["FUNCS"]).FUNCS))
def test_every_function_has_an_importable_name(name):
    """Graph nodes call FuncDef functions by reference; the emitted file imports them from torch or
    routec.codegen, so none may be a lambda or live in the compiler."""
    from types import SimpleNamespace

    from routec.compiler.emit import _Emitter
    from routec.compiler.layers import FUNCS

    spelled = _Emitter(SimpleNamespace(spec_name="Net")).ref(FUNCS[name].fn)
    assert spelled.startswith(("torch.", "functions.", "runtime.", "ops.", "layers.")), spelled


@pytest.mark.parametrize("name", __import__("routec.stdlib", fromlist=["available"]).available())
def test_every_stdlib_spec_emits(name):
    """Every stdlib spec (built at its default sizes on the meta device: no memory, no data) is written as
    valid Python by `routec compile`, naming only torch and routec.codegen."""
    from routec.dsl import RouteError

    try:
        with torch.device("meta"):
            net = load(f"stdlib:{name}")
    except RouteError as err:
        pytest.skip(f"stdlib:{name} does not compile at its defaults: {str(err).splitlines()[0]}")
    source = emit_module(net, f"stdlib:{name}")
    compile(source, f"{name}_routec.py", "exec")
    assert_standalone_imports(source)


def test_codegen_never_imports_the_compiler():
    """DESIGN §2: imports flow dsl ← compiler → codegen; the emitted files rely on codegen standing alone."""
    for path in sorted((ROOT / "codegen").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = ("." * node.level) + (node.module or "")
                assert not target.startswith(("..compiler", "..dsl", "routec.compiler", "routec.dsl")), \
                    f"{path.name} imports {target}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith(("routec.compiler", "routec.dsl")), f"{path.name}: {alias.name}"
