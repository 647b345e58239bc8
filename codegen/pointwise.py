"""Launch helpers for the pointwise kernels that the fusion pass generates (`routec.compiler.passes`).

A generated kernel evaluates one fused region of elementwise ops over the region's iteration space: the
broadcast of all its inputs' shapes. Broadcasting is index arithmetic, not copies: every operand (input or
output) is addressed through its strides in the iteration space, with stride 0 along broadcast dimensions
(`Tensor.expand` gives exactly those strides). `iteration_layout` drops size-1 dimensions and merges
neighbours that every operand walks contiguously, so a bias add over [B, L, D] runs as a rank-2 loop and a
plain same-shape chain as rank 1. Generated kernels unroll up to `MAX_RANK` dimensions; anything deeper
runs the region's PyTorch reference instead.

The generated files import only torch, triton and this package (`backend`, `pointwise`).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from .backend import interpreting, use_triton

__all__ = ["MAX_RANK", "iteration_layout", "out_buffer", "block_size", "fusable_inputs"]

MAX_RANK = 6


def out_buffer(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A kernel's output buffer. Tests set ROUTEC_POISON=1 to fill it with NaN first, so an element the
    kernel misses fails the comparison with the reference."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    if os.environ.get("ROUTEC_POISON", "") == "1":
        out.fill_(float("nan"))
    return out


def fusable_inputs(*xs: Tensor) -> bool:
    """Whether the generated Triton kernel can take these inputs: floating tensors on one device, with a
    backend that runs Triton for them (CUDA, or ROUTEC_BACKEND=triton under TRITON_INTERPRET=1)."""
    if not xs or not all(isinstance(x, Tensor) and x.is_floating_point() for x in xs):
        return False
    if len({x.device for x in xs}) != 1 or any(x.dtype == torch.float64 for x in xs):
        return False
    return use_triton(*xs)


def iteration_layout(shape: Sequence[int],
                     operands: Sequence[Tensor]) -> Optional[tuple[int, list[int], list[list[int]]]]:
    """The iteration space of `shape` and each operand's strides in it, innermost dimension first.

    Each operand must broadcast to `shape`. Size-1 dimensions are dropped and dimensions d, d+1 are merged
    when every operand has stride[d] == stride[d+1] * size[d+1]. Returns (rank, sizes, strides per operand),
    the lists padded with 1s and 0s to `MAX_RANK` entries, or None when more than `MAX_RANK` dimensions remain.
    """
    strides = [list(op.expand(tuple(shape)).stride()) for op in operands]
    dims = [d for d, n in enumerate(shape) if n != 1]
    sizes: list[int] = []
    merged: list[list[int]] = [[] for _ in operands]
    for d in dims:  # outermost first
        if sizes and all(s[-1] == st[d] * shape[d] for s, st in zip(merged, strides)):
            sizes[-1] *= shape[d]
            for s, st in zip(merged, strides):
                s[-1] = st[d]
            continue
        sizes.append(shape[d])
        for s, st in zip(merged, strides):
            s.append(st[d])
    if not sizes:
        sizes, merged = [1], [[0] for _ in operands]
    if len(sizes) > MAX_RANK:
        return None
    pad = MAX_RANK - len(sizes)
    return len(sizes), sizes[::-1] + [1] * pad, [s[::-1] + [0] * pad for s in merged]


def block_size(n: int) -> int:
    """Elements per program: 1024 on a GPU; in the interpreter (about 1.4 ms per program) as few programs as
    possible, up to 65536 elements each."""
    cap = 65536 if interpreting() else 1024
    return max(16, min(cap, 1 << max(0, math.ceil(math.log2(max(n, 1))))))
