"""Property tests: whatever the input, the front end returns a tree or raises RouteError — nothing else.

Inputs: random bytes, random text, soups of the language's own tokens, and random mutations of every
spec in the repository. Whenever an input parses, the formatter must round-trip it. Random expression
trees printed by the formatter must parse back to the same tree.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routec.dsl import KEYWORDS, RouteError, ast, format_source, parse, strip_spans
from routec.dsl.fmt import format_expr, format_module

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted(
    p for p in ROOT.rglob("*.route")
    if "golden" not in p.relative_to(ROOT).parts and not any(part.startswith(".") for part in p.parts)
)

def examples(n: int) -> settings:
    """Fixed, moderate example counts: the whole file stays well under a minute on two cores."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

MUTATION_BUDGET = 120  # mutated inputs over all specs together: the stdlib grows, the run time must not

PUNCTUATION = ["(", ")", "[", "]", "{", "}", ",", ":", ".", "...", "=", "==", "!=", "<", "<=", ">", ">=", "+",
               "-", "*", "/", "//", "%", "@", "**", "->"]
ATOMS = ["x", "h", "d", "B", "T", "Linear", "mean", "topk", "0", "1", "17", "0.5", "1e-3", '"gelu"', '"a\\"b"',
         "# comment", "## doc", "\t", "é", "$", '"open']
VOCAB = list(KEYWORDS) + PUNCTUATION + ATOMS
SEPARATORS = [" ", " ", " ", "\n", "\n    ", ""]


def check_front_end(source) -> None:
    """The property itself: a Module or a RouteError that renders; a Module also round-trips."""
    try:
        module = parse(source, "prop.route")
    except RouteError as err:
        assert err.diagnostics
        text = err.render()
        assert "Traceback" not in text
        assert all(d.code.startswith("R0") for d in err.diagnostics)
        return
    assert isinstance(module, ast.Module)
    text = source.decode("utf-8") if isinstance(source, bytes) else source
    once = format_module(module, text)
    assert strip_spans(parse(once, "prop.route")) == strip_spans(module)
    assert format_source(once, "prop.route") == once


@examples(100)
@given(st.binary(max_size=400))
def test_random_bytes(data):
    check_front_end(data)


@examples(100)
@given(st.text(max_size=300))
def test_random_text(text):
    check_front_end(text)


@st.composite
def token_soups(draw):
    tokens = draw(st.lists(st.sampled_from(VOCAB), max_size=60))
    seps = draw(st.lists(st.sampled_from(SEPARATORS), min_size=len(tokens), max_size=len(tokens)))
    return "".join(t + s for t, s in zip(tokens, seps))


@st.composite
def framed_soups(draw):
    """Token soups inside a valid block, so that the parser gets past the header into statements."""
    inner = draw(token_soups())
    return f"block A(d: int) {{\n    in x: [B, T, d]\n    {inner}\n    out x\n}}\n"


@examples(100)
@given(token_soups())
def test_token_soups(source):
    check_front_end(source)


@examples(120)
@given(framed_soups())
def test_token_soups_inside_a_block(source):
    check_front_end(source)


@st.composite
def mutations(draw, text: str):
    """Apply one to three random edits: delete, duplicate or replace a span, or insert a token."""
    for _ in range(draw(st.integers(1, 3))):
        n = len(text)
        i = draw(st.integers(0, n))
        j = draw(st.integers(i, min(n, i + 40)))
        op = draw(st.sampled_from(["delete", "duplicate", "insert", "replace"]))
        if op == "delete":
            text = text[:i] + text[j:]
        elif op == "duplicate":
            text = text[:j] + text[i:j] + text[j:]
        elif op == "insert":
            text = text[:i] + draw(st.sampled_from(VOCAB + SEPARATORS)) + text[i:]
        else:
            text = text[:i] + draw(st.sampled_from(VOCAB)) + text[j:]
    return text


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(ROOT)))
def test_mutated_specs(path):
    source = path.read_text(encoding="utf-8")

    @examples(max(5, MUTATION_BUDGET // len(SPECS)))
    @given(mutations(source))
    def run(mutated):
        check_front_end(mutated)

    run()


# Random expression trees: the formatter's output parses back to the same tree.

SPAN = ast.Span(file="gen.route", line=1, col=1, end_line=1, end_col=2)
NAMES = st.sampled_from(["x", "h", "d", "Linear", "mean", "head", "x_1"])
LEAVES = st.one_of(
    NAMES.map(lambda n: ast.Name(span=SPAN, id=n)),
    st.integers(0, 10**6).map(lambda v: ast.Int(span=SPAN, value=v)),
    st.floats(0, 1e6, allow_nan=False, allow_infinity=False).map(lambda v: ast.Float(span=SPAN, value=v)),
    st.booleans().map(lambda v: ast.Bool(span=SPAN, value=v)),
    st.text(st.characters(blacklist_categories=["Cc", "Cs"]), max_size=6).map(lambda v: ast.Str(span=SPAN, value=v)),
)


def _compound(children):
    small = st.lists(children, max_size=3).map(tuple)
    keywords = st.lists(
        st.tuples(NAMES, children).map(lambda kv: ast.Keyword(span=SPAN, name=kv[0], value=kv[1])), max_size=2
    ).map(lambda kws: tuple({k.name: k for k in kws}.values()))
    optional = st.none() | children
    subscripts = st.lists(
        st.one_of(
            children,
            st.builds(lambda a, b, c: ast.Slice(span=SPAN, start=a, stop=b, step=c), optional, optional, optional),
            st.just(ast.EllipsisIndex(span=SPAN)),
        ),
        min_size=1, max_size=3,
    ).map(tuple)
    branches = st.lists(
        st.tuples(NAMES, children).map(lambda nv: ast.RouteBranch(span=SPAN, name=nv[0], value=nv[1])),
        max_size=3, unique_by=lambda b: b.name,
    ).map(tuple)
    target = st.one_of(
        st.builds(lambda n, b: ast.RouteExperts(span=SPAN, name=n, body=b), NAMES, children),
        branches.map(lambda bs: ast.RouteBranches(span=SPAN, branches=bs)),
    )
    return st.one_of(
        st.builds(lambda op, a, b: ast.BinOp(span=SPAN, op=op, left=a, right=b),
                  st.sampled_from(ast.BINARY_OPS), children, children),
        st.builds(lambda op, a: ast.UnaryOp(span=SPAN, op=op, operand=a), st.sampled_from(["-", "+", "not"]),
                  children),
        st.builds(lambda a, b: ast.Pipe(span=SPAN, left=a, right=b), children, children),
        st.builds(lambda f, a, k: ast.Call(span=SPAN, func=f, args=a, kwargs=k), children, small, keywords),
        st.builds(lambda v, s: ast.Index(span=SPAN, value=v, indices=s), children, subscripts),
        st.builds(lambda v, a: ast.Attribute(span=SPAN, value=v, attr=a), children, st.sampled_from(["T", "t", "last"])),
        small.map(lambda items: ast.ListExpr(span=SPAN, items=items)),
        small.map(lambda items: ast.TupleExpr(span=SPAN, items=items)),
        st.builds(lambda v, g, t: ast.Route(span=SPAN, value=v, gate=g, target=t), children, children, target),
    )


EXPRESSIONS = st.recursive(LEAVES, _compound, max_leaves=12)


@examples(150)
@given(EXPRESSIONS)
def test_printed_expressions_parse_back(e):
    text = format_expr(e)
    module = parse(f"block A() {{\n    out {text}\n}}\n", "gen.route")
    assert strip_spans(module.definitions[0].body[0].value) == strip_spans(e), text
