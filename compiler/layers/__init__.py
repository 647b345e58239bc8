"""The layer and tensor-function library the compiler lowers `.route` calls to.

`LAYERS` (modules with parameters: `Linear`, `MambaMixer`, …) and `FUNCS` (parameter-free functions: `gelu`,
`mean`, `concat`, …) map names to definitions; `bind_args` checks a call's arguments against a definition;
each definition's shape rule gives the symbolic output shape or a message; `render_shape` spells a shape.
"""

from .funcs import FUNCS, token_shuffle, token_unshuffle
from .modules import LAYERS
from .spiking import SPIKING_FUNCS
from .vision import VISION_LAYERS

LAYERS.update({defn.name: defn for defn in VISION_LAYERS})
FUNCS.update({defn.name: defn for defn in SPIKING_FUNCS})
from .registry import (
    REQUIRED,
    UNKNOWN,
    VARIADIC,
    Dim,
    FuncDef,
    LayerDef,
    Param,
    Ref,
    Shape,
    bind_args,
    render_shape,
    render_value,
)

__all__ = [
    "FUNCS",
    "LAYERS",
    "REQUIRED",
    "UNKNOWN",
    "VARIADIC",
    "Dim",
    "FuncDef",
    "LayerDef",
    "Param",
    "Ref",
    "Shape",
    "bind_args",
    "render_shape",
    "render_value",
    "token_shuffle",
    "token_unshuffle",
]
