"""The values an expression of a `.route` spec evaluates to while the compiler elaborates it.

Static values (ints, floats, bools, strings, lists of them) are plain Python. Everything else is one of the
small classes below: a tensor flowing in the fx graph with its symbolic shape, a layer or block that can be
applied, a partially applied function waiting for its input in a pipe, or a gate's decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch.fx as fx

from ..dsl import ast
from ..dsl.diagnostics import Span
from .layers import FuncDef, LayerDef, Shape, render_shape


@dataclass
class Tensor:
    """A tensor in the graph being built: its fx node and symbolic shape (ints and symbol names)."""

    node: fx.Node
    shape: Shape
    dtype: str = "float"

    def describe(self) -> str:
        return f"a tensor {render_shape(self.shape)}"


@dataclass
class Dim:
    """A symbolic dimension bound by an `in` declaration (`B`, `T`), usable in shapes like `[B, n]`."""

    name: str


@dataclass
class Callee:
    """A layer, function or block named but not yet instantiated/applied (`LayerNorm`, `gelu`, `Block`)."""

    kind: str  # "layer" | "func" | "block" | "builtin"
    name: str
    defn: Union[LayerDef, FuncDef, "ast.Definition", None] = None
    origin: Optional[str] = None  # the file a `use`d block comes from

    # `defn` by kind, for the type checker: a layer's is a LayerDef, a func's a FuncDef, a block's its AST.
    @property
    def layer_def(self) -> LayerDef:
        assert isinstance(self.defn, LayerDef), self.kind
        return self.defn

    @property
    def func_def(self) -> FuncDef:
        assert isinstance(self.defn, FuncDef), self.kind
        return self.defn

    @property
    def block_def(self) -> "ast.Definition":
        assert isinstance(self.defn, ast.Definition), self.kind
        return self.defn


@dataclass
class Partial:
    """A function with its non-tensor arguments bound (`mean(1)`), applied to the tensor a pipe brings."""

    defn: FuncDef
    args: list[Any]
    kwargs: dict[str, Any]
    span: Span
    arg_spans: dict[str, Span] = field(default_factory=dict)  # where each bound argument was written


@dataclass
class Instance:
    """An instantiated layer (one nn.Module at `path`) or block (its modules live under `path`)."""

    kind: str  # "layer" | "block"
    name: str
    path: str
    defn: Any
    kwargs: dict[str, Any]
    span: Span
    scope: Any = None  # for blocks: the parameter scope the body runs in
    origin: Optional[str] = None


@dataclass
class GateValue:
    """A gate's decision: weights over `choices` (and the chosen indices for top-k gates)."""

    kind: str
    weights: Tensor
    indices: Optional[Tensor]
    choices: Union[int, str]  # a size, or a dimension's name when only known at run time
    k: int
    span: Span
    name: str
    timing: str = "pre"
    capacity: float = 0.0  # the gate's `capacity=` factor (0: none); a route by the gate bounds each branch
    capacity_span: Optional[Span] = None  # where the option was written


@dataclass
class ExitArray:
    """The heads of an indexed exit (`exit head[i] = …`), keyed by index."""

    name: str
    heads: dict[Any, Tensor] = field(default_factory=dict)


Value = Any
