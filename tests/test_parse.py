"""The parser: every construct of the language, precedence, layout rules, spans, docs and limits."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from routec.dsl import KEYWORDS, RouteError, ast, parse, strip_spans, walk

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.route"))

DESIGN_EXAMPLES = '''\
# RSMamba: one shared mixer over three token orders, gated per sample
use stdlib.mamba (MambaMixer)

block RSMambaLayer(d: int, inner: int) {
    in x: [B, L, d]
    h = x -> LayerNorm(d)
    mixer = MambaMixer(d, inner)                 # one instance: the three paths share its weights
    paths p(h) {
        fwd:     mixer(h)
        rev:     h -> flip(1) -> mixer -> flip(1)
        shuffle: h -> permute(1, random) -> mixer -> unpermute
    } combine softmax_gate(Linear(3 * d, 3, bias=false), on=mean(1))
    out x + p
}

model RSMamba(d: int = 192, depth: int = 24, classes: int = 45) {
    in img: [B, 3, 224, 224]
    x = img -> PatchEmbed(3, d, patch=16, stride=8) -> PosEmbed(d)
    repeat depth { x = RSMambaLayer(d, 2 * d)(x) }
    out x -> LayerNorm(d) -> mean(1) -> Linear(d, classes)
}

block MoEMLP(d: int, hidden: int, experts: int = 16, k: int = 4) {
    in x: [B, T, d]
    gate g = topk(k, noisy=true) of Linear(d, experts)(x)     # pre-gate: only chosen experts run
    out route x by g to experts { Linear(d, hidden) -> gelu -> Linear(hidden, d) }
}

model EarlyExitViT(d: int = 384, depth: int = 12, classes: int = 100) {
    in x: [B, N, d]
    h = x
    repeat i in depth {
        h = TransformerBlock(d, heads=6)(h)
        exit head[i] = h -> mean(1) -> Linear(d, classes) when confidence(head[i]) >= 0.9
    }
}

block LeakyRNN(n_in: int, n: int) {
    in x: [B, T, n_in]
    param tau: [n] = 2.0                                    # trainable time constants
    scan h over x.T init zeros([B, n]) {
        h = h + (tanh(Linear(n, n)(h) + Linear(n_in, n)(x.t)) - h) / tau
    }
    out h
}
'''


def sx(e) -> str:
    """An S-expression of an expression tree, written independently of the formatter."""
    if e is None:
        return "_"
    k = e.kind
    if k == "name":
        return e.id
    if k in ("int", "float"):
        return repr(e.value)
    if k == "bool":
        return "true" if e.value else "false"
    if k == "str":
        return repr(e.value)
    if k == "binop":
        return f"({e.op} {sx(e.left)} {sx(e.right)})"
    if k == "unop":
        return f"({e.op}u {sx(e.operand)})"
    if k == "pipe":
        return f"(-> {sx(e.left)} {sx(e.right)})"
    if k == "call":
        parts = [sx(a) for a in e.args] + [f"{kw.name}={sx(kw.value)}" for kw in e.kwargs]
        return f"(call {sx(e.func)}{''.join(' ' + p for p in parts)})"
    if k == "index":
        return f"(idx {sx(e.value)} {' '.join(sx(i) for i in e.indices)})"
    if k == "slice":
        return f"(: {sx(e.start)} {sx(e.stop)} {sx(e.step)})"
    if k == "ellipsis":
        return "..."
    if k == "attr":
        return f"(. {sx(e.value)} {e.attr})"
    if k == "list":
        return "[" + " ".join(sx(i) for i in e.items) + "]"
    if k == "tuple":
        return "(tuple" + "".join(" " + sx(i) for i in e.items) + ")"
    if k == "gate_ref":
        return f"(gate {e.name})"
    if k == "route":
        t = e.target
        if t.kind == "experts":
            return f"(route {sx(e.value)} {sx(e.gate)} {t.name} {sx(t.body)})"
        return f"(route {sx(e.value)} {sx(e.gate)} " + " ".join(f"{b.name}:{sx(b.value)}" for b in t.branches) + ")"
    raise AssertionError(k)


def expr(text: str):
    module = parse(f"block T() {{\n    out {text}\n}}\n", "t.route")
    return module.definitions[0].body[0].value


def body(text: str) -> tuple:
    return parse("block T() {\n" + text + "\n}\n", "t.route").definitions[0].body


@pytest.mark.parametrize("text, expected", [
    ("a + b * c", "(+ a (* b c))"),
    ("a - b - c", "(- (- a b) c)"),
    ("a / b // c % d @ e", "(@ (% (// (/ a b) c) d) e)"),
    ("a ** b ** c", "(** a (** b c))"),
    ("-a ** 2", "(-u (** a 2))"),
    ("2 ** -1", "(** 2 (-u 1))"),
    ("- -a", "(-u (-u a))"),
    ("+a * b", "(* (+u a) b)"),
    ("x -> f -> g(1)", "(-> (-> x f) (call g 1))"),
    ("x + y -> f", "(-> (+ x y) f)"),
    ("x -> f + 1", "(-> x (+ f 1))"),
    ("x -> f >= 0.9", "(>= (-> x f) 0.9)"),
    ("a < b and not c or d", "(or (and (< a b) (notu c)) d)"),
    ("not a == b", "(notu (== a b))"),
    ("(a + b) * c", "(* (+ a b) c)"),
    ("Linear(d, n)(x)", "(call (call Linear d n) x)"),
    ("Linear(3 * d, 3, bias=false)", "(call Linear (* 3 d) 3 bias=false)"),
    ("f()", "(call f)"),
    ("x.T", "(. x T)"),
    ("h.last.t", "(. (. h last) t)"),
    ("x[:, 0]", "(idx x (: _ _ _) 0)"),
    ("x[..., 1:3]", "(idx x ... (: 1 3 _))"),
    ("x[::2, 1:, :n-1]", "(idx x (: _ _ 2) (: 1 _ _) (: _ (- n 1) _))"),
    ("head[i]", "(idx head i)"),
    ("[a, b,]", "[a b]"),
    ("[]", "[]"),
    ("()", "(tuple)"),
    ("(a,)", "(tuple a)"),
    ("(a, b)", "(tuple a b)"),
    ("\"ge\\\"lu\\n\"", "'ge\"lu\\n'"),
    ("true", "true"),
    ("1e-3", "0.001"),
    ("2.5E4", "25000.0"),
    ("route x by g to experts { Linear(d, h) -> gelu }", "(route x g experts (-> (call Linear d h) gelu))"),
    ("route x by g to { skip: identity  small: f(x) }", "(route x g skip:identity small:(call f x))"),
    ("route x by g to {\n  a: x\n\n  b: y\n} -> f", "(-> (route x g a:x b:y) f)"),
    ("f(\n  a,\n  b=[1,\n 2]\n)", "(call f a b=[1 2])"),
])
def test_expression_structure(text, expected):
    assert sx(expr(text)) == expected


def test_comparisons_do_not_chain():
    with pytest.raises(RouteError):
        expr("a < b < c")


def test_design_examples_parse_as_written():
    module = parse(DESIGN_EXAMPLES, "design.route")
    assert [(u.module, [n.name for n in u.names]) for u in module.uses] == [("stdlib.mamba", ["MambaMixer"])]
    assert [(d.kind, d.name) for d in module.definitions] == [
        ("block", "RSMambaLayer"), ("model", "RSMamba"), ("block", "MoEMLP"), ("model", "EarlyExitViT"),
        ("block", "LeakyRNN"),
    ]
    layer, net, moe, vit, rnn = module.definitions
    assert [s.kind for s in layer.body] == ["in", "assign", "assign", "paths", "out"]
    paths = layer.body[3]
    assert paths.name == "p" and [sx(i) for i in paths.inputs] == ["h"]
    assert [(b.name, sx(b.value)) for b in paths.branches] == [
        ("fwd", "(call mixer h)"),
        ("rev", "(-> (-> (-> h (call flip 1)) mixer) (call flip 1))"),
        ("shuffle", "(-> (-> (-> h (call permute 1 random)) mixer) unpermute)"),
    ]
    assert sx(paths.combine) == "(call softmax_gate (call Linear (* 3 d) 3 bias=false) on=(call mean 1))"
    assert [(p.name, p.type, sx(p.default)) for p in net.params] == [
        ("d", "int", "192"), ("depth", "int", "24"), ("classes", "int", "45")]
    rep = net.body[2]
    assert rep.kind == "repeat" and rep.var is None and sx(rep.count) == "depth"
    assert sx(rep.body[0].value) == "(call (call RSMambaLayer d (* 2 d)) x)"
    gate = moe.body[1]
    assert (gate.name, gate.timing, sx(gate.gate_kind), sx(gate.scores)) == (
        "g", None, "(call topk k noisy=true)", "(call (call Linear d experts) x)")
    assert sx(moe.body[2].value) == "(route x g experts (-> (-> (call Linear d hidden) gelu) (call Linear hidden d)))"
    exit_ = vit.body[2].body[1]
    assert (exit_.kind, exit_.name, sx(exit_.index), sx(exit_.rule)) == (
        "exit", "head", "i", "(>= (call confidence (idx head i)) 0.9)")
    assert vit.body[2].var == "i"
    param, scan = rnn.body[1], rnn.body[2]
    assert (param.name, [sx(d) for d in param.shape], sx(param.init)) == ("tau", ["n"], "2.0")
    assert (scan.states, sx(scan.over), sx(scan.init), scan.reverse, scan.order) == (
        ("h",), "(. x T)", "(call zeros [B n])", False, None)
    assert [c.text for c in module.comments] == [
        "# RSMamba: one shared mixer over three token orders, gated per sample",
        "# one instance: the three paths share its weights",
        "# pre-gate: only chosen experts run",
        "# trainable time constants",
    ]


def test_file_level_forms():
    module = parse(
        'use stdlib.mamba (MambaMixer)\nuse "other.route" (Foo, Bar as Baz,)\nuse stdlib.rsmamba\n\n'
        'block A(p: int, q: float = 0.5, flag: bool = true, act: str = "gelu", dims: shape = [3, 224, 224],) {\n'
        '    out p\n}\n',
        "f.route",
    )
    uses = [(u.module, u.path, None if u.names is None else [(n.name, n.alias) for n in u.names])
            for u in module.uses]
    assert uses == [
        ("stdlib.mamba", None, [("MambaMixer", None)]),
        (None, "other.route", [("Foo", None), ("Bar", "Baz")]),
        ("stdlib.rsmamba", None, None),
    ]
    params = module.definitions[0].params
    assert [(p.name, p.type, sx(p.default)) for p in params] == [
        ("p", "int", "_"), ("q", "float", "0.5"), ("flag", "bool", "true"), ("act", "str", "'gelu'"),
        ("dims", "shape", "[3 224 224]"),
    ]


def test_statement_forms():
    stmts = body('''
    in x: [B, T, 2 * d] long
    in task: [B] long
    let n = d // heads
    a, b = split(x, 2)
    param w: [n, n] = normal(0.02)
    pre gate g = topk(2, noisy=true, capacity=1.25, aux=0.01) of Linear(d, 8)(x)
    post gate s = gumbel(tau, hard=true) of x
    gate k = keyed(task, table) of x
    out logits = x
    out x
    emit y = h
    exit e = x when entropy(e) <= 0.3
    scan (h, c) over x.T reverse order perm(idx) init (zeros([B, n]), zeros([B, n])) { h, c = cell(x.t, (h, c)) }
    paths q { a: x  b: y } combine gate g
    paths r(x) {
        a: x
    }
    combine concat(-1) sample(drop=0.1) ensemble(n=4)
''')
    kinds = [s.kind for s in stmts]
    assert kinds == ["in", "in", "let", "assign", "param", "gate", "gate", "gate", "out", "out", "emit", "exit",
                     "scan", "paths", "paths"]
    x, task, let, assign, param, pre, post, keyed, named, plain, emit, exit_, scan, pq, pr = stmts
    assert (x.name, [sx(d) for d in x.shape], x.dtype) == ("x", ["B", "T", "(* 2 d)"], "long")
    assert (task.dtype, let.name, sx(let.value)) == ("long", "n", "(// d heads)")
    assert [t.id for t in assign.targets] == ["a", "b"]
    assert (param.name, sx(param.init)) == ("w", "(call normal 0.02)")
    assert (pre.timing, post.timing, keyed.timing) == ("pre", "post", None)
    assert sx(pre.gate_kind) == "(call topk 2 noisy=true capacity=1.25 aux=0.01)"
    assert (named.name, plain.name) == ("logits", None)
    assert (emit.name, sx(emit.value)) == ("y", "h")
    assert (exit_.name, exit_.index, sx(exit_.rule)) == ("e", None, "(<= (call entropy e) 0.3)")
    assert (scan.states, scan.reverse, sx(scan.order)) == (("h", "c"), True, "(call perm idx)")
    assert sx(scan.init) == "(tuple (call zeros [B n]) (call zeros [B n]))"
    assert [t.id for t in scan.body[0].targets] == ["h", "c"]
    assert (pq.inputs, [b.name for b in pq.branches], sx(pq.combine)) == ((), ["a", "b"], "(gate g)")
    assert [sx(m) for m in pr.modifiers] == ["(call sample drop=0.1)", "(call ensemble n=4)"]
    assert sx(pr.combine) == "(call concat (-u 1))"


def test_if_else_chains_and_layout():
    (stmt,) = body('''
    if a and not b {
        x = 1
    }
    else if c {
        x = 2
    } else {
        x = 3
        y = x
            -> f
            -> g
    }
''')
    assert sx(stmt.cond) == "(and a (notu b))"
    (nested,) = stmt.orelse
    assert nested.kind == "if" and sx(nested.cond) == "c"
    assert [sx(s.value) for s in nested.orelse] == ["3", "(-> (-> x f) g)"]


def test_one_line_bodies_and_empty_bodies():
    rep, scan, empty = body("    repeat 3 { x = f(x) }\n    scan h over x.T init 0 { }\n    repeat 0 {}")
    assert len(rep.body) == 1 and scan.body == () and empty.body == ()


def test_docs_attach_to_the_next_thing():
    module = parse('''## The file.
## Second line.

## A block.
block A(d: int) {
    ## The input.
    in x: [B, d]
    paths p(x) {
        ## First.
        a: x
    } combine sum
    out route x by g to {
        ##Skip it.
        skip: identity
    }
    ## dangling: documents nothing, so it is a comment
}
''', "d.route")
    assert module.doc == "The file.\nSecond line."
    block = module.definitions[0]
    assert block.doc == "A block."
    assert block.body[0].doc == "The input."
    assert block.body[1].branches[0].doc == "First."
    assert block.body[2].value.target.branches[0].doc == "Skip it."
    assert [c.text for c in module.comments] == ["## dangling: documents nothing, so it is a comment"]


def test_spans_are_exact():
    module = parse("block A(d: int) {\n    y = foo(a, k=2) -> g\n}\n", "s.route")
    stmt = module.definitions[0].body[0]
    pipe = stmt.value
    call = pipe.left
    def where(node):
        s = node.span
        return (s.line, s.col, s.end_line, s.end_col)
    assert where(module.definitions[0]) == (1, 1, 3, 2)
    assert where(stmt) == (2, 5, 2, 25)
    assert where(pipe) == (2, 9, 2, 25)
    assert where(call) == (2, 9, 2, 20)
    assert where(call.kwargs[0]) == (2, 16, 2, 19)
    assert where(pipe.right) == (2, 24, 2, 25)
    assert all(n.span.file == "s.route" for n in walk(module))


def test_nodes_are_frozen_and_strict():
    module = parse("block A() {\n    out 1\n}\n", "f.route")
    with pytest.raises(Exception):
        module.definitions[0].name = "B"  # type: ignore[misc]
    with pytest.raises(Exception):
        ast.Name(span=module.span, id="x", extra=1)  # type: ignore[call-arg]


def test_strip_spans_ignores_positions_only():
    a = parse("block A() {\n    out x+1\n}\n", "a.route")
    b = parse("\n\nblock A(  ) {   out x   +   1 }", "b.route")
    c = parse("block A() {\n    out x+2\n}\n", "a.route")
    assert a != b
    assert strip_spans(a) == strip_spans(b)
    assert strip_spans(a) != strip_spans(c)


def test_bytes_input_and_line_endings():
    text = "block A() {\r\n    out 1\r\n}\r\n"
    assert strip_spans(parse(text.encode(), "b.route")) == strip_spans(parse(text.replace("\r\n", "\n"), "c.route"))


def test_comment_only_file_is_an_empty_module():
    module = parse("# nothing here yet\n", "c.route")
    assert module.definitions == () and [c.text for c in module.comments] == ["# nothing here yet"]


@pytest.mark.parametrize("text, code", [
    ("block A() {\n    out " + "(" * 5000 + "x" + ")" * 5000 + "\n}\n", "R008"),
    ("block A() {\n    out " + "[" * 100000 + "\n}\n", "R008"),
    ("block A() {\n    out " + "- " * 5000 + "x\n}\n", "R008"),
    ("block A() {\n    out x" + " -> f" * 3000 + "\n}\n", "R008"),
    ("block A() {\n" + "repeat 1 {\n" * 3000 + "}\n" * 3000 + "}\n", "R008"),
    ("block A() {\n    out x" + ".a" * 3000 + "\n}\n", "R008"),
])
def test_deep_nesting_is_a_clean_error(text, code):
    start = time.perf_counter()
    with pytest.raises(RouteError) as info:
        parse(text, "deep.route")
    assert info.value.codes == [code]
    assert time.perf_counter() - start < 10


def test_several_errors_across_definitions():
    with pytest.raises(RouteError) as info:
        parse("block A(d int) {\n    out d\n}\n\nblock B() {\n    x = \n    out x\n}\n\nmodel C() {\n    out ,\n}\n",
              "m.route")
    assert [(d.code, d.span.line) for d in info.value.diagnostics] == [("R010", 1), ("R010", 6), ("R010", 11)]


def test_keywords_are_documented():
    doc = (ROOT / "docs" / "language.md").read_text(encoding="utf-8")
    listed = re.search(r"Reserved words \(never usable as names\): (.*?)\.\n", doc, re.S).group(1)
    assert sorted(listed.replace("`", "").split()) == sorted(KEYWORDS)


def test_error_codes_are_documented():
    doc = (ROOT / "docs" / "language.md").read_text(encoding="utf-8")
    source = (ROOT / "dsl" / "parser.py").read_text(encoding="utf-8")
    used = set(re.findall(r'"(R0\d\d)"', source))
    documented = set(re.findall(r"^\| (R0\d\d) \|", doc, re.M))
    assert used and used <= documented


def test_examples_parse_and_cover_every_construct():
    assert len(EXAMPLES) >= 5
    kinds: set[str] = set()
    extras: set[str] = set()
    for path in EXAMPLES:
        module = parse(path.read_bytes(), path.name)
        for node in walk(module):
            kinds.add(getattr(node, "kind", type(node).__name__))
            if isinstance(node, ast.Gate) and node.timing:
                extras.add(f"{node.timing} gate")
            if isinstance(node, ast.Scan):
                extras |= {"scan reverse"} if node.reverse else set()
                extras |= {"scan order"} if node.order is not None else set()
                extras |= {"scan states"} if len(node.states) > 1 else set()
            if isinstance(node, ast.Repeat):
                extras.add("repeat var" if node.var else "repeat")
            if isinstance(node, ast.Exit):
                extras.add("exit indexed" if node.index is not None else "exit plain")
            if isinstance(node, ast.Paths) and node.modifiers:
                extras.add("modifiers")
            if isinstance(node, ast.Use):
                extras.add("use file" if node.path else "use stdlib")
            if isinstance(node, ast.If) and node.orelse:
                extras.add("else")
            if isinstance(node, ast.Assign) and len(node.targets) > 1:
                extras.add("unpacking")
            if isinstance(node, ast.Out) and node.name:
                extras.add("named out")
            if isinstance(node, ast.InDecl) and node.dtype:
                extras.add("dtype")
        if module.doc:
            extras.add("module doc")
    statements = {"in", "out", "let", "assign", "param", "if", "repeat", "gate", "paths", "exit", "scan", "emit"}
    expressions = {"name", "int", "float", "bool", "str", "attr", "call", "index", "binop", "unop", "pipe",
                   "list", "tuple", "route", "experts", "branches", "slice", "ellipsis", "gate_ref"}
    assert statements | expressions <= kinds
    assert {"pre gate", "post gate", "scan reverse", "scan order", "scan states", "repeat", "repeat var",
            "exit indexed", "exit plain", "modifiers", "use file", "else", "unpacking", "named out", "dtype",
            "module doc"} <= extras


def test_dsl_does_not_import_torch():
    code = "import sys, routec.dsl, routec.dsl.fmt; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_paths_inputs_take_no_keywords():
    with pytest.raises(RouteError) as info:
        parse("block A() {\n    paths p(x=1) { a: x } combine sum\n    out p\n}\n", "k.route")
    assert info.value.codes == ["R016"]


def test_too_many_bad_characters_stop_early():
    with pytest.raises(RouteError) as info:
        parse("block A() {\n    out " + "$ " * 80 + "\n}\n", "c.route")
    codes = info.value.codes
    assert codes.count("R006") == 50 and codes[-1] == "R099"
