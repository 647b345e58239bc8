"""`linear_combine`: a path aggregator fused into the GEMM of the Linear layer that ends the last path.

    lin = x @ weight^T + bias                                   x: [*S, K]; weight: [N, K]; bias: [N] or None
    y   = Σ_{p < P-1} c_p * others[p] + c_{P-1} * lin           others: [P-1, *S, N] (the other paths)

with the coefficients c given by `mode`: "gate" reads them from `weights` [*S', P] (`*S'` broadcast from the
left against `*S` exactly as `gated_combine` does: [B, P] per sample, [B, L, P] per token, dims may be 1),
"sum" uses 1 and "mean" 1/P (the sum divided by P). The result is `[*S, N]` in the promoted dtype of the
inputs (fp32 accumulation, float64 in the reference). It equals `gated_combine(stack([*others, lin]), w)`
(or the stack's sum/mean) without writing `lin` to memory or stacking the paths.

Forward kernel: the rows of `*S` are flattened to M. One program per [BLOCK_M, BLOCK_N] output tile runs
the K loop of `tl.dot` (fp32 accumulator), adds the bias, and in the epilogue reads the P-1 other paths'
tiles and the tile's gate weights (row m reads weight row m // ROWS_PER_G of a [R, P] table, as in
combine.py) and writes y once, summing the paths in order p = 0 … P-1 as the unfused combine does.

Backward (torch ops on the saved inputs, the two GEMMs with torch.matmul — cuBLAS on a GPU, at the
inputs' precision with fp32 accumulation): with g = dy and c_last the last path's coefficient,
    u = dy @ weight                              [*S, K]
    dx = c_last * u,  dweight = (c_last * dy)^T x,  dbias = Σ_rows c_last * dy
    dothers[p] = c_p * dy,  dweights[..., p] = Σ_n dy * others[p]  (p < P-1)
    dweights[..., P-1] = Σ_k x * u + dy · bias   (= Σ_n dy * lin, without recomputing lin)
then dweights is summed over the dims `*S'` lacks or broadcasts. The reference backend differentiates the
reference by autograd (`reference_vjp`).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .backend import interpreting, reference_vjp, use_triton

__all__ = ["linear_combine", "linear_combine_reference", "linear_combine_forward", "linear_combine_backward",
           "MODES"]

MODES = ("sum", "mean", "gate")
_MODE_CODE = {"gate": 0, "sum": 1, "mean": 2}


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor], others: Tensor, weights: Optional[Tensor],
           mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"linear_combine: mode must be one of {', '.join(MODES)}, got {mode!r}")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_combine: x [*S, K] and weight [N, K] must agree on K, got x "
                         f"{list(x.shape)} and weight {list(weight.shape)}")
    n_out = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (n_out,):
        raise ValueError(f"linear_combine: bias must be [{n_out}], got {list(bias.shape)}")
    inner = tuple(x.shape[:-1])
    if others.dim() != len(inner) + 2 or tuple(others.shape[1:]) != inner + (n_out,):
        raise ValueError(f"linear_combine: others must be [P-1, *S, N] = [P-1, {', '.join(map(str, inner + (n_out,)))}]"
                         f", got {list(others.shape)}")
    n_paths = others.shape[0] + 1
    if (mode == "gate") != (weights is not None):
        raise ValueError("linear_combine: mode 'gate' needs weights; 'sum' and 'mean' take none")
    if weights is not None:
        lead = weights.shape[:-1]
        if weights.dim() < 1 or weights.shape[-1] != n_paths:
            raise ValueError(f"linear_combine: weights must end with the path axis P={n_paths}, got "
                             f"{list(weights.shape)}")
        if len(lead) > len(inner) or any(w not in (1, s) for w, s in zip(lead, inner)):
            raise ValueError(f"linear_combine: weights {list(weights.shape)} do not broadcast from the left "
                             f"against the paths' [*S] = {list(inner)}")


def _result_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype  # type: ignore[union-attr]
    for t in tensors[1:]:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def linear_combine_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], others: Tensor,
                             weights: Optional[Tensor] = None, *, mode: str = "gate") -> Tensor:
    """The last path's Linear, stacked under the other paths, then summed, averaged or weighted by `weights`.
    Plain PyTorch, differentiable, any float dtype (accumulates in fp32, or float64)."""
    _check(x, weight, bias, others, weights, mode)
    dtype = _result_dtype(x, weight, bias, others, weights)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    last = F.linear(x.to(acc), weight.to(acc), None if bias is None else bias.to(acc))  # [*S, N]
    paths = torch.cat([others.to(acc), last.unsqueeze(0)], 0)  # [P, *S, N]
    if mode == "sum":
        return paths.sum(0).to(dtype)
    if mode == "mean":
        return paths.mean(0).to(dtype)
    assert weights is not None
    w = weights.to(acc).movedim(-1, 0)  # [P, *S']
    w = w.reshape(*w.shape, *([1] * (paths.dim() - w.dim())))  # [P, *S', 1, …, 1] against [P, *S, N]
    return (w * paths).sum(0).to(dtype)


# ------------------------------------------------------------------------------------------------ kernel


@triton.jit(do_not_specialize=["M"])  # M = 1 stays a runtime scalar (M.to below), and row counts vary
def _linear_combine_fwd_kernel(
    x_ptr,  # [M, K] contiguous
    w_ptr,  # [N, K] contiguous (the Linear's weight)
    b_ptr,  # [N] (read only when HAS_BIAS)
    others_ptr,  # [Q, M, N] contiguous, Q = P - 1
    g_ptr,  # [M // ROWS_PER_G, P] gate weights (read only when MODE == 0)
    y_ptr,  # [M, N]
    M,
    N,
    K,
    ROWS_PER_G,
    Q: tl.constexpr,
    MODE: tl.constexpr,  # 0 gate, 1 sum, 2 mean
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y[m, n] = Σ_{p<Q} c[m, p] * others[p, m, n] + c[m, Q] * (Σ_k x[m, k] * w[n, k] + b[n]);
    one program per [BLOCK_M, BLOCK_N] tile of y, K loop of tl.dot, the combine in the epilogue."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_K >= 16, "tl.dot tiles must be >= 16")
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_ok = rows < M
    col_ok = cols < N
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # [BK]
        k_ok = ks < K
        a = tl.load(x_ptr + rows64[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols64[None, :] * K + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter computes 16-bit floats wrongly; on a GPU they go to the tensor cores
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)  # [BM, BN]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows64[:, None] * N + cols64[None, :]  # [BM, BN]
    g_rows = (rows64 // ROWS_PER_G) * (Q + 1)
    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p in tl.static_range(Q):
        other = tl.load(others_ptr + p * M.to(tl.int64) * N + offs, mask=mask, other=0.0).to(tl.float32)
        if MODE == 0:
            c = tl.load(g_ptr + g_rows + p, mask=row_ok, other=0.0).to(tl.float32)  # [BM]
            y += c[:, None] * other
        else:
            y += other
    if MODE == 0:
        c_last = tl.load(g_ptr + g_rows + Q, mask=row_ok, other=0.0).to(tl.float32)  # [BM]
        y += c_last[:, None] * acc
    else:
        y += acc
    if MODE == 2:
        y = y / (Q + 1)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _empty(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The output buffer; NaN-filled first when ROUTEC_POISON=1 (tests), so a missed element shows."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("ROUTEC_POISON", "") == "1":
        out.fill_(float("nan"))
    return out


def _gate_table(inner: tuple, weights: Tensor) -> tuple[Tensor, int]:
    """Gate weights as a contiguous [R, P] table and how many consecutive rows of [M] share one table row."""
    lead = tuple(weights.shape[:-1])
    n_paths = weights.shape[-1]
    if all(w == s for w, s in zip(lead, inner)):
        return weights.reshape(-1, n_paths).contiguous(), math.prod(inner[len(lead):])
    padded = weights.reshape(*lead, *([1] * (len(inner) - len(lead))), n_paths)
    return padded.expand(*inner, n_paths).reshape(-1, n_paths).contiguous(), 1


def _tiles(dtype: torch.dtype, M: int, N: int, K: int) -> tuple[int, int, int]:
    def fit(n: int, cap: int) -> int:
        return max(16, min(cap, triton.next_power_of_2(max(n, 1))))

    if interpreting():  # ~1.4 ms per program: few, large tiles
        return fit(M, 64), fit(N, 64), fit(K, 64)
    if dtype == torch.float32:
        return fit(M, 64), fit(N, 64), fit(K, 32)
    return fit(M, 128), fit(N, 128), fit(K, 64)


def linear_combine_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], others: Tensor,
                           weights: Optional[Tensor] = None, *, mode: str = "gate", out: Optional[Tensor] = None,
                           blocks: Optional[tuple[int, int, int]] = None) -> Tensor:
    """Launch the forward kernel. `out` ([*S, N], contiguous) lets a test pass a poisoned buffer; `blocks`
    (BLOCK_M, BLOCK_N, BLOCK_K) overrides the tile sizes."""
    _check(x, weight, bias, others, weights, mode)
    inner = tuple(x.shape[:-1])
    N, K = weight.shape
    M = math.prod(inner)
    Q = others.shape[0]
    dtype = _result_dtype(x, weight, bias, others, weights)
    y = _empty(inner + (N,), dtype, x.device) if out is None else out
    if M * N == 0:
        return y
    x2 = x.reshape(M, K).contiguous()  # [M, K]
    w = weight.contiguous()  # [N, K]
    if w.dtype != x2.dtype:  # tl.dot needs one operand dtype
        common = torch.promote_types(x2.dtype, w.dtype)
        x2, w = x2.to(common), w.to(common)
    others_c = others.contiguous() if Q > 0 else y  # [Q, M, N]; a valid pointer when there are none
    if weights is not None:
        table, rows_per_g = _gate_table(inner, weights)
    else:
        table, rows_per_g = x2, 1
    block_m, block_n, block_k = blocks or _tiles(x2.dtype, M, N, K)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    warps = 8 if block_m * block_n >= 128 * 128 and not interpreting() else 4
    _linear_combine_fwd_kernel[grid](
        x2, w, bias if bias is not None else w, others_c, table, y, M, N, K, rows_per_g,
        Q=Q, MODE=_MODE_CODE[mode], HAS_BIAS=bias is not None, UPCAST=interpreting(),
        PRECISION="ieee" if x2.dtype == torch.float32 else None,  # fp32: exact, not TF32
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
    )
    return y


def linear_combine_backward(x: Tensor, weight: Tensor, bias: Optional[Tensor], others: Tensor,
                            weights: Optional[Tensor], mode: str, dy: Tensor) -> tuple:
    """(dx, dweight, dbias or None, dothers, dweights or None) from the saved inputs (see module doc)."""
    inner = tuple(x.shape[:-1])
    N, K = weight.shape
    Q = others.shape[0]
    acc = torch.float64 if dy.dtype == torch.float64 or x.dtype == torch.float64 else torch.float32
    mm = torch.promote_types(x.dtype, weight.dtype)  # the GEMMs run at the inputs' precision
    dyf = dy.to(acc)  # [*S, N]
    if mode == "gate":
        assert weights is not None
        lead = weights.shape[:-1]
        coef = weights.to(acc).reshape(*lead, *([1] * (len(inner) - len(lead))), Q + 1)
        coef = coef.expand(*inner, Q + 1)  # [*S, P]
        c_last: Tensor | float = coef[..., Q:]  # [*S, 1]
        c_others: Tensor | float = coef[..., :Q].movedim(-1, 0).unsqueeze(-1)  # [Q, *S, 1]
    else:
        c_last = c_others = 1.0 if mode == "sum" else 1.0 / (Q + 1)
    g = dyf * c_last  # [*S, N]: the gradient reaching the Linear's output
    g2 = g.reshape(-1, N)  # [M, N]
    x2 = x.reshape(-1, K)  # [M, K]
    u = torch.matmul(dy.reshape(-1, N).to(mm), weight.to(mm)).to(acc).reshape(*inner, K)  # dy @ W: [*S, K]
    dx = (u * c_last).to(x.dtype)
    dweight = torch.matmul(g2.t().to(mm), x2.to(mm)).to(weight.dtype)  # [N, K]
    dbias = g2.sum(0).to(bias.dtype) if bias is not None else None
    dothers = (c_others * dyf.unsqueeze(0)).to(others.dtype).expand(others.shape).contiguous()  # [Q, *S, N]
    dweights = None
    if weights is not None:
        d_o = torch.einsum("qmn,mn->mq", others.reshape(Q, -1, N).to(acc), dyf.reshape(-1, N))  # [M, Q]
        d_l = (x2.to(acc) * u.reshape(-1, K)).sum(-1)  # [M]: Σ_k x * (dy @ W) = Σ_n dy * (x @ W^T)
        if bias is not None:
            d_l = d_l + dyf.reshape(-1, N) @ bias.to(acc)
        full = torch.cat([d_o, d_l.unsqueeze(-1)], -1).reshape(*inner, Q + 1)  # [*S, P]
        lead = weights.shape[:-1]
        dw = full.sum(dim=tuple(range(len(lead), len(inner)))) if len(lead) < len(inner) else full
        dweights = (dw.sum_to_size(weights.shape) if dw.shape != weights.shape else dw).to(weights.dtype)
    return dx, dweight, dbias, dothers, dweights


# ------------------------------------------------------------------------------------------------ custom op


@torch.library.custom_op("routec::linear_combine", mutates_args=())
def _linear_combine_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], others: Tensor,
                       weights: Optional[Tensor], mode: str) -> Tensor:
    if use_triton(x, weight, bias, others, weights) and _result_dtype(x, weight, bias, others, weights) \
            != torch.float64:
        return linear_combine_forward(x, weight, bias, others, weights, mode=mode)
    with torch.no_grad():
        return linear_combine_reference(x, weight, bias, others, weights, mode=mode)


@_linear_combine_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor], others: Tensor, weights: Optional[Tensor],
      mode: str) -> Tensor:
    _check(x, weight, bias, others, weights, mode)
    dtype = _result_dtype(x, weight, bias, others, weights)
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=dtype)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, others, weights, mode = inputs
    ctx.save_for_backward(x, weight, bias, others, weights)
    ctx.mode = mode


def _backward(ctx, dy: Tensor):
    x, weight, bias, others, weights = ctx.saved_tensors
    if use_triton(x, weight, bias, others, weights, dy) and dy.dtype != torch.float64:
        grads = linear_combine_backward(x, weight, bias, others, weights, ctx.mode, dy)
    else:
        def ref(x_, w_, b_, o_, g_):
            return linear_combine_reference(x_, w_, b_, o_, g_, mode=ctx.mode)

        grads = reference_vjp(ref, (x, weight, bias, others, weights), (dy,))
    return (*grads, None)


_linear_combine_op.register_autograd(_backward, setup_context=_setup_context)


def linear_combine(x: Tensor, weight: Tensor, bias: Optional[Tensor], others: Tensor,
                   weights: Optional[Tensor] = None, *, mode: str = "gate") -> Tensor:
    """Σ_{p<P-1} c_p * others[p] + c_{P-1} * (x @ weight^T + bias): the aggregator of `paths` fused into the
    Linear that ends the last path. x [*S, K], weight [N, K], bias [N] or None, others [P-1, *S, N] (the
    other paths, stacked), weights [*S', P] for mode="gate" (broadcast from the left, as gated_combine),
    None for "sum" (c = 1) and "mean" (c = 1/P). Returns [*S, N]; differentiable in every tensor."""
    return torch.ops.routec.linear_combine(x, weight, bias, others, weights, mode)
