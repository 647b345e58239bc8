"""The definitions the compiler resolves call names against, argument binding, and symbolic shapes.

A `.route` call such as `Linear(d, 3, bias=false)` or a pipe stage `-> mean(1)` names a `LayerDef` (a module
with parameters, built once and then applied) or a `FuncDef` (a parameter-free tensor function).
`bind_args` maps the call's positional and keyword arguments onto the definition's `Param`s; the
definition's shape rule then gives the symbolic output shape, or a message for the user.

Shapes are plain tuples whose entries are ints, symbol strings (`"B"`, `"T"`) or simple expression strings
(`"3 * H"`); `"?"` marks a dim that cannot be computed statically. Two dims are only called different when
both are ints: symbols are never assumed distinct, so a check never rejects a program that could be right.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

Dim = Union[int, str]
Shape = tuple[Dim, ...]
ShapeResult = Union[Shape, list[Shape], str]  # a shape, one shape per output, or a message (maybe an ArgMessage)

PARAM_TYPES = ("int", "float", "bool", "str", "shape", "any")
UNKNOWN = "?"


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Ref:
    """A default that copies another parameter's value, as in `PatchEmbed(…, patch=16, stride=patch)`."""

    param: str

    def __repr__(self) -> str:
        return self.param


@dataclass(frozen=True)
class Param:
    """One argument of a layer or function. `variadic` collects the remaining positional arguments
    (`reshape(B, -1, 4)`, `permute(0, 2, 1)`) into a tuple; a single list argument is taken as that tuple."""

    name: str
    type: str
    default: Any = REQUIRED
    doc: str = ""
    variadic: bool = False

    def __post_init__(self) -> None:
        if self.type not in PARAM_TYPES:
            raise ValueError(f"Param {self.name}: type must be one of {PARAM_TYPES}, got {self.type!r}")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class LayerDef:
    """A layer: `build(**kwargs)` makes the nn.Module, applied to `arity` tensors (`min_arity` when trailing
    inputs are optional, e.g. a recurrent cell's state). `rule(kwargs, in_shapes)` returns the output shape
    (a list of shapes for several outputs) or a message; `check` and `out_shape` wrap it."""

    name: str
    params: tuple[Param, ...]
    factory: Callable[..., Any]
    rule: Callable[[dict, list[Shape]], ShapeResult]
    doc: str
    arity: int = 1
    min_arity: int | None = None

    def build(self, **kwargs: Any) -> Any:
        bound, errors = bind_args(self, [], kwargs)
        if errors:
            raise TypeError("; ".join(errors))
        return self.factory(**bound)

    def out_shape(self, kwargs: dict, in_shapes: Sequence[Sequence[Dim]]) -> ShapeResult:
        bound, errors = bind_args(self, [], kwargs)
        if errors:
            return errors[0]
        shapes = [tuple(s) for s in in_shapes]
        low = self.arity if self.min_arity is None else self.min_arity
        if not low <= len(shapes) <= self.arity:
            want = str(self.arity) if low == self.arity else f"{low} to {self.arity}"
            return f"`{render_call(self, bound)}` takes {want} {_plural(self.arity, 'input')}, got {len(shapes)}"
        return self.rule(bound, shapes)

    def check(self, kwargs: dict, in_shapes: Sequence[Sequence[Dim]]) -> str | None:
        result = self.out_shape(kwargs, in_shapes)
        return result if isinstance(result, str) else None


class ArgMessage(str):
    """A shape rule's message about one argument (`param`): the compiler points at that argument, not the call."""

    param: str

    def __new__(cls, text: str, param: str) -> "ArgMessage":
        message = super().__new__(cls, text)
        message.param = param
        return message


VARIADIC = -1


@dataclass(frozen=True)
class FuncDef:
    """A parameter-free tensor function: `apply(*tensors, **kwargs)` computes it, `shape(in_shapes, kwargs)`
    gives the symbolic result. `arity` is the number of tensor inputs (`VARIADIC`: one or more, e.g. the
    items of a list for `concat`); `outputs` is the number of results (0: as many as the arguments say,
    for `split` and `chunk`), in which case `shape` returns a list of shapes."""

    name: str
    params: tuple[Param, ...]
    fn: Callable[..., Any]
    rule: Callable[[list[Shape], dict], ShapeResult]
    doc: str
    arity: int = 1
    min_arity: int | None = None
    outputs: int = 1

    def apply(self, *tensors: Any, **kwargs: Any) -> Any:
        return self.fn(*tensors, **kwargs)

    def shape(self, in_shapes: Sequence[Sequence[Dim]], kwargs: dict) -> ShapeResult:
        bound, errors = bind_args(self, [], kwargs)
        if errors:
            return errors[0]
        shapes = [tuple(s) for s in in_shapes]
        low = self.arity if self.min_arity is None else self.min_arity
        if self.arity == VARIADIC:
            if not shapes:
                return f"`{self.name}` needs at least one input"
        elif not low <= len(shapes) <= self.arity:
            want = str(self.arity) if low == self.arity else f"{low} to {self.arity}"
            return f"`{render_call(self, bound)}` takes {want} {_plural(self.arity, 'input')}, got {len(shapes)}"
        return self.rule(shapes, bound)


Definition = Union[LayerDef, FuncDef]


def bind_args(defn: Definition, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Map positional and keyword arguments onto `defn.params`.

    Returns (kwargs with every parameter present, defaults filled in, ints widened to float where a float is
    wanted; list of error messages). The kwargs are only complete when there are no errors.
    """
    name = defn.name
    params = {p.name: p for p in defn.params}
    bound: dict[str, Any] = {}
    errors: list[str] = []

    rest = list(args)
    for p in defn.params:
        if not rest:
            break
        if p.variadic:
            bound[p.name] = tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else tuple(rest)
            rest = []
        else:
            bound[p.name] = rest.pop(0)
    if rest:
        n = len(defn.params)
        if n == 0:
            errors.append(f"`{name}` takes no arguments, got {len(args)}")
        else:
            errors.append(f"`{name}` takes at most {n} {_plural(n, 'argument')}, got {len(args)}")

    for key, value in kwargs.items():
        if key not in params:
            errors.append(ArgMessage(_unknown_argument(name, key, list(params)), key))
        elif key in bound:
            errors.append(ArgMessage(f"`{name}` got argument `{key}` twice, by position and by name", key))
        else:
            bound[key] = value

    for key, value in list(bound.items()):
        p = params[key]
        ok, coerced = _coerce(value, p)
        if ok:
            bound[key] = coerced
        else:
            errors.append(ArgMessage(f"`{name}` argument `{key}` must be {_type_words(p)}, got {describe(value)}", key))

    for p in defn.params:
        if p.name in bound:
            continue
        if p.required:
            errors.append(f"`{name}` is missing argument `{p.name}`")
        else:
            bound[p.name] = p.default
    for key, value in bound.items():
        if isinstance(value, Ref):
            bound[key] = bound.get(value.param)
    return bound, errors


def _unknown_argument(name: str, key: str, known: list[str]) -> str:
    if not known:
        return f"`{name}` has no argument `{key}`; it takes no arguments"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"`{name}` has no argument `{key}`; did you mean `{close[0]}`?"
    return f"`{name}` has no argument `{key}`; it takes {', '.join(f'`{k}`' for k in known)}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _coerce(value: Any, p: Param) -> tuple[bool, Any]:
    if p.variadic:
        if p.type == "any":
            return True, tuple(value)
        item = Param(p.name, p.type)
        items = [_coerce(v, item) for v in value]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if p.type == "any" or (value is None and p.default is None):  # an optional argument left out
        return True, value
    if p.type == "int":
        return _is_int(value), value
    if p.type == "float":
        ok = _is_int(value) or isinstance(value, float)
        return ok, float(value) if ok else value
    if p.type == "bool":
        return isinstance(value, bool), value
    if p.type == "str":
        return isinstance(value, str), value
    # "shape": a list of dims, each an int or a symbol
    ok = isinstance(value, (list, tuple)) and all(_is_int(v) or isinstance(v, str) for v in value)
    return ok, tuple(value) if ok else value


def _type_words(p: Param) -> str:
    words = {"int": "int", "float": "float", "bool": "bool", "str": "str", "shape": "a shape (a list of dims)"}
    if p.variadic:
        return {"int": "ints", "float": "floats", "bool": "bools", "str": "strs", "shape": "shapes"}[p.type]
    return words[p.type]


def describe(value: Any) -> str:
    """A value as the user wrote it, with its type: `float 2.5`, `str "abc"`, `bool true`, `a tensor [B, 8]`."""
    if callable(getattr(value, "describe", None)):  # the compiler's values (a tensor) say what they are
        return str(value.describe())
    if isinstance(value, (list, tuple)) and value and all(_is_int(v) for v in value):
        return f"list {render_value(value)}"
    kind = {bool: "bool", int: "int", float: "float", str: "str", list: "list", tuple: "list"}.get(
        type(value), type(value).__name__
    )
    return f"{kind} {render_value(value)}"


def render_value(value: Any) -> str:
    """A value in `.route` spelling: `true`, `"gelu"`, `[3, 224, 224]`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(render_value(v) for v in value) + "]"
    return repr(value)


def render_shape(shape: Sequence[Dim]) -> str:
    """`("B", "T", 256)` → `[B, T, 256]`."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


def render_call(defn: Definition, kwargs: dict[str, Any], shown: int = 1) -> str:
    """The call as the user would write it, its first `shown` arguments spelled out: `Linear(512, …)`."""
    if not defn.params:
        return defn.name
    values = [render_value(kwargs.get(p.name)) for p in defn.params[:shown] if not p.variadic]
    if len(defn.params) > len(values):
        values.append("…")
    return f"{defn.name}({', '.join(values)})"


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


def differ(a: Dim, b: Dim) -> bool:
    """Whether two dims are known to differ (only provable when both are ints)."""
    return _is_int(a) and _is_int(b) and a != b


def norm_dim(dim: int, rank: int) -> int | None:
    """`dim` counted from the front, or None when it is out of range for `rank` dims."""
    d = dim + rank if dim < 0 else dim
    return d if 0 <= d < rank else None


def dim_error(call: str, dim: int, shape: Shape, extra: int = 0) -> str:
    """Message for a dimension index that does not exist (`extra`: dims an insertion may add)."""
    rank = len(shape) + extra
    return f"`{call}`: dimension {dim} is out of range for {render_shape(shape)} (valid: {-rank} to {rank - 1})"


def _atom(d: Dim) -> str:
    text = str(d)
    return f"({text})" if " " in text else text


def product(dims: Sequence[Dim]) -> Dim:
    """The product of dims: an int when all are ints, else an expression such as `3 * H * W`."""
    if UNKNOWN in dims:
        return UNKNOWN
    number = 1
    symbols = []
    for d in dims:
        if _is_int(d):
            number *= int(d)
        else:
            symbols.append(_atom(d))
    if not symbols:
        return number
    if number == 0:
        return 0
    return " * ".join(([str(number)] if number != 1 else []) + symbols)


def total(dims: Sequence[Dim]) -> Dim:
    """The sum of dims: an int when all are ints, else an expression such as `T + 4`."""
    if UNKNOWN in dims:
        return UNKNOWN
    number = sum(int(d) for d in dims if _is_int(d))
    symbols = [_atom(d) for d in dims if not _is_int(d)]
    if not symbols:
        return number
    return " + ".join(symbols + ([str(number)] if number else []))


def conv_length(size: Dim, kernel: int, stride: int, padding: int) -> Dim:
    """Output length of a convolution: an int, `L - 2` for a symbolic length at stride 1, else `?`."""
    if _is_int(size):
        return (int(size) + 2 * padding - kernel) // stride + 1
    if stride != 1 or size == UNKNOWN:
        return UNKNOWN
    change = 2 * padding - kernel + 1
    if change == 0:
        return size
    return f"{_atom(size)} + {change}" if change > 0 else f"{_atom(size)} - {-change}"
