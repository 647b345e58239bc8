"""routec.dsl: the `.route` language front end — text in, typed syntax tree or friendly errors out.

`parse(source, filename)` returns a frozen `ast.Module` or raises `RouteError` (the project's one error
type, holding every `Diagnostic` sorted by position); `read_source(path)` reads a file with clean errors
for unreadable, huge, binary and non-UTF-8 input; `format_source(source, filename)` prints the canonical
form. This package never imports torch.
"""

from . import ast
from .ast import strip_spans, walk
from .diagnostics import Diagnostic, Diagnostics, Note, RouteError, Span, render_diagnostic
from .parser import KEYWORDS, decode_source, parse, read_source

__all__ = [
    "ast", "parse", "read_source", "decode_source", "format_source", "strip_spans", "walk",
    "Diagnostic", "Diagnostics", "Note", "RouteError", "Span", "render_diagnostic", "KEYWORDS",
]


def format_source(source: str, filename: str = "<string>") -> str:
    """The canonical form of a `.route` file (comments kept); raises RouteError if it does not parse."""
    from .fmt import format_source as _format

    return _format(source, filename)
