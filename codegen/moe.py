"""`moe_ffn`: the routed expert MLP of a top-k mixture of experts (DESIGN §5).

    y[t] = sum_j weights[t, j] * ffn_e(x[t]),   e = indices[t, j]
    ffn_e(v) = act(v @ w1[e] + b1[e]) @ w2[e] + b2[e]                   activation in {"gelu", "silu", "relu"}
    ffn_e(v) = (act(v @ w1[e] + b1[e]) * (v @ w3[e])) @ w2[e] + b2[e]   "swiglu" (act = silu), "geglu" (act = gelu)

x [T, d]; weights [T, k]; indices [T, k] int64 in [0, E) (not checked on the device); w1, w3 [E, d, h];
w2 [E, h, out] (out may differ from d); optional biases b1 [E, h], b2 [E, out] (absent = 0); y [T, out].
gelu is the exact erf form (PyTorch's default). Dropless: every assignment is computed, an assignment with
weight 0 (dropped by a router's capacity) just contributes 0.

Triton forward (5 launches, no host synchronisation):
  1. `router._expert_hist_kernel` + `router._expert_scatter_kernel`: counting sort of the A = T*k
     assignments by expert -> counts [E] and `order` [A] (flat ids a = t*k + j grouped by expert).
  2. `_moe_up_kernel`, grouped GEMM 1: a program owns BLOCK_M consecutive sorted rows of ONE expert and a
     BLOCK_N slice of h. Its expert and rows come from `counts` on the device (`_expert_tile`): expert e
     owns ceil(counts[e] / BLOCK_M) tiles, so experts without tokens own none, and the grid is the upper
     bound ceil(A / BLOCK_M) + E, tiles past the end return at once. The token rows x[order[p] // k] are
     gathered inside the GEMM's loads; b1[e], the activation (and the GLU product) are its epilogue.
     Writes H [A, h] in sorted order.
  3. `_moe_down_kernel`, grouped GEMM 2: H rows of one expert @ w2[e]; the epilogue adds b2[e], multiplies
     by the routing weight and scatters row p to row a = order[p] of Y [A, out] (plain stores: the rows
     are distinct).
  4. `_sum_slots_kernel`: y[t] = sum_j Y[t*k + j], contiguous reads. This deterministic second pass is the
     chosen combine (no fp32 atomics, bit-reproducible, any dtype); for k = 1, Y is y and the pass is skipped.

Triton backward (recomputes the pre-activations instead of storing them in the forward):
  sort; `_moe_up_kernel` again storing Z1 (and Z3); `_moe_dh_kernel`: G = dy[tok] @ w2[e]^T with the
  epilogue giving partial dweights = sum_h G * H per h-tile (the first h-tile also adds dy[tok] . b2[e])
  and dZ1 (dZ3) = activation backward of weight * G, written over Z1 (Z3); `_moe_wgrad_kernel` (grid
  E x tiles, loop over the expert's rows): dw2[e] = H_e^T (weight * dy[tok]), dw1[e] = X_e^T dZ1_e (and
  dw3 with dZ3 in the same launch); the bias gradients are the column sums of the same loaded row tiles
  in the programs of the first R-tile: db2[e] = sum of weight * dy[tok] rows, db1[e] = sum of dZ1_e rows;
  `_moe_down_kernel` again for dX rows = dZ1 @ w1[e]^T (+ dZ3 @ w3[e]^T) and `_sum_slots_kernel` for dx.

Every tl.dot has tiles >= 16 and accumulates in fp32; 16-bit operands go to the tensor cores as they are
on a GPU and are upcast to fp32 in the interpreter (which computes bf16 wrongly).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .backend import interpreting, reference_vjp, use_triton
from .router import _alloc, sort_by_expert

# activation name -> (code of the elementwise activation in the kernels, gated linear unit?)
ACTIVATIONS = {"gelu": (0, False), "silu": (1, False), "relu": (2, False), "geglu": (0, True), "swiglu": (1, True)}


def _check(x: Tensor, weights: Tensor, indices: Tensor, w1: Tensor, w2: Tensor, activation: str,
           w3: Optional[Tensor], b1: Optional[Tensor] = None, b2: Optional[Tensor] = None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"moe_ffn activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    glu = ACTIVATIONS[activation][1]
    if glu and w3 is None:
        raise ValueError(f"activation {activation!r} needs w3 [E, d, h]")
    if not glu and w3 is not None:
        raise ValueError(f"w3 is only used by 'swiglu' and 'geglu', got activation {activation!r}")
    if x.dim() != 2 or w1.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"moe_ffn needs x [T, d], w1 [E, d, h], w2 [E, h, out], got {list(x.shape)}, "
                         f"{list(w1.shape)}, {list(w2.shape)}")
    T, d = x.shape
    E, _, h = w1.shape
    if w1.shape[1] != d or tuple(w2.shape[:2]) != (E, h) or (w3 is not None and w3.shape != w1.shape):
        raise ValueError(f"expert weights must be w1 [E, d, h], w2 [E, h, out] (w3 like w1) with d={d}, got "
                         f"{list(w1.shape)}, {list(w2.shape)}" + ("" if w3 is None else f", {list(w3.shape)}"))
    out = w2.shape[2]
    for name, b, want in (("b1", b1, (E, h)), ("b2", b2, (E, out))):
        if b is not None and tuple(b.shape) != want:
            raise ValueError(f"{name} must be [E, {'h' if name == 'b1' else 'out'}] = {list(want)}, "
                             f"got {list(b.shape)}")
    if any(w is not None and w.dtype != x.dtype for w in (w1, w2, w3, b1, b2)):
        raise ValueError(f"expert weights and biases must have x's dtype {x.dtype}, got "
                         f"{[None if w is None else w.dtype for w in (w1, w2, w3, b1, b2)]}")
    if indices.dim() != 2 or indices.shape[0] != T or weights.shape != indices.shape:
        raise ValueError(f"weights and indices must both be [T={T}, k], got {list(weights.shape)} and "
                         f"{list(indices.shape)}")


# Reference: a loop over experts with boolean masks; differentiable, float64-capable.


def _activate(z1: Tensor, z3: Optional[Tensor], activation: str) -> Tensor:
    base = {"gelu": F.gelu, "geglu": F.gelu, "silu": F.silu, "swiglu": F.silu, "relu": F.relu}[activation]
    return base(z1) if z3 is None else base(z1) * z3


def moe_ffn_reference(
    x: Tensor, weights: Tensor, indices: Tensor, w1: Tensor, w2: Tensor, activation: str = "gelu",
    w3: Optional[Tensor] = None, b1: Optional[Tensor] = None, b2: Optional[Tensor] = None,
) -> Tensor:
    """For each expert: pick its (token, slot) pairs, run its MLP on those rows, add back weighted."""
    dtype = x.dtype
    if dtype in (torch.float16, torch.bfloat16):
        x, weights, w1, w2 = x.float(), weights.float(), w1.float(), w2.float()
        w3, b1, b2 = (None if t is None else t.float() for t in (w3, b1, b2))
    y = x.new_zeros(x.shape[0], w2.shape[2])  # [T, out]
    for e in range(w1.shape[0]):
        tok, slot = (indices == e).nonzero(as_tuple=True)  # this expert's assignments (maybe none)
        rows = x[tok]  # [n, d]
        z1 = rows @ w1[e] if b1 is None else rows @ w1[e] + b1[e]  # [n, h]
        hidden = _activate(z1, None if w3 is None else rows @ w3[e], activation)  # [n, h]
        out = hidden @ w2[e] if b2 is None else hidden @ w2[e] + b2[e]  # [n, out]
        y = y.index_add(0, tok, out * weights[tok, slot, None])
    return y.to(dtype)


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:  # exact gelu
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 1:  # silu
        out = z / (1.0 + tl.exp(-z))
    else:  # relu
        out = tl.maximum(z, 0.0)
    return out


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 0:  # Phi(z) + z * phi(z)
        out = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 1:
        s = 1.0 / (1.0 + tl.exp(-z))
        out = s * (1.0 + z * (1.0 - s))
    else:
        out = (z > 0.0).to(tl.float32)
    return out


@triton.jit
def _expert_tile(pid_m, counts_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Which expert tile `pid_m` is: (expert e, first sorted row p0, rows left in e from p0; <= 0 past the end)."""
    experts = tl.arange(0, BLOCK_E)
    cnt = tl.load(counts_ptr + experts, mask=experts < E, other=0).to(tl.int32)
    tiles = (cnt + BLOCK_M - 1) // BLOCK_M
    e = tl.sum((tl.cumsum(tiles, 0) <= pid_m).to(tl.int32), 0)  # first expert whose tiles end after pid_m
    before = experts < e
    start = tl.sum(tl.where(before, cnt, 0), 0)
    p0 = start + (pid_m - tl.sum(tl.where(before, tiles, 0), 0)) * BLOCK_M
    rows_left = start + tl.sum(tl.where(experts == e, cnt, 0), 0) - p0
    return e, p0, rows_left


@triton.jit
def _gemm_rows(
    acc, a_ptr, a_rows, row_ok, stride_am, stride_ak, b_ptr, stride_bk, stride_bn, rn, n_ok, KDIM,
    BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """acc += A[a_rows, :KDIM] @ B[:KDIM, rn] with A's rows gathered by index (int64 [BLOCK_M])."""
    a_base = a_ptr + a_rows[:, None] * stride_am
    b_base = b_ptr + rn[None, :] * stride_bn
    for k0 in range(0, KDIM, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < KDIM
        a = tl.load(a_base + rk[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_base + rk[:, None] * stride_bk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)
    return acc


@triton.jit
def _moe_up_kernel(
    x_ptr, order_ptr, counts_ptr, w1_ptr, w3_ptr, bias1_ptr, h_ptr, z1_ptr, z3_ptr,
    # x: [T, D]; order: [A]; counts: [E]; w1, w3: [E, D, H]; bias1: [E, H]; h, z1, z3: [A, H] sorted
    E, D, H,
    stride_xt, stride_xd, stride_w1e, stride_w1d, stride_w1h, stride_w3e, stride_w3d, stride_w3h,
    stride_b1e, stride_b1h,
    K: tl.constexpr, ACT: tl.constexpr, GLU: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """H[p] = act(x[tok(p)] @ w1[e] + bias1[e]) (* x[tok(p)] @ w3[e]) for one expert tile x one BLOCK_N
    slice of h; with STORE_PRE also the pre-activations Z1 (bias included) and Z3."""
    e, p0, rows_left = _expert_tile(tl.program_id(0), counts_ptr, E, BLOCK_M, BLOCK_E)
    if rows_left <= 0:
        return
    rm = tl.arange(0, BLOCK_M)
    row_ok = rm < rows_left
    p = (p0 + rm).to(tl.int64)
    tok = tl.load(order_ptr + p, mask=row_ok, other=0) // K
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < H
    e64 = e.to(tl.int64)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    a_base = x_ptr + tok[:, None] * stride_xt
    b1_base = w1_ptr + e64 * stride_w1e + rn[None, :] * stride_w1h
    b3_base = w3_ptr + e64 * stride_w3e + rn[None, :] * stride_w3h
    for k0 in range(0, D, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < D
        a = tl.load(a_base + rk[None, :] * stride_xd, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b1 = tl.load(b1_base + rk[:, None] * stride_w1d, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b1 = b1.to(tl.float32)
        acc1 = tl.dot(a, b1, acc1, input_precision=PRECISION, out_dtype=tl.float32)
        if GLU:
            b3 = tl.load(b3_base + rk[:, None] * stride_w3d, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                b3 = b3.to(tl.float32)
            acc3 = tl.dot(a, b3, acc3, input_precision=PRECISION, out_dtype=tl.float32)
    if HAS_BIAS:
        acc1 += tl.load(bias1_ptr + e64 * stride_b1e + rn * stride_b1h, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    hidden = _act(acc1, ACT)
    if GLU:
        hidden = hidden * acc3
    out_off = p[:, None] * H + rn[None, :]
    out_ok = row_ok[:, None] & n_ok[None, :]
    tl.store(h_ptr + out_off, hidden.to(h_ptr.dtype.element_ty), mask=out_ok)
    if STORE_PRE:
        tl.store(z1_ptr + out_off, acc1.to(z1_ptr.dtype.element_ty), mask=out_ok)
        if GLU:
            tl.store(z3_ptr + out_off, acc3.to(z3_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _moe_down_kernel(
    a_ptr, a2_ptr, order_ptr, counts_ptr, b_ptr, b2_ptr, bias_ptr, w_ptr, out_ptr,
    # a, a2: [A, KDIM] sorted; b, b2: [E, KDIM, N] (any strides); bias: [E, N]; w: [A] routing weights;
    # out: [A, N]
    E, KDIM, N,
    stride_be, stride_bk, stride_bn, stride_b2e, stride_b2k, stride_b2n, stride_biase, stride_biasn,
    HAS_2: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """out[order[p]] = (w[order[p]] *) (a[p] @ b[e] (+ a2[p] @ b2[e]) (+ bias[e])) for one expert tile x
    BLOCK_N columns."""
    e, p0, rows_left = _expert_tile(tl.program_id(0), counts_ptr, E, BLOCK_M, BLOCK_E)
    if rows_left <= 0:
        return
    rm = tl.arange(0, BLOCK_M)
    row_ok = rm < rows_left
    p = (p0 + rm).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    e64 = e.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _gemm_rows(acc, a_ptr, p, row_ok, KDIM, 1, b_ptr + e64 * stride_be, stride_bk, stride_bn, rn, n_ok,
                     KDIM, BLOCK_K, UPCAST, PRECISION)
    if HAS_2:
        acc = _gemm_rows(acc, a2_ptr, p, row_ok, KDIM, 1, b2_ptr + e64 * stride_b2e, stride_b2k, stride_b2n, rn,
                         n_ok, KDIM, BLOCK_K, UPCAST, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e64 * stride_biase + rn * stride_biasn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    a = tl.load(order_ptr + p, mask=row_ok, other=0)
    if SCALE:
        acc = acc * tl.load(w_ptr + a, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + a[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_slots_kernel(
    src_ptr, out_ptr,  # src: [T*K, N] per-assignment rows; out: [T, N]
    T, N, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[t] = sum_j src[t*K + j]: the combine over each token's k slots (fp32 sum)."""
    rt = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rt < T)[:, None] & (rn < N)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for j in range(K):
        acc += tl.load(src_ptr + (rt * K + j)[:, None] * N + rn[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rt[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _moe_dh_kernel(
    dy_ptr, order_ptr, counts_ptr, w2_ptr, bias2_ptr, w_ptr, h_ptr, z1_ptr, z3_ptr, part_ptr,
    # dy: [T, OUT]; w2: [E, H, OUT]; bias2: [E, OUT]; w: [A]; h, z1, z3: [A, H] sorted (z1, z3 overwritten
    # by dz1, dz3); part: [NH, A]
    E, OUT, H, A,
    stride_dyt, stride_dyd, stride_w2e, stride_w2h, stride_w2d, stride_b2e, stride_b2n,
    K: tl.constexpr, ACT: tl.constexpr, GLU: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """G = dy[tok] @ w2[e]^T; partial dweights = sum(G * H) over this h-slice (+ dy[tok] . bias2[e] in the
    first h-slice); dZ = act backward of w * G."""
    e, p0, rows_left = _expert_tile(tl.program_id(0), counts_ptr, E, BLOCK_M, BLOCK_E)
    if rows_left <= 0:
        return
    pid_n = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    row_ok = rm < rows_left
    p = (p0 + rm).to(tl.int64)
    a = tl.load(order_ptr + p, mask=row_ok, other=0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < H
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    tok = a // K
    e64 = e.to(tl.int64)
    g = _gemm_rows(acc, dy_ptr, tok, row_ok, stride_dyt, stride_dyd, w2_ptr + e64 * stride_w2e,
                   stride_w2d, stride_w2h, rn, n_ok, OUT, BLOCK_K, UPCAST, PRECISION)  # [BLOCK_M, BLOCK_N]
    off = p[:, None] * H + rn[None, :]
    ok = row_ok[:, None] & n_ok[None, :]
    hidden = tl.load(h_ptr + off, mask=ok, other=0.0).to(tl.float32)
    dw_part = tl.sum(g * hidden, 1)  # [BLOCK_M]
    if HAS_BIAS:
        if pid_n == 0:  # the bias term of dweights, counted once per row
            for k0 in range(0, OUT, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                k_ok = rk < OUT
                dyt = tl.load(dy_ptr + tok[:, None] * stride_dyt + rk[None, :] * stride_dyd,
                              mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_K]
                bias = tl.load(bias2_ptr + e64 * stride_b2e + rk * stride_b2n, mask=k_ok, other=0.0)
                dw_part += tl.sum(dyt * bias.to(tl.float32)[None, :], 1)
    tl.store(part_ptr + pid_n.to(tl.int64) * A + a, dw_part, mask=row_ok)
    dh = g * tl.load(w_ptr + a, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    z1 = tl.load(z1_ptr + off, mask=ok, other=0.0).to(tl.float32)
    if GLU:
        z3 = tl.load(z3_ptr + off, mask=ok, other=0.0).to(tl.float32)
        tl.store(z3_ptr + off, (dh * _act(z1, ACT)).to(z3_ptr.dtype.element_ty), mask=ok)
        dh = dh * z3
    tl.store(z1_ptr + off, (dh * _act_grad(z1, ACT)).to(z1_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _moe_wgrad_kernel(
    a_ptr, b_ptr, b2_ptr, out_ptr, out2_ptr, colsum_ptr, order_ptr, counts_ptr, w_ptr,
    # a: rows [*, R]; b, b2: rows [*, C]; out, out2: [E, R, C]; colsum: [E, C] contiguous; order, w: [A]
    E, R, C,
    stride_am, stride_ar, stride_bm, stride_bc, stride_oe, stride_or, stride_oc,
    K: tl.constexpr, A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, B_SCALE: tl.constexpr,
    HAS_B2: tl.constexpr, COLSUM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """out[e] = sum over expert e's sorted rows p of A[row(p)]^T B[row(p)] (and out2[e] with B2), with
    B's rows scaled by w[order[p]] when B_SCALE; with COLSUM also colsum[e] = sum of those B rows (a bias
    gradient), written by the programs of the first R-tile.

    A row is the token row order[p] // K when *_GATHER, else the sorted row p. One program per
    (expert, BLOCK_R, BLOCK_C) tile, looping over the expert's rows; an expert without rows writes zeros.
    """
    e = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    cnt = tl.load(counts_ptr + experts, mask=experts < E, other=0).to(tl.int32)
    start = tl.sum(tl.where(experts < e, cnt, 0), 0)
    n_rows = tl.sum(tl.where(experts == e, cnt, 0), 0)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rc = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok = rr < R
    c_ok = rc < C
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    col = tl.zeros([BLOCK_C], dtype=tl.float32)
    for q0 in range(0, n_rows, BLOCK_P):
        rq = q0 + tl.arange(0, BLOCK_P)
        q_ok = rq < n_rows
        p = (start + rq).to(tl.int64)
        a_id = tl.load(order_ptr + p, mask=q_ok, other=0)
        tok = a_id // K
        if A_GATHER:
            a_rows = tok
        else:
            a_rows = p
        if B_GATHER:
            b_rows = tok
        else:
            b_rows = p
        at = tl.load(a_ptr + a_rows[:, None] * stride_am + rr[None, :] * stride_ar,
                     mask=q_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_P, BLOCK_R]
        bt = tl.load(b_ptr + b_rows[:, None] * stride_bm + rc[None, :] * stride_bc,
                     mask=q_ok[:, None] & c_ok[None, :], other=0.0)  # [BLOCK_P, BLOCK_C]
        if B_SCALE:
            scale = tl.load(w_ptr + a_id, mask=q_ok, other=0.0).to(tl.float32)
            bt_scaled = bt.to(tl.float32) * scale[:, None]
            if COLSUM:
                col += tl.sum(bt_scaled, 0)
            bt = bt_scaled.to(b_ptr.dtype.element_ty)
        elif COLSUM:
            col += tl.sum(bt.to(tl.float32), 0)
        if UPCAST:
            at = at.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(tl.trans(at), bt, acc, input_precision=PRECISION, out_dtype=tl.float32)
        if HAS_B2:
            b2t = tl.load(b2_ptr + b_rows[:, None] * stride_bm + rc[None, :] * stride_bc,
                          mask=q_ok[:, None] & c_ok[None, :], other=0.0)
            if UPCAST:
                b2t = b2t.to(tl.float32)
            acc2 = tl.dot(tl.trans(at), b2t, acc2, input_precision=PRECISION, out_dtype=tl.float32)
    off = e.to(tl.int64) * stride_oe + rr[:, None] * stride_or + rc[None, :] * stride_oc
    ok = r_ok[:, None] & c_ok[None, :]
    tl.store(out_ptr + off, acc.to(out_ptr.dtype.element_ty), mask=ok)
    if HAS_B2:
        tl.store(out2_ptr + off, acc2.to(out2_ptr.dtype.element_ty), mask=ok)
    if COLSUM:
        if tl.program_id(1) == 0:
            tl.store(colsum_ptr + e.to(tl.int64) * C + rc, col.to(colsum_ptr.dtype.element_ty), mask=c_ok)


def _pow2(n: int, hi: int) -> int:
    return max(16, min(hi, triton.next_power_of_2(n)))


class _Config:
    """Tile sizes: small tiles in the interpreter (~1.4 ms per program), tensor-core tiles on a GPU."""

    def __init__(self, x: Tensor, D: int, H: int):
        self.upcast = interpreting()
        self.precision = "ieee" if x.dtype == torch.float32 else None  # fp32: exact, not TF32
        if interpreting():
            self.block_m, self.bn_cap, self.bk_cap, self.block_p = 16, 64, 64, 32
            self.warps, self.stages = 4, 1
        elif x.dtype == torch.float32:
            self.block_m, self.bn_cap, self.bk_cap, self.block_p = 64, 64, 32, 32
            self.warps, self.stages = 4, 2
        else:
            self.block_m, self.bn_cap, self.bk_cap, self.block_p = 128, 128, 64, 64
            self.warps, self.stages = 8, 3
        self.D, self.H = D, H

    def bn(self, n: int) -> int:
        return _pow2(n, self.bn_cap)

    def bk(self, k: int) -> int:
        return _pow2(k, self.bk_cap)


def _m_tiles(A: int, E: int, block_m: int) -> int:
    return triton.cdiv(A, block_m) + E  # upper bound on sum_e ceil(counts[e] / block_m), no host sync


def _up(cfg, x, order, counts, w1, w3, b1, K, act, glu, store_pre):
    A, E, H = order.shape[0], w1.shape[0], w1.shape[2]
    hidden = _alloc((A, H), x.dtype, x.device)
    z1 = _alloc((A, H), x.dtype, x.device) if store_pre else hidden
    z3 = _alloc((A, H), x.dtype, x.device) if store_pre and glu else hidden
    w3_ = w1 if w3 is None else w3
    b1_ = w1 if b1 is None else b1  # any tensor stands in for an absent pointer (never read)
    bn, bk = cfg.bn(H), cfg.bk(cfg.D)
    _moe_up_kernel[(_m_tiles(A, E, cfg.block_m), triton.cdiv(H, bn))](
        x, order, counts, w1, w3_, b1_, hidden, z1, z3,
        E, cfg.D, H,
        x.stride(0), x.stride(1), *w1.stride(), *w3_.stride(), b1_.stride(0), b1_.stride(1),
        K=K, ACT=act, GLU=glu, HAS_BIAS=b1 is not None, STORE_PRE=store_pre, UPCAST=cfg.upcast,
        PRECISION=cfg.precision,
        BLOCK_M=cfg.block_m, BLOCK_N=bn, BLOCK_K=bk, BLOCK_E=triton.next_power_of_2(E),
        num_warps=cfg.warps, num_stages=cfg.stages,
    )
    return hidden, z1, z3


def _down(cfg, a, order, counts, b, out, *, a2=None, b2=None, bias=None, w=None):
    """out[order[p]] = (w *) (a[p] @ b[e] (+ a2[p] @ b2[e]) (+ bias[e])); b, b2 [E, KDIM, N], bias [E, N]
    in any strides."""
    A, KDIM = a.shape
    E, _, N = b.shape
    b2_ = b if b2 is None else b2
    bias_ = b if bias is None else bias
    bn, bk = cfg.bn(N), cfg.bk(KDIM)
    _moe_down_kernel[(_m_tiles(A, E, cfg.block_m), triton.cdiv(N, bn))](
        a, a if a2 is None else a2, order, counts, b, b2_, bias_, a if w is None else w, out,
        E, KDIM, N, *b.stride(), *b2_.stride(), bias_.stride(0), bias_.stride(-1),
        HAS_2=a2 is not None, HAS_BIAS=bias is not None, SCALE=w is not None, UPCAST=cfg.upcast,
        PRECISION=cfg.precision,
        BLOCK_M=cfg.block_m, BLOCK_N=bn, BLOCK_K=bk, BLOCK_E=triton.next_power_of_2(E),
        num_warps=cfg.warps, num_stages=cfg.stages,
    )
    return out


def _sum_slots(src: Tensor, T: int, K: int, out: Tensor) -> Tensor:
    N = src.shape[1]
    block_n = _pow2(N, 256)
    block_t = 16 if interpreting() else max(1, 4096 // block_n)
    _sum_slots_kernel[(triton.cdiv(T, block_t), triton.cdiv(N, block_n))](
        src, out, T, N, K=K, BLOCK_T=block_t, BLOCK_N=block_n,
    )
    return out


def _per_slot(T: int, K: int, N: int, like: Tensor) -> Tensor:
    """The per-assignment buffer [T*K, N]; for K = 1 it is the output itself."""
    return _alloc((T * K, N), like.dtype, like.device)


def _finish(rows: Tensor, T: int, K: int, like: Tensor) -> Tensor:
    if K == 1:
        return rows
    return _sum_slots(rows, T, K, _alloc((T, rows.shape[1]), like.dtype, like.device))


def moe_ffn_triton(x, weights, indices, w1, w2, activation, w3, b1=None, b2=None):
    """Forward: sort, GEMM 1 with gather + b1 + activation, GEMM 2 with b2 + weight + scatter, slot sum."""
    T, D = x.shape
    E, _, H = w1.shape
    OUT = w2.shape[2]
    K = indices.shape[1]
    act, glu = ACTIVATIONS[activation]
    cfg = _Config(x, D, H)
    counts, _, order, _ = sort_by_expert(indices, E)
    hidden, _, _ = _up(cfg, x, order, counts, w1, w3, b1, K, act, glu, store_pre=False)
    rows = _down(cfg, hidden, order, counts, w2, _per_slot(T, K, OUT, x), bias=b2,
                 w=weights.contiguous().reshape(-1))  # [T*K, OUT]
    return _finish(rows, T, K, x)


def moe_ffn_backward_triton(dy, x, weights, indices, w1, w2, activation, w3, b1=None, b2=None):
    """Gradients (dx, dweights, dw1, dw2, dw3, db1, db2) with Triton grouped GEMMs; pre-activations
    recomputed; dw3, db1, db2 are None where the input is."""
    T, D = x.shape
    E, _, H = w1.shape
    OUT = w2.shape[2]
    K = indices.shape[1]
    A = T * K
    act, glu = ACTIVATIONS[activation]
    cfg = _Config(x, D, H)
    dy = dy.to(x.dtype)  # [T, OUT]
    w_flat = weights.contiguous().reshape(-1)
    counts, _, order, _ = sort_by_expert(indices, E)
    hidden, dz1, dz3 = _up(cfg, x, order, counts, w1, w3, b1, K, act, glu, store_pre=True)

    bn, bk = cfg.bn(H), cfg.bk(OUT)
    b2_ = w2 if b2 is None else b2
    part = _alloc((triton.cdiv(H, bn), A), torch.float32, x.device)
    _moe_dh_kernel[(_m_tiles(A, E, cfg.block_m), triton.cdiv(H, bn))](
        dy, order, counts, w2, b2_, w_flat, hidden, dz1, dz3, part,
        E, OUT, H, A, dy.stride(0), dy.stride(1), *w2.stride(), b2_.stride(0), b2_.stride(-1),
        K=K, ACT=act, GLU=glu, HAS_BIAS=b2 is not None, UPCAST=cfg.upcast, PRECISION=cfg.precision,
        BLOCK_M=cfg.block_m, BLOCK_N=bn, BLOCK_K=bk, BLOCK_E=triton.next_power_of_2(E),
        num_warps=cfg.warps, num_stages=cfg.stages,
    )
    dweights = part.sum(0).reshape(T, K).to(weights.dtype)

    dw2 = _alloc(w2.shape, w2.dtype, w2.device)
    db2 = None if b2 is None else _alloc(b2.shape, b2.dtype, b2.device)
    _wgrad(cfg, hidden, False, dy, True, dw2, order, counts, K, w=w_flat, colsum=db2)
    dw1 = _alloc(w1.shape, w1.dtype, w1.device)
    dw3 = None if w3 is None else _alloc(w3.shape, w3.dtype, w3.device)
    db1 = None if b1 is None else _alloc(b1.shape, b1.dtype, b1.device)
    _wgrad(cfg, x, True, dz1, False, dw1, order, counts, K, b2=dz3 if glu else None, out2=dw3, colsum=db1)

    w1t, w3t = w1.transpose(1, 2), None if w3 is None else w3.transpose(1, 2)  # [E, H, D] views
    rows = _down(cfg, dz1, order, counts, w1t, _per_slot(T, K, D, x), a2=dz3 if glu else None, b2=w3t)
    return _finish(rows, T, K, x), dweights, dw1, dw2, dw3, db1, db2


def _wgrad(cfg, a, a_gather, b, b_gather, out, order, counts, K, *, w=None, b2=None, out2=None, colsum=None):
    E, R, C = out.shape
    br, bc = cfg.bn(R), cfg.bn(C)
    _moe_wgrad_kernel[(E, triton.cdiv(R, br), triton.cdiv(C, bc))](
        a, b, b if b2 is None else b2, out, out if out2 is None else out2, out if colsum is None else colsum,
        order, counts, a if w is None else w,
        E, R, C, a.stride(0), a.stride(1), b.stride(0), b.stride(1), *out.stride(),
        K=K, A_GATHER=a_gather, B_GATHER=b_gather, B_SCALE=w is not None, HAS_B2=b2 is not None,
        COLSUM=colsum is not None, UPCAST=cfg.upcast, PRECISION=cfg.precision,
        BLOCK_R=br, BLOCK_C=bc, BLOCK_P=cfg.block_p, BLOCK_E=triton.next_power_of_2(E),
        num_warps=cfg.warps, num_stages=cfg.stages,
    )


@torch.library.custom_op("routec::moe_ffn", mutates_args=())
def _moe_ffn_op(
    x: Tensor, weights: Tensor, indices: Tensor, w1: Tensor, w2: Tensor, activation: str, w3: Optional[Tensor],
    b1: Optional[Tensor] = None, b2: Optional[Tensor] = None,
) -> Tensor:
    if use_triton(x, weights, indices, w1, w2, w3, b1, b2):
        return moe_ffn_triton(x, weights, indices, w1, w2, activation, w3, b1, b2)
    with torch.no_grad():
        return moe_ffn_reference(x, weights, indices, w1, w2, activation, w3, b1, b2)


@_moe_ffn_op.register_fake
def _(x, weights, indices, w1, w2, activation, w3, b1=None, b2=None):
    return x.new_empty(x.shape[0], w2.shape[2])  # [T, out]


@torch.library.custom_op("routec::moe_ffn_backward", mutates_args=())
def _moe_ffn_backward_op(
    dy: Tensor, x: Tensor, weights: Tensor, indices: Tensor, w1: Tensor, w2: Tensor, activation: str,
    w3: Optional[Tensor], b1: Optional[Tensor] = None, b2: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The Triton backward: (dx, dweights, dw1, dw2, dw3, db1, db2), each of dw3, db1, db2 an empty [0]
    tensor when its input is absent.

    An op of its own so that AOTAutograd traces the backward through its fake implementation instead of into
    a kernel launch. (The reference backward is plain autograd, traced directly: a custom op's body runs
    below the autograd dispatch key, where re-running the reference would record no graph.)
    """
    dx, dweights, dw1, dw2, dw3, db1, db2 = moe_ffn_backward_triton(
        dy, x, weights, indices, w1, w2, activation, w3, b1, b2)
    return (dx, dweights, dw1, dw2, _or_empty(dw3, x), _or_empty(db1, x), _or_empty(db2, x))


def _or_empty(grad: Optional[Tensor], like: Tensor) -> Tensor:
    """An absent gradient as a fresh empty [0] tensor (op outputs must not alias each other)."""
    return like.new_empty(0) if grad is None else grad


@_moe_ffn_backward_op.register_fake
def _(dy, x, weights, indices, w1, w2, activation, w3, b1=None, b2=None):
    dw3, db1, db2 = (x.new_empty(0) if t is None else torch.empty_like(t) for t in (w3, b1, b2))
    return (torch.empty_like(x), torch.empty_like(weights), torch.empty_like(w1), torch.empty_like(w2),
            dw3, db1, db2)


def _moe_ffn_setup(ctx, inputs, output):
    x, weights, indices, w1, w2, activation, w3, b1, b2 = inputs
    ctx.activation = activation
    ctx.triton = use_triton(x, weights, indices, w1, w2, w3, b1, b2)
    ctx.save_for_backward(x, weights, indices, w1, w2, w3, b1, b2)


def _moe_ffn_backward(ctx, dy):
    x, weights, indices, w1, w2, w3, b1, b2 = ctx.saved_tensors
    if ctx.triton:
        dx, dweights, dw1, dw2, dw3, db1, db2 = torch.ops.routec.moe_ffn_backward(
            dy, x, weights, indices, w1, w2, ctx.activation, w3, b1, b2)
    else:
        dx, dweights, _, dw1, dw2, _, dw3, db1, db2 = reference_vjp(
            moe_ffn_reference, (x, weights, indices, w1, w2, ctx.activation, w3, b1, b2), (dy,))
    return (dx, dweights, None, dw1, dw2, None, None if w3 is None else dw3, None if b1 is None else db1,
            None if b2 is None else db2)


_moe_ffn_op.register_autograd(_moe_ffn_backward, setup_context=_moe_ffn_setup)


def moe_ffn(
    x: Tensor, weights: Tensor, indices: Tensor, w1: Tensor, w2: Tensor, *, activation: str = "gelu",
    w3: Optional[Tensor] = None, b1: Optional[Tensor] = None, b2: Optional[Tensor] = None,
) -> Tensor:
    """y[t] = sum_j weights[t, j] * FFN_{indices[t, j]}(x[t]), y [T, out]; see the module docstring."""
    _check(x, weights, indices, w1, w2, activation, w3, b1, b2)
    return torch.ops.routec.moe_ffn(x, weights, indices, w1, w2, activation, w3, b1, b2)
