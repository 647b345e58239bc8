"""The typed syntax tree of a `.route` file: what `routec.dsl.parse` returns and the compiler consumes.

Every node is a frozen pydantic model with a `span` (where it came from in the source). Variants are
discriminated unions on a `kind` field (`Expr`, `Stmt`, `Subscript`, `RouteTarget`); sequences are
tuples. The tree holds no behaviour: checks and lowering live in `routec.compiler`.

`strip_spans(node)` gives a span-free nested structure for comparing trees (the formatter round-trip);
`walk(node)` yields every node below and including `node`.
"""

from __future__ import annotations

from typing import Annotated, Any, Iterator, Literal, Optional, Union, get_args

from pydantic import BaseModel, ConfigDict, Field

from .diagnostics import Span

__all__ = [
    "Node", "Span",
    "Name", "Int", "Float", "Bool", "Str", "Attribute", "Keyword", "Call", "Slice", "EllipsisIndex",
    "Index", "BinOp", "UnaryOp", "Pipe", "ListExpr", "TupleExpr", "RouteBranch", "RouteExperts",
    "RouteBranches", "Route", "GateRef", "Expr", "Subscript", "RouteTarget",
    "InDecl", "Out", "Let", "Assign", "ParamDecl", "If", "Repeat", "Gate", "Branch", "Paths", "Exit",
    "Scan", "Emit", "Stmt",
    "UseName", "Use", "Param", "Definition", "Comment", "Module",
    "BINARY_OPS", "COMPARISON_OPS", "PARAM_TYPES", "strip_spans", "walk",
]

BinaryOperator = Literal[
    "or", "and", "==", "!=", "<", "<=", ">", ">=", "+", "-", "*", "/", "//", "%", "@", "**"
]
UnaryOperator = Literal["-", "+", "not"]
BINARY_OPS: tuple[str, ...] = get_args(BinaryOperator)
COMPARISON_OPS = ("==", "!=", "<", "<=", ">", ">=")
ParamType = Literal["int", "float", "bool", "str", "shape"]
PARAM_TYPES: tuple[str, ...] = get_args(ParamType)


class Node(BaseModel):
    """Base of every syntax-tree node: frozen, no extra fields, a source span."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    span: Span


# Expressions


class Name(Node):
    """A name: a parameter, a value bound by a statement, a layer or function (`x`, `LayerNorm`)."""

    kind: Literal["name"] = "name"
    id: str


class Int(Node):
    kind: Literal["int"] = "int"
    value: int


class Float(Node):
    kind: Literal["float"] = "float"
    value: float


class Bool(Node):
    kind: Literal["bool"] = "bool"
    value: bool


class Str(Node):
    kind: Literal["str"] = "str"
    value: str


class Attribute(Node):
    """`value.attr`: `x.T` (iterate over axis T), `x.t` (the current step), `h.last`."""

    kind: Literal["attr"] = "attr"
    value: Expr
    attr: str


class Keyword(Node):
    """A keyword argument `name=value` of a call."""

    name: str
    value: Expr


class Call(Node):
    """`func(args..., name=value...)`; `func` may itself be a call (`Linear(d, n)(x)`)."""

    kind: Literal["call"] = "call"
    func: Expr
    args: tuple[Expr, ...] = ()
    kwargs: tuple[Keyword, ...] = ()


class Slice(Node):
    """`start:stop:step` inside an index, each part optional."""

    kind: Literal["slice"] = "slice"
    start: Optional[Expr] = None
    stop: Optional[Expr] = None
    step: Optional[Expr] = None


class EllipsisIndex(Node):
    """`...` inside an index."""

    kind: Literal["ellipsis"] = "ellipsis"


class Index(Node):
    """`value[i, j:k, ...]`."""

    kind: Literal["index"] = "index"
    value: Expr
    indices: tuple[Subscript, ...]


class BinOp(Node):
    """`left op right` for arithmetic, matrix product `@`, comparisons, `and` and `or`."""

    kind: Literal["binop"] = "binop"
    op: BinaryOperator
    left: Expr
    right: Expr


class UnaryOp(Node):
    kind: Literal["unop"] = "unop"
    op: UnaryOperator
    operand: Expr


class Pipe(Node):
    """`left -> right`: apply `right` (a layer, function or call result) to `left`; left-associative."""

    kind: Literal["pipe"] = "pipe"
    left: Expr
    right: Expr


class ListExpr(Node):
    kind: Literal["list"] = "list"
    items: tuple[Expr, ...] = ()


class TupleExpr(Node):
    kind: Literal["tuple"] = "tuple"
    items: tuple[Expr, ...] = ()


class RouteBranch(Node):
    """`name: expr` inside `route ... to { ... }`."""

    name: str
    value: Expr
    doc: Optional[str] = None


class RouteExperts(Node):
    """`to experts { expr }`: one expert per gate choice, each a copy of `body` applied to the input."""

    kind: Literal["experts"] = "experts"
    name: str
    body: Expr


class RouteBranches(Node):
    """`to { skip: identity  small: expr  ... }`: named, distinct branches, one per gate choice."""

    kind: Literal["branches"] = "branches"
    branches: tuple[RouteBranch, ...] = ()


class Route(Node):
    """`route value by gate to target`: send each row of `value` to the branches `gate` chooses."""

    kind: Literal["route"] = "route"
    value: Expr
    gate: Expr
    target: RouteTarget


class GateRef(Node):
    """`gate g` as the aggregator of `paths ... combine gate g`."""

    kind: Literal["gate_ref"] = "gate_ref"
    name: str


Expr = Annotated[
    Union[
        Name, Int, Float, Bool, Str, Attribute, Call, Index, BinOp, UnaryOp, Pipe, ListExpr, TupleExpr,
        Route,
    ],
    Field(discriminator="kind"),
]
Subscript = Annotated[
    Union[
        Name, Int, Float, Bool, Str, Attribute, Call, Index, BinOp, UnaryOp, Pipe, ListExpr, TupleExpr,
        Route, Slice, EllipsisIndex,
    ],
    Field(discriminator="kind"),
]
RouteTarget = Annotated[Union[RouteExperts, RouteBranches], Field(discriminator="kind")]
CombineAgg = Annotated[
    Union[
        Name, Int, Float, Bool, Str, Attribute, Call, Index, BinOp, UnaryOp, Pipe, ListExpr, TupleExpr,
        Route, GateRef,
    ],
    Field(discriminator="kind"),
]


# Statements (each may carry a `##` doc comment)


class InDecl(Node):
    """`in name: [dims] dtype?` — a model or block input with a symbolic shape."""

    kind: Literal["in"] = "in"
    name: str
    shape: tuple[Expr, ...]
    dtype: Optional[str] = None
    doc: Optional[str] = None


class Out(Node):
    """`out expr` or `out name = expr` (several named outs make a tuple of named outputs)."""

    kind: Literal["out"] = "out"
    name: Optional[str] = None
    value: Expr
    doc: Optional[str] = None


class Let(Node):
    """`let name = expr`: a static value computed from parameters."""

    kind: Literal["let"] = "let"
    name: str
    value: Expr
    doc: Optional[str] = None


class Assign(Node):
    """`x = expr` or `a, b = expr` (tuple unpacking)."""

    kind: Literal["assign"] = "assign"
    targets: tuple[Name, ...]
    value: Expr
    doc: Optional[str] = None


class ParamDecl(Node):
    """`param name: [dims] = init` — a trainable tensor and its initialiser."""

    kind: Literal["param"] = "param"
    name: str
    shape: tuple[Expr, ...]
    init: Expr
    doc: Optional[str] = None


class If(Node):
    """Static `if cond { ... } else { ... }` over parameters; `else if` nests an `If` in `orelse`."""

    kind: Literal["if"] = "if"
    cond: Expr
    then: tuple[Stmt, ...] = ()
    orelse: tuple[Stmt, ...] = ()
    doc: Optional[str] = None


class Repeat(Node):
    """`repeat count { ... }` or `repeat var in count { ... }` (var = 0 … count-1)."""

    kind: Literal["repeat"] = "repeat"
    var: Optional[str] = None
    count: Expr
    body: tuple[Stmt, ...] = ()
    doc: Optional[str] = None


class Gate(Node):
    """`[pre|post] gate name = gate_kind of scores`; `gate_kind` is a name or call (`topk(k, noisy=true)`)."""

    kind: Literal["gate"] = "gate"
    timing: Optional[Literal["pre", "post"]] = None
    name: str
    gate_kind: Expr
    scores: Expr
    doc: Optional[str] = None


class Branch(Node):
    """`name: expr` inside `paths`."""

    name: str
    value: Expr
    doc: Optional[str] = None


class Paths(Node):
    """`paths name(inputs) { branch... } combine agg modifier...` — parallel branches and their aggregator."""

    kind: Literal["paths"] = "paths"
    name: str
    inputs: tuple[Expr, ...] = ()
    branches: tuple[Branch, ...] = ()
    combine: CombineAgg
    modifiers: tuple[Call, ...] = ()
    doc: Optional[str] = None


class Exit(Node):
    """`exit name[index] = head when rule` — an intermediate head and its halting rule."""

    kind: Literal["exit"] = "exit"
    name: str
    index: Optional[Expr] = None
    value: Expr
    rule: Expr
    doc: Optional[str] = None


class Scan(Node):
    """`scan states over seq [reverse] [order o] init init { body }` — a recurrence over a sequence axis."""

    kind: Literal["scan"] = "scan"
    states: tuple[str, ...]
    over: Expr
    reverse: bool = False
    order: Optional[Expr] = None
    init: Expr
    body: tuple[Stmt, ...] = ()
    doc: Optional[str] = None


class Emit(Node):
    """`emit name = expr` inside a scan: a per-step output stacked along the scanned axis."""

    kind: Literal["emit"] = "emit"
    name: str
    value: Expr
    doc: Optional[str] = None


Stmt = Annotated[
    Union[InDecl, Out, Let, Assign, ParamDecl, If, Repeat, Gate, Paths, Exit, Scan, Emit],
    Field(discriminator="kind"),
]


# File level


class UseName(Node):
    """`Name` or `Name as Alias` in a `use` list."""

    name: str
    alias: Optional[str] = None


class Use(Node):
    """`use stdlib.mamba (MambaMixer)`, `use "other.route" (Foo, Bar as Baz)`; names None = everything."""

    module: Optional[str] = None
    path: Optional[str] = None
    names: Optional[tuple[UseName, ...]] = None
    doc: Optional[str] = None


class Param(Node):
    """`name: type = default` in a block or model header."""

    name: str
    type: ParamType
    default: Optional[Expr] = None


class Definition(Node):
    """`block Name(params) { body }` or `model Name(params) { body }`."""

    kind: Literal["block", "model"]
    name: str
    params: tuple[Param, ...] = ()
    body: tuple[Stmt, ...] = ()
    doc: Optional[str] = None


class Comment(Node):
    """A `#` comment (text includes the `#`, trailing spaces removed); kept for the formatter."""

    text: str


class Module(Node):
    """One `.route` file; `doc` is its leading `##` block when a blank line separates it from what follows."""

    filename: str
    doc: Optional[str] = None
    uses: tuple[Use, ...] = ()
    definitions: tuple[Definition, ...] = ()
    comments: tuple[Comment, ...] = ()


for _model in list(globals().values()):
    if isinstance(_model, type) and issubclass(_model, Node):
        _model.model_rebuild()


def _children(value: Any) -> Iterator[Any]:
    if isinstance(value, Node):
        for name in type(value).model_fields:
            if name != "span":
                yield getattr(value, name)
    elif isinstance(value, tuple):
        yield from value


def walk(node: Node) -> Iterator[Node]:
    """Every node in `node`'s tree, parents before children (iterative: deep trees are fine)."""
    stack: list[Any] = [node]
    while stack:
        value = stack.pop()
        if isinstance(value, Node):
            yield value
        stack.extend(reversed(list(_children(value))))


def strip_spans(value: Any) -> Any:
    """A span-free copy of a node (or tuple of nodes) as nested tuples, for equality up to position.

    Each node becomes `(ClassName, (field, value)...)` without `span`, and a `Module` also drops its
    `filename`; comments are compared by text.
    """
    if isinstance(value, Node):
        fields = tuple(
            (name, strip_spans(getattr(value, name)))
            for name in type(value).model_fields
            if name != "span" and not (isinstance(value, Module) and name == "filename")
        )
        return (type(value).__name__,) + fields
    if isinstance(value, tuple):
        return tuple(strip_spans(v) for v in value)
    return value
