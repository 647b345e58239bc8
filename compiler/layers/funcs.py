"""Parameter-free tensor functions (`FUNCS`) usable as pipe stages and calls: `x -> gelu -> mean(1)`.

Each `FuncDef` pairs a named function of torch or `routec.codegen.functions` (its Python defaults are the
`Param` defaults) with a symbolic shape rule. `permute(1, random)` / `unpermute` in a spec are the compiler's: it draws the permutation with
`token_shuffle` (FuncDef `shuffle`) and undoes it with `token_unshuffle` (FuncDef `unpermute`).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ...codegen import functions
from ...codegen.functions import concat, confidence, entropy, stack, token_shuffle, token_unshuffle
from .registry import (
    UNKNOWN,
    VARIADIC,
    ArgMessage,
    FuncDef,
    Param,
    Shape,
    ShapeResult,
    differ,
    describe,
    dim_error,
    norm_dim,
    product,
    render_shape,
    render_value,
    total,
)


def _render_call(name: str, params: tuple[Param, ...], kw: dict) -> str:
    """`mean(1)`, `reshape(B, -1, 4)`: the first argument, then up to the last one that is not its default."""
    shown: list[str] = []
    pending: list[str] = []
    for p in params:
        value = kw.get(p.name)
        if p.variadic:
            text = [str(v) if isinstance(v, str) else render_value(v) for v in value or ()]
        else:
            text = [render_value(value)]
        pending.extend(text)
        if p.required or value != p.default or p is params[0]:
            shown.extend(pending)
            pending = []
    return f"{name}({', '.join(shown)})"


def _render_kw(name: str, params: tuple[Param, ...], kw: dict) -> str:
    """`pad([0, 2], value=1.0)`, `std(3, keepdim=true)`: required arguments by position, the others by name
    when they differ from their default."""
    shown = [render_value(kw.get(p.name)) for p in params if p.required]
    shown += [f"{p.name}={render_value(kw.get(p.name))}" for p in params
              if not p.required and kw.get(p.name) != p.default]
    return f"{name}({', '.join(shown)})"


def _same(shapes: list[Shape], kw: dict) -> ShapeResult:
    return shapes[0]


def _dim_rule(name: str, params: tuple[Param, ...], keep: Callable[[Shape, int, dict], ShapeResult]):
    """A rule that checks `kw["dim"]` against the first input's rank, then lets `keep` shape the result."""

    def rule(shapes: list[Shape], kw: dict) -> ShapeResult:
        x = shapes[0]
        d = norm_dim(kw["dim"], len(x))
        if d is None:
            return dim_error(_render_call(name, params, kw), kw["dim"], x)
        return keep(x, d, kw)

    return rule


def _reduced(x: Shape, d: int, kw: dict) -> ShapeResult:
    if kw.get("keepdim"):
        return x[:d] + (1,) + x[d + 1 :]
    return x[:d] + x[d + 1 :]


def _reshape(shapes: list[Shape], kw: dict) -> ShapeResult:
    (x,) = shapes
    target = kw["shape"]
    call = _render_call("reshape", RESHAPE_PARAMS, kw)
    if not target or not all(isinstance(t, (int, str)) and not isinstance(t, bool) for t in target):
        return f"`reshape` needs sizes (ints, dims or -1), got {render_value(target)}"
    if target.count(-1) > 1:
        return f"`{call}` can infer at most one dimension (-1), got {render_shape(target)}"
    if any(isinstance(t, int) and t < -1 for t in target):
        return f"`{call}` needs sizes of at least 0 (or -1 to infer one), got {render_shape(target)}"
    known = [t for t in target if t != -1]
    if all(isinstance(d, int) for d in x) and all(isinstance(t, int) for t in known):
        have, want = product(x), product(known)
        assert isinstance(have, int) and isinstance(want, int)
        fits = have == want if -1 not in target else want > 0 and have % want == 0
        if not fits:
            return f"`{call}` cannot reshape {render_shape(x)} ({have} elements) into {render_shape(target)}"
        if -1 in target:
            return tuple(have // want if t == -1 else t for t in target)
        return tuple(target)
    if -1 not in target:
        return tuple(target)
    # Infer -1 symbolically: cancel the symbols the target repeats from the input, divide the numbers.
    in_symbols = Counter(str(d) for d in x if not isinstance(d, int))
    out_symbols = Counter(str(t) for t in known if not isinstance(t, int))
    in_number = product([d for d in x if isinstance(d, int)])
    out_number = product([t for t in known if isinstance(t, int)])
    assert isinstance(in_number, int) and isinstance(out_number, int)
    if out_symbols - in_symbols or UNKNOWN in in_symbols or out_number == 0 or in_number % out_number:
        inferred: Any = UNKNOWN
    else:
        rest = list((in_symbols - out_symbols).elements())
        inferred = product([in_number // out_number, *rest])
    return tuple(inferred if t == -1 else t for t in target)


def _transpose(shapes: list[Shape], kw: dict) -> ShapeResult:
    (x,) = shapes
    call = _render_call("transpose", TRANSPOSE_PARAMS, kw)
    a, b = norm_dim(kw["a"], len(x)), norm_dim(kw["b"], len(x))
    if a is None:
        return dim_error(call, kw["a"], x)
    if b is None:
        return dim_error(call, kw["b"], x)
    out = list(x)
    out[a], out[b] = x[b], x[a]
    return tuple(out)


def _permute(shapes: list[Shape], kw: dict) -> ShapeResult:
    (x,) = shapes
    dims = [norm_dim(d, len(x)) for d in kw["dims"]]
    if sorted(d for d in dims if d is not None) != list(range(len(x))) or None in dims:
        return (
            f"`{_render_call('permute', PERMUTE_PARAMS, kw)}` needs an order of all {len(x)} dimensions "
            f"of {render_shape(x)}, each once"
        )
    return tuple(x[d] for d in dims if d is not None)


def _concat(shapes: list[Shape], kw: dict) -> ShapeResult:
    first = shapes[0]
    call = _render_call("concat", CONCAT_PARAMS, kw)
    d = norm_dim(kw["dim"], len(first))
    if d is None:
        return dim_error(call, kw["dim"], first)
    for other in shapes[1:]:
        if len(other) != len(first) or any(differ(a, b) for i, (a, b) in enumerate(zip(first, other)) if i != d):
            return (
                f"`{call}` needs inputs of equal shapes outside dimension {kw['dim']}, "
                f"got {render_shape(first)} and {render_shape(other)}"
            )
    return first[:d] + (total([s[d] for s in shapes]),) + first[d + 1 :]


def _stack(shapes: list[Shape], kw: dict) -> ShapeResult:
    first = shapes[0]
    call = _render_call("stack", STACK_PARAMS, kw)
    d = norm_dim(kw["dim"], len(first) + 1)
    if d is None:
        return dim_error(call, kw["dim"], first, extra=1)
    for other in shapes[1:]:
        if len(other) != len(first) or any(differ(a, b) for a, b in zip(first, other)):
            return f"`{call}` needs inputs of equal shapes, got {render_shape(first)} and {render_shape(other)}"
    return first[:d] + (len(shapes),) + first[d:]


def _split(shapes: list[Shape], kw: dict) -> ShapeResult:
    (x,) = shapes
    call = _render_call("split", SPLIT_PARAMS, kw)
    d = norm_dim(kw["dim"], len(x))
    if d is None:
        return dim_error(call, kw["dim"], x)
    sizes = kw["sizes"]
    size = x[d]
    if isinstance(sizes, int) and not isinstance(sizes, bool):
        if sizes < 1:
            return f"`{call}` needs a piece size of at least 1, got {sizes}"
        if not isinstance(size, int):
            return (
                f"`{call}` splits into pieces of {sizes}: dimension {kw['dim']} must be a known size, "
                f"got {render_shape(x)}"
            )
        pieces = [min(sizes, size - start) for start in range(0, size, sizes)]
    elif isinstance(sizes, (list, tuple)) and all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        pieces = list(sizes)
        if differ(sum(pieces), size):
            return f"`{call}` needs sizes adding up to dimension {kw['dim']} of {render_shape(x)}, got {sum(pieces)}"
    else:
        return f"`split` argument `sizes` must be an int or a list of ints, got {render_value(sizes)}"
    return [x[:d] + (p,) + x[d + 1 :] for p in pieces]


def _chunk(shapes: list[Shape], kw: dict) -> ShapeResult:
    (x,) = shapes
    call = _render_call("chunk", CHUNK_PARAMS, kw)
    d = norm_dim(kw["dim"], len(x))
    if d is None:
        return dim_error(call, kw["dim"], x)
    n, size = kw["n"], x[d]
    if n < 1:
        return f"`{call}` needs at least 1 chunk, got {n}"
    if isinstance(size, int):
        if size % n:
            return f"`{call}` needs dimension {kw['dim']} divisible by {n}, got {render_shape(x)}"
        piece: Any = size // n
    elif n == 1 or size == UNKNOWN:
        piece = size
    else:
        piece = f"({size}) // {n}" if " " in size else f"{size} // {n}"
    return [x[:d] + (piece,) + x[d + 1 :]] * n


def _flatten(shapes: list[Shape], kw: dict) -> ShapeResult:
    (x,) = shapes
    call = _render_call("flatten", FLATTEN_PARAMS, kw)
    if not x:
        return (1,)
    a, b = norm_dim(kw["start"], len(x)), norm_dim(kw["end"], len(x))
    if a is None:
        return dim_error(call, kw["start"], x)
    if b is None:
        return dim_error(call, kw["end"], x)
    if a > b:
        return f"`{call}` needs start ≤ end, got dimensions {a} and {b} of {render_shape(x)}"
    return x[:a] + (product(x[a : b + 1]),) + x[b + 1 :]


def _unsqueeze(shapes: list[Shape], kw: dict) -> ShapeResult:
    (x,) = shapes
    d = norm_dim(kw["dim"], len(x) + 1)
    if d is None:
        return dim_error(_render_call("unsqueeze", DIM_REQUIRED, kw), kw["dim"], x, extra=1)
    return x[:d] + (1,) + x[d:]


def _squeeze(x: Shape, d: int, kw: dict) -> ShapeResult:
    if differ(x[d], 1):
        return f"`squeeze({kw['dim']})` needs dimension {kw['dim']} to be 1, got {render_shape(x)}"
    return x[:d] + x[d + 1 :]


def _filled_shape(shapes: list[Shape], kw: dict) -> ShapeResult:
    return tuple(kw["shape"])


def _topk(name: str):
    def keep(x: Shape, d: int, kw: dict) -> ShapeResult:
        k = kw["k"]
        if k < 1 or (isinstance(x[d], int) and k > x[d]):
            return f"`{name}({k})` needs 1 ≤ k ≤ {x[d]} along dimension {kw['dim']} of {render_shape(x)}, got {k}"
        return x[:d] + (k,) + x[d + 1 :]

    return keep


def _gather(shapes: list[Shape], kw: dict) -> ShapeResult:
    x, index = shapes
    call = _render_call("gather", DIM_REQUIRED, kw)
    d = norm_dim(kw["dim"], len(x))
    if d is None:
        return dim_error(call, kw["dim"], x)
    if len(index) != len(x):
        return f"`{call}` needs an index of the same rank as {render_shape(x)}, got {render_shape(index)}"
    return index


def _unpermute(shapes: list[Shape], kw: dict) -> ShapeResult:
    y, perm = shapes
    d = norm_dim(kw["dim"], len(y))
    if d is None:
        return dim_error(_render_call("unpermute", DIM_1, kw), kw["dim"], y)
    if len(perm) != 1 or differ(perm[0], y[d]):
        return f"`unpermute({kw['dim']})` needs a permutation [{y[d]}], got {render_shape(perm)}"
    return y


def _narrow(x: Shape, d: int, kw: dict) -> ShapeResult:
    start, length = kw["start"], kw["length"]
    if start < 0 or length < 0 or (isinstance(x[d], int) and start + length > x[d]):
        return f"`narrow({kw['dim']}, {start}, {length})` is out of range for {render_shape(x)}"
    return x[:d] + (length,) + x[d + 1 :]


def _one_hot(shapes: list[Shape], kw: dict) -> ShapeResult:
    if kw["num"] < 1:
        return f"`one_hot` argument `num` must be at least 1, got {kw['num']}"
    return shapes[0] + (kw["num"],)


def _grown(size: Any, by: int) -> Any:
    """A dim changed by `by` elements: an int, `T + 3` / `T - 2` for a symbol, `?` when unknown."""
    if by == 0 or size == UNKNOWN:
        return size
    if isinstance(size, int):
        return size + by
    text = str(size)
    if any(c in text for c in "*/()%"):
        text = f"({text})"
    else:  # a sum: `T + 1` grown by 2 is `T + 3`
        while tail := re.fullmatch(r"(.+) ([+-]) (\d+)", text):
            text, by = tail.group(1), by + (int(tail.group(3)) if tail.group(2) == "+" else -int(tail.group(3)))
    if by == 0:
        return text
    return f"{text} + {by}" if by > 0 else f"{text} - {-by}"


def _pad(shapes: list[Shape], kw: dict) -> ShapeResult:
    """torch.nn.functional.pad (constant): amounts in (left, right) pairs, last dimension first."""
    (x,) = shapes
    amounts = kw["pad"]
    if isinstance(amounts, (list, tuple)) and any(isinstance(a, str) for a in amounts):
        symbol = next(a for a in amounts if isinstance(a, str))
        return ArgMessage(
            f"`pad` amounts must be ints known before the model runs, but `{symbol}` is a size known only at "
            f"run time", "pad")
    if not isinstance(amounts, (list, tuple)) or not all(isinstance(a, int) and not isinstance(a, bool)
                                                          for a in amounts):
        return ArgMessage(
            f"`pad` argument `pad` must be a list of ints [left, right, top, bottom, …], got {describe(amounts)}",
            "pad")
    call = _render_kw("pad", PAD_PARAMS, kw)
    if not amounts or len(amounts) % 2:
        return ArgMessage(
            f"`{call}` needs a (left, right) pair of amounts per padded dimension, last dimension first: an even "
            f"number of amounts, got {len(amounts)}", "pad")
    if len(amounts) // 2 > len(x):
        return ArgMessage(
            f"`{call}` pads {len(amounts) // 2} dimensions, but {render_shape(x)} has {len(x)} "
            f"(at most {2 * len(x)} amounts)", "pad")
    out = list(x)
    for i in range(len(amounts) // 2):
        d = len(x) - 1 - i
        size = _grown(x[d], amounts[2 * i] + amounts[2 * i + 1])
        if isinstance(size, int) and size < 0:
            return ArgMessage(
                f"`{call}` crops dimension {d} of {render_shape(x)} to {size} elements (negative amounts crop)",
                "pad")
        out[d] = size
    return tuple(out)


def _spread(name: str) -> Callable[[list[Shape], dict], ShapeResult]:
    """`std` / `var`: a reduction along `dim`; one element with Bessel's correction is refused (0 / 0)."""

    def rule(shapes: list[Shape], kw: dict) -> ShapeResult:
        (x,) = shapes
        call = _render_kw(name, STAT_PARAMS, kw)
        d = norm_dim(kw["dim"], len(x))
        if d is None:
            return ArgMessage(dim_error(call, kw["dim"], x), "dim")
        if kw["unbiased"] and x[d] == 1:
            return ArgMessage(
                f"`{call}`: dimension {kw['dim']} of {render_shape(x)} has one element, and the unbiased "
                f"estimate divides by n - 1 = 0 (NaN); pass unbiased=false to divide by n", "dim")
        return _reduced(x, d, kw)

    return rule


def _clamp(shapes: list[Shape], kw: dict) -> ShapeResult:
    low, high = kw["min"], kw["max"]
    if low is None and high is None:
        return "`clamp` needs a bound: `min=…`, `max=…` or both"
    for key, bound in (("min", low), ("max", high)):
        if bound is not None and bound != bound:
            return ArgMessage(f"`clamp` argument `{key}` must be a number, got nan", key)
    if low is not None and high is not None and low > high:
        return ArgMessage(f"`clamp(min={low!r}, max={high!r})` needs min ≤ max", "max")
    return shapes[0]


DIM_LAST = (Param("dim", "int", -1),)
DIM_1 = (Param("dim", "int", 1),)
DIM_REQUIRED = (Param("dim", "int"),)
REDUCE_PARAMS = (Param("dim", "int"), Param("keepdim", "bool", False))
RESHAPE_PARAMS = (Param("shape", "any", doc="sizes, symbols or -1 (one inferred size)", variadic=True),)
TRANSPOSE_PARAMS = (Param("a", "int"), Param("b", "int"))
PERMUTE_PARAMS = (Param("dims", "int", doc="the new order of the dimensions", variadic=True),)
CONCAT_PARAMS = DIM_LAST
STACK_PARAMS = (Param("dim", "int", 0),)
SPLIT_PARAMS = (Param("sizes", "any", doc="a piece size, or a list of sizes"), Param("dim", "int", -1))
CHUNK_PARAMS = (Param("n", "int"), Param("dim", "int", -1))
FLATTEN_PARAMS = (Param("start", "int", 0), Param("end", "int", -1))
SHAPE_PARAMS = (Param("shape", "shape"),)
PAD_PARAMS = (
    Param("pad", "any", doc="amounts [left, right, top, bottom, …]: a pair per dimension, last dimension first"),
    Param("value", "float", 0.0),
)
STAT_PARAMS = (Param("dim", "int"), Param("keepdim", "bool", False), Param("unbiased", "bool", True))
CLAMP_PARAMS = (Param("min", "float", None, "lower bound (none: unbounded)"),
                Param("max", "float", None, "upper bound (none: unbounded)"))
TOPK_PARAMS = (Param("k", "int"), Param("dim", "int", -1))


def _pointwise(name: str, fn: Callable[[torch.Tensor], torch.Tensor], doc: str) -> FuncDef:
    return FuncDef(name, (), fn, _same, doc)


def _with_dim(name, params, fn, keep, doc, **extra) -> FuncDef:
    return FuncDef(name, params, fn, _dim_rule(name, params, keep), doc, **extra)


def _keep(x: Shape, d: int, kw: dict) -> ShapeResult:
    return x


FUNCS: dict[str, FuncDef] = {
    f.name: f
    for f in (
        _pointwise("gelu", F.gelu, "Gaussian error linear unit (exact erf form)"),
        _pointwise("silu", F.silu, "x * sigmoid(x)"),
        _pointwise("relu", F.relu, "max(x, 0)"),
        _pointwise("tanh", torch.tanh, "hyperbolic tangent"),
        _pointwise("sigmoid", torch.sigmoid, "1 / (1 + exp(-x))"),
        _pointwise("exp", torch.exp, "e ** x"),
        _pointwise("log", torch.log, "natural logarithm"),
        _pointwise("abs", torch.abs, "|x|"),
        _pointwise("softplus", F.softplus, "log(1 + exp(x))"),
        _pointwise("elu", F.elu, "x where x > 0, else exp(x) - 1"),
        FuncDef("leaky_relu", (Param("slope", "float", 0.01),), functions.leaky_relu, _same,
                "x where x > 0, else slope * x"),
        FuncDef("clamp", CLAMP_PARAMS, functions.clamp, _clamp,
                "x limited to [min, max] (at least one bound); gradient 1 inside, 0 outside"),
        _pointwise("detach", torch.Tensor.detach, "the same values without gradient"),
        _pointwise("identity", functions.identity, "returns its input"),
        _with_dim("softmax", DIM_LAST, functions.softmax, _keep, "softmax along dim"),
        _with_dim(
            "log_softmax", DIM_LAST, functions.log_softmax, _keep, "log of softmax along dim"
        ),
        _with_dim(
            "mean", REDUCE_PARAMS, functions.mean, _reduced, "mean along dim"
        ),
        _with_dim("sum", REDUCE_PARAMS, functions.sum_dim, _reduced, "sum along dim"),
        _with_dim(
            "max",
            REDUCE_PARAMS,
            functions.max_dim,
            _reduced,
            "largest value along dim (values only)",
        ),
        _with_dim(
            "min",
            REDUCE_PARAMS,
            functions.min_dim,
            _reduced,
            "smallest value along dim (values only)",
        ),
        _with_dim(
            "argmax",
            REDUCE_PARAMS,
            functions.argmax,
            _reduced,
            "index of the largest value along dim (long)",
        ),
        _with_dim("flip", DIM_REQUIRED, functions.flip, _keep, "reverses the order along dim"),
        FuncDef("std", STAT_PARAMS, functions.std, _spread("std"),
                "standard deviation along dim (unbiased: divided by n - 1, else by n)"),
        FuncDef("var", STAT_PARAMS, functions.var, _spread("var"),
                "variance along dim (unbiased: divided by n - 1, else by n)"),
        FuncDef("pad", PAD_PARAMS, functions.pad, _pad,
                "constant padding as torch.nn.functional.pad: (left, right) pairs from the last dimension"),
        FuncDef("reshape", RESHAPE_PARAMS, functions.reshape, _reshape, "same elements, new shape"),
        FuncDef(
            "transpose", TRANSPOSE_PARAMS, functions.transpose, _transpose, "swaps dimensions a and b"
        ),
        FuncDef("permute", PERMUTE_PARAMS, functions.permute, _permute, "reorders the dimensions"),
        _with_dim(
            "shuffle",
            DIM_1,
            token_shuffle,
            lambda x, d, kw: [x, (x[d],)],
            "random order along dim: (y, perm); the compiler's permute(dim, random)",
            outputs=2,
        ),
        FuncDef(
            "unpermute",
            DIM_1,
            token_unshuffle,
            _unpermute,
            "undoes shuffle: (y, perm) → x in the original order",
            arity=2,
        ),
        FuncDef("concat", CONCAT_PARAMS, concat, _concat, "joins a list of tensors along dim", arity=VARIADIC),
        FuncDef("stack", STACK_PARAMS, stack, _stack, "stacks a list of tensors along a new dim", arity=VARIADIC),
        FuncDef(
            "split",
            SPLIT_PARAMS,
            functions.split,
            _split,
            "pieces along dim, of one size (the last may be shorter) or of the listed sizes",
            outputs=0,
        ),
        FuncDef(
            "chunk",
            CHUNK_PARAMS,
            functions.chunk,
            _chunk,
            "n equal pieces along dim",
            outputs=0,
        ),
        FuncDef(
            "flatten",
            FLATTEN_PARAMS,
            functions.flatten,
            _flatten,
            "merges dimensions start … end",
        ),
        FuncDef(
            "unsqueeze", DIM_REQUIRED, functions.unsqueeze, _unsqueeze, "inserts a dimension of size 1"
        ),
        _with_dim("squeeze", DIM_REQUIRED, functions.squeeze, _squeeze, "removes a dimension of size 1"),
        FuncDef(
            "zeros",
            SHAPE_PARAMS,
            functions.zeros,
            _filled_shape,
            "zeros of shape (on the device and dtype of an optional tensor input)",
            arity=1,
            min_arity=0,
        ),
        FuncDef(
            "ones",
            SHAPE_PARAMS,
            functions.ones,
            _filled_shape,
            "ones of shape (on the device and dtype of an optional tensor input)",
            arity=1,
            min_arity=0,
        ),
        _with_dim("confidence", DIM_LAST, confidence, _reduced, "max softmax probability along dim"),
        _with_dim("entropy", DIM_LAST, entropy, _reduced, "entropy −Σ p log p of softmax along dim"),
        _with_dim(
            "topk_values",
            TOPK_PARAMS,
            functions.topk_values,
            _topk("topk_values"),
            "the k largest values along dim, largest first",
        ),
        _with_dim(
            "topk_indices",
            TOPK_PARAMS,
            functions.topk_indices,
            _topk("topk_indices"),
            "indices of the k largest values along dim, largest first",
        ),
        FuncDef(
            "gather",
            DIM_REQUIRED,
            functions.gather,
            _gather,
            "x.gather(dim, index): picks along dim by a long index of the same rank",
            arity=2,
        ),
        _with_dim(
            "narrow",
            (Param("dim", "int"), Param("start", "int"), Param("length", "int")),
            functions.narrow,
            _narrow,
            "the slice start … start + length along dim",
        ),
        FuncDef(
            "one_hot",
            (Param("num", "int"),),
            functions.one_hot,
            _one_hot,
            "long ids [...] → one-hot [..., num] (long)",
        ),
    )
}
