"""The formatter: canonical output, comments kept, and the round trip over every spec in the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

from routec.dsl import RouteError, format_source, parse, strip_spans

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted(
    p for p in ROOT.rglob("*.route")
    if "golden" not in p.relative_to(ROOT).parts and not any(part.startswith(".") for part in p.parts)
)


def test_there_are_specs_to_round_trip():
    names = {p.relative_to(ROOT).parts[0] for p in SPECS}
    assert "examples" in names
    assert len(SPECS) >= 5


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(ROOT)))
def test_round_trip(path):
    source = path.read_text(encoding="utf-8")
    once = format_source(source, path.name)
    assert strip_spans(parse(once, path.name)) == strip_spans(parse(source, path.name))
    assert format_source(once, path.name) == once


def test_examples_are_in_canonical_form():
    for path in sorted((ROOT / "examples").glob("*.route")):
        source = path.read_text(encoding="utf-8")
        assert format_source(source, path.name) == source, path.name


def check(source: str, expected: str) -> None:
    out = format_source(source, "f.route")
    assert out == expected
    assert format_source(out, "f.route") == out
    assert strip_spans(parse(out, "f.route")) == strip_spans(parse(source, "f.route"))


def test_layout_is_canonical():
    check(
        'use   "lib.route"(A,B as C,)\nuse stdlib.x\nblock  A( d:int,q : float=0.5 ){in x:[B,T,d]\n'
        'y=x->LayerNorm( d )->f(1,k = 2)\n\n\n\nrepeat i in 3 { y = g(y) }\n'
        'paths p ( y ) { a : y  b : -y } combine concat( -1 ) sample( drop=0.1 )\n'
        'scan (h,c) over x.T reverse order flip init (0,0) {h,c=cell(x.t,(h,c))\nemit o=h}\n'
        'out   logits=p[...,1:3, ::2]}\nmodel M(){out route x by g to{a:x b:y}}',
        '''use "lib.route" (A, B as C)
use stdlib.x

block A(d: int, q: float = 0.5) {
    in x: [B, T, d]
    y = x -> LayerNorm(d) -> f(1, k=2)

    repeat i in 3 {
        y = g(y)
    }
    paths p(y) {
        a: y
        b: -y
    } combine concat(-1) sample(drop=0.1)
    scan (h, c) over x.T reverse order flip init (0, 0) {
        h, c = cell(x.t, (h, c))
        emit o = h
    }
    out logits = p[..., 1:3, ::2]
}

model M() {
    out route x by g to {
        a: x
        b: y
    }
}
''')


@pytest.mark.parametrize("text, expected", [
    ("(a + b) * c", "(a + b) * c"),
    ("a + (b * c)", "a + b * c"),
    ("(a - b) - c", "a - b - c"),
    ("a - (b - c)", "a - (b - c)"),
    ("(x -> f) + 1", "(x -> f) + 1"),
    ("x -> (f + 1)", "x -> f + 1"),
    ("x -> (f -> g)", "x -> (f -> g)"),
    ("(x -> f) -> g", "x -> f -> g"),
    ("-(a ** 2)", "-a ** 2"),
    ("(-a) ** 2", "(-a) ** 2"),
    ("(a ** b) ** c", "(a ** b) ** c"),
    ("a ** (-b)", "a ** -b"),
    ("not (a and b)", "not (a and b)"),
    ("(not a) and b", "not a and b"),
    ("(a < b) == c", "(a < b) == c"),
    ("(a or b) and c", "(a or b) and c"),
    ("(f)(x)", "f(x)"),
    ("(a + b).T", "(a + b).T"),
    ("(-x)[0]", "(-x)[0]"),
    ("(a, b)", "(a, b)"),
    ("(a,)", "(a,)"),
    ("1.0e-3", "0.001"),
    ('"tab\\there \\"q\\" \\\\"', '"tab\\there \\"q\\" \\\\"'),
])
def test_minimal_parentheses(text, expected):
    out = format_source(f"block A() {{\n    out {text}\n}}\n", "p.route")
    assert out == f"block A() {{\n    out {expected}\n}}\n"
    assert strip_spans(parse(out, "p.route")) == strip_spans(parse(f"block A() {{\n out {text}\n}}", "p.route"))


def test_comments_everywhere_are_kept():
    check(
        '''## The file.

# leading comment
use stdlib.mamba (MambaMixer)  # trailing use

## Doc of A.
block A(d: int) {  # header
    # before x
    in x: [B, d]
    y = f(
        x,  # inside a call
        # own line inside a call
        2)
    if d > 2 {
        y = y  # then
        # end of then
    }
    # between } and else
    else {
        y = -y
    }
    paths p(y) {
        # before a branch
        a: y  # branch
        b: -y
        # after the branches
    }  # after the brace
    combine sum  # after combine
    ## dangling doc
}  # after A
# end of file
''',
        '''## The file.

# leading comment
use stdlib.mamba (MambaMixer)  # trailing use

## Doc of A.
block A(d: int) {  # header
    # before x
    in x: [B, d]
    # inside a call
    # own line inside a call
    y = f(x, 2)
    if d > 2 {
        y = y  # then
        # end of then

        # between } and else
    } else {
        y = -y
    }
    paths p(y) {
        # before a branch
        a: y  # branch
        b: -y
        # after the branches
        # after the brace
    } combine sum  # after combine
    ## dangling doc
}  # after A
# end of file
''')


def test_blank_lines_collapse_but_stay():
    check(
        "block A() {\n\n\n    in x: [B]\n\n\n\n    # note\n\n    y = x\n    out y\n\n}\n\n\n\nmodel B() {\n    out 1\n}\n",
        "block A() {\n    in x: [B]\n\n    # note\n\n    y = x\n    out y\n}\n\nmodel B() {\n    out 1\n}\n",
    )


def test_one_line_forms_expand():
    check(
        "block A() { repeat 2 { x = f(x) }\n if a { } else { }\n out x }\n",
        # an empty `else` says nothing, so it goes
        "block A() {\n    repeat 2 {\n        x = f(x)\n    }\n    if a {\n    }\n    out x\n}\n",
    )


def test_else_if_chains_stay_flat():
    check(
        "block A() {\n    if a {\n        x = 1\n    } else if b {\n        x = 2\n    } else {\n        x = 3\n    }\n}\n",
        "block A() {\n    if a {\n        x = 1\n    } else if b {\n        x = 2\n    } else {\n        x = 3\n    }\n}\n",
    )


def test_fmt_refuses_broken_input():
    with pytest.raises(RouteError):
        format_source("block A( {\n}\n", "bad.route")


def test_docs_of_branches_and_nested_routes():
    check(
        "block A() {\n    out route x by g to {\n        ## keep it\n        a: x\n        b: route x by h to {\n"
        "            c: x\n        }\n    }\n}\n",
        "block A() {\n    out route x by g to {\n        ## keep it\n        a: x\n        b: route x by h to {\n"
        "            c: x\n        }\n    }\n}\n",
    )
