"""Front end stage 1: `.route` text → `routec.dsl.ast.Module`, or a `RouteError` with every syntax error.

The stages, in order:
1. `decode_source` — bytes to text: size, NUL bytes, UTF-8 and empty-file checks (R001–R004).
2. `_check_characters`, then `_lex` — control characters (R002, R005); Lark's basic lexer over
   `grammar.lark`, resuming after a bad character or an unterminated string (R006, R007).
3. `_layout` — bracket matching and nesting depth (R008, R012–R014), comments set aside for the
   formatter, newlines cleaned up as `grammar.lark` describes.
4. `_parse_tokens` — the LALR parser fed token by token; a syntax error is recorded (R010, R011) and
   the parser resynchronises at the next statement, so one run reports many errors.
5. `_check_depth` then `_ToAst` — a non-recursive transform into frozen AST nodes (R015–R019);
   `_check_names` — names declared twice (R020–R023).

Limits keep every input bounded: files up to `MAX_SOURCE_BYTES`, brackets nested `MAX_NESTING` deep,
syntax trees `MAX_TREE_DEPTH` deep, and at most `MAX_ERRORS` diagnostics.
"""

from __future__ import annotations

import difflib
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, NoReturn, Optional, Union

from lark import Lark, Token, Transformer_NonRecursive, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedToken
from lark.lexer import LexerThread

from . import ast
from .diagnostics import Diagnostics, Note, RouteError, Span

__all__ = [
    "parse", "read_source", "decode_source", "KEYWORDS", "MAX_SOURCE_BYTES", "MAX_NESTING",
    "MAX_TREE_DEPTH", "MAX_ERRORS",
]

MAX_SOURCE_BYTES = 262_144  # 256 KiB: fifty times the largest stdlib spec, parsed in seconds
MAX_NESTING = 64
MAX_TREE_DEPTH = 200
MAX_ERRORS = 50
MAX_INT = 2**63 - 1

GRAMMAR_PATH = Path(__file__).with_name("grammar.lark")

OPENERS = {"LPAR": "RPAR", "LSQB": "RSQB", "LBRACE": "RBRACE"}
CLOSERS = {v: k for k, v in OPENERS.items()}
BRACKET_TEXT = {"LPAR": "(", "RPAR": ")", "LSQB": "[", "RSQB": "]", "LBRACE": "{", "RBRACE": "}"}

# A newline before one of these continues the statement (`} else {`, `} combine sum`, a pipe on the next line).
CONTINUATION = {"ELSE", "COMBINE", "_ARROW"}
STATEMENT_KEYWORDS = ("in", "out", "let", "param", "if", "repeat", "gate", "pre", "post", "paths", "exit",
                      "scan", "emit")
ITEM_KEYWORDS = ("use", "block", "model")
COMBINE_MODIFIERS = ("sample", "ensemble")


@lru_cache(maxsize=None)
def _lark() -> Lark:
    """The parser, built once: LALR, strict (no conflicts, no terminal collisions), positions on."""
    return Lark(
        GRAMMAR_PATH.read_text(encoding="utf-8"),
        parser="lalr",
        lexer="basic",
        strict=True,
        propagate_positions=True,
        maybe_placeholders=True,
    )


@lru_cache(maxsize=None)
def _raw_lexer() -> Any:
    """The grammar's lexer without `%ignore`, so comments and whitespace come through as tokens."""
    return _lark()._build_lexer(dont_ignore=True)


@lru_cache(maxsize=None)
def _keywords() -> dict[str, str]:
    """Reserved word → terminal name, read from the grammar (`"scan"` → `SCAN`)."""
    words = {}
    for term in _lark().terminals:
        if term.pattern.type == "str" and re.fullmatch(r"[a-z]+", term.pattern.value):
            words[term.pattern.value] = term.name
    return words


KEYWORDS: tuple[str, ...] = ()  # filled below, after the grammar is known to load


def _line(tok: Token) -> int:
    """Positions of lexed tokens are always set; Lark types them Optional."""
    return tok.line or 1


def _col(tok: Token) -> int:
    return tok.column or 1


def _span(file: str, tok: Token) -> Span:
    return Span(file=file, line=_line(tok), col=_col(tok), end_line=tok.end_line or _line(tok),
                end_col=tok.end_column or _col(tok) + 1)


def _meta_span(file: str, meta: Any) -> Span:
    return Span(file=file, line=meta.line, col=meta.column, end_line=meta.end_line, end_col=meta.end_column)


def _fail(code: str, message: str, span: Span, sources: dict[str, str], help: Optional[str] = None) -> RouteError:
    diags = Diagnostics(sources)
    diags.error(code, message, span, help=help)
    return RouteError(diags.items, sources)


def decode_source(data: bytes, filename: str) -> str:
    """Bytes of a `.route` file → text, or a RouteError for huge, binary, non-UTF-8 or empty input."""
    start = Span.point(filename, 1, 1)
    if len(data) > MAX_SOURCE_BYTES:
        raise _fail("R004", f"file is too large ({len(data)} bytes; the limit is {MAX_SOURCE_BYTES})", start, {})
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise _fail("R001", "file is UTF-16 encoded; routec reads UTF-8", start, {}, help="save the file as UTF-8")
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        col = nul - (data.rfind(b"\n", 0, nul) + 1) + 1
        raise _fail("R002", "file contains a NUL byte; is it a binary file?", Span.point(filename, line, col), {})
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        line_start = data.rfind(b"\n", 0, err.start) + 1
        col = len(data[line_start:err.start].decode("utf-8", errors="replace")) + 1
        sources = {filename: data.decode("utf-8", errors="replace")}
        raise _fail(
            "R001",
            f"file is not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start})",
            Span.point(filename, line, col),
            sources,
            help="save the file as UTF-8",
        ) from None
    return text


def read_source(path: Union[str, os.PathLike]) -> str:
    """Read a `.route` file as text; every problem (missing, unreadable, huge, binary) is a RouteError."""
    filename = str(path)
    start = Span.point(filename, 1, 1)
    try:
        size = os.stat(path).st_size
        if size > MAX_SOURCE_BYTES:
            raise _fail("R004", f"file is too large ({size} bytes; the limit is {MAX_SOURCE_BYTES})", start, {})
        with open(path, "rb") as handle:
            data = handle.read(MAX_SOURCE_BYTES + 1)
    except OSError as err:
        raise _fail("R000", f"cannot read file: {err.strerror or err}", start, {}) from None
    return decode_source(data, filename)


def normalise(text: str) -> str:
    """Text as the parser sees it: no byte-order mark, `\\n` line ends (positions refer to this)."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _check_characters(text: str, file: str, diags: Diagnostics) -> None:
    """Control characters (and NUL) anywhere, even in comments, mean a binary or corrupted file."""
    for count, match in enumerate(_CONTROL.finditer(text)):
        if count == 5:
            break
        pos = match.start()
        line = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        ch = match.group()
        code, what = ("R002", "a NUL byte; is it a binary file?") if ch == "\x00" else (
            "R005", f"control character U+{ord(ch):04X}")
        diags.error(code, f"invalid character: {what}", Span.point(file, line, col))


def _lex(text: str, file: str, diags: Diagnostics) -> list[Token]:
    """All tokens (comments and whitespace included); a bad character is reported and skipped (an
    unterminated string to the end of its line), and lexing resumes right after it."""
    thread = LexerThread.from_text(_raw_lexer(), text)
    tokens: list[Token] = []
    while True:
        try:
            tokens.extend(thread.lex(None))
            return tokens
        except UnexpectedCharacters as err:
            pos = err.pos_in_stream or 0
            ch = text[pos]
            span = Span.point(file, err.line or 1, err.column or 1)
            if ch == '"':
                end = text.find("\n", pos)
                end = len(text) if end < 0 else end
                span = Span(file=file, line=span.line, col=span.col, end_line=span.line,
                            end_col=span.col + end - pos)
                diags.error("R007", "unterminated string", span, help="close the string with `\"` on the same line")
            else:
                end = pos + 1
                shown = ch if ch.isprintable() and not ch.isspace() else f"U+{ord(ch):04X}"
                diags.error("R006", f"unexpected character `{shown}`", span,
                            help="names use ASCII letters, digits and `_`" if ch.isalpha() else None)
            if len(diags) >= MAX_ERRORS:
                diags.error("R099", f"too many errors; stopped after {MAX_ERRORS}", span)
                return []
            assert thread.state is not None
            thread.state.line_ctr.feed(text[pos:end])


def _attached_docs(tokens: list[Token]) -> set[int]:
    """Indices of the `##` lines that document something: a run of them on consecutive lines, directly
    followed on the next line by a definition, `use`, statement or branch. Any other `##` line (before a
    blank line, a comment, `}` or the end of the file) is an ordinary comment."""
    keep: set[int] = set()
    i, n = 0, len(tokens)
    while i < n:
        if tokens[i].type != "DOC":
            i += 1
            continue
        run = [i]
        while True:
            k = run[-1] + 1
            while k < n and tokens[k].type == "_NL":
                k += 1
            if k < n and tokens[k].type == "DOC" and _line(tokens[k]) == _line(tokens[run[-1]]) + 1:
                run.append(k)
            else:
                break
        nxt = tokens[k] if k < n else None
        if (nxt is not None and _line(nxt) == _line(tokens[run[-1]]) + 1
                and (nxt.type == "NAME" or nxt.value in STATEMENT_KEYWORDS or nxt.value in ITEM_KEYWORDS)):
            keep.update(run)
        i = k
    return keep


def _module_doc(tokens: list[Token]) -> tuple[list[Token], Optional[str]]:
    """The file's own doc: `##` lines at the very top followed by a blank line (else they document the
    first definition). Returns the tokens without them, and the doc text."""
    docs: list[Token] = []
    i = 0
    while i < len(tokens) and tokens[i].type in ("WS", "_NL", "DOC"):
        if tokens[i].type == "DOC":
            if docs and _line(tokens[i]) > _line(docs[-1]) + 1:
                return tokens, None
            docs.append(tokens[i])
        elif tokens[i].type == "_NL" and docs:
            j = i + 1
            while j < len(tokens) and tokens[j].type == "WS":
                j += 1
            if j < len(tokens) and tokens[j].type == "_NL":
                return tokens[j:], _doc_text(docs)
        i += 1
    return tokens, None


def _doc_text(docs: list[Token]) -> str:
    lines = []
    for tok in docs:
        text = tok.value[2:].rstrip()
        lines.append(text[1:] if text.startswith(" ") else text)
    return "\n".join(lines)


def _layout(
    tokens: list[Token], file: str, diags: Diagnostics
) -> tuple[Optional[list[Token]], list[ast.Comment]]:
    """Bracket matching, comments aside, newline clean-up (see grammar.lark). None if brackets are broken."""
    comments: list[ast.Comment] = []
    stack: list[Token] = []
    kept: list[Token] = []
    broken = False
    for tok in tokens:
        kind = tok.type
        if kind == "WS":
            continue
        if kind == "COMMENT":
            comments.append(ast.Comment(span=_span(file, tok), text=tok.value.rstrip()))
            continue
        in_parens = bool(stack) and stack[-1].type != "LBRACE"
        if kind == "_NL" and in_parens:
            continue
        if kind == "DOC" and in_parens:
            comments.append(ast.Comment(span=_span(file, tok), text=tok.value.rstrip()))
            continue
        if kind in OPENERS:
            stack.append(tok)
            if len(stack) > MAX_NESTING:
                diags.error("R008", f"brackets nested too deeply (the limit is {MAX_NESTING} levels)",
                            _span(file, tok))
                return None, comments
        elif kind in CLOSERS:
            if not stack:
                diags.error("R014", f"unmatched `{tok.value}`: nothing is open here", _span(file, tok))
                broken = True
                continue
            if stack[-1].type != CLOSERS[kind]:
                broken = True
                opener = stack[-1]
                want = BRACKET_TEXT[OPENERS[opener.type]]
                deeper = any(t.type == CLOSERS[kind] for t in stack)
                if deeper:
                    # `f(x }`: the brackets opened since the matching one were never closed.
                    while stack[-1].type != CLOSERS[kind]:
                        unclosed = stack.pop()
                        diags.error(
                            "R012",
                            f"unclosed `{unclosed.value}`: expected `{BRACKET_TEXT[OPENERS[unclosed.type]]}`",
                            _span(file, unclosed),
                            notes=[(f"`{tok.value}` here closes an outer `{BRACKET_TEXT[CLOSERS[kind]]}` first",
                                    _span(file, tok))],
                        )
                    stack.pop()
                elif opener.type == "LBRACE":
                    # A stray `)` or `]` inside a block: drop it, keep the block open.
                    diags.error("R014", f"unmatched `{tok.value}`: no `{BRACKET_TEXT[CLOSERS[kind]]}` is open here",
                                _span(file, tok))
                else:
                    # `foo(]` is most likely a typo for `)`: close the innermost bracket.
                    diags.error(
                        "R013",
                        f"mismatched `{tok.value}`: expected `{want}` to close `{opener.value}`",
                        _span(file, tok),
                        notes=[(f"`{opener.value}` opened here", _span(file, opener))],
                    )
                    stack.pop()
                continue
            stack.pop()
        kept.append(tok)
        if len(diags) >= MAX_ERRORS:
            return None, comments
    if stack:
        eof = _eof_span(file, next((t for t in reversed(kept) if t.type != "_NL"), None))
        inner = stack[-1]
        closer = BRACKET_TEXT[OPENERS[inner.type]]
        notes = [Note(message=f"unclosed `{t.value}` opened here", span=_span(file, t)) for t in reversed(stack)]
        notes += _misindented_closers(kept, inner, file)
        diags.error("R012", f"unexpected end of file: expected `{closer}`", eof, notes=notes)
        broken = True
    if broken:
        return None, comments

    # Documentation that documents nothing becomes an ordinary comment.
    docs_fixed: list[Token] = []
    attached = _attached_docs(kept)
    for i, tok in enumerate(kept):
        if tok.type == "DOC" and i not in attached:
            comments.append(ast.Comment(span=_span(file, tok), text=tok.value.rstrip()))
            continue
        docs_fixed.append(tok)

    # The kind of the next token that is not a newline, for every position (None at the end).
    following: list[Optional[str]] = [None] * len(docs_fixed)
    upcoming: Optional[str] = None
    for i in range(len(docs_fixed) - 1, -1, -1):
        following[i] = upcoming
        if docs_fixed[i].type != "_NL":
            upcoming = docs_fixed[i].type

    out: list[Token] = []
    for i, tok in enumerate(docs_fixed):
        if tok.type == "_NL":
            if not out or out[-1].type in ("_NL", "LBRACE", "_ARROW", "DOC"):
                continue
            nxt = following[i]
            if nxt is None or nxt == "RBRACE" or nxt in CONTINUATION:
                continue
        out.append(tok)
    comments.sort(key=lambda c: c.span.sort_key())
    return out, comments


def _misindented_closers(kept: list[Token], unclosed: Token, file: str) -> list[Note]:
    """Point at a `{ … }` pair inside the unclosed block whose `}` is indented unlike its `{` line:
    usually that `}` was meant for the block that is left open, and the real missing `}` is there."""
    indent: dict[int, int] = {}
    line_first: dict[int, Token] = {}
    for tok in kept:
        line_first.setdefault(_line(tok), tok)
    for line, tok in line_first.items():
        indent[line] = _col(tok)
    stack: list[Token] = []
    started = False
    for tok in kept:
        if tok is unclosed:
            started = True
            continue
        if not started:
            continue
        if tok.type == "LBRACE":
            stack.append(tok)
        elif tok.type == "RBRACE" and stack:
            opener = stack.pop()
            if line_first.get(_line(tok)) is tok and indent.get(_line(opener)) != _col(tok):
                return [Note(message="this `{` may be the one left open: the `}` that closes it is indented "
                                     "differently", span=_span(file, opener))]
    return []


def _eof_span(file: str, last: Optional[Token]) -> Span:
    if last is None:
        return Span.point(file, 1, 1)
    return Span.point(file, last.end_line or _line(last), last.end_column or _col(last))


# Syntax errors in the language's words


_EXPR_START = {"NAME", "INT", "FLOAT", "STRING", "LPAR", "LSQB", "ADD_OP", "NOT", "TRUE", "FALSE", "ROUTE"}
_STMT_START = {"IN", "OUT", "LET", "PARAM", "IF", "REPEAT", "GATE", "PRE", "POST", "PATHS", "EXIT", "SCAN",
               "EMIT"}
_ITEM_START = {"USE", "BLOCK", "MODEL"}
_OPERATORS = {"OR", "AND", "COMP_OP", "_ARROW", "ADD_OP", "MUL_OP", "POW", "LPAR", "LSQB", "DOT"}
_NAMED = {"NAME": "a name", "INT": "an integer", "FLOAT": "a number", "STRING": "a string",
          "_NL": "end of line", "$END": "end of file", "DOC": "a statement", "COMP_OP": "a comparison",
          "ADD_OP": "`+` or `-`", "MUL_OP": "`*`, `/`, `//`, `%` or `@`", "_ARROW": "`->`"}


def _literal(term: str) -> Optional[str]:
    try:
        pattern = _lark().get_terminal(term).pattern
    except KeyError:
        return None
    return pattern.value if pattern.type == "str" else None


def _join(words: list[str]) -> str:
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " or " + words[-1]


def describe_expected(expected: Iterable[str]) -> str:
    """`{'NAME', 'INT', …, 'RBRACE'}` → "an expression or `}`"."""
    rest = set(expected) - {"_ERR"}
    words: list[str] = []
    if _STMT_START <= rest:
        words.append("a statement")
        rest -= _STMT_START | {"NAME", "DOC"}
    if _ITEM_START <= rest:
        words += ["`use`", "`block`", "`model`"]
        rest -= _ITEM_START | {"DOC"}
    if {"NAME", "INT", "LPAR"} <= rest:
        words.append("an expression")
        rest -= _EXPR_START
    if len(rest & _OPERATORS) >= 3:
        words.append("an operator")
        rest -= _OPERATORS
    tail = []
    for term in sorted(rest, key=lambda t: (t in ("_NL", "$END"), t)):
        if term in _NAMED:
            word = _NAMED[term]
        else:
            lit = _literal(term)
            word = f"`{lit}`" if lit is not None else term.lower()
        if word not in words and word not in tail:
            tail.append(word)
    words += tail
    if not words:
        return "something else"
    if len(words) > 6:
        words = words[:5] + ["…"]
    return _join(words)


def describe_token(tok: Token) -> str:
    kind = tok.type
    if kind == "$END":
        return "end of file"
    if kind == "_NL":
        return "end of line"
    if kind == "NAME":
        return f"name `{tok.value}`"
    if kind in ("INT", "FLOAT"):
        return f"number `{tok.value}`"
    if kind == "STRING":
        text = tok.value if len(tok.value) <= 24 else tok.value[:20] + "…\""
        return f"string {text}"
    if kind == "DOC":
        return "doc comment"
    if tok.value in _keywords():
        return f"keyword `{tok.value}`"
    return f"`{tok.value}`"


def _did_you_mean(word: str, candidates: Iterable[str]) -> Optional[str]:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None


def _statement_start(tokens: list[Token], i: int) -> bool:
    return i == 0 or tokens[i - 1].type in ("_NL", "LBRACE", "DOC")


def _syntax_error(tokens: list[Token], i: int, tok: Token, expected: set[str], file: str,
                  diags: Diagnostics) -> None:
    """Record one syntax error at `tok` (index `i`), with a typo hint where one is likely."""
    words = _keywords()
    # `sacn h over x.T …`: a misspelt keyword lexes as a name, and the error shows at the next token.
    if i >= 1 and tokens[i - 1].type == "NAME" and _statement_start(tokens, i - 1) and tok.type != "EQUAL":
        prev = tokens[i - 1]
        keywords = ITEM_KEYWORDS if {"USE", "BLOCK"} & expected or _top_level(tokens, i - 1) else STATEMENT_KEYWORDS
        hint = _did_you_mean(prev.value, keywords)
        if hint:
            what = "definition" if keywords is ITEM_KEYWORDS else "statement"
            diags.error("R010", f"unknown {what} keyword `{prev.value}`", _span(file, prev), help=hint)
            return
    if tok.type in ("ELSE", "COMBINE") and (i == 0 or tokens[i - 1].type != "RBRACE"):
        owner = "an `if`" if tok.type == "ELSE" else "a `paths`"
        diags.error("R010", f"`{tok.value}` must follow the closing `}}` of {owner} block", _span(file, tok))
        return
    found = describe_token(tok)
    span = _span(file, tok) if tok.type != "$END" else Span.point(file, _line(tok), _col(tok))
    if tok.type == "RBRACE" and i >= 1 and (tokens[i - 1].end_line or 0) < _line(tok):
        # The newline before a closing `}` is dropped, but for the reader the statement ended there.
        prev = tokens[i - 1]
        found = "end of line"
        span = Span.point(file, prev.end_line or _line(prev), prev.end_column or _col(prev))
    message = f"expected {describe_expected(expected)}, found {found}"
    help = None
    if tok.type == "NAME":
        # A name where a keyword belongs: `} combin sum`, `scan h ovr x.T`, `blok A()`.
        allowed = [w for w, term in words.items() if term in expected]
        help = _did_you_mean(tok.value, allowed)
        if help is None and _ITEM_START & expected:
            help = _did_you_mean(tok.value, ITEM_KEYWORDS)
    elif tok.type == "EQUAL" and "COMP_OP" in expected:
        help = "use `==` to compare"
    elif tok.value == ">" and i >= 1 and tokens[i - 1].value == "-":
        help = "write the pipe `->` without a space"
    elif tok.value in words and "NAME" in expected and tok.type not in CONTINUATION:
        help = f"`{tok.value}` is a reserved word and cannot be used as a name"
    code = "R011" if tok.type == "$END" else "R010"
    diags.error(code, message, span, help=help)


def _top_level(tokens: list[Token], i: int) -> bool:
    depth = 0
    for tok in tokens[:i]:
        if tok.type == "LBRACE":
            depth += 1
        elif tok.type == "RBRACE":
            depth -= 1
    return depth == 0


def _parse_tokens(tokens: list[Token], eof: Token, file: str, diags: Diagnostics) -> Optional[Tree]:
    """Feed the LALR parser; on a syntax error, record it, unwind to the enclosing statement (or
    definition), feed `_ERR` in its place, skip to the end of that statement, and go on. Returns the
    tree (broken statements become `error_stmt` / `error_item`), or None when recovery gave up."""
    level = []  # brace depth before each token
    open_braces = 0
    for tok in tokens:
        level.append(open_braces)
        open_braces += {"LBRACE": 1, "RBRACE": -1}.get(tok.type, 0)
    level.append(open_braces)  # at the end of the file
    interactive = _lark().parse_interactive("")
    state = interactive.parser_state
    table = state.parse_conf.parse_table.states
    i = 0
    last_error = -1
    errors = 0
    while True:
        tok = tokens[i] if i < len(tokens) else eof
        try:
            if tok is eof:
                result = interactive.feed_eof(eof)
                return result  # with errors, statements that failed stand as error_stmt / error_item
            interactive.feed_token(tok)
            i += 1
            continue
        except UnexpectedToken:
            pass
        if i == last_error:
            if tok is eof:
                return None
            i += 1  # resynchronising stalled on this very token: drop it
            continue
        last_error = i
        errors += 1
        _syntax_error(tokens, i, tok, interactive.accepts(), file, diags)
        if errors >= MAX_ERRORS:
            diags.error("R099", f"too many syntax errors; stopped after {MAX_ERRORS}", _span(file, tok))
            return None
        depth = 0
        while "_ERR" not in table[state.state_stack[-1]] and len(state.state_stack) > 1:
            state.state_stack.pop()
            value = state.value_stack.pop()
            if isinstance(value, Token):
                depth += {"LBRACE": 1, "RBRACE": -1}.get(value.type, 0)
        try:
            interactive.feed_token(Token.new_borrow_pos("_ERR", "", tok))
        except UnexpectedToken:
            return None
        if level[i] - depth == 0:
            # A broken `use` or definition header: resume at the next line that starts a definition.
            while i < len(tokens) and not (
                tokens[i].type == "_NL" and level[i] == 0 and i + 1 < len(tokens)
                and tokens[i + 1].type in ("USE", "BLOCK", "MODEL", "DOC")
            ):
                i += 1
            continue
        while i < len(tokens):
            kind = tokens[i].type
            if kind == "LBRACE":
                depth += 1
            elif kind == "RBRACE":
                if depth == 0:
                    break
                depth -= 1
            elif kind == "_NL" and depth <= 0:
                break
            i += 1


def _check_depth(tree: Tree, file: str, diags: Diagnostics) -> bool:
    """Refuse syntax trees deeper than MAX_TREE_DEPTH (long operator chains, deep nesting) so nothing
    downstream can hit Python's recursion limit."""
    stack: list[tuple[Any, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, Tree):
            continue
        if depth > MAX_TREE_DEPTH:
            diags.error("R008", f"expression nested too deeply (the limit is {MAX_TREE_DEPTH} levels)",
                        _meta_span(file, node.meta), help="split it with intermediate assignments")
            return False
        stack.extend((child, depth + 1) for child in node.children)
    return True


# Parse tree → AST


class _Args:
    """A call's arguments while they travel up to the call node."""

    def __init__(self, args: tuple, kwargs: tuple):
        self.args, self.kwargs = args, kwargs


class _Docs:
    def __init__(self, text: str):
        self.text = text


class _Modifier:
    def __init__(self, call: ast.Call):
        self.call = call


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", '"': '"'}


@v_args(meta=True)
class _ToAst(Transformer_NonRecursive):
    """One method per grammar rule, each building one node with its span."""

    def __init__(self, file: str, diags: Diagnostics):
        super().__init__()
        self.file = file
        self.diags = diags

    def _s(self, meta: Any) -> Span:
        return _meta_span(self.file, meta)

    def _t(self, tok: Token) -> Span:
        return _span(self.file, tok)

    def _from(self, tok: Token, node: ast.Node) -> Span:
        """From the start of `tok` to the end of `node` (a span that leaves out leading doc comments)."""
        return Span(file=self.file, line=_line(tok), col=_col(tok), end_line=node.span.end_line,
                    end_col=node.span.end_col)

    # File level

    def start(self, meta, children):
        items = [c for c in children if c is not None]
        span = self._s(meta) if not meta.empty else Span.point(self.file, 1, 1)
        return ast.Module(
            span=span,
            filename=self.file,
            uses=tuple(c for c in items if isinstance(c, ast.Use)),
            definitions=tuple(c for c in items if isinstance(c, ast.Definition)),
        )

    def item(self, meta, children):
        docs, node = children
        return node.model_copy(update={"doc": docs.text}) if docs is not None else node

    stmt = item

    def error_item(self, meta, children):
        return None

    error_stmt = error_item

    def docs(self, meta, children):
        return _Docs(_doc_text(children))

    def use_decl(self, meta, children):
        source, names = children
        kind, value = source
        return ast.Use(span=self._s(meta), module=value if kind == "module" else None,
                       path=value if kind == "path" else None, names=names)

    def dotted_name(self, meta, children):
        return ("module", ".".join(t.value for t in children))

    def use_path(self, meta, children):
        return ("path", self._string(children[0]))

    def use_names(self, meta, children):
        return tuple(c for c in children if c is not None)

    def use_name(self, meta, children):
        name, alias = children
        return ast.UseName(span=self._s(meta), name=name.value, alias=alias.value if alias else None)

    def definition(self, meta, children):
        kind, name, *rest = children
        body = rest.pop()
        params = tuple(p for p in rest if p is not None)
        return ast.Definition(span=self._s(meta), kind=kind, name=name.value, params=params, body=body)

    def def_kind(self, meta, children):
        return children[0].value

    def param_decl(self, meta, children):
        name, type_tok, default = children
        type_name = type_tok.value
        if type_name not in ast.PARAM_TYPES:
            self.diags.error(
                "R015",
                f"unknown parameter type `{type_name}`; expected {_join([f'`{t}`' for t in ast.PARAM_TYPES])}",
                self._t(type_tok),
                help=_did_you_mean(type_name, ast.PARAM_TYPES),
            )
            type_name = "int"
        return ast.Param(span=self._s(meta), name=name.value, type=type_name, default=default)

    def body(self, meta, children):
        return tuple(c for c in children if c is not None)

    # Statements

    def in_decl(self, meta, children):
        name, shape, dtype = children
        return ast.InDecl(span=self._s(meta), name=name.value, shape=shape,
                          dtype=dtype.value if dtype else None)

    def shape(self, meta, children):
        return tuple(c for c in children if c is not None)

    def out_stmt(self, meta, children):
        name, value = children
        return ast.Out(span=self._s(meta), name=name.value if name else None, value=value)

    def let_stmt(self, meta, children):
        name, value = children
        return ast.Let(span=self._s(meta), name=name.value, value=value)

    def assign(self, meta, children):
        *targets, value = children
        return ast.Assign(span=self._s(meta), targets=tuple(targets), value=value)

    def target(self, meta, children):
        return ast.Name(span=self._s(meta), id=children[0].value)

    def param_stmt(self, meta, children):
        name, shape, init = children
        return ast.ParamDecl(span=self._s(meta), name=name.value, shape=shape, init=init)

    def if_stmt(self, meta, children):
        cond, then, orelse = children
        if isinstance(orelse, ast.If):
            orelse = (orelse,)
        return ast.If(span=self._s(meta), cond=cond, then=then, orelse=orelse or ())

    def repeat_stmt(self, meta, children):
        var, count, body = children
        return ast.Repeat(span=self._s(meta), var=var.value if var else None, count=count, body=body)

    def gate_stmt(self, meta, children):
        timing, name, gate_kind, scores = children
        return ast.Gate(span=self._s(meta), timing=timing, name=name.value, gate_kind=gate_kind, scores=scores)

    def gate_timing(self, meta, children):
        return children[0].value

    def paths_stmt(self, meta, children):
        name, *rest = children
        inputs: tuple = ()
        branches, modifiers = [], []
        combine = None
        for child in rest:
            if child is None:
                continue
            if isinstance(child, _Args):
                inputs = self._positional_only(child, "paths inputs")
            elif isinstance(child, ast.Branch):
                branches.append(child)
            elif isinstance(child, _Modifier):
                modifiers.append(child.call)
            else:
                combine = child
        assert combine is not None  # the grammar requires `combine`
        return ast.Paths(span=self._s(meta), name=name.value, inputs=inputs, branches=tuple(branches),
                         combine=combine, modifiers=tuple(modifiers))

    def branch(self, meta, children):
        docs, name, value = children
        return ast.Branch(span=self._from(name, value), name=name.value, value=value,
                          doc=docs.text if docs else None)

    def gate_ref(self, meta, children):
        return ast.GateRef(span=self._s(meta), name=children[0].value)

    def modifier(self, meta, children):
        name, args = children
        if name.value not in COMBINE_MODIFIERS:
            self.diags.error(
                "R019",
                f"unknown combine modifier `{name.value}`; expected `sample(...)` or `ensemble(...)`",
                self._t(name),
                help=_did_you_mean(name.value, COMBINE_MODIFIERS),
            )
        args = args or _Args((), ())
        func = ast.Name(span=self._t(name), id=name.value)
        return _Modifier(ast.Call(span=self._s(meta), func=func, args=args.args, kwargs=args.kwargs))

    def exit_stmt(self, meta, children):
        name, index, value, rule = children
        return ast.Exit(span=self._s(meta), name=name.value, index=index, value=value, rule=rule)

    def scan_stmt(self, meta, children):
        states, over, reverse, order, init, body = children
        return ast.Scan(span=self._s(meta), states=states, over=over, reverse=reverse is not None,
                        order=order, init=init, body=body)

    def scan_states(self, meta, children):
        return tuple(t.value for t in children if t is not None)

    def scan_reverse(self, meta, children):
        return True

    def emit_stmt(self, meta, children):
        name, value = children
        return ast.Emit(span=self._s(meta), name=name.value, value=value)

    # Expressions

    def binop(self, meta, children):
        left, op, right = children
        return ast.BinOp(span=self._s(meta), op=op.value, left=left, right=right)

    def unop(self, meta, children):
        op, operand = children
        return ast.UnaryOp(span=self._s(meta), op=op.value, operand=operand)

    def pipe(self, meta, children):
        left, right = children
        return ast.Pipe(span=self._s(meta), left=left, right=right)

    def call(self, meta, children):
        func, args = children
        args = args or _Args((), ())
        return ast.Call(span=self._s(meta), func=func, args=args.args, kwargs=args.kwargs)

    def index(self, meta, children):
        value, *subs = children
        return ast.Index(span=self._s(meta), value=value, indices=tuple(s for s in subs if s is not None))

    def attr(self, meta, children):
        value, name = children
        return ast.Attribute(span=self._s(meta), value=value, attr=name.value)

    def name(self, meta, children):
        return ast.Name(span=self._s(meta), id=children[0].value)

    def int_lit(self, meta, children):
        tok = children[0]
        value = int(tok.value) if len(tok.value) <= 20 else MAX_INT + 1
        if value > MAX_INT:
            self.diags.error("R017", f"integer literal is too large (the limit is {MAX_INT})", self._t(tok))
            value = 0
        return ast.Int(span=self._s(meta), value=value)

    def float_lit(self, meta, children):
        tok = children[0]
        value = float(tok.value)
        if value in (float("inf"), float("-inf")):
            self.diags.error("R017", "number literal is too large for a float", self._t(tok))
            value = 0.0
        return ast.Float(span=self._s(meta), value=value)

    def string_lit(self, meta, children):
        return ast.Str(span=self._s(meta), value=self._string(children[0]))

    def true(self, meta, children):
        return ast.Bool(span=self._s(meta), value=True)

    def false(self, meta, children):
        return ast.Bool(span=self._s(meta), value=False)

    def tuple_expr(self, meta, children):
        return ast.TupleExpr(span=self._s(meta), items=tuple(c for c in children if c is not None))

    def list_expr(self, meta, children):
        return ast.ListExpr(span=self._s(meta), items=tuple(c for c in children if c is not None))

    def args(self, meta, children):
        args, kwargs, seen = [], [], set()
        for child in children:
            if child is None:
                continue
            if isinstance(child, ast.Keyword):
                if child.name in seen:
                    self.diags.error("R016", f"keyword argument `{child.name}` given twice", child.span)
                seen.add(child.name)
                kwargs.append(child)
            elif kwargs:
                self.diags.error("R016", "positional argument after a keyword argument", child.span,
                                 help="put positional arguments first")
            else:
                args.append(child)
        return _Args(tuple(args), tuple(kwargs))

    def kwarg(self, meta, children):
        name, value = children
        return ast.Keyword(span=self._s(meta), name=name.value, value=value)

    def ellipsis(self, meta, children):
        return ast.EllipsisIndex(span=self._s(meta))

    def slice_expr(self, meta, children):
        start, stop, step = (list(children) + [None, None, None])[:3]
        return ast.Slice(span=self._s(meta), start=start, stop=stop, step=step)

    def route_expr(self, meta, children):
        value, gate, target = children
        return ast.Route(span=self._s(meta), value=value, gate=gate, target=target)

    def route_experts(self, meta, children):
        name, body = children
        return ast.RouteExperts(span=self._s(meta), name=name.value, body=body)

    def route_branches(self, meta, children):
        return ast.RouteBranches(span=self._s(meta), branches=tuple(c for c in children if c is not None))

    def route_branch(self, meta, children):
        docs, name, value = children
        return ast.RouteBranch(span=self._from(name, value), name=name.value, value=value,
                               doc=docs.text if docs else None)

    # Helpers

    def _positional_only(self, args: _Args, what: str) -> tuple:
        for kw in args.kwargs:
            self.diags.error("R016", f"{what} take no keyword arguments", kw.span)
        return args.args

    def _string(self, tok: Token) -> str:
        body = tok.value[1:-1]
        out, i = [], 0
        while i < len(body):
            ch = body[i]
            if ch == "\\":
                esc = body[i + 1]
                if esc not in _ESCAPES:
                    col = _col(tok) + 1 + i
                    self.diags.error("R018", f"unknown escape `\\{esc}` in string",
                                     Span(file=self.file, line=_line(tok), col=col, end_line=_line(tok), end_col=col + 2),
                                     help="strings know `\\\"`, `\\\\`, `\\n` and `\\t`")
                out.append(_ESCAPES.get(esc, esc))
                i += 2
            else:
                out.append(ch)
                i += 1
        return "".join(out)


def _check_names(module: ast.Module, diags: Diagnostics) -> None:
    """Names that must be unique where they are declared: definitions in a file, names brought in by
    `use`, parameters of a definition, branches of a `paths` or `route` (R020–R023)."""

    def unique(items: Iterable[tuple[str, Span]], code: str, message: str) -> None:
        first: dict[str, Span] = {}
        for name, span in items:
            if name in first:
                diags.error(code, message.format(name=name), span,
                            notes=[(f"`{name}` first declared here", first[name])])
            else:
                first[name] = span

    unique(((d.name, d.span) for d in module.definitions), "R022", "`{name}` is defined twice in this file")
    imported = [(n.alias or n.name, n.span) for u in module.uses for n in (u.names or ())]
    unique(imported, "R023", "`{name}` is imported twice")
    for d in module.definitions:
        unique(((p.name, p.span) for p in d.params), "R020", f"parameter `{{name}}` of `{d.name}` is declared twice")
        for node in ast.walk(d):
            if isinstance(node, ast.Paths):
                unique(((b.name, b.span) for b in node.branches), "R021",
                       f"branch `{{name}}` of `paths {node.name}` is declared twice")
            elif isinstance(node, ast.RouteBranches):
                unique(((b.name, b.span) for b in node.branches), "R021",
                       "branch `{name}` of this `route` is declared twice")


def _fallback(diags: Diagnostics, filename: str) -> NoReturn:
    """Raise what was recorded; a stage that gives up always records why, but never fail silently."""
    if not diags.errors:
        diags.error("R010", "syntax error", Span.point(filename, 1, 1))
    diags.raise_if_any()
    raise AssertionError("unreachable")


def parse(source: Union[str, bytes], filename: str = "<string>") -> ast.Module:
    """Parse a `.route` file. Raises RouteError holding every error found, sorted by position."""
    if isinstance(source, (bytes, bytearray)):
        source = decode_source(bytes(source), filename)
    text = normalise(source)
    sources = {filename: text}
    diags = Diagnostics(sources)
    if len(text.encode("utf-8", errors="replace")) > MAX_SOURCE_BYTES:
        diags.error("R004", f"file is too large (the limit is {MAX_SOURCE_BYTES} bytes)", Span.point(filename, 1, 1))
        diags.raise_if_any()
    if not text.strip():
        diags.error("R003", "file is empty: expected `use`, `block` or `model`", Span.point(filename, 1, 1))
        diags.raise_if_any()
    _check_characters(text, filename, diags)
    diags.raise_if_any()

    tokens, doc = _module_doc(_lex(text, filename, diags))
    diags.raise_if_any()  # after a bad character the brackets and statements around it mean little
    laid, comments = _layout(tokens, filename, diags) if tokens else (None, [])
    if laid is None or diags:
        _fallback(diags, filename)
    eof = Token("$END", "", start_pos=len(text), line=1, column=1, end_line=1, end_column=1)
    if laid:
        last = laid[-1]
        eof = Token("$END", "", start_pos=len(text), line=last.end_line, column=last.end_column,
                    end_line=last.end_line, end_column=last.end_column)
    tree = _parse_tokens(laid, eof, filename, diags)
    if tree is None:
        _fallback(diags, filename)
    if not _check_depth(tree, filename, diags):
        diags.raise_if_any()
    module = _ToAst(filename, diags).transform(tree)
    _check_names(module, diags)
    diags.raise_if_any()
    return module.model_copy(update={"comments": tuple(comments), "doc": doc})


KEYWORDS = tuple(sorted(_keywords()))
