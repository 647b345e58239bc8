"""More functions: spiking `x -> lif(beta=0.9, threshold=1.0, reset="subtract")` on [B, T, …] (time on
dim 1), and the trigonometric functions sinusoidal embeddings are built from."""

from __future__ import annotations

import torch

from ...codegen import functions, runtime
from .registry import FuncDef, Param, Shape, ShapeResult, render_shape


def _same(shapes: list[Shape], kw: dict) -> ShapeResult:
    return shapes[0]


def _lif_rule(shapes: list[Shape], kw: dict) -> ShapeResult:
    (x,) = shapes
    if len(x) < 3:
        return f"`lif` runs along time (dim 1) of [B, T, …], got {render_shape(x)}"
    if kw["reset"] not in ("subtract", "zero"):
        return f"`lif` reset must be \"subtract\" or \"zero\", got \"{kw['reset']}\""
    return x


SPIKING_FUNCS = (
    FuncDef("lif", (Param("beta", "float", 1.0, "leak per step (1: integrate-and-fire)"),
                    Param("threshold", "float", 1.0), Param("reset", "str", "subtract")),
            runtime.lif, _lif_rule,
            "spikes of integrate-and-fire neurons along time: [B, T, …] → [B, T, …] (arctan surrogate gradient)"),
    FuncDef("sin", (), torch.sin, _same, "elementwise sine"),
    FuncDef("cos", (), torch.cos, _same, "elementwise cosine"),
    FuncDef("gelu_tanh", (), functions.gelu_tanh, _same, "GELU with the tanh approximation (GPT-2's)"),
)
