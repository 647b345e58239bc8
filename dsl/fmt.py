"""`routec fmt`: print a parsed `.route` file in canonical form, keeping every comment.

Canonical form: four-space indents, one statement per line, single spaces around binary operators and
after commas, only the parentheses precedence needs, `use` lines first, one blank line between
definitions, runs of blank lines collapsed to one. Guarantees, checked by the tests for every spec in
the repository: `parse(fmt(s)) == parse(s)` up to spans, and `fmt(fmt(s)) == fmt(s)`.

Comments live in `Module.comments` with their positions. Each printed line stands for a range of source
lines; comments before that range are printed on their own lines first, and a comment at the end of a
line of the range stays at the end of the printed line (others inside it move above the statement).
"""

from __future__ import annotations

import re
from typing import Optional

from . import ast
from .parser import normalise, parse

__all__ = ["format_source", "format_module", "format_expr"]

INDENT = "    "

# Binding strength of each expression form (higher binds tighter); see docs/language.md.
_BINARY_PREC = {"or": 1, "and": 2, "==": 4, "!=": 4, "<": 4, "<=": 4, ">": 4, ">=": 4, "+": 6, "-": 6,
                "*": 7, "/": 7, "//": 7, "%": 7, "@": 7, "**": 9}
_NOT, _PIPE, _UNARY, _POSTFIX, _ATOM = 3, 5, 8, 10, 11


def _prec(e: ast.Node) -> int:
    if isinstance(e, ast.BinOp):
        return _BINARY_PREC[e.op]
    if isinstance(e, ast.UnaryOp):
        return _NOT if e.op == "not" else _UNARY
    if isinstance(e, ast.Pipe):
        return _PIPE
    if isinstance(e, (ast.Call, ast.Index, ast.Attribute)):
        return _POSTFIX
    return _ATOM


def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def format_expr(e: ast.Node, depth: int = 0) -> str:
    """One expression in canonical form; `depth` is the indent level for multi-line `route` branches."""
    return _Expr(depth).expr(e)


class _Expr:
    def __init__(self, depth: int):
        self.depth = depth

    def wrap(self, e: ast.Node, need: int) -> str:
        text = self.expr(e)
        return f"({text})" if _prec(e) < need else text

    def items(self, items: tuple) -> str:
        return ", ".join(self.expr(i) for i in items)

    def expr(self, e: ast.Node) -> str:
        if isinstance(e, ast.Name):
            return e.id
        if isinstance(e, ast.Bool):
            return "true" if e.value else "false"
        if isinstance(e, ast.Int):
            return str(e.value)
        if isinstance(e, ast.Float):
            return repr(e.value)
        if isinstance(e, ast.Str):
            return _quote(e.value)
        if isinstance(e, ast.Attribute):
            return f"{self.wrap(e.value, _POSTFIX)}.{e.attr}"
        if isinstance(e, ast.Call):
            args = [self.expr(a) for a in e.args] + [f"{k.name}={self.expr(k.value)}" for k in e.kwargs]
            return f"{self.wrap(e.func, _POSTFIX)}({', '.join(args)})"
        if isinstance(e, ast.Index):
            return f"{self.wrap(e.value, _POSTFIX)}[{self.items(e.indices)}]"
        if isinstance(e, ast.Slice):
            parts = [self.expr(p) if p is not None else "" for p in (e.start, e.stop)]
            if e.step is not None:
                parts.append(self.expr(e.step))
            return ":".join(parts)
        if isinstance(e, ast.EllipsisIndex):
            return "..."
        if isinstance(e, ast.BinOp):
            p = _BINARY_PREC[e.op]
            if e.op == "**":
                return f"{self.wrap(e.left, _POSTFIX)} ** {self.wrap(e.right, _UNARY)}"
            if p == 4:  # comparisons do not chain
                return f"{self.wrap(e.left, _PIPE)} {e.op} {self.wrap(e.right, _PIPE)}"
            return f"{self.wrap(e.left, p)} {e.op} {self.wrap(e.right, p + 1)}"
        if isinstance(e, ast.UnaryOp):
            if e.op == "not":
                return f"not {self.wrap(e.operand, _NOT)}"
            return f"{e.op}{self.wrap(e.operand, _UNARY)}"
        if isinstance(e, ast.Pipe):
            return f"{self.wrap(e.left, _PIPE)} -> {self.wrap(e.right, _PIPE + 1)}"
        if isinstance(e, ast.ListExpr):
            return f"[{self.items(e.items)}]"
        if isinstance(e, ast.TupleExpr):
            if len(e.items) == 1:
                return f"({self.expr(e.items[0])},)"
            return f"({self.items(e.items)})"
        if isinstance(e, ast.GateRef):
            return f"gate {e.name}"
        if isinstance(e, ast.Route):
            head = f"route {self.expr(e.value)} by {self.expr(e.gate)} to"
            target = e.target
            if isinstance(target, ast.RouteExperts):
                return f"{head} {target.name} {{ {self.expr(target.body)} }}"
            if not target.branches:
                return f"{head} {{}}"
            inner = _Expr(self.depth + 1)
            lines = [f"{head} {{"]
            for branch in target.branches:
                for doc in _doc_lines(branch.doc):
                    lines.append(INDENT * (self.depth + 1) + doc)
                lines.append(f"{INDENT * (self.depth + 1)}{branch.name}: {inner.expr(branch.value)}")
            lines.append(INDENT * self.depth + "}")
            return "\n".join(lines)
        raise TypeError(f"not an expression node: {type(e).__name__}")


def _doc_lines(doc: Optional[str]) -> list[str]:
    if doc is None:
        return []
    return [f"## {line}" if line else "##" for line in doc.split("\n")]


def _shape(dims: tuple) -> str:
    return "[" + ", ".join(format_expr(d) for d in dims) + "]"


class _Printer:
    """Emits lines in order, weaving in comments by source line and keeping single blank lines."""

    def __init__(self, module: ast.Module, source: str):
        self.source_lines = source.split("\n")
        self.comments = list(module.comments)
        self.next_comment = 0
        self.out: list[str] = []
        self.prev_line: Optional[int] = None  # source line of the last thing printed
        self.no_gap = True  # at the start of the file or of a body: no blank line

    # Comments and blank lines

    def _pending(self, before: int) -> list[ast.Comment]:
        taken = []
        while self.next_comment < len(self.comments) and self.comments[self.next_comment].span.line < before:
            taken.append(self.comments[self.next_comment])
            self.next_comment += 1
        return taken

    def _trailing(self, comment: ast.Comment) -> bool:
        line = self.source_lines[comment.span.line - 1] if comment.span.line <= len(self.source_lines) else ""
        return line[: comment.span.col - 1].strip() != ""

    def _gap(self, line: int, force: bool = False) -> None:
        if self.out and not self.no_gap and (force or (self.prev_line is not None and line > self.prev_line + 1)):
            if self.out[-1] != "":
                self.out.append("")
        self.no_gap = False

    def flush(self, before: int, depth: int) -> None:
        """Print, on their own lines, the comments that come before source line `before`."""
        for comment in self._pending(before):
            self._gap(comment.span.line)
            self.out.append(INDENT * depth + comment.text)
            self.prev_line = comment.span.line

    def line(self, text: str, depth: int, start: int, end: int, doc: Optional[str] = None,
             force_gap: bool = False) -> None:
        """Print a construct covering source lines `start`…`end` (text may hold several lines)."""
        docs = _doc_lines(doc)
        first = start - len(docs)
        self.flush(first, depth)
        inside = self._pending(end + 1)
        trailing = inside.pop() if inside and self._trailing(inside[-1]) else None
        self._gap(first, force_gap)
        for comment in inside:
            self.out.append(INDENT * depth + comment.text)
        for doc_line in docs:
            self.out.append(INDENT * depth + doc_line)
        text_lines = text.split("\n")
        if trailing is not None:
            text_lines[-1] += "  " + trailing.text
        self.out.extend(INDENT * depth + t for t in text_lines)
        self.prev_line = max(end, self.prev_line or 0)

    def open(self, text: str, depth: int, start: int, doc: Optional[str] = None, force_gap: bool = False) -> None:
        self.line(text, depth, start, start, doc, force_gap)
        self.no_gap = True

    def close(self, text: str, depth: int, start: int, end: int) -> None:
        """A closing line: comments up to it stay inside the body, one indent deeper."""
        self.flush(start, depth + 1)
        self.no_gap = True
        self.line(text, depth, start, end)

    # Source positions the tree does not record

    def _find(self, word: str, start: int, stop: int) -> int:
        """The first line in `start`…`stop` whose code (comments cut off) holds keyword `word`."""
        pattern = re.compile(rf"\b{word}\b")
        for number in range(start, min(stop, len(self.source_lines)) + 1):
            code = self.source_lines[number - 1].split("#", 1)[0]
            if pattern.search(code):
                return number
        return stop

    # Tree

    def module(self, module: ast.Module) -> str:
        if module.doc is not None:
            self.out.extend(_doc_lines(module.doc))
            self.out.append("")
            self.no_gap = True
        for use in module.uses:
            self.line(self.use(use), 0, use.span.line, use.span.end_line, use.doc)
        for definition in module.definitions:
            self.definition(definition)
        self.flush(10**9, 0)
        return "\n".join(self.out).rstrip("\n") + "\n"

    def use(self, use: ast.Use) -> str:
        source = use.module if use.module is not None else _quote(use.path or "")
        if use.names is None:
            return f"use {source}"
        names = ", ".join(n.name + (f" as {n.alias}" if n.alias else "") for n in use.names)
        return f"use {source} ({names})"

    def definition(self, d: ast.Definition) -> None:
        params = []
        for p in d.params:
            text = f"{p.name}: {p.type}"
            if p.default is not None:
                text += f" = {format_expr(p.default)}"
            params.append(text)
        self.open(f"{d.kind} {d.name}({', '.join(params)}) {{", 0, d.span.line, d.doc, force_gap=True)
        self.body(d.body, 1)
        self.close("}", 0, d.span.end_line, d.span.end_line)

    def body(self, stmts: tuple, depth: int) -> None:
        for stmt in stmts:
            self.stmt(stmt, depth)

    def stmt(self, s: ast.Node, depth: int) -> None:
        e = format_expr  # multi-line expressions are indented relative to their statement
        start, end = s.span.line, s.span.end_line
        doc = getattr(s, "doc", None)
        if isinstance(s, ast.InDecl):
            self.line(f"in {s.name}: {_shape(s.shape)}" + (f" {s.dtype}" if s.dtype else ""), depth, start, end, doc)
        elif isinstance(s, ast.Out):
            self.line("out " + (f"{s.name} = " if s.name else "") + e(s.value), depth, start, end, doc)
        elif isinstance(s, ast.Let):
            self.line(f"let {s.name} = {e(s.value)}", depth, start, end, doc)
        elif isinstance(s, ast.Assign):
            targets = ", ".join(t.id for t in s.targets)
            self.line(f"{targets} = {e(s.value)}", depth, start, end, doc)
        elif isinstance(s, ast.ParamDecl):
            self.line(f"param {s.name}: {_shape(s.shape)} = {e(s.init)}", depth, start, end, doc)
        elif isinstance(s, ast.Emit):
            self.line(f"emit {s.name} = {e(s.value)}", depth, start, end, doc)
        elif isinstance(s, ast.Gate):
            timing = f"{s.timing} " if s.timing else ""
            self.line(f"{timing}gate {s.name} = {e(s.gate_kind)} of {e(s.scores)}", depth, start, end, doc)
        elif isinstance(s, ast.Exit):
            index = f"[{e(s.index)}]" if s.index is not None else ""
            self.line(f"exit {s.name}{index} = {e(s.value)} when {e(s.rule)}", depth, start, end, doc)
        elif isinstance(s, ast.Repeat):
            var = f"{s.var} in " if s.var else ""
            self.open(f"repeat {var}{e(s.count)} {{", depth, start, doc)
            self.body(s.body, depth + 1)
            self.close("}", depth, end, end)
        elif isinstance(s, ast.Scan):
            states = s.states[0] if len(s.states) == 1 else f"({', '.join(s.states)})"
            head = f"scan {states} over {e(s.over)}"
            if s.reverse:
                head += " reverse"
            if s.order is not None:
                head += f" order {e(s.order)}"
            self.open(f"{head} init {e(s.init)} {{", depth, start, doc)
            self.body(s.body, depth + 1)
            self.close("}", depth, end, end)
        elif isinstance(s, ast.If):
            self.if_stmt(s, depth, doc)
        elif isinstance(s, ast.Paths):
            inputs = f"({', '.join(e(i) for i in s.inputs)})" if s.inputs else ""
            self.open(f"paths {s.name}{inputs} {{", depth, start, doc)
            for branch in s.branches:
                self.line(f"{branch.name}: {e(branch.value)}", depth + 1, branch.span.line,
                          branch.span.end_line, branch.doc)
            after = s.branches[-1].span.end_line if s.branches else start
            combine_line = self._find("combine", after, end)
            tail = " ".join(e(m) for m in s.modifiers)
            self.close(f"}} combine {e(s.combine)}" + (f" {tail}" if tail else ""), depth, combine_line, end)
        else:
            raise TypeError(f"not a statement node: {type(s).__name__}")

    def if_stmt(self, s: ast.If, depth: int, doc: Optional[str], prefix: str = "") -> None:
        e = format_expr
        if prefix:
            self.line(f"}} else if {e(s.cond)} {{", depth, s.span.line, s.span.line)
            self.no_gap = True
        else:
            self.open(f"if {e(s.cond)} {{", depth, s.span.line, doc)
        self.body(s.then, depth + 1)
        if not s.orelse:
            self.close("}", depth, s.span.end_line, s.span.end_line)
            return
        after = s.then[-1].span.end_line if s.then else s.span.line
        else_line = self._find("else", after, s.span.end_line)
        self.flush(else_line, depth + 1)
        self.no_gap = True
        nested = s.orelse[0]
        if len(s.orelse) == 1 and isinstance(nested, ast.If) and nested.span.line == else_line and nested.doc is None:
            self.if_stmt(nested, depth, None, prefix="else")
            return
        self.open("} else {", depth, else_line)
        self.body(s.orelse, depth + 1)
        self.close("}", depth, s.span.end_line, s.span.end_line)


def format_module(module: ast.Module, source: str) -> str:
    """The canonical text of `module`, parsed from `source` (used to place comments)."""
    return _Printer(module, normalise(source)).module(module)


def format_source(source: str, filename: str = "<string>") -> str:
    """Parse `source` and print it in canonical form; raises RouteError if it does not parse."""
    return format_module(parse(source, filename), source)
