"""Errors for people: source spans, diagnostics, the project's one error type, and how they render.

Every stage of routec reports problems the same way: collect `Diagnostic`s in a `Diagnostics`, then
`raise_if_any()` raises one `RouteError` holding all of them sorted by position. `RouteError.render()`
prints each as

    model.route:12:17: error[R014]: message
       12 |     x = foo(
          |         ^~~
    model.route:3:5: note: unclosed `{` opened here
        3 | block A() {
          |           ^
       = help: did you mean `scan`?

Codes: `R0xx` are syntax and file errors from `routec.dsl`, `R1xx` and up are semantic errors from the
compiler (see docs/language.md for the table).
"""

from __future__ import annotations

from typing import Iterable, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict

__all__ = ["Span", "Note", "Diagnostic", "Diagnostics", "RouteError", "render_diagnostic"]


class Span(BaseModel):
    """A source range: 1-based `line`/`col` of the first character, `end_line`/`end_col` one past the last."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    @classmethod
    def point(cls, file: str, line: int, col: int) -> "Span":
        """A one-character span at `line:col`."""
        return cls(file=file, line=line, col=col, end_line=line, end_col=col + 1)

    def sort_key(self) -> tuple[str, int, int, int, int]:
        return (self.file, self.line, self.col, self.end_line, self.end_col)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


class Note(BaseModel):
    """A secondary message, optionally pointing at its own span (`unclosed `{` opened here`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    message: str
    span: Optional[Span] = None


class Diagnostic(BaseModel):
    """One problem: a stable code (`R010`), a message, where, and optional notes and a help line."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    code: str
    message: str
    span: Span
    notes: tuple[Note, ...] = ()
    help: Optional[str] = None
    severity: Literal["error", "warning"] = "error"

    def sort_key(self) -> tuple:
        return (*self.span.sort_key(), self.code, self.message)

    def render(self, sources: Optional[Mapping[str, str]] = None) -> str:
        return render_diagnostic(self, sources)


MAX_SHOWN = 100


def _source_line(sources: Optional[Mapping[str, str]], span: Span) -> Optional[str]:
    if not sources or span.file not in sources:
        return None
    lines = sources[span.file].split("\n")
    if not 1 <= span.line <= len(lines):
        return None
    return lines[span.line - 1].rstrip("\r")


def _excerpt(sources: Optional[Mapping[str, str]], span: Span) -> list[str]:
    """The source line of `span` with a caret (and tildes) under it; empty when the line is unknown."""
    line = _source_line(sources, span)
    if line is None:
        return []
    number = str(span.line)
    gutter = " " * (len(number) + 1)
    start = max(span.col - 1, 0)
    start = min(start, len(line))
    end = span.end_col - 1 if span.end_line == span.line else len(line)
    width = max(end - start, 1)
    if len(line) > MAX_SHOWN:
        # Show a window of a very long line around the span.
        left = max(0, start - MAX_SHOWN // 3)
        right = min(len(line), left + MAX_SHOWN)
        prefix = "…" if left else ""
        width = max(1, min(width, right - start))
        start = start - left + len(prefix)
        line = prefix + line[left:right] + ("…" if right < len(line) else "")
    # Copy tabs from the source line so the caret lines up however the terminal expands them.
    pad = "".join("\t" if ch == "\t" else " " for ch in line[:start])
    return [
        f"{gutter}{number} | {line}".rstrip(),
        f"{gutter}{' ' * len(number)} | {pad}^{'~' * (width - 1)}",
    ]


def render_diagnostic(diag: Diagnostic, sources: Optional[Mapping[str, str]] = None) -> str:
    """`file:line:col: error[CODE]: message`, the source line with a caret, then notes and help."""
    out = [f"{diag.span}: {diag.severity}[{diag.code}]: {diag.message}"]
    out += _excerpt(sources, diag.span)
    for note in diag.notes:
        if note.span is None:
            out.append(f"   = note: {note.message}")
        else:
            out.append(f"{note.span}: note: {note.message}")
            out += _excerpt(sources, note.span)
    if diag.help:
        out.append(f"   = help: {diag.help}")
    return "\n".join(out)


class RouteError(Exception):
    """The project's one error type: every diagnostic found, sorted by position.

    `sources` maps file names to their text so that `render()` can show the offending lines; the
    front end fills it in, and a caller may pass more with `render(sources)`.
    """

    def __init__(self, diagnostics: Iterable[Diagnostic], sources: Optional[Mapping[str, str]] = None):
        self.diagnostics: list[Diagnostic] = sorted(diagnostics, key=Diagnostic.sort_key)
        if not self.diagnostics:
            raise ValueError("RouteError needs at least one diagnostic")
        self.sources: dict[str, str] = dict(sources or {})
        super().__init__(self._summary())

    def _summary(self) -> str:
        first = self.diagnostics[0]
        more = len(self.diagnostics) - 1
        tail = f" (and {more} more)" if more else ""
        return f"{first.span}: {first.severity}[{first.code}]: {first.message}{tail}"

    @property
    def codes(self) -> list[str]:
        return [d.code for d in self.diagnostics]

    def render(self, sources: Optional[Mapping[str, str]] = None) -> str:
        """All diagnostics rendered with their source lines, separated by blank lines."""
        known = {**self.sources, **(sources or {})}
        return "\n\n".join(render_diagnostic(d, known) for d in self.diagnostics)


class Diagnostics:
    """A collector: add errors as they are found, then `raise_if_any()` once at the end of a stage."""

    def __init__(self, sources: Optional[Mapping[str, str]] = None):
        self.items: list[Diagnostic] = []
        self.sources: dict[str, str] = dict(sources or {})

    def add(self, diagnostic: Diagnostic) -> Diagnostic:
        self.items.append(diagnostic)
        return diagnostic

    def error(
        self,
        code: str,
        message: str,
        span: Span,
        notes: Iterable[Note | tuple[str, Optional[Span]] | str] = (),
        help: Optional[str] = None,
    ) -> Diagnostic:
        """Record an error; a note may be a `Note`, a `(message, span)` pair or a bare message."""
        made = tuple(
            n if isinstance(n, Note) else Note(message=n) if isinstance(n, str) else Note(message=n[0], span=n[1])
            for n in notes
        )
        return self.add(Diagnostic(code=code, message=message, span=span, notes=made, help=help))

    def warning(self, code: str, message: str, span: Span, help: Optional[str] = None) -> Diagnostic:
        return self.add(Diagnostic(code=code, message=message, span=span, help=help, severity="warning"))

    def extend(self, diagnostics: Iterable[Diagnostic]) -> None:
        self.items.extend(diagnostics)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.items if d.severity == "error"]

    def __len__(self) -> int:
        return len(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        """Raise a `RouteError` with every diagnostic (warnings included) if any error was recorded."""
        if self.errors:
            raise RouteError(self.items, self.sources)
