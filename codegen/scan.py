"""Linear and selective (Mamba S6) scans: references, Triton kernels, launchers and the `routec::` ops.

`linear_scan` runs the first-order diagonal recurrence h[t] = a[t] * h[t-1] + b[t] over axis 1 of
[B, L, D] tensors; `selective_scan` is Mamba's S6 scan with the discretisation, softplus, D skip and
silu(z) gate fused in. Both kernels walk the sequence in chunks: inside a chunk `tl.associative_scan`
runs along time with the affine-map combine below, and the state between chunks is carried in registers,
so the state never touches memory (the selective scan writes only one state per chunk, for its backward).

Layout is channels-last ([B, L, D], D contiguous): a tile [CHUNK, BLOCK_D] is CHUNK rows of BLOCK_D
consecutive channels, read coalesced along D. Reverse scans use index arithmetic (row i of chunk c is time
L-1-(c*CHUNK+i)), so one kernel serves both directions. Rows past the end of the sequence get the identity
map (coefficient 1, input 0) and so carry the state through unchanged.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .backend import interpreting, reference_vjp, use_triton

LOG2E = math.log2(math.e)


def linear_scan_reference(a: Tensor, b: Tensor, h0: Optional[Tensor] = None, *, reverse: bool = False) -> Tensor:
    """h[t] = a[t] * h[t-1] + b[t] with h[-1] = h0 (or 0), a loop over time; reverse runs t = L-1 ... 0."""
    bsz, length, dim = b.shape
    h = torch.zeros(bsz, dim, dtype=b.dtype, device=b.device) if h0 is None else h0.to(b.dtype)
    steps = range(length - 1, -1, -1) if reverse else range(length)
    out = [None] * length
    for t in steps:
        h = a[:, t] * h + b[:, t]  # [B, D]
        out[t] = h
    return torch.stack(out, dim=1) if length else b.clone()


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    *,
    delta_softplus: bool = False,
    reverse: bool = False,
) -> Tensor:
    """Mamba S6 as a loop over time: the state h [Bt, D, N] is updated once per step (DESIGN §5)."""
    bsz, length, dim = u.shape
    dt = delta if delta_bias is None else delta + delta_bias
    if delta_softplus:
        dt = F.softplus(dt)
    h = u.new_zeros(bsz, dim, A.shape[1])  # [Bt, D, N]
    steps = range(length - 1, -1, -1) if reverse else range(length)
    ys = [None] * length
    for t in steps:
        dA = torch.exp(dt[:, t, :, None] * A)  # [Bt, D, N]
        dBu = dt[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]
        h = dA * h + dBu
        ys[t] = (h * C[:, t, None, :]).sum(-1)  # [Bt, D]
    y = torch.stack(ys, dim=1) if length else torch.zeros_like(u)
    if D is not None:
        y = y + D * u
    if z is not None:
        y = y * F.silu(z)
    return y


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # Composition of the maps x -> a1*x + b1 (earlier) then x -> a2*x + b2 (later). With reverse=True
    # tl.associative_scan passes the later accumulated map first, which gives g[t] = b[t] + a[t]*g[t+1].
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _linear_scan_kernel(
    A, X, H0, Y,  # forward: a, b, h0, h.  backward: a, dh, h0, g (= db)
    HS, DA, DH0,  # backward only: the forward output h, da, dh0
    L, D,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
    REVERSE: tl.constexpr, HAS_H0: tl.constexpr, BACKWARD: tl.constexpr,
):
    """One program per (batch row, block of BLOCK_D channels) walks the whole sequence chunk by chunk.

    Forward: y[t] = a[t] * y[prev] + x[t], scanning time backwards when REVERSE.
    Backward (BACKWARD, run in the opposite direction of the forward): the adjoint g[t] = dh[t] +
    a[t'] * g[t'] where t' is the previous step in this kernel's order (the next one of the forward), so
    the coefficient is a loaded one row shifted; g is db, da[t] = g[t] * h[t"] with t" the forward's
    previous step (h0 before the first), and dh0 = a[first] * g[first].
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    if REVERSE:
        STEP: tl.constexpr = -1
    else:
        STEP: tl.constexpr = 1
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    col_ok = cols < D
    rows = tl.arange(0, CHUNK)  # [CHUNK]
    base = pid_b * L * D
    h0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_H0:
        h0 = tl.load(H0 + pid_b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    carry = tl.zeros([BLOCK_D], dtype=tl.float32)
    if not BACKWARD:
        carry = h0
    for c in range(0, tl.cdiv(L, CHUNK)):
        if REVERSE:
            t = L - 1 - (c * CHUNK + rows)
        else:
            t = c * CHUNK + rows
        t_ok = (t >= 0) & (t < L)
        mask = t_ok[:, None] & col_ok[None, :]  # [CHUNK, BLOCK_D]
        offs = base + t.to(tl.int64)[:, None] * D + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            tp = t - STEP
            p_mask = ((tp >= 0) & (tp < L))[:, None] & col_ok[None, :]
            coef = tl.load(A + base + tp.to(tl.int64)[:, None] * D + cols[None, :], mask=p_mask, other=0.0)
        else:
            coef = tl.load(A + offs, mask=mask, other=0.0)
        coef = tl.where(mask, coef.to(tl.float32), 1.0)
        acum, hloc = tl.associative_scan((coef, x), 0, _affine_combine)
        h = hloc + acum * carry[None, :]  # [CHUNK, BLOCK_D]
        tl.store(Y + offs, h.to(Y.dtype.element_ty), mask=mask)
        if BACKWARD:
            tq = t + STEP
            q_ok = (tq >= 0) & (tq < L)
            hprev = tl.load(HS + base + tq.to(tl.int64)[:, None] * D + cols[None, :],
                            mask=q_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            hprev = tl.where(q_ok[:, None], hprev, h0[None, :])
            tl.store(DA + offs, (h * hprev).to(DA.dtype.element_ty), mask=mask)
        carry = tl.sum(tl.where(rows[:, None] == CHUNK - 1, h, 0.0), axis=0)
    if BACKWARD and HAS_H0:
        t_first = (L - 1) * (1 - REVERSE)  # the forward's first step: 0, or L-1 for a reverse scan
        a_first = tl.load(A + base + t_first * D + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(DH0 + pid_b * D + cols, (a_first * carry).to(DH0.dtype.element_ty), mask=col_ok)


def _poison() -> bool:
    """Tests set ROUTEC_POISON=1 so that launchers fill their outputs with NaN before the kernel runs."""
    import os

    return os.environ.get("ROUTEC_POISON", "") == "1"


def _new(like: Tensor, shape=None, dtype=None) -> Tensor:
    shape = like.shape if shape is None else shape
    dtype = like.dtype if dtype is None else dtype
    if _poison():
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _linear_config(length: int, dim: int) -> tuple[int, int, int]:
    """(CHUNK, BLOCK_D, num_warps). The interpreter wants few programs; a GPU wants many in flight."""
    if interpreting():
        return 16, min(32, triton.next_power_of_2(dim)), 4
    return 64, min(32, triton.next_power_of_2(dim)), 4


def linear_scan_forward(a: Tensor, b: Tensor, h0: Optional[Tensor], reverse: bool,
                        chunk: Optional[int] = None, block_d: Optional[int] = None) -> Tensor:
    """Launch the forward kernel: a, b [B, L, D] contiguous, h0 [B, D] or None -> h [B, L, D]."""
    a, b = a.contiguous(), b.contiguous()
    h0 = None if h0 is None else h0.contiguous()
    bsz, length, dim = b.shape
    c0, bd0, warps = _linear_config(length, dim)
    chunk, block_d = chunk or c0, block_d or bd0
    h = _new(b)
    if h.numel():
        grid = (bsz, triton.cdiv(dim, block_d))
        _linear_scan_kernel[grid](
            a, b, h0 if h0 is not None else b, h, h, h, h, length, dim,
            CHUNK=chunk, BLOCK_D=block_d, REVERSE=reverse, HAS_H0=h0 is not None, BACKWARD=False,
            num_warps=warps,
        )
    return h


def linear_scan_backward(a: Tensor, h0: Optional[Tensor], h: Tensor, dh: Tensor, reverse: bool,
                         chunk: Optional[int] = None, block_d: Optional[int] = None):
    """Launch the backward kernel: a reverse-direction scan of dh plus da and dh0 -> (da, db, dh0)."""
    a, h, dh = a.contiguous(), h.contiguous(), dh.contiguous()
    h0 = None if h0 is None else h0.contiguous()
    bsz, length, dim = h.shape
    c0, bd0, warps = _linear_config(length, dim)
    chunk, block_d = chunk or c0, block_d or bd0
    db = _new(h)
    da = _new(a)
    dh0 = None if h0 is None else _new(h0)
    if length == 0:
        return da, db, None if h0 is None else torch.zeros_like(h0)
    grid = (bsz, triton.cdiv(dim, block_d))
    _linear_scan_kernel[grid](
        a, dh, h0 if h0 is not None else a, db, h, da, dh0 if dh0 is not None else da, length, dim,
        CHUNK=chunk, BLOCK_D=block_d, REVERSE=not reverse, HAS_H0=h0 is not None, BACKWARD=True,
        num_warps=warps,
    )
    return da, db, dh0


@torch.library.custom_op("routec::linear_scan", mutates_args=())
def _linear_scan_op(a: Tensor, b: Tensor, h0: Optional[Tensor], reverse: bool) -> Tensor:
    if use_triton(a, b, h0):
        return linear_scan_forward(a, b, h0, reverse)
    with torch.no_grad():
        return linear_scan_reference(a, b, h0, reverse=reverse)


@_linear_scan_op.register_fake
def _(a, b, h0, reverse):
    return torch.empty_like(b)


def _linear_scan_setup(ctx, inputs, output):
    a, b, h0, reverse = inputs
    ctx.save_for_backward(a, b, h0, output)
    ctx.reverse = reverse


def _linear_scan_bwd(ctx, dh):
    a, b, h0, h = ctx.saved_tensors
    if use_triton(a, b, h0):
        da, db, dh0 = linear_scan_backward(a, h0, h, dh, ctx.reverse)
    else:
        def ref(a_, b_, h0_):
            return linear_scan_reference(a_, b_, h0_, reverse=ctx.reverse)

        da, db, dh0 = reference_vjp(ref, (a, b, h0), (dh,))
    return da, db, dh0, None


_linear_scan_op.register_autograd(_linear_scan_bwd, setup_context=_linear_scan_setup)


def linear_scan(a: Tensor, b: Tensor, h0: Optional[Tensor] = None, *, reverse: bool = False) -> Tensor:
    """h[t] = a[t] * h[t-1] + b[t] over axis 1 (h[-1] = h0 or 0); reverse runs t = L-1 ... 0.

    a, b: [B, L, D] of one dtype (fp32 or bf16; fp32 accumulation); h0: [B, D]. Returns h [B, L, D].
    """
    if a.dim() != 3 or a.shape != b.shape:
        raise ValueError(f"linear_scan: a and b must both be [B, L, D], got {list(a.shape)} and {list(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"linear_scan: a and b must have one dtype, got {a.dtype} and {b.dtype}")
    if h0 is not None and h0.shape != (b.shape[0], b.shape[2]):
        raise ValueError(f"linear_scan: h0 must be [B, D] = {[b.shape[0], b.shape[2]]}, got {list(h0.shape)}")
    return torch.ops.routec.linear_scan(a, b, h0, reverse)
