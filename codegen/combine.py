"""`gated_combine`: the weighted sum that aggregates parallel paths (DESIGN §5).

    y = Σ_p weights[..., p] * paths[p]          paths: [P, *S, D], weights: [*S', P]

`*S'` is broadcast against `*S` from the left: it is a prefix of `*S` in which any dimension may be 1, so
`[B, P]` gives one weight per sample for paths `[P, B, L, D]`, `[B, L, P]` one per token and `[P]` one for
the whole tensor. The result has shape `[*S, D]` and the promoted dtype of the inputs (fp32 accumulation).

Kernels. The rows of `*S` are flattened to `M`. When `*S'` is an exact prefix of `*S` (the three cases
above) a row `m` reads weight row `m // rows_per_weight` and the weights are never expanded; any other
broadcast (a 1 inside `*S'`) is expanded to `[M, P]` first, which costs `M * P` elements against the
`P * M * D` of the paths. The forward runs one program per `[BLOCK_M, BLOCK_D]` output tile and loops over
the `P` paths (a compile-time constant). The backward runs one program per (row block, path): it writes
`dpaths[p] = w[:, p] * dy` and a per-row partial `Σ_d dy * paths[p]`, which the launcher sums over the rows
that share a weight (and over broadcast dimensions) to give `dweights`.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backend import reference_vjp, use_triton

__all__ = ["gated_combine", "gated_combine_reference"]


def _empty(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A launcher's output buffer. Tests set ROUTEC_POISON=1 to fill it first (NaN, -1, or 0xFF for bool)
    so that a kernel that misses an element fails the comparison with the reference."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("ROUTEC_POISON", "") == "1":
        if out.dtype.is_floating_point:
            out.fill_(float("nan"))
        elif out.dtype == torch.bool:
            out.view(torch.uint8).fill_(255)
        else:
            out.fill_(-1)
    return out


def _check(paths: Tensor, weights: Tensor) -> None:
    if paths.dim() < 2:
        raise ValueError(f"gated_combine: paths must be [P, *S, D], got shape {list(paths.shape)}")
    n_paths, inner = paths.shape[0], paths.shape[1:-1]
    if weights.dim() < 1 or weights.shape[-1] != n_paths:
        raise ValueError(
            f"gated_combine: weights must end with the path axis P={n_paths}, got shape {list(weights.shape)}"
        )
    lead = weights.shape[:-1]
    if len(lead) > len(inner) or any(w not in (1, s) for w, s in zip(lead, inner)):
        raise ValueError(
            f"gated_combine: weights {list(weights.shape)} do not broadcast from the left against paths "
            f"{list(paths.shape)} (need [*S', P] with *S' a prefix of {list(inner)}, dims may be 1)"
        )


def gated_combine_reference(paths: Tensor, weights: Tensor) -> Tensor:
    """Σ_p weights[..., p] * paths[p], written with plain broadcasting. Differentiable, any float dtype."""
    _check(paths, weights)
    n_inner = paths.dim() - 2  # len(*S)
    w = weights.movedim(-1, 0)  # [P, *S']
    w = w.reshape(*w.shape, *([1] * (n_inner - (w.dim() - 1))), 1)  # [P, *S', 1, ..., 1] against [P, *S, D]
    dtype = torch.promote_types(paths.dtype, weights.dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (w.to(acc) * paths.to(acc)).sum(0).to(dtype)


@triton.jit
def _combine_fwd_kernel(
    paths_ptr,  # [P, M, D] contiguous
    w_ptr,  # [M // ROWS_PER_W, P] contiguous
    y_ptr,  # [M, D] contiguous
    M,
    D,
    ROWS_PER_W,
    P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """y[m, d] = Σ_p w[m // ROWS_PER_W, p] * paths[p, m, d]; one program per [BLOCK_M, BLOCK_D] tile."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    row_ok = rows < M
    mask = row_ok[:, None] & (cols[None, :] < D)
    rows64 = rows.to(tl.int64)
    offs = rows64[:, None] * D + cols[None, :]  # [BM, BD]
    w_rows = rows64 // ROWS_PER_W
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for p in tl.static_range(P):
        w = tl.load(w_ptr + w_rows * P + p, mask=row_ok, other=0.0).to(tl.float32)  # [BM]
        x = tl.load(paths_ptr + p * M.to(tl.int64) * D + offs, mask=mask, other=0.0).to(tl.float32)
        acc += w[:, None] * x
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_bwd_kernel(
    paths_ptr,  # [P, M, D]
    w_ptr,  # [M // ROWS_PER_W, P]
    dy_ptr,  # [M, D]
    dpaths_ptr,  # [P, M, D]
    dw_rows_ptr,  # [M, P] fp32: Σ_d dy[m, d] * paths[p, m, d]
    M,
    D,
    ROWS_PER_W,
    P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per (row block, path p): dpaths[p] = w[:, p] * dy and the per-row dot for dweights."""
    p = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    base = p.to(tl.int64) * M * D
    w = tl.load(w_ptr + (rows64 // ROWS_PER_W) * P + p, mask=row_ok, other=0.0).to(tl.float32)  # [BM]
    dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols[None, :] < D)
        offs = rows64[:, None] * D + cols[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(paths_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dpaths_ptr + base + offs, (w[:, None] * dy).to(dpaths_ptr.dtype.element_ty), mask=mask)
        dot += tl.sum(dy * x, axis=1)
    tl.store(dw_rows_ptr + rows64 * P + p, dot, mask=row_ok)


def _kernel_weights(paths: Tensor, weights: Tensor) -> tuple[Tensor, int]:
    """Weights as a contiguous [R, P] table and how many consecutive rows of [M] share one table row."""
    inner = paths.shape[1:-1]
    lead = weights.shape[:-1]
    if all(w == s for w, s in zip(lead, inner)):
        return weights.reshape(-1, weights.shape[-1]).contiguous(), math.prod(inner[len(lead):])
    padded = weights.reshape(*lead, *([1] * (len(inner) - len(lead))), weights.shape[-1])
    return padded.expand(*inner, weights.shape[-1]).reshape(-1, weights.shape[-1]).contiguous(), 1


def _block_sizes(D: int) -> tuple[int, int]:
    block_d = min(triton.next_power_of_2(max(D, 1)), 256)
    return max(4096 // block_d, 1), block_d


def gated_combine_forward(paths: Tensor, weights: Tensor, *, out: Tensor | None = None) -> Tensor:
    """Launch the forward kernel. `out` (shape `[*S, D]`, contiguous) lets a test pass a poisoned buffer."""
    _check(paths, weights)
    P, D = paths.shape[0], paths.shape[-1]
    M = math.prod(paths.shape[1:-1])
    paths_c = paths.contiguous()
    w_table, rows_per_w = _kernel_weights(paths, weights)
    dtype = torch.promote_types(paths.dtype, weights.dtype)
    y = _empty(paths.shape[1:], dtype, paths.device) if out is None else out
    if M * D == 0:
        return y
    block_m, block_d = _block_sizes(D)
    grid = (triton.cdiv(M, block_m), triton.cdiv(D, block_d))
    _combine_fwd_kernel[grid](paths_c, w_table, y, M, D, rows_per_w, P=P, BLOCK_M=block_m, BLOCK_D=block_d)
    return y


def gated_combine_backward(
    paths: Tensor, weights: Tensor, dy: Tensor, *, dpaths_out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Launch the backward kernel: (dpaths [P, *S, D], dweights shaped like weights)."""
    P, D = paths.shape[0], paths.shape[-1]
    inner = paths.shape[1:-1]
    M = math.prod(inner)
    paths_c, dy_c = paths.contiguous(), dy.contiguous()
    w_table, rows_per_w = _kernel_weights(paths, weights)
    dpaths = _empty(paths.shape, paths.dtype, paths.device) if dpaths_out is None else dpaths_out
    dw_rows = _empty((M, P), torch.float32, paths.device)  # [M, P]
    if M * D > 0:
        block_m, block_d = _block_sizes(D)
        grid = (triton.cdiv(M, block_m), P)
        _combine_bwd_kernel[grid](
            paths_c, w_table, dy_c, dpaths, dw_rows, M, D, rows_per_w, P=P, BLOCK_M=block_m, BLOCK_D=block_d
        )
    else:
        dw_rows.zero_()
        dpaths.zero_()
    lead = weights.shape[:-1]
    full = dw_rows.reshape(*inner, P)  # [*S, P]
    # Sum over the dims of *S that *S' lacks (trailing) or broadcasts (size 1).
    dw = full.sum(dim=tuple(range(len(lead), len(inner)))) if len(lead) < len(inner) else full
    dw = dw.sum_to_size(weights.shape) if dw.shape != weights.shape else dw
    return dpaths, dw.to(weights.dtype)


@torch.library.custom_op("routec::gated_combine", mutates_args=())
def _gated_combine_op(paths: Tensor, weights: Tensor) -> Tensor:
    if use_triton(paths, weights):
        return gated_combine_forward(paths, weights)
    with torch.no_grad():
        return gated_combine_reference(paths, weights)


@_gated_combine_op.register_fake
def _(paths: Tensor, weights: Tensor) -> Tensor:
    _check(paths, weights)
    return paths.new_empty(paths.shape[1:], dtype=torch.promote_types(paths.dtype, weights.dtype))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy: Tensor):
    paths, weights = ctx.saved_tensors
    if use_triton(paths, weights, dy):
        return gated_combine_backward(paths, weights, dy)
    return reference_vjp(gated_combine_reference, (paths, weights), (dy,))


_gated_combine_op.register_autograd(_backward, setup_context=_setup_context)


def gated_combine(paths: Tensor, weights: Tensor) -> Tensor:
    """y = Σ_p weights[..., p] * paths[p]; paths [P, *S, D], weights [*S', P] (*S' a left prefix of *S,
    dims may be 1). Differentiable in both; Triton on CUDA, the reference elsewhere (see module doc)."""
    return torch.ops.routec.gated_combine(paths, weights)
