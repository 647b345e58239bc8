"""Elaboration: a parsed spec with parameter values → one torch.fx graph over real nn.Modules.

The elaborator walks the model's statements with concrete parameter values, instantiating layers and
blocks (names follow docs/compiler.md), resolving names with "did you mean", checking symbolic shapes with
the layer library's rules, and emitting fx nodes: layers become `call_module`, tensor functions
`call_function`, and the routing constructs call the modules of `routec.codegen.runtime` (which run the
`routec::` custom ops). Every node records the span of the statement it came from (`meta["route_span"]`).

Errors are collected per statement (a failed statement binds its targets to `POISON` so that one mistake
is reported once) and raised together as a `RouteError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import torch
import torch.fx as fx
from torch import nn

from ..codegen import ops, runtime
from ..codegen.ctor import construct, recorded_like
from ..codegen.functions import (
    arange_float as _arange_float,
    arange_like as _arange_like,
    confidence as _confidence,
    dense_from_topk as _dense_from_topk,
    exit_buffer as _exit_buffer,
    exit_index as _exit_index,
    entropy as _entropy,
    eye_like as _eye_like,
    ones_batch as _ones_batch,
    ones_for as _ones_for,
    param_init,
    route_table_like as _route_table,
    softmax_last as _softmax_last,
)
from ..dsl import ast
from ..dsl.diagnostics import Diagnostics, Note, RouteError, Span
from .layers import FUNCS, LAYERS, FuncDef, LayerDef, bind_args, render_shape, render_value
from .layers.registry import describe
from .meta import ROUTE_SHAPE, ROUTE_SPAN, ROUTE_STMT
from .values import Callee, Dim, ExitArray, GateValue, Instance, Partial, Tensor


class Abort(Exception):
    """Stops the current statement after its error has been recorded."""


class _Poison:
    def __repr__(self) -> str:
        return "POISON"


POISON: Any = _Poison()

CONSTANTS = ("eye", "route_table", "arange")
GATE_KINDS = ("topk", "softmax", "sigmoid", "threshold", "bernoulli", "gumbel", "argmax", "keyed")
# Gates that take `capacity=<factor>` (hard choices a route sends rows by; see Elaborator.gate_capacity).
CAPACITY_GATES = ("topk", "argmax", "threshold", "bernoulli", "gumbel")
COMBINE_MODES = ("sum", "mean", "max", "concat")
EXIT_RULES = ("confidence", "entropy")
INITIALISERS = ("zeros", "ones", "normal", "uniform", "constant", "xavier", "kaiming", "arange", "linspace",
                "s4d_real")
MAX_REPEAT = 10_000  # `repeat` is unrolled at compile time
DTYPES = {"float": torch.float32, "long": torch.int64, "int": torch.int64, "bool": torch.bool}

_UNARY: dict[str, Callable[[Any], Any]] = {"-": operator.neg, "+": operator.pos, "not": torch.logical_not}
_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
    "//": operator.floordiv, "%": operator.mod, "**": operator.pow, "@": operator.matmul,
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt,
    ">=": operator.ge,
}


@dataclass
class Scope:
    """Names visible in a block body; `prefix` is where the modules it creates are registered."""

    prefix: str
    parent: Optional["Scope"] = None
    names: dict[str, Any] = field(default_factory=dict)
    anon: dict[str, int] = field(default_factory=dict)
    repeats: int = 0
    shuffles: list[Any] = field(default_factory=list)

    def lookup(self, name: str) -> Any:
        scope: Optional[Scope] = self
        while scope is not None:
            if name in scope.names:
                return scope.names[name]
            scope = scope.parent
        raise KeyError(name)

    def visible(self) -> list[str]:
        out: list[str] = []
        scope: Optional[Scope] = self
        while scope is not None:
            out += list(scope.names)
            scope = scope.parent
        return out

    def child(self, prefix: Optional[str] = None) -> "Scope":
        return Scope(prefix=self.prefix if prefix is None else prefix, parent=self)


def _mentions_node(scope: Scope, node: fx.Node) -> bool:
    """Whether a value bound in `scope` or its parents (names, shuffles) is or holds `node`."""
    def holds(v: Any, depth: int = 0) -> bool:
        if isinstance(v, fx.Node):
            return v is node
        if isinstance(v, Tensor):
            return v.node is node
        if depth > 4:
            return False
        if isinstance(v, (list, tuple, set)):
            return any(holds(u, depth + 1) for u in v)
        if isinstance(v, dict):
            return any(holds(u, depth + 1) for u in v.values())
        if dataclasses.is_dataclass(v) and not isinstance(v, type):  # GateValue, Partial, ExitArray, …
            return any(holds(getattr(v, f.name), depth + 1) for f in dataclasses.fields(v))
        return False

    s: Optional[Scope] = scope
    while s is not None:
        if holds(list(s.names.values())) or holds(s.shuffles):
            return True
        s = s.parent
    return False


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@dataclass
class GraphContext:
    """The graph being emitted into (the model's, or a scan step's) and the tensors it captures."""

    graph: fx.Graph
    parent: Optional["GraphContext"] = None
    captures: dict[int, tuple[fx.Node, fx.Node]] = field(default_factory=dict)  # outer node id → (outer, inner)
    dim_sources: dict[str, tuple[fx.Node, int]] = field(default_factory=dict)

    def owns(self, node: fx.Node) -> bool:
        return node.graph is self.graph


@dataclass
class ExitState:
    """Bookkeeping of the exits seen so far in a model (DESIGN §4 exit semantics)."""

    out: Optional[Tensor] = None
    index: Optional[fx.Node] = None
    alive: Optional[fx.Node] = None
    heads: list[Tensor] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    classes: Any = None
    scores: list[Optional[fx.Node]] = field(default_factory=list)  # per exit, the score its rule thresholds
    last_survivors: Optional[Tensor] = None  # the last exit head's rows of the samples still running


class Elaborator:
    """Builds the fx graph and module tree of one model. Use `elaborate(...)`."""

    def __init__(self, modules: dict[str, ast.Module], sources: dict[str, str], diags: Diagnostics):
        self.modules = modules  # file name → parsed file
        self.sources = sources
        self.diags = diags
        self.root = nn.Module()
        self.ctx = GraphContext(fx.Graph())
        self.stmt_span: Optional[Span] = None
        self.stmt_text = ""
        self.exit_state: Optional[ExitState] = None
        self.batch_symbol: Optional[str] = None
        self.aux_losses: list[fx.Node] = []
        self.created: dict[str, Any] = {}  # module path → owner instance key (for sharing checks)
        self.scan_frames: list[Any] = []
        self.node_shapes: dict[int, tuple] = {}  # id(fx node) → symbolic shape, for nodes used as arguments
        self.time_exits: list[tuple[str, Any, Any, Any]] = []  # (name, selected, index, every step) nodes
        self.pending_outs: list[tuple[Optional[str], Any]] = []
        self.file_scopes: dict[str, Scope] = {}
        self.live_owners: list[tuple[Scope, str]] = []
        self.stats: list[tuple[str, str, fx.Node]] = []  # (kind, name, node) routing statistics
        self.expanding: list[ast.Definition] = []  # the blocks being expanded, outermost first
        # Set by build.elaborate_model for the model being compiled, read by build.finish:
        self.inputs: list[tuple[str, tuple, Optional[str]]] = []  # (name, symbolic shape, dtype) per `in`
        self.model_outs: list[tuple[Optional[str], Any]] = []
        self.model_scope: Optional[Scope] = None

    # ------------------------------------------------------------------ errors

    def error(self, code: str, message: str, span: Span, help: Optional[str] = None, notes=()) -> NoReturn:
        self.diags.error(code, message, span, notes=notes, help=help)
        raise Abort()

    # ------------------------------------------------------------------ graph emission

    def _tag(self, node: fx.Node) -> fx.Node:
        if self.stmt_span is not None:
            node.meta[ROUTE_SPAN] = self.stmt_span
            node.meta[ROUTE_STMT] = self.stmt_text
            node.meta["stack_trace"] = f'File "{self.stmt_span.file}", line {self.stmt_span.line}\n    {self.stmt_text}'
        return node

    def node_of(self, t: Tensor) -> fx.Node:
        """The node for `t` in the current graph, capturing it from an enclosing graph if needed."""
        self.node_shapes.setdefault(id(t.node), t.shape)
        t.node.meta.setdefault(ROUTE_SHAPE, t.shape)  # for graph passes (compiler/passes/batch_calls.py)
        return self._capture(t.node, self.ctx)

    def _capture(self, node: fx.Node, ctx: GraphContext) -> fx.Node:
        if ctx.owns(node):
            return node
        assert ctx.parent is not None, "tensor from an unknown graph"
        outer = self._capture(node, ctx.parent)
        key = id(outer)
        if key not in ctx.captures:
            first = next((n for n in ctx.graph.nodes if n.op != "placeholder"), None)
            if first is None:
                inner = ctx.graph.placeholder(f"captured_{len(ctx.captures)}")
            else:
                with ctx.graph.inserting_before(first):
                    inner = ctx.graph.placeholder(f"captured_{len(ctx.captures)}")
            ctx.captures[key] = (outer, inner)
        return ctx.captures[key][1]

    def arg(self, value: Any) -> Any:
        if isinstance(value, Tensor):
            return self.node_of(value)
        if isinstance(value, (list, tuple)):
            return type(value)(self.arg(v) for v in value)
        if isinstance(value, dict):
            return {k: self.arg(v) for k, v in value.items()}
        return value

    def call_function(self, fn: Callable, args: tuple, kwargs: Optional[dict] = None) -> fx.Node:
        return self._tag(self.ctx.graph.call_function(fn, self.arg(args), self.arg(kwargs or {})))

    def call_module(self, path: str, args: tuple, kwargs: Optional[dict] = None) -> fx.Node:
        return self._tag(self.ctx.graph.call_module(path, self.arg(args), self.arg(kwargs or {})))

    def getitem(self, node: fx.Node, i: int) -> fx.Node:
        return self._tag(self.ctx.graph.call_function(operator.getitem, (node, i)))

    def register(self, path: str, module: nn.Module) -> None:
        """Put `module` at `path` in the model, creating plain containers on the way."""
        parent: nn.Module = self.root
        parts = path.split(".")
        for part in parts[:-1]:
            if not hasattr(parent, part) or not isinstance(getattr(parent, part), nn.Module):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(parts[-1], module)

    def lookup_module(self, path: str) -> Optional[nn.Module]:
        try:
            return self.root.get_submodule(path)
        except AttributeError:
            return None

    def runtime_dim(self, dim: Any) -> Any:
        """An int, or a graph node giving the size a symbol has at run time."""
        if isinstance(dim, int):
            return dim
        if isinstance(dim, str) and dim in self.ctx.dim_sources:
            node, axis = self.ctx.dim_sources[dim]
            return self._tag(self.ctx.graph.call_function(runtime.batch_dim, (node, axis)))
        ctx = self.ctx
        while ctx.parent is not None and dim not in ctx.dim_sources:
            ctx = ctx.parent
        if dim in ctx.dim_sources:
            node, axis = ctx.dim_sources[dim]
            inner = self._capture(node, self.ctx)
            return self._tag(self.ctx.graph.call_function(runtime.batch_dim, (inner, axis)))
        raise KeyError(dim)

    # ------------------------------------------------------------------ definitions and names

    def find_definition(self, name: str, scope: Scope) -> Optional[tuple[ast.Definition, str]]:
        try:
            value = scope.lookup(name)
        except KeyError:
            return None
        if isinstance(value, Callee) and value.kind == "block" and isinstance(value.defn, ast.Definition):
            return value.defn, value.origin or ""
        return None

    def resolve_name(self, node: ast.Name, scope: Scope) -> Any:
        try:
            return scope.lookup(node.id)
        except KeyError:
            pass
        if node.id in LAYERS:
            return Callee("layer", node.id, LAYERS[node.id])
        if node.id in FUNCS:
            return Callee("func", node.id, FUNCS[node.id])
        if node.id in GATE_KINDS or node.id in INITIALISERS or node.id in CONSTANTS \
                or node.id in ("random", "identity"):
            return Callee("builtin", node.id)
        known = scope.visible() + list(LAYERS) + list(FUNCS)
        close = difflib.get_close_matches(node.id, known, n=1, cutoff=0.75)
        self.error("R101", f"undefined name `{node.id}`", node.span,
                   help=f"did you mean `{close[0]}`?" if close else None)

    def anon_name(self, scope: Scope, kind: str) -> str:
        base = kind.lower()
        n = scope.anon.get(base, 0)
        scope.anon[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    # ------------------------------------------------------------------ expressions

    def static(self, expr: ast.Subscript, scope: Scope, what: str) -> Any:
        # (ast.Subscript includes every ast.Expr; eval rejects a slice or `...` where a value is needed)
        value = self.eval(expr, scope)
        if value is POISON:
            raise Abort()
        if isinstance(value, (Tensor, Instance, Callee, Partial, GateValue)):
            self.error("R102", f"{what} must be known before the model runs (a number, string or list), "
                       f"got {self.describe(value)}", expr.span)
        return value

    def describe(self, value: Any) -> str:
        if isinstance(value, Tensor):
            return value.describe()
        if isinstance(value, Instance):
            return f"the {value.kind} `{value.name}`"
        if isinstance(value, Callee):
            return f"the {value.kind} `{value.name}`"
        if isinstance(value, Partial):
            return f"the function `{value.defn.name}`"
        if isinstance(value, GateValue):
            return f"the gate `{value.name}`"
        if isinstance(value, Dim):
            return f"the dimension `{value.name}`"
        return describe(value)

    def eval(self, expr: Any, scope: Scope, name_hint: Optional[str] = None) -> Any:
        method = getattr(self, f"eval_{type(expr).__name__}", None)
        if method is None:
            self.error("R103", f"`{type(expr).__name__}` cannot be used here", expr.span)
        return method(expr, scope, name_hint)

    def eval_Name(self, e: ast.Name, scope: Scope, hint) -> Any:
        return self.resolve_name(e, scope)

    def eval_Int(self, e: ast.Int, scope: Scope, hint) -> Any:
        return e.value

    def eval_Float(self, e: ast.Float, scope: Scope, hint) -> Any:
        return e.value

    def eval_Bool(self, e: ast.Bool, scope: Scope, hint) -> Any:
        return e.value

    def eval_Str(self, e: ast.Str, scope: Scope, hint) -> Any:
        return e.value

    def eval_ListExpr(self, e: ast.ListExpr, scope: Scope, hint) -> Any:
        return [self.eval(i, scope) for i in e.items]

    def eval_TupleExpr(self, e: ast.TupleExpr, scope: Scope, hint) -> Any:
        return tuple(self.eval(i, scope) for i in e.items)

    def eval_UnaryOp(self, e: ast.UnaryOp, scope: Scope, hint) -> Any:
        v = self.eval(e.operand, scope)
        if v is POISON:
            return POISON
        if isinstance(v, Tensor):
            fn = _UNARY[e.op]
            return Tensor(self.call_function(fn, (v,)), v.shape)
        if isinstance(v, Dim):
            self.error("R104", f"`{e.op}` cannot apply to the dimension `{v.name}`", e.span)
        if e.op == "not":
            return not v
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            self.error("R104", f"`{e.op}` needs a number, got {self.describe(v)}", e.span)
        return -v if e.op == "-" else v

    def eval_BinOp(self, e: ast.BinOp, scope: Scope, hint) -> Any:
        left = self.eval(e.left, scope)
        if e.op in ("and", "or") and not isinstance(left, Tensor):
            if left is POISON:
                return POISON
            if e.op == "and" and not left:
                return left
            if e.op == "or" and left:
                return left
            return self.eval(e.right, scope)
        right = self.eval(e.right, scope)
        if left is POISON or right is POISON:
            return POISON
        left, right = (v.weights if isinstance(v, GateValue) else v for v in (left, right))
        if isinstance(left, Tensor) or isinstance(right, Tensor):
            return self.tensor_binop(e, left, right)
        if isinstance(left, Dim) or isinstance(right, Dim):
            return self.dim_binop(e, left, right)
        for side, v in (("left", left), ("right", right)):
            if not isinstance(v, (int, float, bool, str, list, tuple)):
                self.error("R104", f"`{e.op}` cannot apply to {self.describe(v)}", getattr(e, side).span)
        if e.op == "and":
            return left and right
        if e.op == "or":
            return left or right
        if _too_large(e.op, left, right):
            self.error("R105", f"`{e.op}` gives a value too large for a spec ({describe(left)} {e.op} "
                       f"{describe(right)})", e.span)
        try:
            result = _BINARY[e.op](left, right)
        except ZeroDivisionError:
            self.error("R105", f"division by zero in `{render_value(left)} {e.op} {render_value(right)}`", e.span)
        except OverflowError:
            self.error("R105", f"`{render_value(left)} {e.op} {render_value(right)}` overflows", e.span)
        except TypeError:
            self.error("R104", f"`{e.op}` cannot combine {describe(left)} and {describe(right)}", e.span)
        if e.op == "/" and isinstance(result, float) and result.is_integer() and isinstance(left, int) \
                and isinstance(right, int):
            return result
        return result

    def dim_binop(self, e: ast.BinOp, left: Any, right: Any) -> Any:
        l_txt = left.name if isinstance(left, Dim) else render_value(left)
        r_txt = right.name if isinstance(right, Dim) else render_value(right)
        if e.op in ("+", "-", "*", "//"):
            return Dim(f"{l_txt} {e.op} {r_txt}")
        self.error("R104", f"`{e.op}` cannot apply to a dimension (`{l_txt} {e.op} {r_txt}`)", e.span)

    def broadcast(self, e: ast.Node, a: tuple, b: tuple) -> tuple:
        out = []
        for i in range(1, max(len(a), len(b)) + 1):
            x = a[-i] if i <= len(a) else 1
            y = b[-i] if i <= len(b) else 1
            if x == 1:
                out.append(y)
            elif y == 1 or x == y:
                out.append(x)
            elif isinstance(x, int) and isinstance(y, int):
                self.error("R120", f"shapes {render_shape(a)} and {render_shape(b)} do not broadcast "
                           f"(dimension {-i}: {x} vs {y})", e.span)
            else:
                out.append(x if isinstance(y, int) else y)
        return tuple(reversed(out))

    def tensor_binop(self, e: ast.BinOp, left: Any, right: Any) -> Tensor:
        for side, v in (("left", left), ("right", right)):
            if not isinstance(v, (Tensor, int, float, bool)):
                self.error("R104", f"`{e.op}` cannot combine a tensor with {self.describe(v)}", getattr(e, side).span,
                           help=f"`->` binds more loosely than `{e.op}`: `x -> f {e.op} y` is `x -> (f {e.op} y)`; "
                           f"write `(x -> f) {e.op} y`" if isinstance(v, (Callee, Instance, Partial)) else None)
        ls = left.shape if isinstance(left, Tensor) else ()
        rs = right.shape if isinstance(right, Tensor) else ()
        if e.op == "@":
            if len(ls) < 1 or len(rs) < 1:
                self.error("R120", "`@` needs tensors on both sides", e.span)
            if isinstance(ls[-1], int) and isinstance(rs[-2 if len(rs) > 1 else -1], int) \
                    and ls[-1] != rs[-2 if len(rs) > 1 else -1]:
                self.error("R120", f"`@` needs the inner dimensions to agree, got {render_shape(ls)} @ "
                           f"{render_shape(rs)}", e.span)
            shape = self.broadcast(e, ls[:-2], rs[:-2]) + ls[-2:-1] + rs[-1:] if len(rs) > 1 else ls[:-1]
        else:
            shape = self.broadcast(e, ls, rs)
        fn: Callable[..., Any] = {"and": torch.logical_and, "or": torch.logical_or}.get(e.op) or _BINARY[e.op]
        dtype = "bool" if e.op in ast.COMPARISON_OPS or e.op in ("and", "or") else "float"
        return Tensor(self.call_function(fn, (left, right)), shape, dtype)

    def eval_Attribute(self, e: ast.Attribute, scope: Scope, hint) -> Any:
        base = self.eval(e.value, scope)
        if base is POISON:
            return POISON
        if isinstance(base, Tensor):
            if e.attr == "T" and base.node.op == "get_attr" and len(base.shape) == 2:  # a weight matrix's transpose
                return Tensor(self.call_function(torch.t, (base,)), tuple(reversed(base.shape)))
            if e.attr == "T" and len(base.shape) >= 2:
                return SeqAxis(base)
            if e.attr == "t":
                if not self.scan_frames:
                    self.error("R106", "`.t` (the current step) is only defined inside a `scan` body", e.span)
                return self.scan_frames[-1].step_of(self, base, e.span)
            if e.attr == "last" and len(base.shape) >= 2:
                return Tensor(self.call_function(operator.getitem, (base, (slice(None), -1))),
                              (base.shape[0],) + tuple(base.shape[2:]))
        if isinstance(base, Instance) and base.kind == "layer":
            param = self.lookup_param(f"{base.path}.{e.attr}")
            if param is not None:  # a layer's parameter as a value: weight tying (`x @ tok.weight.T`)
                return Tensor(self.get_param_node(f"{base.path}.{e.attr}"), tuple(param.shape))
            layer = self.lookup_module(base.path)
            assert layer is not None  # an instance's module is registered when it is built
            names = [n for n, _ in layer.named_parameters()]
            close = difflib.get_close_matches(e.attr, names, n=1)
            self.error("R106", f"the layer `{base.name}` has no parameter `{e.attr}` (it has "
                       f"{', '.join(names) or 'none'})", e.span, help=f"did you mean `{close[0]}`?" if close else None)
        self.error("R106", f"{self.describe(base)} has no attribute `{e.attr}`", e.span)

    def eval_Index(self, e: ast.Index, scope: Scope, hint) -> Any:
        base = self.eval(e.value, scope)
        if base is POISON:
            return POISON
        if isinstance(base, ExitArray):
            key = self.static(e.indices[0], scope, "an exit index")
            if key not in base.heads:
                self.error("R107", f"exit `{base.name}[{render_value(key)}]` is not defined yet", e.span)
            return base.heads[key]
        if isinstance(base, (list, tuple)):
            key = self.static(e.indices[0], scope, "an index")
            try:
                return base[key]
            except (IndexError, TypeError):
                self.error("R107", f"index {render_value(key)} is out of range for a list of {len(base)}", e.span)
        if not isinstance(base, Tensor):
            self.error("R107", f"{self.describe(base)} cannot be indexed", e.value.span)
        items: list[Any] = []
        shape: list[Any] = []
        dims = list(base.shape)
        pos = 0
        tensor_indexed = False
        for sub in e.indices:
            if isinstance(sub, ast.EllipsisIndex):
                if Ellipsis in items:
                    self.error("R107", "an index can have only one `...`", sub.span)
                rest = len(e.indices) - 1 - e.indices.index(sub)
                keep = len(dims) - pos - rest
                shape += dims[pos: pos + keep]
                pos += keep
                items.append(Ellipsis)
            elif isinstance(sub, ast.Slice):
                parts = [None if p is None else self.static(p, scope, "a slice bound")
                         for p in (sub.start, sub.stop, sub.step)]
                for p, bound in zip(parts, (sub.start, sub.stop, sub.step)):
                    if p is not None and bound is not None and (not isinstance(p, int) or isinstance(p, bool)):
                        self.error("R107", f"a slice bound must be an int, got {describe(p)}", bound.span)
                if sub.step is not None and parts[2] is not None and parts[2] <= 0:
                    self.error("R107", f"a slice step must be positive, got {parts[2]}", sub.step.span)
                items.append(slice(*parts))
                if pos >= len(dims):
                    self.error("R107", f"too many indices for {base.describe()}", sub.span)
                size = dims[pos]
                if isinstance(size, int):
                    size = len(range(size)[slice(*parts)])
                elif parts != [None, None, None]:
                    size = "?"
                shape.append(size)
                pos += 1
            else:
                value = self.eval(sub, scope)
                if isinstance(value, Tensor):  # a per-sample choice: `w_gate[task]` (gather along this dim)
                    if value.dtype != "long":
                        self.error("R107", f"a tensor index must be long (ids), got {value.describe()}", sub.span)
                    if tensor_indexed:
                        self.error("R107", "at most one tensor index per indexing", sub.span)
                    if pos >= len(dims):
                        self.error("R107", f"too many indices for {base.describe()}", sub.span)
                    tensor_indexed = True
                    items.append(value)
                    shape += list(value.shape)
                    pos += 1
                    continue
                idx = self.static(sub, scope, "an index")
                if not isinstance(idx, int):
                    self.error("R107", f"an index must be an int, got {describe(idx)}", sub.span)
                if pos >= len(dims):
                    self.error("R107", f"too many indices for {base.describe()}", sub.span)
                extent = dims[pos]
                if isinstance(extent, int) and not -extent <= idx < extent:
                    self.error("R107", f"index {idx} is out of range for dimension {pos} of size {extent}",
                               sub.span)
                items.append(idx)
                pos += 1
        shape += dims[pos:]
        return Tensor(self.call_function(operator.getitem, (base, tuple(items))), tuple(shape), base.dtype)

    def eval_Pipe(self, e: ast.Pipe, scope: Scope, hint) -> Any:
        left = self.eval(e.left, scope)
        if left is POISON:
            return POISON
        right = self.eval(e.right, scope, name_hint=None)
        if right is POISON:
            return POISON
        return self.apply(right, [left], {}, e.right.span, scope)

    def eval_Call(self, e: ast.Call, scope: Scope, hint) -> Any:
        func = self.eval(e.func, scope)
        if func is POISON:
            return POISON
        args = [self.eval(a, scope) for a in e.args]
        kwargs = {k.name: self.eval(k.value, scope) for k in e.kwargs}
        if any(v is POISON for v in args) or any(v is POISON for v in kwargs.values()):
            return POISON
        if isinstance(func, Callee) and func.name in ("zeros", "ones"):
            return self.filled(func.name, args, kwargs, e.span)
        if isinstance(func, Callee) and func.kind == "builtin" and func.name in CONSTANTS:
            return self.constant(func.name, args, kwargs, e.span)
        if isinstance(func, Callee) and func.kind == "func" and func.name == "permute" \
                and any(isinstance(a, Callee) and a.name == "random" for a in args):
            dims = [a for a in args if not isinstance(a, Callee)]
            return Partial(FUNCS["shuffle"], dims, kwargs, e.span)
        if isinstance(func, Callee) and func.kind in ("layer", "block") \
                and not any(isinstance(a, Tensor) for a in args):
            return self.instantiate(func, args, kwargs, e, scope, hint)
        if isinstance(func, Callee) and func.kind == "func":
            tensors = [a for a in args if isinstance(a, (Tensor, list))]
            spans = self.arg_spans(func.func_def, args, e)
            if not tensors or (isinstance(args[0], list) and not any(isinstance(i, Tensor) for i in args[0])):
                return Partial(func.func_def, args, kwargs, e.span, spans)
            return self.apply_func(func.func_def, args, kwargs, e.span, arg_spans=spans)
        if isinstance(func, Callee) and (func.kind == "block" or (
                func.kind == "layer" and any(p.required for p in func.layer_def.params))):
            tensor = next(a for a in args if isinstance(a, Tensor))  # (without tensors it was built above)
            self.error("R114", f"`{func.name}(…)` takes its sizes and options, then the result is applied to "
                       f"tensors (`{func.name}(…)(x)`), but it got {tensor.describe()} as an argument", e.span)
        return self.apply(func, args, kwargs, e.span, scope)

    def eval_Route(self, e: ast.Route, scope: Scope, hint) -> Any:
        return self.route(e, scope)

    # ------------------------------------------------------------------ layers, blocks, functions

    def instantiate(self, callee: Callee, args: list, kwargs: dict, e: ast.Call | _FakeCall, scope: Scope,
                    hint: Optional[str]) -> Instance:
        name = hint or self.anon_name(scope, callee.name)
        path = join(scope.prefix, name)
        if callee.kind == "layer":
            defn = callee.layer_def
            bound, errors = bind_args(defn, args, kwargs)
            if errors:
                dims = [v.name for v in list(args) + list(kwargs.values()) if isinstance(v, Dim)]
                if dims:
                    self.error("R110", f"`{callee.name}` needs sizes known before the model runs, but `{dims[0]}` "
                               "is a dimension of an input, known only at run time", e.span,
                               help="pass the size as a parameter of the model or block")
                self.error("R110", errors[0], e.span,
                           help="`/` always gives a float; `//` divides integers" if "must be int, got float" in errors[0] else None)
            existing = self.lookup_module(path)
            if existing is None:
                try:
                    module = defn.factory(**bound)
                except (ValueError, TypeError, RuntimeError) as err:
                    self.error("R111", f"cannot build `{callee.name}`: {err}", e.span)
                self.register(path, module)
            return Instance("layer", callee.name, path, defn, bound, e.span)
        defn_ast = callee.block_def
        block_scope = self.bind_block_params(defn_ast, args, kwargs, e, callee.origin, path)
        return Instance("block", callee.name, path, defn_ast, {}, e.span, scope=block_scope, origin=callee.origin)

    def bind_block_params(self, d: ast.Definition, args: list, kwargs: dict, e: Any, origin: Optional[str],
                          path: str) -> Scope:
        scope = Scope(prefix=path, parent=self.file_scope(d.span.file))
        names = [p.name for p in d.params]
        if len(args) > len(names):
            self.error("R112", f"`{d.name}` takes {len(names)} parameters, got {len(args)} arguments", e.span)
        given = dict(zip(names, args))
        for key, value in kwargs.items():
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                self.error("R112", f"`{d.name}` has no parameter `{key}`", e.span,
                           help=f"did you mean `{close[0]}`?" if close else None)
            if key in given:
                self.error("R112", f"`{d.name}` got parameter `{key}` twice", e.span)
            given[key] = value
        for p in d.params:
            if p.name in given:
                value = given[p.name]
            elif p.default is not None:
                value = self.static(p.default, scope, f"the default of `{p.name}`")
            else:
                self.error("R112", f"`{d.name}` is missing parameter `{p.name}`", e.span)
            scope.names[p.name] = self.check_param_type(d, p, value, e.span)
        return scope

    def check_param_type(self, d: ast.Definition, p: ast.Param, value: Any, span: Span) -> Any:
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
            "shape": isinstance(value, (list, tuple)) and all(isinstance(v, (int, Dim)) for v in value),
        }[p.type]
        if not ok:
            self.error("R113", f"parameter `{p.name}` of `{d.name}` must be {p.type}, got {self.describe(value)}",
                       span)
        return float(value) if p.type == "float" else value

    def apply(self, func: Any, args: list, kwargs: dict, span: Span, scope: Scope) -> Any:
        if isinstance(func, Partial):
            return self.apply_func(func.defn, args + func.args, {**func.kwargs, **kwargs}, func.span, scope,
                                   arg_spans=func.arg_spans)
        if isinstance(func, Callee):
            if func.kind == "func":
                return self.apply_func(func.func_def, args, kwargs, span, scope)
            if func.kind == "layer" and not any(p.required for p in func.layer_def.params):
                inst = self.instantiate(func, [], {}, _FakeCall(span), scope, None)
                return self.apply(inst, args, kwargs, span, scope)
            if func.kind == "builtin" and func.name == "identity":
                return args[0]
            if func.kind == "builtin" and func.name in INITIALISERS:
                return self.filled(func.name, args, kwargs, span)
            self.error("R114", f"`{func.name}` needs its arguments before it can be applied, e.g. "
                       f"`{func.name}(…)`", span)
        if isinstance(func, Instance):
            if kwargs:
                self.error("R114", f"`{func.name}` is applied to tensors only; keyword arguments belong to "
                           f"its construction", span)
            args = [t for a in args for t in (a if isinstance(a, tuple) else (a,))]
            for a in args:
                if not isinstance(a, Tensor):
                    self.error("R114", f"`{func.name}` must be applied to tensors, got {self.describe(a)}", span)
            if func.kind == "layer":
                return self.apply_layer(func, args, span)
            return self.apply_block(func, args, span)
        if isinstance(func, Tensor):
            self.error("R114", f"{func.describe()} is not a function: it cannot be applied", span)
        self.error("R114", f"{self.describe(func)} cannot be applied", span)

    def apply_layer(self, inst: Instance, args: list[Tensor], span: Span) -> Any:
        defn: LayerDef = inst.defn
        result = defn.out_shape(inst.kwargs, [a.shape for a in args])
        if isinstance(result, str):
            self.error("R121", result, span)
        node = self.call_module(inst.path, tuple(args))
        if isinstance(result, list):
            return tuple(Tensor(self.getitem(node, i), tuple(s)) for i, s in enumerate(result))
        return Tensor(node, tuple(result))

    @staticmethod
    def arg_spans(defn: FuncDef, args: list, e: ast.Call) -> dict[str, Span]:
        """Where a function call wrote each of its non-tensor arguments, by parameter name (for messages that
        concern one argument: `pad`'s amounts, `std`'s dim)."""
        spans: dict[str, Span] = {}
        params = iter(defn.params)
        for value, node in zip(args, e.args):
            if isinstance(value, (Tensor, GateValue)) or (
                    isinstance(value, list) and value and all(isinstance(i, Tensor) for i in value)):
                continue
            p = next(params, None)
            if p is None:
                break
            spans[p.name] = node.span
            if p.variadic:
                break
        for k in e.kwargs:
            spans[k.name] = k.span  # `max=0`: the whole keyword argument
        return spans

    def apply_func(self, defn: FuncDef, args: list, kwargs: dict, span: Span, scope: Optional[Scope] = None,
                   arg_spans: Optional[dict[str, Span]] = None) -> Any:
        args = [a.weights if isinstance(a, GateValue) else a for a in args]  # a gate's value is its weights
        if defn.name == "unpermute" and len(args) == 1 and scope is not None:
            perm = self.current_shuffle(scope, span)
            args = [args[0], perm]
        tensors: list[Tensor] = []
        rest: list[Any] = []
        for a in args:
            if isinstance(a, Tensor):
                tensors.append(a)
            elif isinstance(a, list) and a and all(isinstance(i, Tensor) for i in a):
                tensors.extend(a)
            else:
                rest.append(a)
        if defn.name in ("zeros", "ones"):
            return self.filled(defn.name, args, kwargs, span)
        symbolic = [self.dim_symbol(a) for a in rest]
        symbolic_kw = {k: self.dim_symbol(v) for k, v in kwargs.items()}
        bound, errors = bind_args(defn, symbolic, symbolic_kw)
        if errors:
            self.error("R110", errors[0], (arg_spans or {}).get(getattr(errors[0], "param", ""), span))
        shape = defn.shape([t.shape for t in tensors], bound)
        if isinstance(shape, str):
            self.error("R121", shape, (arg_spans or {}).get(getattr(shape, "param", ""), span))
        runtime_kw = {k: self.dim_value(v, span) for k, v in bound.items()}
        node = self.call_function(defn.fn, tuple(tensors), runtime_kw)
        if isinstance(shape, list):
            outs = tuple(Tensor(self.getitem(node, i), tuple(s)) for i, s in enumerate(shape))
            if defn.name == "shuffle" and scope is not None:
                scope.shuffles.append(outs[1])
                return outs[0]
            return outs
        return Tensor(node, tuple(shape))

    def dim_symbol(self, v: Any) -> Any:
        """Dims inside a function's arguments (`reshape(B, T, c)`) as the symbol strings shape rules take."""
        if isinstance(v, Dim):
            return v.name
        if isinstance(v, (list, tuple)):
            return type(v)(self.dim_symbol(x) for x in v)
        return v

    def dim_value(self, v: Any, span: Span) -> Any:
        """… and as run-time sizes (graph nodes reading the input's size) for the call itself."""
        if isinstance(v, str) and v in self.known_symbols():
            try:
                return self.runtime_dim(v)
            except KeyError:
                self.error("R115", f"the size `{v}` is not known when the model runs", span)
        if isinstance(v, str) and any(op in v for op in ("+", "-", "*", "//")):
            return self.dim_expression(v, span)
        if isinstance(v, (list, tuple)):
            return type(v)(self.dim_value(x, span) for x in v)
        return v

    def dim_expression(self, text: str, span: Span) -> Any:
        """A size written with arithmetic on symbols (`B * k`, `L // 4`) as graph nodes computing it."""
        import ast as pyast

        ops = {pyast.Add: operator.add, pyast.Sub: operator.sub, pyast.Mult: operator.mul,
               pyast.FloorDiv: operator.floordiv}

        def build(node: pyast.AST) -> Any:
            if isinstance(node, pyast.Constant) and isinstance(node.value, int):
                return node.value
            if isinstance(node, pyast.Name) and node.id in self.known_symbols():
                return self.runtime_dim(node.id)
            if isinstance(node, pyast.BinOp) and type(node.op) in ops:
                left, right = build(node.left), build(node.right)
                if isinstance(left, int) and isinstance(right, int):
                    return ops[type(node.op)](left, right)
                return self._tag(self.ctx.graph.call_function(ops[type(node.op)], (left, right)))
            self.error("R115", f"the size `{text}` is not known when the model runs", span)

        try:
            tree = pyast.parse(text, mode="eval").body
        except SyntaxError:
            self.error("R115", f"the size `{text}` is not known when the model runs", span)
        return build(tree)

    def known_symbols(self) -> set[str]:
        ctx: Optional[GraphContext] = self.ctx
        out: set[str] = set()
        while ctx is not None:
            out |= set(ctx.dim_sources)
            ctx = ctx.parent
        return out

    def current_shuffle(self, scope: Scope, span: Span) -> Tensor:
        s: Optional[Scope] = scope
        while s is not None:
            if s.shuffles:
                return s.shuffles.pop()
            s = s.parent
        self.error("R122", "`unpermute` without a `permute(…, random)` before it in this path", span)

    def filled(self, kind: str, args: list, kwargs: dict, span: Span) -> Tensor:
        if kind not in ("zeros", "ones") or len(args) != 1 or not isinstance(args[0], (list, tuple)):
            self.error("R115", f"`{kind}` here takes one shape, e.g. `{kind}([B, n])`", span)
        dims = [d.name if isinstance(d, Dim) else d for d in args[0]]
        sizes = []
        for d in dims:
            try:
                sizes.append(self.runtime_dim(d))
            except KeyError:
                self.error("R115", f"the size `{d}` of `{kind}` is not known when the model runs", span)
        like = self.like_tensor()
        fn = runtime.zeros_batch if kind == "zeros" else _ones_batch
        return Tensor(self.call_function(fn, tuple(sizes), {"like": like}), tuple(dims))

    def constant(self, kind: str, args: list, kwargs: dict, span: Span) -> Tensor:
        """Tensors fixed by parameters: `eye(n)` (float [n, n]) and `route_table(kind, H, W)` (the token
        order of a 2-D route over an H×W grid, long [H·W]; kinds of `routec.codegen.multiscan.route_table`)."""
        for v in list(args) + list(kwargs.values()):
            if isinstance(v, (Tensor, Dim)):
                self.error("R115", f"`{kind}` takes parameters (numbers, strings), got {self.describe(v)}", span)
        like = self.like_tensor()
        if kind == "arange":  # arange(n) or arange(start, end): float [n] (positions, frequencies)
            if not 1 <= len(args) <= 2 or not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
                self.error("R115", "`arange(n)` or `arange(start, end)` takes ints", span)
            start, end = (0, args[0]) if len(args) == 1 else args
            if end <= start:
                self.error("R115", f"`arange({start}, {end})` is empty", span)
            return Tensor(self.call_function(_arange_float, (start, end), {"like": like}), (end - start,))
        if kind == "eye":
            if len(args) != 1 or not isinstance(args[0], int) or args[0] < 1:
                self.error("R115", "`eye(n)` takes one size n ≥ 1", span)
            return Tensor(self.call_function(_eye_like, (args[0],), {"like": like}), (args[0], args[0]))
        from ..codegen.multiscan import route_table

        if len(args) != 3 or not isinstance(args[0], str) or not all(isinstance(a, int) for a in args[1:]):
            self.error("R115", "`route_table(kind, H, W)` takes a route kind and the grid's height and width",
                       span)
        name, h, w = args
        try:
            route_table(name, h * w, h, w)
        except (ValueError, KeyError) as err:
            self.error("R115", f"`route_table`: {err}", span)
        return Tensor(self.call_function(_route_table, (name, h, w), {"like": like}), (h * w,), "long")

    def like_tensor(self) -> fx.Node:
        ctx = self.ctx
        while ctx.parent is not None:
            ctx = ctx.parent
        first = next(iter(ctx.dim_sources.values()))[0]
        return self._capture(first, self.ctx)

    def apply_block(self, inst: Instance, args: list[Tensor], span: Span) -> Any:
        d: ast.Definition = inst.defn
        scope = Scope(prefix=inst.path, parent=inst.scope)
        ins = [s for s in d.body if isinstance(s, ast.InDecl)]
        if len(ins) != len(args):
            self.error("R116", f"`{d.name}` takes {len(ins)} {'input' if len(ins) == 1 else 'inputs'}, "
                       f"got {len(args)}", span)
        for decl, value in zip(ins, args):
            self.bind_input(decl, value, scope, span, d.name)
        if any(e is d for e in self.expanding):
            chain = " → ".join(e.name for e in self.expanding[[id(e) for e in self.expanding].index(id(d)):])
            self.error("R128", f"`{d.name}` uses itself ({chain} → {d.name}): blocks are expanded at compile "
                       "time, so they cannot be recursive", span, help="use `repeat` for a fixed depth")
        saved = self.stmt_span, self.stmt_text
        before = len(self.diags.errors)
        first_new = len(self.diags.items)
        self.expanding.append(d)
        try:
            outs = self.run_body(d.body, scope, block=True)
        finally:
            self.expanding.pop()
            self.stmt_span, self.stmt_text = saved
            self.note_expansion(first_new, d.name, span)
        if not outs:
            if len(self.diags.errors) > before:
                raise Abort()
            self.error("R117", f"`{d.name}` has no `out`", d.span)
        if len(outs) == 1:
            return outs[0][1]
        return tuple(v for _, v in outs)

    def note_expansion(self, first: int, name: str, span: Span) -> None:
        """Diagnostics found in a block's body (items `first`…) also say where the block was used; nested
        blocks stack their notes innermost first, like a traceback read from the error outwards."""
        note = Note(message=f"while expanding `{name}` at {span}")
        items = self.diags.items
        for i in range(first, len(items)):
            items[i] = items[i].model_copy(update={"notes": items[i].notes + (note,)})

    def bind_input(self, decl: ast.InDecl, value: Tensor, scope: Scope, span: Span, owner: str) -> None:
        want = [self.eval_dim(x, scope) for x in decl.shape]
        if len(want) != len(value.shape):
            self.error("R121", f"`{owner}` input `{decl.name}` must be {render_shape(tuple(self.dim_text(w) for w in want))}"
                       f", got {render_shape(value.shape)}", span)
        for w, got in zip(want, value.shape):
            if isinstance(w, Dim):
                if w.name in scope.names and isinstance(scope.names[w.name], (int, Dim)):
                    continue
                scope.names[w.name] = got if isinstance(got, int) else Dim(got)
            elif isinstance(got, int) and w != got:
                self.error("R121", f"`{owner}` input `{decl.name}` must be "
                           f"{render_shape(tuple(self.dim_text(x) for x in want))}, got {render_shape(value.shape)}",
                           span)
        scope.names[decl.name] = value

    def dim_text(self, d: Any) -> Any:
        return d.name if isinstance(d, Dim) else d

    def eval_dim(self, expr: ast.Expr, scope: Scope) -> Any:
        """A dimension in an `in`/`param` shape: an int from parameters, or a (new) symbol."""
        if isinstance(expr, ast.Name):
            try:
                v = scope.lookup(expr.id)
            except KeyError:
                return Dim(expr.id)
            if isinstance(v, (int, Dim)) and not isinstance(v, bool):
                return v
            self.error("R118", f"`{expr.id}` is {self.describe(v)}, not a dimension", expr.span)
        v = self.eval(expr, scope)
        if isinstance(v, (int, Dim)) and not isinstance(v, bool):
            return v
        self.error("R118", f"a dimension must be an int or a name, got {self.describe(v)}", expr.span,
                   help="`/` always gives a float; `//` divides integers" if isinstance(v, float) else None)

    # ------------------------------------------------------------------ statements

    def file_scope(self, filename: str) -> Scope:
        return self.file_scopes[filename]

    def run_body(self, body: tuple, scope: Scope, block: bool = False) -> list[tuple[Optional[str], Any]]:
        outs: list[tuple[Optional[str], Any]] = []
        for stmt in body:
            self.stmt_span = stmt.span
            self.stmt_text = self.source_line(stmt.span)
            try:
                result = self.statement(stmt, scope)
            except Abort:
                for name in self.targets_of(stmt):
                    scope.names[name] = POISON
                continue
            if isinstance(stmt, ast.Out) and result is not None:
                outs.append((stmt.name, result))
            if self.pending_outs:
                outs.extend(self.pending_outs)
                self.pending_outs = []
        return outs

    def source_line(self, span: Span) -> str:
        text = self.sources.get(span.file, "")
        lines = text.splitlines()
        return lines[span.line - 1].strip() if 0 < span.line <= len(lines) else ""

    def targets_of(self, stmt: Any) -> list[str]:
        if isinstance(stmt, ast.Assign):
            return [t.id for t in stmt.targets]
        if isinstance(stmt, (ast.Let, ast.Gate, ast.Paths, ast.Exit, ast.Emit, ast.ParamDecl, ast.InDecl)):
            return [stmt.name]
        if isinstance(stmt, ast.Scan):  # the states and everything the body emits
            return list(stmt.states) + [n.name for n in ast.walk(stmt) if isinstance(n, ast.Emit)]
        return []

    def statement(self, stmt: Any, scope: Scope) -> Any:
        method = getattr(self, f"stmt_{type(stmt).__name__}")
        return method(stmt, scope)

    def stmt_InDecl(self, s: ast.InDecl, scope: Scope) -> None:
        if s.name in scope.names:  # bound by the block's caller
            return None
        self.error("R119", f"`in {s.name}` must come before the statements that use it", s.span)

    def stmt_Out(self, s: ast.Out, scope: Scope) -> Any:
        value = self.eval(s.value, scope)
        if value is POISON:
            raise Abort()
        if not isinstance(value, (Tensor, tuple)):
            self.error("R123", f"`out` must be a tensor, got {self.describe(value)}", s.value.span)
        return value

    def stmt_Let(self, s: ast.Let, scope: Scope) -> None:
        scope.names[s.name] = self.static(s.value, scope, f"`let {s.name}`")

    def stmt_Assign(self, s: ast.Assign, scope: Scope) -> None:
        hint = s.targets[0].id if len(s.targets) == 1 else None
        value = self.eval(s.value, scope, name_hint=hint)
        if value is POISON:
            raise Abort()
        if len(s.targets) == 1:
            scope.names[s.targets[0].id] = value
            return
        if not isinstance(value, (tuple, list)) or len(value) != len(s.targets):
            got = f"{len(value)} values" if isinstance(value, (tuple, list)) else self.describe(value)
            self.error("R124", f"cannot unpack {got} into {len(s.targets)} names", s.span)
        for t, v in zip(s.targets, value):
            scope.names[t.id] = v

    def stmt_ParamDecl(self, s: ast.ParamDecl, scope: Scope) -> None:
        dims = [self.static(d, scope, "a parameter's size") for d in s.shape]
        for d, e in zip(dims, s.shape):
            if not isinstance(d, int) or isinstance(d, bool) or d <= 0:
                self.error("R125", f"a parameter's sizes must be positive ints, got {describe(d)}", e.span)
        data = self.initial_value(s.init, scope, tuple(dims))
        path = join(scope.prefix, s.name)
        if self.lookup_param(path) is None:
            parent_path, _, leaf = path.rpartition(".")
            if parent_path and self.lookup_module(parent_path) is None:
                self.register(parent_path, nn.Module())
            owner = self.lookup_module(parent_path) if parent_path else self.root
            assert owner is not None  # registered just above
            owner.register_parameter(leaf, recorded_like(nn.Parameter(data), data))
        scope.names[s.name] = Tensor(self.get_param_node(path), tuple(dims))

    def get_param_node(self, path: str) -> fx.Node:
        """A `get_attr` of parameter `path` in the model graph, captured into the current graph."""
        node = self._tag(self.root_graph().get_attr(path))
        return node if self.ctx.parent is None else self._capture(node, self.ctx)

    def root_graph(self) -> fx.Graph:
        ctx = self.ctx
        while ctx.parent is not None:
            ctx = ctx.parent
        return ctx.graph

    def lookup_param(self, path: str) -> Optional[torch.Tensor]:
        try:
            return self.root.get_parameter(path)
        except AttributeError:
            return None

    def initial_value(self, init: ast.Expr, scope: Scope, dims: tuple) -> torch.Tensor:
        if isinstance(init, (ast.Int, ast.Float)) or (isinstance(init, ast.UnaryOp) and init.op == "-"):
            value = self.static(init, scope, "an initial value")
            return torch.full(dims, float(value))
        if isinstance(init, (ast.Name, ast.Call)):
            fname = init.id if isinstance(init, ast.Name) else getattr(init.func, "id", "")
            args = [self.static(a, scope, "an initialiser argument") for a in getattr(init, "args", ())]
            kwargs = {k.name: self.static(k.value, scope, "an initialiser argument")
                      for k in getattr(init, "kwargs", ())}
            try:
                if fname == "uniform":
                    lo, hi = (float(args[0]), float(args[1])) if len(args) == 2 else (
                        float(kwargs.get("low", -1.0)), float(kwargs.get("high", 1.0)))
                    if not lo < hi:
                        self.error("R126", f"`uniform(low, high)` needs low < high, got {lo} and {hi}", init.span)
                # recorded, so that `routec compile` writes the same initialisation
                return construct(param_init, fname, tuple(dims), *args, **kwargs)
            except (IndexError, ValueError, TypeError):
                self.error("R126", f"bad arguments for initialiser `{fname}`", init.span)
            except RuntimeError as err:
                self.error("R126", f"initialiser `{fname}` does not fit shape {list(dims)}: {err}", init.span)
            except LookupError:  # not an initialiser
                pass
        self.error("R126", "a parameter's initial value must be a number or one of "
                   + ", ".join(f"`{i}`" for i in INITIALISERS), init.span)

    def stmt_If(self, s: ast.If, scope: Scope) -> None:
        cond = self.static(s.cond, scope, "an `if` condition")
        self.run_nested(s.then if cond else s.orelse, scope)

    def run_nested(self, body: tuple, scope: Scope) -> None:
        saved = self.stmt_span, self.stmt_text
        outs = self.run_body(body, scope)
        self.stmt_span, self.stmt_text = saved
        if outs:
            self.pending_outs.extend(outs)

    def stmt_Repeat(self, s: ast.Repeat, scope: Scope) -> None:
        count = self.static(s.count, scope, "a `repeat` count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            self.error("R127", f"`repeat` needs a count ≥ 0, got {describe(count)}", s.count.span)
        if count > MAX_REPEAT:
            self.error("R127", f"`repeat` unrolls at most {MAX_REPEAT} times, got {count}", s.count.span)
        container = "layers" if scope.repeats == 0 else f"layers_{scope.repeats}"
        scope.repeats += 1
        outer_prefix, outer_anon = scope.prefix, scope.anon
        try:
            for i in range(count):
                scope.prefix = join(outer_prefix, f"{container}.{i}")
                scope.anon = {}
                if s.var:
                    scope.names[s.var] = i
                self.run_nested(s.body, scope)
        finally:
            scope.prefix, scope.anon = outer_prefix, outer_anon

    # ------------------------------------------------------------------ gates and routes

    def stmt_Gate(self, s: ast.Gate, scope: Scope) -> None:
        kind_expr = s.gate_kind
        kind = kind_expr.id if isinstance(kind_expr, ast.Name) else \
            getattr(getattr(kind_expr, "func", None), "id", None)
        if kind not in GATE_KINDS:
            close = difflib.get_close_matches(str(kind), GATE_KINDS, n=1)
            self.error("R130", f"unknown gate kind `{kind}`; gates are "
                       + ", ".join(f"`{k}`" for k in GATE_KINDS), kind_expr.span,
                       help=f"did you mean `{close[0]}`?" if close else None)
        sub = scope.child(join(scope.prefix, s.name))
        sub.anon = {}
        scores = self.eval(s.scores, sub)
        if scores is POISON:
            raise Abort()
        if not isinstance(scores, Tensor):
            self.error("R131", f"a gate scores a tensor, got {self.describe(scores)}", s.scores.span)
        if kind == "keyed":
            self.keyed_gate(s, kind_expr, scope)
            return
        args = [self.static(a, scope, "a gate argument") for a in getattr(kind_expr, "args", ())]
        kwargs = {k.name: self.static(k.value, scope, "a gate argument") for k in getattr(kind_expr, "kwargs", ())}
        capacity, capacity_span = self.gate_capacity(str(kind), kind_expr, kwargs)
        numbers = [(f"option `{k}`", v) for k, v in kwargs.items() if k in ("temperature", "t", "tau")]
        if args and kind != "topk":
            numbers.append(("argument", args[0]))
        for what, value in numbers:
            if not _is_number(value):
                self.error("R132", f"`{kind}` {what} must be a number, got {describe(value)}", kind_expr.span)
        choices = scores.shape[-1]
        path = join(join(scope.prefix, s.name), "gate")
        timing = s.timing or ("pre" if kind in ("topk", "threshold", "bernoulli", "gumbel", "argmax") else "post")
        if kind == "topk":
            k = args[0] if args else kwargs.get("k")
            if not isinstance(k, int) or k < 1:
                self.error("R132", f"`topk` needs k ≥ 1, got {describe(k)}", kind_expr.span)
            if not isinstance(choices, int):
                self.error("R132", f"`topk` needs a known number of experts, got the run-time size `{choices}`",
                           kind_expr.span)
            if k > choices:
                self.error("R132", f"`topk(k={k})` needs at least {k} experts, got {choices}", kind_expr.span)
            unknown = set(kwargs) - {"k", "noisy", "normalize", "capacity", "aux"}
            if unknown:
                self.error("R132", f"`topk` has no option `{sorted(unknown)[0]}` (options: noisy, normalize, "
                           f"capacity, aux)", kind_expr.span)
            x = self.gate_input(s.scores, sub)
            d = x.shape[-1] if x is not None and isinstance(x.shape[-1], int) else None
            module = runtime.TopKGate(k, choices, d=d, noisy=bool(kwargs.get("noisy", False)),
                                      normalize=bool(kwargs.get("normalize", False)),
                                      capacity_factor=capacity)
            if self.lookup_module(path) is None:
                self.register(path, module)
            call_args = (scores, x) if module.w_noise is not None else (scores,)
            node = self.call_module(path, call_args)
            w = Tensor(self.getitem(node, 0), scores.shape[:-1] + (k,))
            idx = Tensor(self.getitem(node, 1), scores.shape[:-1] + (k,), "long")
            if kwargs.get("aux", True):
                self.aux_losses.append(self.getitem(node, 2))
            self.stats.append(("gate", s.name, idx.node))
            scope.names[s.name] = GateValue("topk", w, idx, choices, k, s.span, s.name, timing, capacity,
                                            capacity_span)
            return
        gate_module: nn.Module
        if kind in ("softmax", "sigmoid"):
            gate_module = runtime.SoftGate(kind, temperature=float(kwargs.get("temperature",
                                                                              args[0] if args else 1.0)))
        else:
            threshold = float(args[0]) if args and kind == "threshold" else float(kwargs.get("t", 0.5))
            gate_module = runtime.HardGate(kind, threshold=threshold,
                                           tau=float(args[0] if args and kind == "gumbel" else kwargs.get("tau", 1.0)))
        if self.lookup_module(path) is None:
            self.register(path, gate_module)
        w = Tensor(self.call_module(path, (scores,)), scores.shape)
        self.stats.append(("gate", s.name, w.node))
        scope.names[s.name] = GateValue(kind, w, None, choices, 1, s.span, s.name, timing, capacity, capacity_span)

    def gate_capacity(self, kind: str, kind_expr: Any, kwargs: dict) -> tuple[float, Optional[Span]]:
        """A hard gate's `capacity=<factor>` option (0.0 when absent) and where it was written. A route by
        the gate runs each branch on ceil(factor · rows · k / branches) rows (runtime.branch_capacity)."""
        if "capacity" not in kwargs:
            return 0.0, None
        span = next(kw.span for kw in kind_expr.kwargs if kw.name == "capacity")
        value = kwargs["capacity"]
        if kind not in CAPACITY_GATES:
            self.error("R132", f"`{kind}` has no option `capacity` (a capacity bounds the rows a hard gate sends "
                       f"to each branch: gates " + ", ".join(f"`{g}`" for g in CAPACITY_GATES) + ")", span)
        if not _is_number(value):
            self.error("R132", f"`{kind}` option `capacity` must be a number, got {describe(value)}", span)
        if not (value > 0 and math.isfinite(value)):
            self.error("R132", f"`{kind}` option `capacity` must be a number > 0, got {value}", span,
                       help="a capacity factor f gives each branch ceil(f · rows · k / branches) rows; "
                            "leave the option out for no capacity")
        return float(value), span

    def keyed_gate(self, s: ast.Gate, kind_expr: Any, scope: Scope) -> None:
        """`keyed(key, n)`: choice `key` (a per-sample long tensor [B] or a static int) out of n, weight 1."""
        args: tuple = getattr(kind_expr, "args", ())
        if len(args) != 2:
            self.error("R133", "a keyed gate is `keyed(key, n)`: the key (task id, timestep bucket) and the "
                       "number of choices", kind_expr.span)
        key = self.eval(args[0], scope)
        n = self.static(args[1], scope, "the number of keyed choices")
        if not isinstance(n, int) or n < 1:
            self.error("R133", f"a keyed gate needs n ≥ 1 choices, got {describe(n)}", args[1].span)
        if isinstance(key, int):
            if not 0 <= key < n:
                self.error("R133", f"key {key} is out of range for {n} choices", args[0].span)
            self.error("R133", "a static key selects one branch: write that branch directly (or pass the key "
                       "as an input [B] long)", args[0].span)
        if not isinstance(key, Tensor) or key.dtype != "long" or len(key.shape) != 1:
            self.error("R133", f"a keyed gate's key must be a long tensor [B], got {self.describe(key)}", args[0].span)
        idx = Tensor(self.call_function(torch.unsqueeze, (key, -1)), key.shape + (1,), "long")
        w = Tensor(self.call_function(_ones_for, (idx,)), key.shape + (1,))
        self.stats.append(("gate", s.name, idx.node))
        scope.names[s.name] = GateValue("keyed", w, idx, n, 1, s.span, s.name, "pre")

    def gate_input(self, scores_expr: ast.Expr, scope: Scope) -> Optional[Tensor]:
        """The tensor a gate's scoring layer reads (`x` in `Linear(d, E)(x)` or `x -> Linear(d, E)`)."""
        e = scores_expr
        if isinstance(e, ast.Call) and e.args:
            e = e.args[0]
        elif isinstance(e, ast.Pipe):
            e = e.left
        else:
            return None
        try:
            v = self.eval(e, scope) if isinstance(e, ast.Name) else None
        except Abort:
            return None
        return v if isinstance(v, Tensor) else None

    def route(self, e: ast.Route, scope: Scope) -> Any:
        x = self.eval(e.value, scope)
        gate = self.eval(e.gate, scope)
        if x is POISON or gate is POISON:
            return POISON
        if not isinstance(x, Tensor):
            self.error("R134", f"`route` sends a tensor, got {self.describe(x)}", e.value.span)
        if not isinstance(gate, GateValue):
            self.error("R134", f"`route … by` needs a gate, got {self.describe(gate)}", e.gate.span)
        if isinstance(e.target, ast.RouteExperts):
            return self.route_experts(e, x, gate, scope)
        return self.route_branches(e, x, gate, scope)

    def route_experts(self, e: ast.Route, x: Tensor, gate: GateValue, scope: Scope) -> Tensor:
        target = e.target
        assert isinstance(target, ast.RouteExperts)  # eval_Route dispatches on the target's kind
        chain = self.flatten_pipe(target.body)
        layers = [c for c in chain]
        if gate.indices is None:
            self.error("R135", "`route … to experts` needs a top-k gate (`topk(k)`), got a "
                       f"`{gate.kind}` gate", e.gate.span)
        ok = len(layers) in (3, 4)
        first = self.expert_layer(layers[0], scope) if ok else None
        last = self.expert_layer(layers[-1], scope) if ok else None
        act = layers[1].id if ok and isinstance(layers[1], ast.Name) else None
        if not (first and last and act in ("gelu", "silu", "relu", "swiglu", "geglu")):
            self.error("R135", "an expert body must be `Linear(d, h) -> act -> Linear(h, d)` with act one of "
                       "gelu, silu, relu, swiglu, geglu (other bodies: use `to { name: … }` branches)",
                       target.body.span)
        (d, h, bias1), (h2, out, bias2) = first, last
        gated = act in ("swiglu", "geglu")
        if h != h2 and not (gated and h == h2):
            self.error("R121", f"the expert's layers do not chain: Linear(…, {h}) then Linear({h2}, …)",
                       target.body.span)
        if isinstance(x.shape[-1], int) and x.shape[-1] != d:
            self.error("R121", f"experts expect the last dimension to be {d}, got {render_shape(x.shape)}",
                       target.body.span)
        assert isinstance(gate.choices, int)  # experts take a topk gate, and topk needs a static count (R132)
        path = join(scope.prefix, target.name)
        if self.lookup_module(path) is None:
            self.register(path, runtime.Experts(gate.choices, d, h, out, activation=act,
                                                bias=bias1 and bias2, gated=gated))
        node = self.call_module(path, (x, gate.weights, gate.indices))
        return Tensor(node, x.shape[:-1] + (out,))

    def flatten_pipe(self, e: ast.Expr) -> list[ast.Expr]:
        if isinstance(e, ast.Pipe):
            return self.flatten_pipe(e.left) + [e.right]
        return [e]

    def expert_layer(self, e: ast.Expr, scope: Scope) -> Optional[tuple[int, int, bool]]:
        if not (isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and e.func.id == "Linear"):
            return None
        args = [self.static(a, scope, "a layer size") for a in e.args]
        kwargs = {k.name: self.static(k.value, scope, "a layer option") for k in e.kwargs}
        bound, errors = bind_args(LAYERS["Linear"], args, kwargs)
        if errors:
            self.error("R110", errors[0], e.span)
        return bound["in_features"], bound["out_features"], bound["bias"]

    def route_branches(self, e: ast.Route, x: Tensor, gate: GateValue, scope: Scope) -> Tensor:
        target = e.target
        assert isinstance(target, ast.RouteBranches)  # eval_Route dispatches on the target's kind
        n = len(target.branches)
        if isinstance(gate.choices, int) and gate.choices != n:
            self.error("R136", f"gate `{gate.name}` chooses among {gate.choices}, but the route has {n} branches",
                       e.span)
        # Each branch is elaborated as its own small graph so that BranchRoute can run it on the rows
        # that chose it (pre-gate: the other rows are never computed).
        per_sample = len(gate.weights.shape) < len(x.shape)  # a gate per sample routes whole samples
        mode = "samples" if per_sample else "rows"
        built = None
        if not per_sample:
            built = self.route_subgraphs(target, x, ("N",) + tuple(x.shape[-1:]), scope, probe=len(x.shape) > 2)
            if built is not None and len(x.shape) > 2 and not all(_row_wise(gm) for gm in built[0]):
                built = None  # a branch mixes tokens (attention, convolution): route token sets per sample
            if built is None:
                mode = "tokens"
        if built is None:
            shape = ("N",) + tuple(x.shape[1:]) if per_sample else (1, "L") + tuple(x.shape[2:])
            built = self.route_subgraphs(target, x, shape, scope, probe=False)
        assert built is not None
        modules, shapes, extras = built
        for br, shp in zip(target.branches[1:], shapes[1:]):
            if tuple(shp[-1:]) != tuple(shapes[0][-1:]):
                self.error("R121", f"route branches must produce equal widths, got "
                           f"{render_shape(shapes[0])} and {render_shape(shp)}", br.span)
        capacity = self.route_capacity(e, gate, mode, modules)
        path = join(scope.prefix, f"route_{gate.name}")
        if self.lookup_module(path) is None:
            self.register(path, runtime.BranchRoute(modules, mode=mode,
                                                    extras=[[rowwise for _, rowwise in e] for e in extras],
                                                    **({"capacity_factor": capacity} if capacity else {})))
        if gate.indices is not None:
            w, idx = gate.weights, gate.indices
        else:  # a one-hot or dense gate: the chosen branch is the argmax, weighted by its (STE) value
            idx_node = self.call_function(torch.argmax, (gate.weights,), {"dim": -1, "keepdim": True})
            idx = Tensor(idx_node, gate.weights.shape[:-1] + (1,), "long")
            w = Tensor(self.call_function(torch.gather, (gate.weights, -1, idx)), idx.shape)
        outer = tuple(node for e in extras for node, _ in e)
        node = self.call_module(path, (x, w, idx) + outer)
        if per_sample:
            return Tensor(node, x.shape[:1] + tuple(shapes[0][1:]))
        return Tensor(node, x.shape[:-1] + tuple(shapes[0][-1:]))

    def route_capacity(self, e: ast.Route, gate: GateValue, mode: str, modules: list[fx.GraphModule]) -> float:
        """The capacity factor of a route by `gate` (0.0: none). Row-wise routes ("rows" mode) run
        capacity-bounded branches, and so do token routes ("tokens" mode) whose branches mix tokens only
        through self-attention (which masks the padding keys, `runtime.token_padding`): elsewhere padding
        rows would enter a branch's token mixing or batch statistics, so a capacity is an error there —
        except for `topk`, whose router already drops the weights over capacity (those rows then run and
        contribute 0, as before)."""
        if not gate.capacity or mode == "rows":
            return gate.capacity
        mixer = None
        if mode == "tokens":
            mixer = next((m for m in (_padding_unaware(gm) for gm in modules) if m is not None), None)
            if mixer is None:
                return gate.capacity
        if gate.kind == "topk":
            return 0.0
        what = "whole samples (a per-sample gate)" if mode == "samples" else \
            f"token sets to branches that mix tokens with `{mixer}`, which cannot mask padding tokens"
        notes = [Note(message="the capacity is declared here", span=gate.capacity_span)] if gate.capacity_span else []
        self.error("R136", f"gate `{gate.name}` declares a capacity, but this route sends {what}: a capacity "
                   "needs branches that are row-wise or mix tokens only by self-attention (padding rows would "
                   "enter the others' token mixing or batch statistics)", e.span, notes=notes,
                   help="remove `capacity=` or make every branch row-wise (Linear, MLP, norms over the last "
                        "dimension) or self-attention (SelfAttention, TransformerBlock)")

    def route_subgraphs(self, target: ast.RouteBranches, x: Tensor, row_shape: tuple, scope: Scope,
                        probe: bool) -> Optional[tuple[list[fx.GraphModule], list[tuple], list[list]]]:
        """One graph per branch on inputs of `row_shape`. With `probe`, a branch that does not accept
        token rows gives None (its diagnostics are dropped) instead of an error."""
        mark = len(self.diags.items)
        modules, shapes, extras = [], [], []
        for br in target.branches:
            def build(sc: Scope, value: ast.Expr = br.value) -> Any:
                return self.eval(value, sc)

            try:
                gm, shape, extra = self.subgraph(build, x, row_shape, join(scope.prefix, br.name), scope,
                                                 br.value.span)
            except Abort:
                if not probe:
                    raise
                del self.diags.items[mark:]
                return None
            modules.append(gm)
            shapes.append(shape)
            extras.append(extra)
        return modules, shapes, extras

    def subgraph(self, build: Callable[[Scope], Any], x: Tensor, row_shape: tuple, prefix: str, scope: Scope,
                 span: Span) -> tuple[fx.GraphModule, tuple, list]:
        """Elaborate `build` on a placeholder standing for `x` in a graph of its own (rows [N, d]); also
        returns the outside tensors it reads as (node, travels-with-the-rows) pairs."""
        ctx = GraphContext(fx.Graph(), parent=self.ctx)
        saved = self.ctx
        self.ctx = ctx
        try:
            ph = ctx.graph.placeholder("rows")
            sub = scope.child(prefix)
            sub.anon = {}
            row = Tensor(ph, row_shape)
            sub.names["_input"] = row
            routed = len(x.shape) - len(row_shape) + 1 if row_shape[0] == "N" else 2  # dims the rows come from
            # the branch reads the routed value, and outside tensors that travel with its rows, as rows
            travelling = self.rebind_rows(sub, scope, x, row, routed)
            value = build(sub)
            if value is POISON:
                raise Abort()
            if isinstance(value, (Callee, Instance, Partial)):  # `small: Adapter(d, r)` — apply it to the rows
                value = self.apply(value, [row], {}, span, sub)
            if not isinstance(value, Tensor):
                self.error("R136", f"a route branch must give a tensor, got {self.describe(value)}", span)
            ctx.graph.output(value.node)
        finally:
            self.ctx = saved
        gm = fx.GraphModule(self.root, ctx.graph)
        # outside tensors the branch read: those with the routed value's leading dims travel with its rows
        # (gathered the same way); others are passed whole
        extras = [(outer, id(outer) in travelling) for outer, _ in ctx.captures.values()]
        return gm, value.shape, extras

    def rebind_rows(self, sub: Scope, scope: Scope, x: Tensor, row: Tensor, routed: int) -> set[int]:
        """Bind, in the branch's scope, the routed value to its rows and every other visible tensor with the
        same leading dims to a view of the rows it will be gathered to (its shape with those dims replaced
        by the rows' leading dims). Returns the ids of those tensors' nodes."""
        lead, row_lead = tuple(x.shape[:routed]), tuple(row.shape[: len(row.shape) - len(x.shape) + routed])
        travelling: set[int] = set()
        s: Optional[Scope] = scope
        while s is not None:
            for name, v in s.names.items():
                if name in sub.names or not isinstance(v, Tensor):
                    continue
                if v is x:
                    sub.names[name] = row
                elif tuple(v.shape[:routed]) == lead and v.node.op != "get_attr":
                    sub.names[name] = Tensor(v.node, row_lead + tuple(v.shape[routed:]), v.dtype)
                    travelling.add(id(v.node))
            s = s.parent
        return travelling

    # ------------------------------------------------------------------ paths

    def stmt_Paths(self, s: ast.Paths, scope: Scope) -> None:
        drop, ensemble = self.path_modifiers(s, scope)
        if ensemble > 0:
            self.ensemble_paths(s, scope, drop, ensemble)
            return
        prefix = join(scope.prefix, s.name)
        values: list[Tensor] = []
        for br in s.branches:
            sub = scope.child(join(prefix, br.name))
            sub.anon = {}
            v = self.eval(br.value, sub)
            if v is POISON:
                raise Abort()
            if not isinstance(v, Tensor):
                self.error("R140", f"path `{br.name}` must give a tensor, got {self.describe(v)}", br.value.span)
            values.append(v)
        if not values:
            self.error("R140", f"`paths {s.name}` has no branches", s.span)
        agg = s.combine
        cprefix = join(prefix, "combine")
        path = join(prefix, "combine_op")
        if isinstance(agg, ast.GateRef):
            gate = self.resolve_name(ast.Name(id=agg.name, span=agg.span), scope)
            if not isinstance(gate, GateValue):
                self.error("R142", f"`combine gate {agg.name}` needs a gate, got {self.describe(gate)}", agg.span)
            self.require_equal_shapes(s, values, f"gate {agg.name}")
            if isinstance(gate.choices, int) and gate.choices != len(values):
                self.error("R142", f"gate `{agg.name}` weighs {gate.choices} choices, but `paths {s.name}` has "
                           f"{len(values)} paths", agg.span)
            weights = gate.weights
            if gate.indices is not None:
                dense = self.call_function(_dense_from_topk, (gate.weights, gate.indices, len(values)))
                weights = Tensor(dense, gate.weights.shape[:-1] + (len(values),))
            self.combine(path, "gate", s, values, weights, drop, scope)
            return
        name = agg.id if isinstance(agg, ast.Name) else getattr(getattr(agg, "func", None), "id", None)
        if name in COMBINE_MODES:
            dim = -1
            if isinstance(agg, ast.Call):
                dim = self.static(agg.args[0], scope, "a concat dimension") if agg.args else -1
            if name != "concat":
                self.require_equal_shapes(s, values, name)
            self.combine(path, name, s, values, None, drop, scope, dim=dim)
            return
        if name in ("softmax_gate", "sigmoid_gate", "sigmoid"):
            self.require_equal_shapes(s, values, name)
            weights = self.path_gate_weights(s, agg, values, cprefix, scope, "sigmoid" if "sigmoid" in name else "softmax")
            self.combine(path, "gate", s, values, weights, drop, scope)
            return
        close = difflib.get_close_matches(str(name), COMBINE_MODES + ("softmax_gate", "sigmoid_gate"), n=1)
        self.error("R143", f"unknown aggregator `{name}`; use sum, mean, max, concat(dim), "
                   "softmax_gate(layer, on=…), sigmoid_gate(layer, on=…) or `gate g`", agg.span,
                   help=f"did you mean `{close[0]}`?" if close else None)

    def path_modifiers(self, s: ast.Paths, scope: Scope) -> tuple[float, int]:
        drop, ensemble = 0.0, 0
        for m in s.modifiers:
            mname = getattr(m.func, "id", "")
            kw = {k.name: self.static(k.value, scope, "a modifier option") for k in m.kwargs}
            pos = [self.static(a, scope, "a modifier option") for a in m.args]
            if mname == "sample":
                drop = kw.get("drop", pos[0] if pos else 0.0)
                if not _is_number(drop):
                    self.error("R141", f"`sample(drop=…)` needs a number, got {describe(drop)}", m.span)
                drop = float(drop)
                if not 0.0 <= drop < 1.0:
                    self.error("R141", f"`sample(drop=…)` needs 0 ≤ drop < 1, got {drop}", m.span)
            elif mname == "ensemble":
                ensemble = kw.get("n", pos[0] if pos else 0)
                if not _is_number(ensemble) or ensemble != int(ensemble):
                    self.error("R141", f"`ensemble(n=…)` needs an int, got {describe(ensemble)}", m.span)
                ensemble = int(ensemble)
                if ensemble < 1:
                    self.error("R141", f"`ensemble(n=…)` needs n ≥ 1, got {ensemble}", m.span)
            else:
                self.error("R141", f"unknown paths modifier `{mname}` (known: sample(drop=p), ensemble(n=k))",
                           m.span)
        return drop, ensemble

    def ensemble_paths(self, s: ast.Paths, scope: Scope, drop: float, ensemble: int) -> None:
        """`paths … combine mode ensemble(n=E)`: the branches become graphs of their own that the combine
        module re-runs E times in eval (fresh randomness in every pass: sampled pathways, shuffles, path
        drops) and averages; training runs them once."""
        agg = s.combine
        mode = agg.id if isinstance(agg, ast.Name) else getattr(getattr(agg, "func", None), "id", None)
        if mode not in COMBINE_MODES:
            self.error("R141", "`ensemble(n=…)` re-runs the paths, so it combines them with sum, mean, max or "
                       "concat(dim)", agg.span)
        dim = -1
        if isinstance(agg, ast.Call) and agg.args:
            dim = self.static(agg.args[0], scope, "a concat dimension")
        prefix = join(scope.prefix, s.name)
        graphs, captured, values = [], [], []
        for br in s.branches:
            ctx = GraphContext(fx.Graph(), parent=self.ctx)
            saved = self.ctx, self.stmt_span, self.stmt_text
            self.ctx = ctx
            try:
                sub = scope.child(join(prefix, br.name))
                sub.anon = {}
                value = self.eval(br.value, sub)
                if value is POISON:
                    raise Abort()
                if not isinstance(value, Tensor):
                    self.error("R140", f"path `{br.name}` must give a tensor, got {self.describe(value)}",
                               br.value.span)
                ctx.graph.output(value.node)
            finally:
                self.ctx, self.stmt_span, self.stmt_text = saved
            graphs.append(fx.GraphModule(self.root, ctx.graph))
            captured.append([outer for outer, _ in ctx.captures.values()])
            values.append(value)
        if mode != "concat":
            self.require_equal_shapes(s, values, mode)
        path = join(prefix, "combine_op")
        if self.lookup_module(path) is None:
            self.register(path, runtime.EnsemblePaths(graphs, [len(c) for c in captured], mode, dim=dim, drop=drop,
                                                      ensemble=ensemble))
        node = self.call_module(path, tuple(n for c in captured for n in c))
        shape = values[0].shape
        if mode == "concat":
            d = dim % len(shape)
            sizes = [v.shape[d] for v in values]
            total: int | str = sum(x for x in sizes if isinstance(x, int)) if all(isinstance(x, int) for x in sizes) else "?"
            shape = shape[:d] + (total,) + shape[d + 1:]
        scope.names[s.name] = Tensor(node, shape)

    def require_equal_shapes(self, s: ast.Paths, values: list[Tensor], mode: str) -> None:
        first = values[0].shape
        for br, v in zip(s.branches[1:], values[1:]):
            if len(v.shape) != len(first) or any(
                    isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(v.shape, first)):
                self.error("R144", f"paths of `combine {mode}` must have equal shapes, got "
                           f"{render_shape(first)} and {render_shape(v.shape)}", br.span)

    def path_gate_weights(self, s: ast.Paths, agg: Any, values: list[Tensor], prefix: str, scope: Scope,
                          kind: str) -> Tensor:
        if not isinstance(agg, ast.Call) or not agg.args:
            self.error("R145", f"`{kind}_gate` needs a scoring layer, e.g. `softmax_gate(Linear(3 * d, 3), "
                       "on=mean(1))`", agg.span)
        sub = scope.child(prefix)
        sub.anon = {}
        scorer = self.eval(agg.args[0], sub)
        on = None
        for k in agg.kwargs:
            if k.name == "on":
                on = self.eval(k.value, sub)
            else:
                self.error("R145", f"`{kind}_gate` has no option `{k.name}` (options: on)", k.span)
        pooled = []
        for v in values:
            pooled.append(self.apply(on, [v], {}, agg.span, sub) if on is not None else v)
        joined = self.apply_func(FUNCS["concat"], [pooled], {"dim": -1}, agg.span)
        scores = self.apply(scorer, [joined], {}, agg.args[0].span, sub)
        if not isinstance(scores, Tensor) or scores.shape[-1] not in (len(values), "?"):
            got = render_shape(scores.shape) if isinstance(scores, Tensor) else self.describe(scores)
            self.error("R145", f"the path gate must score {len(values)} paths, got {got}", agg.args[0].span)
        fn = torch.sigmoid if kind == "sigmoid" else _softmax_last
        weights = Tensor(self.call_function(fn, (scores,)), scores.shape)
        self.stats.append(("paths", s.name, weights.node))
        return weights

    def combine(self, path: str, mode: str, s: ast.Paths, values: list[Tensor], weights: Optional[Tensor],
                drop: float, scope: Scope, dim: int = -1) -> None:
        if mode in ("sum", "mean", "gate") and drop == 0 and self.fuse_linear_combine(s, mode, values, weights, scope):
            return
        if self.lookup_module(path) is None:
            self.register(path, runtime.PathCombine(mode, dim=dim, drop=drop))
        kwargs = {}
        if weights is not None:
            # gate weights [*lead, P] broadcast from the left against the paths' [*S]
            kwargs["weights"] = weights
        node = self.call_module(path, tuple(values), kwargs)
        shape = values[0].shape
        if mode == "concat":
            if not isinstance(dim, int) or isinstance(dim, bool) or not -len(shape) <= dim < len(shape):
                self.error("R144", f"`concat({render_value(dim)})`: the paths are {render_shape(shape)}, "
                           f"so the dimension must be an int from {-len(shape)} to {len(shape) - 1}", s.combine.span)
            d = dim % len(shape)
            total = [v.shape[d] for v in values]
            ints = [t for t in total if isinstance(t, int)]
            size: int | str = sum(ints) if len(ints) == len(total) else "?"
            shape = shape[:d] + (size,) + shape[d + 1:]
        scope.names[s.name] = Tensor(node, shape)

    def fuse_linear_combine(self, s: ast.Paths, mode: str, values: list[Tensor], weights: Optional[Tensor],
                            scope: Scope) -> bool:
        """Lower `combine sum|mean|gate` whose last path ends with a call of an `nn.Linear` into one
        `ops.linear_combine` call: the Linear's GEMM with the combine in its epilogue. Needs: two or more paths,
        the last path's value the output of a `call_module` to a plain `nn.Linear` made in this graph, read by
        nothing else (no user, no other path, no name, shuffle or dim source that could read it later). The
        Linear stays registered (the op reads its parameters with get_attr: state_dict names unchanged) and its
        now unused call is erased. ROUTEC_COMBINE_FUSION=0 (read at compile time) keeps the unfused lowering.
        Sets `scope.names[s.name]` and returns True when it fused, else changes nothing and returns False."""
        if os.environ.get("ROUTEC_COMBINE_FUSION", "1") == "0" or len(values) < 2:
            return False
        graph = self.ctx.graph
        linear = values[-1].node
        if linear.op != "call_module" or len(linear.args) != 1 or linear.kwargs or linear.users \
                or linear.graph is not graph or any(v.node is linear for v in values[:-1]) \
                or (weights is not None and weights.node is linear):
            return False
        module = self.lookup_module(str(linear.target))
        x = linear.args[0]
        if type(module) is not nn.Linear or not isinstance(x, fx.Node):
            return False
        if any(node is linear for node, _ in self.ctx.dim_sources.values()) or _mentions_node(scope, linear):
            return False
        target = str(linear.target)
        weight = self.get_param_node(f"{target}.weight")
        bias = self.get_param_node(f"{target}.bias") if module.bias is not None else None
        shape = values[0].shape
        others = Tensor(self.call_function(torch.stack, (values[:-1], 0)), (len(values) - 1,) + shape)  # [P-1, *S, N]
        node = self.call_function(ops.linear_combine, (x, weight, bias, others, weights), {"mode": mode})
        self.node_shapes.pop(id(linear), None)
        graph.erase_node(linear)
        scope.names[s.name] = Tensor(node, shape)
        return True

    # ------------------------------------------------------------------ exits

    def stmt_Exit(self, s: ast.Exit, scope: Scope) -> None:
        sub = scope.child(join(scope.prefix, s.name))
        sub.anon = {}
        before = set(self.ctx.graph.nodes)  # nodes made by this statement may be fused below
        head = self.eval(s.value, sub)
        if head is POISON:
            raise Abort()
        if not isinstance(head, Tensor) or len(head.shape) != 2:
            got = render_shape(head.shape) if isinstance(head, Tensor) else self.describe(head)
            self.error("R150", f"`exit` head must produce [B, C] logits, got {got}", s.value.span)
        if self.scan_frames and self.scan_frames[-1].mode == "step":
            self.time_exit(s, head, scope, before)
            return
        if self.ctx.parent is not None:
            self.error("R151", "`exit` here is inside a nested graph (a route branch); exits belong to the "
                       "model body or a scan body", s.span)
        key = None
        if s.index is not None:
            key = self.static(s.index, scope, "an exit index")
            arr = self.exit_array(s.name, scope)
            arr.heads[key] = head
        else:
            scope.names[s.name] = head
        decision = self.eval(s.rule, scope)
        if decision is POISON:
            raise Abort()
        if not isinstance(decision, Tensor) or decision.dtype != "bool" or len(decision.shape) != 1:
            self.error("R152", "an exit rule must be a per-sample condition [B] such as `confidence(head) >= 0.9`, "
                       f"got {self.describe(decision)}", s.rule.span)
        fused = self.fuse_exit_head(head, decision, before)
        fused_score: Optional[fx.Node] = None
        if fused is not None:
            head, decision, fused_score = fused
            if key is not None:
                arr.heads[key] = head
            else:
                scope.names[s.name] = head
        st = self.exits()
        if st.classes is None:
            st.classes = head.shape[1]
        elif isinstance(st.classes, int) and isinstance(head.shape[1], int) and head.shape[1] != st.classes:
            self.error("R153", f"all exits must produce the same number of classes, got {st.classes} and "
                       f"{head.shape[1]}", s.value.span)
        if st.out is None:
            self.start_exits(head)
        assert st.out is not None  # start_exits set it
        live = self.live_batch_values(scope, head)
        position = len(st.heads)
        path = f"exit_points.{position}"
        self.register(path, runtime.ExitPoint(position))
        args = (head, decision, st.out, st.index, st.alive) + tuple(v for _, v in live)
        node = self.call_module(path, args)
        st.out = Tensor(self.getitem(node, 0), st.out.shape)
        st.index = self.getitem(node, 1)
        st.alive = self.getitem(node, 2)
        st.last_survivors = Tensor(self.getitem(node, 3), head.shape)
        st.heads.append(head)
        st.scores.append(self.rule_score(decision) if fused_score is None else fused_score)
        st.names.append(f"{s.name}[{key}]" if key is not None else s.name)
        for i, (owner, name) in enumerate(list(self.live_owners)):
            old = owner.names[name]
            owner.names[name] = Tensor(self.getitem(node, 4 + i), old.shape, old.dtype)

    def time_exit(self, s: ast.Exit, head: Tensor, scope: Scope, before: set) -> None:
        """`exit` inside a scan body: a head and rule per time step (exit over time, DESIGN §4)."""
        frame = self.scan_frames[-1]
        if s.index is not None:
            self.error("R151", "an exit inside a scan is per time step already: it takes no index", s.index.span)
        if frame.exit is not None:
            self.error("R151", "a scan body has at most one `exit`", s.span)
        if self.exit_state is not None or self.time_exits:
            self.error("R151", "a model exits either along depth or along one scan's time steps, not both", s.span)
        scope.names[s.name] = head
        decision = self.eval(s.rule, scope)
        if decision is POISON:
            raise Abort()
        if not isinstance(decision, Tensor) or decision.dtype != "bool":
            self.error("R152", "an exit rule must be a per-sample condition such as `confidence(head) >= 0.9`, "
                       f"got {self.describe(decision)}", s.rule.span)
        fused = self.fuse_exit_head(head, decision, before, with_score=False)
        if fused is not None:
            head, decision, _ = fused
            scope.names[s.name] = head
        frame.exit = (s.name, head, decision)

    def fuse_exit_head(self, head: Tensor, decision: Tensor, before: set,
                       with_score: bool = True) -> Optional[tuple[Tensor, Tensor, Optional[fx.Node]]]:
        """Lower `Linear(d, C)` on a [B, d] tensor followed by `confidence(head) >= t` or `entropy(head) <= t`
        (t a static number; also written `t <= confidence(head)` / `t >= entropy(head)`) into one
        `ops.linear_exit` call: the head GEMM with the rule in its epilogue. The Linear stays registered (its
        parameters keep their names; the op reads them with get_attr) and gradients reach them through the
        logits. `linear_exit` decides `score >= t` / `score <= t` on the score as `confidence`/`entropy`
        return it, so only these two comparisons are fused; `>` and `<` keep the unfused lowering. Only nodes
        this statement made (`before`: the graph's nodes before it) and nothing else reads are replaced.
        Returns (logits, decision, the training score node or None), or None when the pattern does not hold."""
        graph = self.ctx.graph
        linear, rule_node = head.node, decision.node
        if rule_node.op != "call_function" or rule_node.kwargs or len(rule_node.args) != 2:
            return None
        a, b = rule_node.args
        ops_of: dict[Any, str] = {operator.ge: ">=", operator.le: "<=", operator.gt: ">", operator.lt: "<"}
        flipped = {">=": "<=", "<=": ">=", ">": "<", "<": ">"}
        op = ops_of.get(rule_node.target)
        if op is None:
            return None
        if isinstance(b, fx.Node) and not isinstance(a, fx.Node):
            a, b, op = b, a, flipped[op]  # `t <= score` is `score >= t`
        score_node, t = a, b
        if not isinstance(score_node, fx.Node) or isinstance(t, bool) or not isinstance(t, (int, float)):
            return None
        rules: dict[Any, tuple[str, str]] = {_confidence: ("confidence", ">="), _entropy: ("entropy", "<=")}
        if score_node.op != "call_function" or score_node.target not in rules:
            return None
        rule, wanted = rules[score_node.target]
        if op != wanted or score_node.args != (linear,) or score_node.kwargs.get("dim", -1) not in (-1, 1):
            return None
        if linear.op != "call_module" or len(linear.args) != 1 or linear.kwargs:
            return None
        module = self.lookup_module(str(linear.target))
        x = linear.args[0]
        if not isinstance(module, nn.Linear) or not isinstance(x, fx.Node) \
                or len(self.node_shapes.get(id(x), ())) != 2:
            return None
        made = {linear, score_node, rule_node}
        if any(n in before or n.graph is not graph for n in made) or set(linear.users) != {score_node} \
                or set(score_node.users) != {rule_node} or rule_node.users:
            return None
        path = str(linear.target)
        weight = self.get_param_node(f"{path}.weight")
        bias = self.get_param_node(f"{path}.bias") if module.bias is not None else None
        node = self.call_function(ops.linear_exit, (x, weight, bias), {"rule": rule, "threshold": float(t)})
        logits, score, leave = (self.getitem(node, i) for i in range(3))
        for old in (rule_node, score_node, linear):
            self.node_shapes.pop(id(old), None)
            graph.erase_node(old)
        self.node_shapes[id(logits)] = head.shape
        self.node_shapes[id(leave)] = decision.shape
        self.node_shapes[id(score)] = decision.shape
        training_score = None
        if with_score:
            st = self.exits()
            path = f"exit_rules.{len(st.heads)}"
            self.register(path, runtime.ExitScore(rule))
            training_score = self.call_module(path, (Tensor(logits, head.shape), Tensor(score, decision.shape)))
            self.node_shapes[id(training_score)] = decision.shape
        return Tensor(logits, head.shape, head.dtype), Tensor(leave, decision.shape, "bool"), training_score

    def rule_score(self, decision: Tensor) -> Optional[fx.Node]:
        """The score a threshold rule compares (`confidence(e)` in `confidence(e) >= 0.9`), returned in
        training as `exit_scores` for losses on the exit decisions (JEI-DNN's gate, DYNAMAX's classifiers)."""
        node = decision.node
        if node.op == "call_function" and node.target in (operator.ge, operator.gt, operator.le, operator.lt) \
                and isinstance(node.args[0], fx.Node) and len(self.node_shapes.get(id(node.args[0]), ())) == 1:
            return node.args[0]
        return None

    def exit_array(self, name: str, scope: Scope) -> ExitArray:
        s: Optional[Scope] = scope
        while s is not None:
            if isinstance(s.names.get(name), ExitArray):
                return s.names[name]
            s = s.parent
        arr = ExitArray(name)
        # indexed exits are visible to the whole model body
        top = scope
        while top.parent is not None and top.parent.parent is not None:
            top = top.parent
        top.names[name] = arr
        return arr

    def node_batch(self, node: fx.Node, batch: Any) -> bool:
        """Whether a graph value has the batch as its first dimension (it leaves with exited samples)."""
        shape = self.node_shapes.get(id(node))
        return shape is not None and len(shape) > 0 and shape[0] == batch

    def exits(self) -> ExitState:
        if self.exit_state is None:
            self.exit_state = ExitState()
        return self.exit_state

    def start_exits(self, head: Tensor) -> None:
        st = self.exits()
        n = self.runtime_dim(head.shape[0]) if not isinstance(head.shape[0], int) else head.shape[0]
        out = self.call_function(_exit_buffer, (head, n))
        st.out = Tensor(out, head.shape)
        st.index = self.call_function(_exit_index, (head, n))
        st.alive = self.call_function(_arange_like, (head, n))

    def prune_exit_live(self) -> None:
        """Stop packing what nothing reads: an exit packs every batch tensor in scope (`live_batch_values`),
        but a tensor no later statement uses (the model's input, a finished branch) would be gathered at
        every exit for nothing. Once the graph is complete, drop those from each ExitPoint's live tensors
        (its argument 5 + j and output 4 + j), renumbering the outputs that stay."""
        graph = self.root_graph()
        for node in reversed(list(graph.nodes)):  # last exit first: what it drops may free an earlier one's
            if node.op != "call_module" or not isinstance(self.lookup_module(str(node.target)), runtime.ExitPoint):
                continue
            users = list(node.users)
            if not all(u.op == "call_function" and u.target is operator.getitem for u in users):
                continue
            outputs = {u.args[1]: u for u in users}
            kept: list[tuple[int, Optional[fx.Node]]] = []
            for j in range(len(node.args) - 5):
                item = outputs.get(4 + j)
                if item is not None and item.users:
                    kept.append((j, item))
                elif item is not None:
                    graph.erase_node(item)
            if len(kept) == len(node.args) - 5:
                continue
            node.args = tuple(node.args[:5]) + tuple(node.args[5 + j] for j, _ in kept)
            for new_j, (_, item) in enumerate(kept):
                assert item is not None
                item.args = (node, 4 + new_j)

    def live_batch_values(self, scope: Scope, head: Tensor) -> list[tuple[str, Tensor]]:
        """Every tensor bound in the visible scopes that has the batch as its first dimension."""
        batch = head.shape[0]
        self.live_owners = []
        out = []
        s: Optional[Scope] = scope
        seen: set[str] = set()
        while s is not None:
            for name, v in s.names.items():
                if name in seen:
                    continue
                seen.add(name)
                if isinstance(v, Tensor) and v.shape and v.shape[0] == batch and v.node.op != "get_attr" \
                        and self.ctx.owns(v.node):
                    out.append((name, v))
                    self.live_owners.append((s, name))
            s = s.parent
        return out

    # ------------------------------------------------------------------ scans

    def stmt_Scan(self, s: ast.Scan, scope: Scope) -> None:
        from .scans import lower_scan

        lower_scan(self, s, scope)

    def stmt_Emit(self, s: ast.Emit, scope: Scope) -> None:
        value = self.eval(s.value, scope)
        if value is POISON:
            raise Abort()
        if not isinstance(value, Tensor):
            self.error("R160", f"`emit` needs a tensor, got {self.describe(value)}", s.value.span)
        emits = scope.names.get("__emits__")
        if emits is None:
            self.error("R160", "`emit` is only allowed inside a `scan` body", s.span)
        emits[s.name] = value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _too_large(op: str, left: Any, right: Any) -> bool:
    """Static arithmetic that would build a huge string/list or integer (the spec is data, not a program)."""
    if op == "*" and isinstance(left, int) and isinstance(right, (str, list, tuple)):
        left, right = right, left
    if op == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int):
        return len(left) * right > 1_000_000
    if op == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
        return right * max(abs(left), 2).bit_length() > 4096
    return False


class SeqAxis:
    """`x.T`: the sequence `x` iterated along its axis 1 by a `scan`."""

    def __init__(self, tensor: Tensor):
        self.tensor = tensor


class StepSlice:
    """Inside a scan body, the scanned sequence: `x.t` is the current step's slice."""

    def __init__(self, tensor: Tensor):
        self.tensor = tensor


@dataclass
class _FakeCall:
    span: Span


ROW_WISE_MODULES = {"Linear", "LayerNorm", "RMSNorm", "MLP", "GELU", "SiLU", "ReLU", "Tanh", "Sigmoid",
                    "Dropout", "Identity", "Experts", "GRUCell", "LSTMCell"}
# functions that keep rows apart when they work on the last dimension (`dim=-1`)
LAST_DIM_FUNCTIONS = {"narrow", "cat", "concat", "split", "chunk"}
ROW_WISE_FUNCTIONS = {"add", "sub", "mul", "truediv", "neg", "gelu", "silu", "relu", "tanh", "sigmoid",
                      "softplus", "exp", "log", "abs", "identity", "detach"}


# modules that mix tokens but keep padding tokens out of real tokens' results when a capacity-bounded token
# route marks them (`runtime.token_padding`: SelfAttention masks the padding keys)
PADDING_AWARE_MODULES = {"SelfAttention", "TransformerBlock"}


def _padding_unaware(gm: fx.GraphModule) -> Optional[str]:
    """The first module or function of a token route's branch that mixes tokens without understanding the
    padding mask of a capacity-bounded route (None: every node is row-wise or self-attention)."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            name = type(gm.get_submodule(node.target)).__name__
            if name not in ROW_WISE_MODULES | PADDING_AWARE_MODULES:
                return name
        elif node.op == "call_function":
            name = getattr(node.target, "__name__", str(node.target))
            if name in LAST_DIM_FUNCTIONS and node.kwargs.get("dim") == -1:
                continue
            if name not in ROW_WISE_FUNCTIONS:
                return name
        elif node.op == "call_method":
            return str(node.target)
    return None


def _row_wise(gm: fx.GraphModule) -> bool:
    """Whether a branch treats every row on its own (so token rows of different samples can be batched)."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and type(gm.get_submodule(node.target)).__name__ not in ROW_WISE_MODULES:
            return False
        if node.op == "call_function" and getattr(node.target, "__name__", "") in LAST_DIM_FUNCTIONS \
                and node.kwargs.get("dim") == -1:
            continue
        if node.op == "call_function" and getattr(node.target, "__name__", "") not in ROW_WISE_FUNCTIONS:
            return False
        if node.op == "call_method":
            return False
    return True
