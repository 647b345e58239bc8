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

import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .backend import interpreting, reference_vjp, use_triton

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
    return os.environ.get("ROUTEC_POISON", "") == "1"


def _new(like: Tensor, shape=None, dtype=None) -> Tensor:
    shape = like.shape if shape is None else shape
    dtype = like.dtype if dtype is None else dtype
    if _poison():
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _linear_config(dim: int, elem_size: int) -> tuple[int, int, int]:
    """(CHUNK, BLOCK_D, num_warps). The interpreter wants few programs; a GPU wants many in flight.

    Measured on an H100 at B8 L4096 D2048 (fp32: 96% of copy bandwidth with 64 x 64 tiles; bf16 is
    bound by the in-chunk scan, not by memory, and does best with narrower 64 x 16 tiles and 2 warps).
    """
    if interpreting():
        return 16, min(32, triton.next_power_of_2(dim)), 4
    if elem_size < 4:
        return 64, min(16, triton.next_power_of_2(dim)), 2
    return 64, min(64, triton.next_power_of_2(dim)), 4


def linear_scan_forward(a: Tensor, b: Tensor, h0: Optional[Tensor], reverse: bool,
                        chunk: Optional[int] = None, block_d: Optional[int] = None) -> Tensor:
    """Launch the forward kernel: a, b [B, L, D] contiguous, h0 [B, D] or None -> h [B, L, D]."""
    a, b = a.contiguous(), b.contiguous()
    h0 = None if h0 is None else h0.contiguous()
    bsz, length, dim = b.shape
    c0, bd0, warps = _linear_config(dim, b.element_size())
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
    c0, bd0, warps = _linear_config(dim, h.element_size())
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


@torch.library.custom_op("routec::linear_scan_backward", mutates_args=())
def _linear_scan_backward_op(
    a: Tensor, h0: Optional[Tensor], h: Tensor, dh: Tensor, reverse: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The Triton backward as an op of its own, so that compiled backward graphs can trace it; dh0 is an
    empty tensor when there is no h0."""
    da, db, dh0 = linear_scan_backward(a, h0, h, dh, reverse)
    return da, db, dh0 if dh0 is not None else a.new_empty(0)


@_linear_scan_backward_op.register_fake
def _(a, h0, h, dh, reverse):
    return torch.empty_like(a), torch.empty_like(h), torch.empty_like(h0) if h0 is not None else a.new_empty(0)


def _linear_scan_bwd(ctx, dh):
    a, b, h0, h = ctx.saved_tensors
    if use_triton(a, b, h0):
        da, db, dh0 = torch.ops.routec.linear_scan_backward(a, h0, h, dh, ctx.reverse)
        dh0 = dh0 if h0 is not None else None
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


@triton.jit
def _softplus(x):
    # torch's softplus with threshold 20: x itself above it, where exp(x) would only add rounding error.
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _selective_chunk(
    U, DELTA, Bm, Cm, t, t_ok, d, d_ok, n, n_ok, A2, bias, pid_b, L, D, N,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    """Load one chunk of inputs and discretise it: dt [TC, BD], dA = exp2(dt*A*log2e) and dt*B*u [TC, BD, BN]."""
    mask = t_ok[:, None] & d_ok[None, :]  # [TC, BD]
    offs = pid_b * L * D + t.to(tl.int64)[:, None] * D + d[None, :]
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    raw = tl.load(DELTA + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[None, :]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    dt = tl.where(mask, dt, 0.0)  # padding rows: dA = 1, dBu = 0, the state passes through
    bn_mask = t_ok[:, None] & n_ok[None, :]  # [TC, BN]
    bn_offs = pid_b * L * N + t.to(tl.int64)[:, None] * N + n[None, :]
    Bt = tl.load(Bm + bn_offs, mask=bn_mask, other=0.0).to(tl.float32)
    Ct = tl.load(Cm + bn_offs, mask=bn_mask, other=0.0).to(tl.float32)
    dA = tl.exp2(dt[:, :, None] * A2[None, :, :])  # [TC, BD, BN]
    dBu = (dt * u)[:, :, None] * Bt[:, None, :]  # [TC, BD, BN]
    return u, raw, dt, Bt, Ct, dA, dBu, offs, mask


@triton.jit
def _selective_fwd_kernel(
    U, DELTA, A, Bm, Cm, Dskip, Z, DBIAS, Y, CKPT,
    L, D, N,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr,
):
    """Selective scan forward; one program per (batch row, block of BLOCK_D channels), all N states.

    The state h [BLOCK_D, N] stays in registers across the sequence; each chunk of CHUNK steps is scanned
    with a 3-D `tl.associative_scan` over [CHUNK, BLOCK_D, N] and its outputs y = <h, C> + D*u, times
    silu(z), are written at once. The state entering chunk c is stored in CKPT[b, c] for the backward.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    d_ok = d < D
    n = tl.arange(0, BLOCK_N)  # [BN]
    n_ok = n < N
    dn_mask = d_ok[:, None] & n_ok[None, :]  # [BD, BN]
    A2 = tl.load(A + d[:, None] * N + n[None, :], mask=dn_mask, other=0.0).to(tl.float32) * 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(DBIAS + d, mask=d_ok, other=0.0).to(tl.float32)
    dskip = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        dskip = tl.load(Dskip + d, mask=d_ok, other=0.0).to(tl.float32)
    rows = tl.arange(0, CHUNK)
    n_chunks = tl.cdiv(L, CHUNK)
    ck_offs = d[:, None] * N + n[None, :]  # [BD, BN]
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    for c in range(0, n_chunks):
        tl.store(CKPT + (pid_b * n_chunks + c) * D * N + ck_offs, h, mask=dn_mask)
        if REVERSE:
            t = L - 1 - (c * CHUNK + rows)
        else:
            t = c * CHUNK + rows
        t_ok = (t >= 0) & (t < L)
        u, raw, dt, Bt, Ct, dA, dBu, offs, mask = _selective_chunk(
            U, DELTA, Bm, Cm, t, t_ok, d, d_ok, n, n_ok, A2, bias, pid_b, L, D, N, HAS_BIAS, SOFTPLUS)
        acum, hloc = tl.associative_scan((dA, dBu), 0, _affine_combine)
        hs = hloc + acum * h[None, :, :]  # [TC, BD, BN]
        y = tl.sum(hs * Ct[:, None, :], axis=2)  # [TC, BD]
        if HAS_D:
            y += dskip[None, :] * u
        if HAS_Z:
            zz = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
            y = y * zz * _sigmoid(zz)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        h = tl.sum(tl.where(rows[:, None, None] == CHUNK - 1, hs, 0.0), axis=0)


@triton.jit
def _selective_bwd_kernel(
    U, DELTA, A, Bm, Cm, Dskip, Z, DBIAS, DY, CKPT,
    DU, DDELTA, DZ, DB_PART, DC_PART, DA_PART, DD_PART, DBIAS_PART,
    L, D, N,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr,
):
    """Selective scan backward by recomputation, chunks visited last to first; same grid as the forward.

    Per chunk: the states h [TC, BD, N] are recomputed from the checkpoint, the adjoint
    g[t] = dy'[t] C[t] + dA[t+1] g[t+1] is a reverse `tl.associative_scan` (dA[t+1] from a one-row-shifted
    load, with the adjoint of the next chunk carried in registers), and g * (h - dBu) = (dL/d dA) * dA gives
    the dt and A gradients without ever forming h[t-1]. du, ddelta, dz are written directly; dB, dC (summed
    over channels) go to per-channel-block partials [B, nDB, L, N], dA, dD, dbias to per-batch partials.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    n_db = tl.num_programs(1)
    if REVERSE:
        STEP: tl.constexpr = -1
    else:
        STEP: tl.constexpr = 1
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    d_ok = d < D
    n = tl.arange(0, BLOCK_N)  # [BN]
    n_ok = n < N
    dn_mask = d_ok[:, None] & n_ok[None, :]
    A1 = tl.load(A + d[:, None] * N + n[None, :], mask=dn_mask, other=0.0).to(tl.float32)  # [BD, BN]
    A2 = A1 * 1.4426950408889634
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(DBIAS + d, mask=d_ok, other=0.0).to(tl.float32)
    dskip = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        dskip = tl.load(Dskip + d, mask=d_ok, other=0.0).to(tl.float32)
    rows = tl.arange(0, CHUNK)
    n_chunks = tl.cdiv(L, CHUNK)
    ck_offs = d[:, None] * N + n[None, :]
    g_carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)  # adjoint at the first step of the next chunk
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        h0 = tl.load(CKPT + (pid_b * n_chunks + c) * D * N + ck_offs, mask=dn_mask, other=0.0)
        if REVERSE:
            t = L - 1 - (c * CHUNK + rows)
        else:
            t = c * CHUNK + rows
        t_ok = (t >= 0) & (t < L)
        u, raw, dt, Bt, Ct, dA, dBu, offs, mask = _selective_chunk(
            U, DELTA, Bm, Cm, t, t_ok, d, d_ok, n, n_ok, A2, bias, pid_b, L, D, N, HAS_BIAS, SOFTPLUS)
        acum, hloc = tl.associative_scan((dA, dBu), 0, _affine_combine)
        hs = hloc + acum * h0[None, :, :]  # [TC, BD, BN]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        dyp = dy
        if HAS_Z:
            zz = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
            sig = _sigmoid(zz)
            y_pre = tl.sum(hs * Ct[:, None, :], axis=2)
            if HAS_D:
                y_pre += dskip[None, :] * u
            tl.store(DZ + offs, (dy * y_pre * sig * (1.0 + zz * (1.0 - sig))).to(DZ.dtype.element_ty), mask=mask)
            dyp = dy * zz * sig
        # dA of the next step in scan order, aligned with this row; beyond the sequence end dt = 0.
        tn = t + STEP
        tn_ok = (tn >= 0) & (tn < L)
        n_offs = pid_b * L * D + tn.to(tl.int64)[:, None] * D + d[None, :]
        n_mask = tn_ok[:, None] & d_ok[None, :]
        raw_n = tl.load(DELTA + n_offs, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            raw_n = raw_n + bias[None, :]
        dt_n = raw_n
        if SOFTPLUS:
            dt_n = _softplus(raw_n)
        dt_n = tl.where(n_mask, dt_n, 0.0)
        dA_n = tl.exp2(dt_n[:, :, None] * A2[None, :, :])  # [TC, BD, BN]
        cg = dyp[:, :, None] * Ct[:, None, :]
        acum_r, gloc = tl.associative_scan((dA_n, cg), 0, _affine_combine, reverse=True)
        g = gloc + acum_r * g_carry[None, :, :]  # dL/dh[t], [TC, BD, BN]
        q = g * (hs - dBu)  # (dL/d dA) * dA
        gB = tl.sum(g * Bt[:, None, :], axis=2)  # [TC, BD]
        ddt = tl.sum(q * A1[None, :, :], axis=2) + gB * u
        du = gB * dt + dyp * dskip[None, :]
        ddl = ddt
        if SOFTPLUS:
            ddl = ddt * _sigmoid(raw)
        ddl = tl.where(mask, ddl, 0.0)
        tl.store(DU + offs, du.to(DU.dtype.element_ty), mask=mask)
        tl.store(DDELTA + offs, ddl.to(DDELTA.dtype.element_ty), mask=mask)
        part = ((pid_b * n_db + pid_d) * L + t.to(tl.int64))[:, None] * N + n[None, :]  # [TC, BN]
        bn_mask = t_ok[:, None] & n_ok[None, :]
        tl.store(DB_PART + part, tl.sum(g * (dt * u)[:, :, None], axis=1), mask=bn_mask)
        tl.store(DC_PART + part, tl.sum(hs * dyp[:, :, None], axis=1), mask=bn_mask)
        dA_acc += tl.sum(q * dt[:, :, None], axis=0)
        dD_acc += tl.sum(dyp * u, axis=0)
        dbias_acc += tl.sum(ddl, axis=0)
        g_carry = tl.sum(tl.where(rows[:, None, None] == 0, g, 0.0), axis=0)
    tl.store(DA_PART + pid_b * D * N + ck_offs, dA_acc, mask=dn_mask)
    tl.store(DD_PART + pid_b * D + d, dD_acc, mask=d_ok)
    tl.store(DBIAS_PART + pid_b * D + d, dbias_acc, mask=d_ok)


def _selective_chunk_size(device: torch.device) -> int:
    """CHUNK of the selective kernels; it fixes the checkpoint shape, so it depends on the device only."""
    return 8 if device.type != "cuda" else 16


def _selective_config(dim: int, n_state: int, backward: bool) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for the selective kernels.

    H100 sweep at B4 L2048 D1536 N16 with CHUNK 16: forward 16 x 8 x N tiles on 2 warps (0.33 ms), backward
    16 x 4 x N on 1 warp (1.75 ms); wider tiles or CHUNK 32 spill registers in the backward (up to 10 ms).
    """
    if interpreting():
        return min(16, triton.next_power_of_2(dim)), 4
    return (4, 1) if backward else (8, 2)


def selective_scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus: bool, reverse: bool,
                           block_d: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Launch the forward kernel -> (y [Bt, L, D], checkpoints [Bt, nC, D, N] fp32)."""
    u, delta, A, B, C = (x.contiguous() for x in (u, delta, A, B, C))
    D, z, delta_bias = (None if x is None else x.contiguous() for x in (D, z, delta_bias))
    bsz, length, dim = u.shape
    n_state = A.shape[1]
    chunk = _selective_chunk_size(u.device)
    bd, warps = _selective_config(dim, n_state, backward=False)
    block_d = block_d or bd
    y = _new(u)
    ckpt = _new(u, (bsz, triton.cdiv(length, chunk), dim, n_state), torch.float32)
    if y.numel():
        grid = (bsz, triton.cdiv(dim, block_d))
        _selective_fwd_kernel[grid](
            u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
            delta_bias if delta_bias is not None else u, y, ckpt, length, dim, n_state,
            CHUNK=chunk, BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(n_state),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=softplus, REVERSE=reverse, num_warps=warps,
        )
    return y, ckpt


def selective_scan_backward(u, delta, A, B, C, D, z, delta_bias, softplus: bool, reverse: bool,
                            ckpt: Tensor, dy: Tensor, block_d: Optional[int] = None):
    """Launch the backward kernel -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)."""
    u, delta, A, B, C, dy = (x.contiguous() for x in (u, delta, A, B, C, dy))
    D, z, delta_bias = (None if x is None else x.contiguous() for x in (D, z, delta_bias))
    bsz, length, dim = u.shape
    n_state = A.shape[1]
    chunk = _selective_chunk_size(u.device)
    bd, warps = _selective_config(dim, n_state, backward=True)
    block_d = block_d or bd
    n_db = triton.cdiv(dim, block_d)
    du, ddelta = _new(u), _new(delta)
    dz = _new(z) if z is not None else None
    f32 = torch.float32
    db_part = _new(u, (bsz, n_db, length, n_state), f32)
    dc_part = _new(u, (bsz, n_db, length, n_state), f32)
    da_part = _new(u, (bsz, dim, n_state), f32)
    dd_part = _new(u, (bsz, dim), f32)
    dbias_part = _new(u, (bsz, dim), f32)
    if u.numel():
        _selective_bwd_kernel[(bsz, n_db)](
            u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
            delta_bias if delta_bias is not None else u, dy, ckpt,
            du, ddelta, dz if dz is not None else du, db_part, dc_part, da_part, dd_part, dbias_part,
            length, dim, n_state,
            CHUNK=chunk, BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(n_state),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=softplus, REVERSE=reverse, num_warps=warps,
        )
    else:
        for t in (du, ddelta, dz, db_part, dc_part, da_part, dd_part, dbias_part):
            if t is not None:
                t.zero_()
    dA = da_part.sum(0).to(A.dtype)
    dB = db_part.sum(1).to(B.dtype)
    dC = dc_part.sum(1).to(C.dtype)
    dD = None if D is None else dd_part.sum(0).to(D.dtype)
    dbias = None if delta_bias is None else dbias_part.sum(0).to(delta_bias.dtype)
    return du, ddelta, dA, dB, dC, dD, dz, dbias


@torch.library.custom_op("routec::selective_scan_backward", mutates_args=())
def _selective_scan_backward_op(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
    delta_bias: Optional[Tensor], delta_softplus: bool, reverse: bool, ckpt: Tensor, dy: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The Triton backward as an op of its own (traceable by compiled backward graphs). Gradients of
    absent optional inputs come back as empty tensors."""
    grads = selective_scan_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, ckpt, dy)
    return tuple(g if g is not None else u.new_empty(0) for g in grads)


@_selective_scan_backward_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, ckpt, dy):
    return tuple(torch.empty_like(x) if x is not None else u.new_empty(0) for x in (u, delta, A, B, C, D, z, delta_bias))


@torch.library.custom_op("routec::selective_scan", mutates_args=())
def _selective_scan_op(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
    delta_bias: Optional[Tensor], delta_softplus: bool, reverse: bool,
) -> tuple[Tensor, Tensor]:
    """Returns (y, checkpoints): the state entering every chunk, kept for the Triton backward. The
    reference path needs none and returns an empty [Bt, 0, D, N]; the backend choice depends only on
    devices and environment, so the fake implementation makes the same choice."""
    triton_path = use_triton(u, delta, A, B, C, D, z, delta_bias)
    if triton_path:
        return selective_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    with torch.no_grad():
        y = selective_scan_reference(u, delta, A, B, C, D, z, delta_bias,
                                     delta_softplus=delta_softplus, reverse=reverse)
    return y, u.new_zeros(_ckpt_shape(u, A, triton_path), dtype=torch.float32)


def _ckpt_shape(u: Tensor, A: Tensor, triton_path: bool) -> tuple[int, int, int, int]:
    bsz, length, dim = u.shape
    chunks = -(-length // _selective_chunk_size(u.device)) if triton_path else 0
    return bsz, chunks, dim, A.shape[1]


@_selective_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    triton_path = use_triton(u, delta, A, B, C, D, z, delta_bias)
    return torch.empty_like(u), u.new_empty(_ckpt_shape(u, A, triton_path), dtype=torch.float32)


def _selective_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, softplus, reverse = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[1])
    ctx.softplus, ctx.reverse = softplus, reverse
    ctx.mark_non_differentiable(output[1])


def _selective_bwd(ctx, dy, _dckpt):
    u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    if dy is None:
        return (None,) * 10
    if use_triton(*inputs):
        grads = torch.ops.routec.selective_scan_backward(*inputs, ctx.softplus, ctx.reverse, ckpt, dy)
        grads = tuple(g if x is not None else None for g, x in zip(grads, inputs))
        return (*grads, None, None)

    def ref(*args):
        return selective_scan_reference(*args, delta_softplus=ctx.softplus, reverse=ctx.reverse)

    return (*reference_vjp(ref, inputs, (dy,)), None, None)


_selective_scan_op.register_autograd(_selective_bwd, setup_context=_selective_setup)


def selective_scan(
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
    """Mamba S6 selective scan (DESIGN §5); returns y [Bt, L, D].

    u, delta, z: [Bt, L, D]; A: [D, N]; B, C: [Bt, L, N]; D, delta_bias: [D].
    dt = softplus?(delta + delta_bias); h[t] = exp(dt A) h[t-1] + dt B[t] u[t]; y = <h[t], C[t]> + D u,
    times silu(z) when z is given. fp32 or bf16 inputs, fp32 state and accumulation.
    """
    bsz, length, dim = u.shape
    if delta.shape != u.shape or (z is not None and z.shape != u.shape):
        raise ValueError(f"selective_scan: delta and z must match u {list(u.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be [D, N] with D = {dim}, got {list(A.shape)}")
    n_state = A.shape[1]
    for name, x in (("B", B), ("C", C)):
        if x.shape != (bsz, length, n_state):
            raise ValueError(f"selective_scan: {name} must be [Bt, L, N] = {[bsz, length, n_state]}, got {list(x.shape)}")
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None and x.shape != (dim,):
            raise ValueError(f"selective_scan: {name} must be [D] = [{dim}], got {list(x.shape)}")
    return torch.ops.routec.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)[0]
