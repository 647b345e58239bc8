"""Multi-route scans: one launch scans the same sequence in several token orders and combines the routes.

A route is a permutation of the L token positions: row r of `routes` (int64 [R, L]) visits positions
routes[r, 0], routes[r, 1], ... Inputs stay in the original token order, shared by all routes ([Bt, L, D])
or one per route ([R, Bt, L, D]). For every route the kernel gathers its inputs in the load, runs the scan
in route order and scatters the states back to their original positions in the store; the combine

    y = sum_r w[..., r] * y_r      (weights None: plain sum; [Bt, R]: per sample; [Bt, L, R]: per token)

is fused as an epilogue: the first route stores, later routes add into the same fp32 output (a program owns
its (sample, channel block) slice across all routes, so only a barrier between routes is needed).
`combine="none"` skips the combine and returns every route's output, [R, Bt, L, D], each in the original
token order (weights must be None): routes are then independent, so the route becomes a grid axis and each
program stores its route's slice. The compiler's multi-route pass (`compiler/passes/multiroute.py`) merges
independent single-route scans into one such launch.

    multi_route_linear_scan:    h_r[k] = a[p] * h_r[k-1] + b[p],  p = routes[r, k],  y_r[p] = h_r[k]
    multi_route_selective_scan: Mamba S6 (DESIGN §5 `selective_scan`) along each route; A, D and delta_bias
                                may be per route

Kernels: one program per (sample, block of channels), routes one after another inside it ("sum"), or one
program per (sample, block of channels, route) ("none"). The linear scan
is chunked (a `tl.associative_scan` over BLOCK_L gathered tokens, carry across chunks); the selective scan
is sequential in time with the [BLOCK_D, N] state in registers. Backward walks each route in reverse:
the linear scan stores its route's states in an fp32 scratch first; the selective scan checkpoints the state
every CHUNK steps and recomputes a chunk at a time. Gradients of shared inputs are accumulated across
routes with atomics; the weights' gradients come from per-channel-block partials summed on the host.

`route_table` builds the routes RSMamba (forward / reverse / random) and MHS-VM (2-D row / column / snake
orders on an H x W grid) use.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .backend import reference_vjp, use_triton

ROUTE_KINDS_1D = ("forward", "reverse", "random")
ROUTE_KINDS_2D = ("row", "column", "snake", "column_snake", "diagonal", "antidiagonal", "spiral", "spiral_mirrored")
ROUTE_KINDS = ROUTE_KINDS_1D + ROUTE_KINDS_2D + tuple(k + "_reverse" for k in ROUTE_KINDS_2D)


def route_table(
    kind: str, L: int, H: int | None = None, W: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One route, int64 [L]: the original positions in the order the route visits them.

    1-D: "forward" (0..L-1), "reverse" (L-1..0), "random" (a permutation drawn from `generator`).
    2-D on an H x W grid stored row-major (position = i * W + j, H * W = L): "row" (row by row, left to
    right), "column" (column by column, top to bottom), "snake" (rows, alternating left-to-right and
    right-to-left), "column_snake" (columns, alternating down and up), and each with "_reverse" appended
    (the same path walked backwards). Stack several with `torch.stack` to get the [R, L] `routes`.
    """
    if kind not in ROUTE_KINDS:
        raise ValueError(f"route_table: kind must be one of {', '.join(ROUTE_KINDS)}, got {kind!r}")
    if kind == "forward":
        return torch.arange(L)
    if kind == "reverse":
        return torch.arange(L - 1, -1, -1)
    if kind == "random":
        return torch.randperm(L, generator=generator)
    if H is None or W is None or H * W != L:
        raise ValueError(f"route_table: 2-D route {kind!r} needs H * W == L, got H={H}, W={W}, L={L}")
    base = kind.removesuffix("_reverse")
    if base in ("diagonal", "antidiagonal", "spiral", "spiral_mirrored"):
        route = _sorted_route(base, H, W)
        return route.flip(0) if kind.endswith("_reverse") else route
    grid = torch.arange(L).reshape(H, W)
    if base in ("column", "column_snake"):
        grid = grid.T.contiguous()  # walk columns as rows
    if base in ("snake", "column_snake"):
        grid[1::2] = grid[1::2].flip(1)
    route = grid.reshape(-1)
    return route.flip(0) if kind.endswith("_reverse") else route


def _sorted_route(kind: str, H: int, W: int) -> torch.Tensor:
    """The MHS-VM routes as a sort of the grid cells by their visiting key.

    "diagonal": anti-diagonals i + j = k in turn, walking up-right on even k and down-left on odd k
    (a zig-zag); "antidiagonal": the same mirrored left-right (j → W-1-j). "spiral": clockwise from the
    top-left corner ring by ring; "spiral_mirrored": the same mirrored top-bottom (i → H-1-i).
    """
    i = torch.arange(H).repeat_interleave(W)  # [L] row of each raster position
    j = torch.arange(W).repeat(H)
    if kind in ("antidiagonal", "spiral_mirrored"):  # a mirrored cell takes the key of its mirror image
        i, j = (i, W - 1 - j) if kind == "antidiagonal" else (H - 1 - i, j)
        kind = "diagonal" if kind == "antidiagonal" else "spiral"
    if kind == "diagonal":
        k = i + j
        key = k * (H + 1) + torch.where(k % 2 == 0, H - 1 - i, i)
    else:
        ring = torch.minimum(torch.minimum(i, j), torch.minimum(H - 1 - i, W - 1 - j))
        width, height = W - 1 - 2 * ring, H - 1 - 2 * ring  # edge lengths of the ring
        top = i == ring
        right = ~top & (j == W - 1 - ring)
        bottom = ~top & ~right & (i == H - 1 - ring)
        along = torch.where(top, j - ring, torch.where(
            right, width + (i - ring), torch.where(
                bottom, width + height + (W - 1 - ring - j), 2 * width + height + (H - 1 - ring - i))))
        key = ring * (H * W) + along
    return torch.argsort(key, stable=True)  # raster positions (row-major) in visiting order


def _route_weight(weights: torch.Tensor | None, r: int) -> torch.Tensor | float:
    """Weight of route r broadcastable against [Bt, L, D]."""
    if weights is None:
        return 1.0
    if weights.dim() == 2:  # [Bt, R]
        return weights[:, r, None, None]
    return weights[:, :, r, None]  # [Bt, L, R]


def _route_input(x: torch.Tensor | None, r: int, base_dim: int) -> torch.Tensor | None:
    if x is None:
        return None
    return x[r] if x.dim() == base_dim + 1 else x


def multi_route_linear_scan_reference(a, b, routes, weights=None, combine="sum"):
    """Loop over routes and time with explicit gathers and scatters. a, b [Bt, L, D] or [R, Bt, L, D].
    combine "sum": y [Bt, L, D]; "none": every route's y_r stacked, [R, Bt, L, D]."""
    R, L = routes.shape
    y = 0.0
    per_route = []
    for r in range(R):
        idx = routes[r]
        a_r = _route_input(a, r, 3).index_select(1, idx)  # [Bt, L, D] in route order
        b_r = _route_input(b, r, 3).index_select(1, idx)
        h = torch.zeros_like(b_r[:, 0])
        hs = []
        for k in range(L):
            h = a_r[:, k] * h + b_r[:, k]
            hs.append(h)
        y_r = torch.zeros_like(b_r).index_copy(1, idx, torch.stack(hs, 1))  # back to original positions
        if combine == "none":
            per_route.append(y_r)
        else:
            y = y + _route_weight(weights, r) * y_r
    return torch.stack(per_route) if combine == "none" else y


def multi_route_selective_scan_reference(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, routes=None, weights=None, delta_softplus=False,
    combine="sum",
):
    """Loop over routes and time, state [Bt, D, N]; u, delta, z [Bt, L, D] or [R, Bt, L, D];
    A [D, N] or [R, D, N]; B, C [Bt, L, N] or [R, Bt, L, N]; D, delta_bias [D] or [R, D].
    combine "sum": y [Bt, L, D]; "none": every route's y_r stacked, [R, Bt, L, D]."""
    R, L = routes.shape
    y = 0.0
    per_route = []
    for r in range(R):
        idx = routes[r]
        u_r = _route_input(u, r, 3).index_select(1, idx)
        dt = _route_input(delta, r, 3).index_select(1, idx)
        B_r = _route_input(B, r, 3).index_select(1, idx)
        C_r = _route_input(C, r, 3).index_select(1, idx)
        A_r = _route_input(A, r, 2)
        if delta_bias is not None:
            dt = dt + _route_input(delta_bias, r, 1)
        if delta_softplus:
            dt = F.softplus(dt)
        h = u_r.new_zeros(u_r.shape[0], u_r.shape[2], A_r.shape[1])  # [Bt, D, N]
        ys = []
        for k in range(L):
            h = torch.exp(dt[:, k, :, None] * A_r) * h + (dt[:, k] * u_r[:, k])[:, :, None] * B_r[:, k, None, :]
            ys.append((h * C_r[:, k, None, :]).sum(-1))
        y_r = torch.stack(ys, 1)  # [Bt, L, D] in route order
        if D is not None:
            y_r = y_r + _route_input(D, r, 1) * u_r
        if z is not None:
            y_r = y_r * F.silu(_route_input(z, r, 3).index_select(1, idx))
        y_r = torch.zeros_like(y_r).index_copy(1, idx, y_r)
        if combine == "none":
            per_route.append(y_r)
        else:
            y = y + _route_weight(weights, r) * y_r
    return torch.stack(per_route) if combine == "none" else y


@triton.jit
def _affine(a1, b1, a2, b2):
    # (x -> a1 x + b1) then (x -> a2 x + b2)
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _softplus(x):
    # torch's softplus with threshold 20
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _mr_linear_fwd_kernel(
    a_ptr, b_ptr, routes_ptr, w_ptr, y_ptr,  # a, b: [(R,) Bt, L, D]; routes: [R, L]; w: [Bt, (L,) R]
    # y: [Bt, L, D] fp32, or [R, Bt, L, D] when SPLIT (y_rs = Bt * L * D)
    L, D, R, a_rs, b_rs, w_sb, w_sl, y_rs,
    HAS_W: tl.constexpr, SPLIT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (sample, channel block[, route when SPLIT]): for each of its routes, a chunked scan over the
    gathered tokens, scattered back (added into y, or stored to the route's slice when SPLIT)."""
    pid_b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    i = tl.arange(0, BLOCK_L)
    zero64 = pid_b.to(tl.int64) * 0
    row = pid_b.to(tl.int64) * L * D
    r_lo = 0
    r_hi = R
    if SPLIT:
        r_lo = tl.program_id(2)
        r_hi = r_lo + 1
    for r in range(r_lo, r_hi):
        r64 = zero64 + r
        carry = tl.zeros([BLOCK_D], dtype=tl.float32)
        for c in range(tl.cdiv(L, BLOCK_L)):
            k = c * BLOCK_L + i
            kmask = k < L
            pos = tl.load(routes_ptr + r * L + k, mask=kmask, other=0)  # [BLOCK_L] int64
            m2 = kmask[:, None] & dmask[None, :]
            off = row + pos[:, None] * D + d[None, :]  # [BLOCK_L, BLOCK_D]
            av = tl.load(a_ptr + r64 * a_rs + off, mask=m2, other=1.0).to(tl.float32)
            bv = tl.load(b_ptr + r64 * b_rs + off, mask=m2, other=0.0).to(tl.float32)
            acum, bcum = tl.associative_scan((av, bv), 0, _affine)
            h = acum * carry[None, :] + bcum
            carry = tl.sum(tl.where((i == BLOCK_L - 1)[:, None], h, 0.0), axis=0)  # padding passes it through
            if HAS_W:
                w = tl.load(w_ptr + pid_b * w_sb + pos * w_sl + r, mask=kmask, other=0.0).to(tl.float32)
                h = h * w[:, None]
            if SPLIT:
                tl.store(y_ptr + r64 * y_rs + off, h, mask=m2)
            else:
                if r == 0:
                    tl.store(y_ptr + off, h, mask=m2)
                else:
                    tl.atomic_add(y_ptr + off, h, mask=m2)
        tl.debug_barrier()  # route r's stores land before route r+1 adds to the same positions


@triton.jit
def _mr_linear_bwd_kernel(
    a_ptr, b_ptr, routes_ptr, w_ptr, gy_ptr, scratch_ptr,  # gy: [(R,) Bt, L, D]; scratch: [(R,) Bt, L, D] fp32
    ga_ptr, gb_ptr, gw_ptr,  # ga, gb: like a, b, fp32, zero-filled; gw: [nDb, Bt, L, R] fp32
    L, D, R, Bt, a_rs, b_rs, w_sb, w_sl, gy_rs,  # gy_rs: Bt * L * D when SPLIT (per-route gy and scratch), else 0
    HAS_W: tl.constexpr, SPLIT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per route: recompute the states (forward chunked scan into `scratch`, route order), then the reverse
    scan g[k] = w*gy[p_k] + a[p_{k+1}] * g[k+1] over chunks walked backwards; da = g * h[k-1], db = g.
    SPLIT: one route per program (grid axis 2), its own gy slice and scratch slice; gradients of inputs the
    routes share meet in the atomics."""
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    i = tl.arange(0, BLOCK_L)
    zero64 = pid_b.to(tl.int64) * 0
    row = pid_b.to(tl.int64) * L * D
    n_chunks = tl.cdiv(L, BLOCK_L)
    gw_row = (pid_d * Bt + pid_b).to(tl.int64) * L * R
    r_lo = 0
    r_hi = R
    if SPLIT:
        r_lo = tl.program_id(2)
        r_hi = r_lo + 1
    for r in range(r_lo, r_hi):
        r64 = zero64 + r
        scratch = scratch_ptr + r64 * gy_rs
        carry = tl.zeros([BLOCK_D], dtype=tl.float32)
        for c in range(n_chunks):
            k = c * BLOCK_L + i
            kmask = k < L
            pos = tl.load(routes_ptr + r * L + k, mask=kmask, other=0)
            m2 = kmask[:, None] & dmask[None, :]
            off = row + pos[:, None] * D + d[None, :]
            av = tl.load(a_ptr + r64 * a_rs + off, mask=m2, other=1.0).to(tl.float32)
            bv = tl.load(b_ptr + r64 * b_rs + off, mask=m2, other=0.0).to(tl.float32)
            acum, bcum = tl.associative_scan((av, bv), 0, _affine)
            h = acum * carry[None, :] + bcum
            carry = tl.sum(tl.where((i == BLOCK_L - 1)[:, None], h, 0.0), axis=0)
            tl.store(scratch + row + k.to(tl.int64)[:, None] * D + d[None, :], h, mask=m2)
        tl.debug_barrier()
        carry = tl.zeros([BLOCK_D], dtype=tl.float32)
        for cc in range(n_chunks):
            k = (n_chunks - 1 - cc) * BLOCK_L + (BLOCK_L - 1 - i)  # descending token index within the route
            kmask = k < L
            nmask = (k + 1) < L
            pos = tl.load(routes_ptr + r * L + k, mask=kmask, other=0)
            pos_next = tl.load(routes_ptr + r * L + k + 1, mask=nmask, other=0)
            m2 = kmask[:, None] & dmask[None, :]
            off = row + pos[:, None] * D + d[None, :]
            a_next = tl.load(
                a_ptr + r64 * a_rs + row + pos_next[:, None] * D + d[None, :],
                mask=nmask[:, None] & dmask[None, :], other=0.0,
            ).to(tl.float32)
            gy = tl.load(gy_ptr + r64 * gy_rs + off, mask=m2, other=0.0).to(tl.float32)
            h = tl.load(scratch + row + k.to(tl.int64)[:, None] * D + d[None, :], mask=m2, other=0.0)
            if HAS_W:
                w = tl.load(w_ptr + pid_b * w_sb + pos * w_sl + r, mask=kmask, other=0.0).to(tl.float32)
                tl.store(gw_ptr + gw_row + pos * R + r, tl.sum(gy * h, axis=1), mask=kmask)
                gy = gy * w[:, None]
            acum, gcum = tl.associative_scan((a_next, gy), 0, _affine)
            g = acum * carry[None, :] + gcum
            carry = tl.sum(tl.where((i == BLOCK_L - 1)[:, None], g, 0.0), axis=0)  # row of the smallest k
            h_prev = tl.load(
                scratch + row + (k - 1).to(tl.int64)[:, None] * D + d[None, :], mask=m2 & (k >= 1)[:, None], other=0.0
            )
            tl.atomic_add(ga_ptr + r64 * a_rs + off, g * h_prev, mask=m2)
            tl.atomic_add(gb_ptr + r64 * b_rs + off, g, mask=m2)
        tl.debug_barrier()  # the scratch is rewritten by the next route


@triton.jit
def _mr_selective_step(
    u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, off, offn, dvalid, nvalid, A, Dv, bias,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    """Load one token's inputs (route-offset pointers) and discretise: dt [BD], dA, dBu [BD, NP].

    dvalid [BD] / nvalid [NP]: channel / state masks, all false for a padding step past the sequence end.
    """
    u = tl.load(u_ptr + off, mask=dvalid, other=0.0).to(tl.float32)
    x = tl.load(delta_ptr + off, mask=dvalid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x = x + bias
    dt = x
    if SOFTPLUS:
        dt = _softplus(x)
    dt = tl.where(dvalid, dt, 0.0)  # an invalid step leaves the state unchanged
    Bv = tl.load(B_ptr + offn, mask=nvalid, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + offn, mask=nvalid, other=0.0).to(tl.float32)
    dA = tl.exp(dt[:, None] * A)
    dBu = (dt * u)[:, None] * Bv[None, :]
    zv = u * 0.0
    if HAS_Z:
        zv = tl.load(z_ptr + off, mask=dvalid, other=0.0).to(tl.float32)
    return u, x, dt, Bv, Cv, dA, dBu, zv


@triton.jit
def _mr_selective_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, routes_ptr, w_ptr,
    y_ptr,  # [Bt, L, D] fp32, or [R, Bt, L, D] when SPLIT (y_rs = Bt * L * D)
    L, Dm, N, R, u_rs, delta_rs, A_rs, B_rs, C_rs, z_rs, D_rs, bias_rs, w_sb, w_sl, y_rs,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_W: tl.constexpr,
    SPLIT: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, NP: tl.constexpr,
):
    """Program (sample, channel block[, route when SPLIT]): for each of its routes, a sequential S6 scan over
    the gathered tokens with the state h [BLOCK_D, NP] in registers; y_r is scattered back and combined
    into y (fp32), or stored to the route's slice of y when SPLIT."""
    pid_b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, NP)
    dmask = d < Dm
    nmask = n < N
    zero64 = pid_b.to(tl.int64) * 0
    row = pid_b.to(tl.int64) * L * Dm
    rown = pid_b.to(tl.int64) * L * N
    r_lo = 0
    r_hi = R
    if SPLIT:
        r_lo = tl.program_id(2)
        r_hi = r_lo + 1
    for r in range(r_lo, r_hi):
        r64 = zero64 + r
        A = tl.load(
            A_ptr + r64 * A_rs + d[:, None] * N + n[None, :], mask=dmask[:, None] & nmask[None, :], other=0.0
        ).to(tl.float32)
        Dv = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_D:
            Dv = tl.load(D_ptr + r64 * D_rs + d, mask=dmask, other=0.0).to(tl.float32)
        bias = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + r64 * bias_rs + d, mask=dmask, other=0.0).to(tl.float32)
        h = tl.zeros([BLOCK_D, NP], dtype=tl.float32)
        for k in range(L):
            pos = tl.load(routes_ptr + r * L + k)
            off = row + pos * Dm + d
            offn = rown + pos * N + n
            u, x, dt, Bv, Cv, dA, dBu, zv = _mr_selective_step(
                u_ptr + r64 * u_rs, delta_ptr + r64 * delta_rs, B_ptr + r64 * B_rs, C_ptr + r64 * C_rs,
                z_ptr + r64 * z_rs, off, offn, dmask, nmask, A, Dv, bias,
                HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
            )
            h = dA * h + dBu
            y = tl.sum(h * Cv[None, :], axis=1)
            if HAS_D:
                y += Dv * u
            if HAS_Z:
                y = y * zv * _sigmoid(zv)
            if HAS_W:
                y = y * tl.load(w_ptr + pid_b * w_sb + pos * w_sl + r).to(tl.float32)
            if SPLIT:
                tl.store(y_ptr + r64 * y_rs + off, y, mask=dmask)
            else:
                if r == 0:
                    tl.store(y_ptr + off, y, mask=dmask)
                else:
                    tl.atomic_add(y_ptr + off, y, mask=dmask)
        tl.debug_barrier()


@triton.jit
def _mr_selective_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, routes_ptr, w_ptr,
    gy_ptr,  # [(R,) Bt, L, D]: per route when SPLIT (gy_rs = Bt * L * D), else 0
    ckpt_ptr, hist_ptr,  # per program: ckpt [n_chunks, BLOCK_D, NP], hist [CHUNK, BLOCK_D, NP] fp32
    gu_ptr, gdelta_ptr, gz_ptr,  # like u, delta, z, fp32, zero-filled
    gB_ptr, gC_ptr,  # [nDb, (R,) Bt, L, N] fp32 zero-filled: per-channel-block partials
    gA_ptr, gD_ptr, gbias_ptr,  # gA: [Bt, R, D, N]; gD, gbias: [Bt, R, D] fp32
    gw_ptr,  # [nDb, Bt, L, R] fp32
    L, Dm, N, R, Bt, u_rs, delta_rs, A_rs, B_rs, C_rs, z_rs, D_rs, bias_rs, w_sb, w_sl, gy_rs, gB_blk, gC_blk,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_W: tl.constexpr,
    SPLIT: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, NP: tl.constexpr, CHUNK: tl.constexpr,
):
    """Per route: a forward pass saving the state every CHUNK steps, then chunks in reverse: recompute the
    chunk's states into `hist`, walk it backwards carrying dL/dh [BLOCK_D, NP]. SPLIT: one route per program
    (grid axis 2) with its own gy slice; gradients of inputs the routes share meet in the atomics."""
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, NP)
    dmask = d < Dm
    nmask = n < N
    m2 = dmask[:, None] & nmask[None, :]
    tile = tl.arange(0, BLOCK_D)[:, None] * NP + n[None, :]  # [BLOCK_D, NP] offsets in a scratch slot
    zero64 = pid_b.to(tl.int64) * 0
    zero32 = pid_b * 0  # makes the token index a tensor, so `k < L` is a mask in the interpreter too
    row = pid_b.to(tl.int64) * L * Dm
    rown = pid_b.to(tl.int64) * L * N
    n_chunks = tl.cdiv(L, CHUNK)
    prog = ((pid_b * tl.num_programs(1) + pid_d) * tl.num_programs(2) + tl.program_id(2)).to(tl.int64)
    ckpt = ckpt_ptr + prog * n_chunks * BLOCK_D * NP
    hist = hist_ptr + prog * CHUNK * BLOCK_D * NP
    gw_row = (pid_d * Bt + pid_b).to(tl.int64) * L * R
    r_lo = 0
    r_hi = R
    if SPLIT:
        r_lo = tl.program_id(2)
        r_hi = r_lo + 1
    for r in range(r_lo, r_hi):
        r64 = zero64 + r
        u_r, delta_r, z_r = u_ptr + r64 * u_rs, delta_ptr + r64 * delta_rs, z_ptr + r64 * z_rs
        B_r, C_r = B_ptr + r64 * B_rs, C_ptr + r64 * C_rs
        A = tl.load(A_ptr + r64 * A_rs + d[:, None] * N + n[None, :], mask=m2, other=0.0).to(tl.float32)
        Dv = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_D:
            Dv = tl.load(D_ptr + r64 * D_rs + d, mask=dmask, other=0.0).to(tl.float32)
        bias = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + r64 * bias_rs + d, mask=dmask, other=0.0).to(tl.float32)
        h = tl.zeros([BLOCK_D, NP], dtype=tl.float32)
        for c in range(n_chunks):
            tl.store(ckpt + c * BLOCK_D * NP + tile, h)
            for j in range(tl.minimum(CHUNK, L - c * CHUNK)):
                k = zero32 + c * CHUNK + j
                valid = k < L
                dvalid = dmask & ((d * 0 + k) < L)
                nvalid = nmask & ((n * 0 + k) < L)
                pos = tl.load(routes_ptr + r * L + k, mask=valid, other=0)
                u, x, dt, Bv, Cv, dA, dBu, zv = _mr_selective_step(
                    u_r, delta_r, B_r, C_r, z_r, row + pos * Dm + d, rown + pos * N + n, dvalid, nvalid,
                    A, Dv, bias, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                )
                h = dA * h + dBu
        tl.debug_barrier()
        gh = tl.zeros([BLOCK_D, NP], dtype=tl.float32)
        gA = tl.zeros([BLOCK_D, NP], dtype=tl.float32)
        gD = tl.zeros([BLOCK_D], dtype=tl.float32)
        gbias = tl.zeros([BLOCK_D], dtype=tl.float32)
        for cc in range(n_chunks):
            c = n_chunks - 1 - cc
            h_start = tl.load(ckpt + c * BLOCK_D * NP + tile)
            h = h_start
            steps = tl.minimum(CHUNK, L - c * CHUNK)
            for j in range(steps):
                k = zero32 + c * CHUNK + j
                valid = k < L
                dvalid = dmask & ((d * 0 + k) < L)
                nvalid = nmask & ((n * 0 + k) < L)
                pos = tl.load(routes_ptr + r * L + k, mask=valid, other=0)
                u, x, dt, Bv, Cv, dA, dBu, zv = _mr_selective_step(
                    u_r, delta_r, B_r, C_r, z_r, row + pos * Dm + d, rown + pos * N + n, dvalid, nvalid,
                    A, Dv, bias, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                )
                h = dA * h + dBu
                tl.store(hist + j * BLOCK_D * NP + tile, h)
            tl.debug_barrier()
            for jj in range(steps):
                j = steps - 1 - jj
                k = zero32 + c * CHUNK + j
                valid = k < L
                dvalid = dmask & ((d * 0 + k) < L)
                nvalid = nmask & ((n * 0 + k) < L)
                pos = tl.load(routes_ptr + r * L + k, mask=valid, other=0)
                off = row + pos * Dm + d
                offn = rown + pos * N + n
                u, x, dt, Bv, Cv, dA, dBu, zv = _mr_selective_step(
                    u_r, delta_r, B_r, C_r, z_r, off, offn, dvalid, nvalid,
                    A, Dv, bias, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                )
                h = tl.load(hist + j * BLOCK_D * NP + tile)
                h_prev = tl.load(hist + tl.maximum(j - 1, 0) * BLOCK_D * NP + tile)
                h_prev = tl.where(j > 0, h_prev, h_start)
                gy = tl.load(gy_ptr + r64 * gy_rs + off, mask=dvalid, other=0.0).to(tl.float32)
                y0 = tl.sum(h * Cv[None, :], axis=1) + Dv * u
                gate = zv * 0.0 + 1.0
                if HAS_Z:
                    sz = _sigmoid(zv)
                    gate = zv * sz
                if HAS_W:
                    tl.store(gw_ptr + gw_row + pos * R + r, tl.sum(gy * y0 * gate, axis=0), mask=valid)
                    gy = gy * tl.load(w_ptr + pid_b * w_sb + pos * w_sl + r, mask=valid, other=0.0).to(tl.float32)
                if HAS_Z:
                    gz = gy * y0 * sz * (1.0 + zv * (1.0 - sz))
                    tl.atomic_add(gz_ptr + r64 * z_rs + off, gz, mask=dvalid)
                gy0 = gy * gate
                gD += gy0 * u
                gu = gy0 * Dv
                gC = tl.sum(gy0[:, None] * h, axis=0)  # [NP], this channel block's share
                tl.atomic_add(gC_ptr + pid_d * gC_blk + r64 * C_rs + offn, gC, mask=nvalid)
                gh += gy0[:, None] * Cv[None, :]
                gdA = gh * h_prev * dA  # dL/d(dt * A)
                gA += gdA * dt[:, None]
                ghB = tl.sum(gh * Bv[None, :], axis=1)
                gdt = tl.sum(gdA * A, axis=1) + ghB * u
                gu += ghB * dt
                gB = tl.sum(gh * (dt * u)[:, None], axis=0)
                tl.atomic_add(gB_ptr + pid_d * gB_blk + r64 * B_rs + offn, gB, mask=nvalid)
                gh = gh * dA
                if SOFTPLUS:
                    gx = tl.where(x > 20.0, gdt, gdt * _sigmoid(x))
                else:
                    gx = gdt
                gx = tl.where(dvalid, gx, 0.0)
                gbias += gx
                tl.atomic_add(gu_ptr + r64 * u_rs + off, gu, mask=dvalid)
                tl.atomic_add(gdelta_ptr + r64 * delta_rs + off, gx, mask=dvalid)
            tl.debug_barrier()
        part = (pid_b * R + r).to(tl.int64) * Dm
        tl.store(gA_ptr + part * N + d[:, None] * N + n[None, :], gA, mask=m2)
        tl.store(gD_ptr + part + d, gD, mask=dmask)
        tl.store(gbias_ptr + part + d, gbias, mask=dmask)


def _poison() -> bool:
    """Tests set ROUTEC_POISON=1 so launchers fill outputs with NaN before the kernel writes them."""
    return os.environ.get("ROUTEC_POISON", "") == "1"


def _empty(shape, like: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    if _poison():
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _route_stride(x: torch.Tensor | None, base_dim: int) -> int:
    return 0 if x is None or x.dim() == base_dim else x[0].numel()


def _weight_strides(weights: torch.Tensor | None, L: int, R: int) -> tuple[int, int]:
    if weights is None:
        return 0, 0
    return (R, 0) if weights.dim() == 2 else (L * R, R)


def _weight_grad(gw_part: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    gw = gw_part.sum(0)  # [Bt, L, R]
    return (gw.sum(1) if weights.dim() == 2 else gw).to(weights.dtype)


def _linear_blocks(L: int, D: int) -> dict:
    return dict(BLOCK_L=min(128, max(16, triton.next_power_of_2(L))), BLOCK_D=min(32, triton.next_power_of_2(D)))


def multi_route_linear_scan_triton(a, b, routes, weights, split=False):
    Bt, L, D = b.shape[-3:]
    R = routes.shape[0]
    a, b, routes = a.contiguous(), b.contiguous(), routes.contiguous()
    w = None if weights is None else weights.contiguous()
    y = _empty((R, Bt, L, D) if split else (Bt, L, D), b)
    cfg = _linear_blocks(L, D)
    w_sb, w_sl = _weight_strides(w, L, R)
    grid = (Bt, triton.cdiv(D, cfg["BLOCK_D"]), R if split else 1)
    _mr_linear_fwd_kernel[grid](
        a, b, routes, b if w is None else w, y, L, D, R, _route_stride(a, 3), _route_stride(b, 3), w_sb, w_sl,
        Bt * L * D if split else 0, HAS_W=w is not None, SPLIT=split, **cfg,
    )
    return y.to(torch.result_type(a, b))


def multi_route_linear_scan_triton_backward(a, b, routes, weights, gy, split=False):
    Bt, L, D = b.shape[-3:]
    R = routes.shape[0]
    a, b, routes, gy = a.contiguous(), b.contiguous(), routes.contiguous(), gy.contiguous()
    w = None if weights is None else weights.contiguous()
    cfg = _linear_blocks(L, D)
    grid = (Bt, triton.cdiv(D, cfg["BLOCK_D"]), R if split else 1)
    ga = torch.zeros(a.shape, dtype=torch.float32, device=a.device)
    gb = torch.zeros(b.shape, dtype=torch.float32, device=b.device)
    gw_part = _empty((grid[1], Bt, L, R), b) if w is not None else b
    scratch = _empty((R, Bt, L, D) if split else (Bt, L, D), b)  # SPLIT: routes run at once, one slice each
    w_sb, w_sl = _weight_strides(w, L, R)
    _mr_linear_bwd_kernel[grid](
        a, b, routes, b if w is None else w, gy, scratch, ga, gb, gw_part, L, D, R, Bt,
        _route_stride(a, 3), _route_stride(b, 3), w_sb, w_sl, Bt * L * D if split else 0,
        HAS_W=w is not None, SPLIT=split, **cfg,
    )
    gw = None if w is None else _weight_grad(gw_part, w)
    return ga.to(a.dtype), gb.to(b.dtype), gw


def _combine(split: bool) -> str:
    return "none" if split else "sum"


@torch.library.custom_op("routec::multi_route_linear_scan", mutates_args=())
def _mr_linear_op(
    a: torch.Tensor, b: torch.Tensor, routes: torch.Tensor, weights: torch.Tensor | None, split: bool = False
) -> torch.Tensor:
    if use_triton(a, b, weights):
        return multi_route_linear_scan_triton(a, b, routes, weights, split)
    with torch.no_grad():
        return multi_route_linear_scan_reference(a, b, routes, weights, _combine(split)).contiguous()


@_mr_linear_op.register_fake
def _(a, b, routes, weights, split=False):
    shape = (routes.shape[0], *b.shape[-3:]) if split else b.shape[-3:]
    return b.new_empty(shape, dtype=torch.result_type(a, b))


def _mr_linear_setup(ctx, inputs, output):
    a, b, routes, weights, split = inputs
    ctx.split = split
    ctx.save_for_backward(a, b, routes, weights)


def _mr_linear_backward(ctx, gy):
    a, b, routes, weights = ctx.saved_tensors
    if use_triton(a, b, weights):
        ga, gb, gw = multi_route_linear_scan_triton_backward(a, b, routes, weights, gy, ctx.split)
    else:
        def fn(a, b, routes, weights):
            return multi_route_linear_scan_reference(a, b, routes, weights, _combine(ctx.split))

        ga, gb, _, gw = reference_vjp(fn, (a, b, routes, weights), (gy,))
    return ga, gb, None, gw, None


_mr_linear_op.register_autograd(_mr_linear_backward, setup_context=_mr_linear_setup)


def _selective_blocks(L: int, D: int, N: int) -> dict:
    return dict(BLOCK_D=min(32, triton.next_power_of_2(D)), NP=triton.next_power_of_2(N))


def _selective_args(u, delta, A, B, C, D, z, delta_bias, routes, weights):
    Bt, L, Dm = u.shape[-3:]
    R = routes.shape[0]
    u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
    D, z, delta_bias, w = (None if t is None else t.contiguous() for t in (D, z, delta_bias, weights))
    w_sb, w_sl = _weight_strides(w, L, R)
    ptrs = (u, delta, A, B, C, u if D is None else D, u if z is None else z, u if delta_bias is None else delta_bias,
            routes.contiguous(), u if w is None else w)
    strides = (_route_stride(u, 3), _route_stride(delta, 3), _route_stride(A, 2), _route_stride(B, 3),
               _route_stride(C, 3), _route_stride(z, 3), _route_stride(D, 1), _route_stride(delta_bias, 1),
               w_sb, w_sl)
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_W=w is not None)
    return (Bt, L, Dm, A.shape[-1], R), ptrs, strides, flags


def multi_route_selective_scan_triton(
    u, delta, A, B, C, D, z, delta_bias, routes, weights, delta_softplus, split=False
):
    (Bt, L, Dm, N, R), ptrs, strides, flags = _selective_args(u, delta, A, B, C, D, z, delta_bias, routes, weights)
    cfg = _selective_blocks(L, Dm, N)
    y = _empty((R, Bt, L, Dm) if split else (Bt, L, Dm), u)
    grid = (Bt, triton.cdiv(Dm, cfg["BLOCK_D"]), R if split else 1)
    _mr_selective_fwd_kernel[grid](
        *ptrs, y, L, Dm, N, R, *strides, Bt * L * Dm if split else 0,
        SPLIT=split, SOFTPLUS=delta_softplus, **flags, **cfg,
    )
    return y.to(u.dtype)


def multi_route_selective_scan_triton_backward(
    u, delta, A, B, C, D, z, delta_bias, routes, weights, delta_softplus, gy, split=False
):
    (Bt, L, Dm, N, R), ptrs, strides, flags = _selective_args(u, delta, A, B, C, D, z, delta_bias, routes, weights)
    cfg = _selective_blocks(L, Dm, N)
    CHUNK = min(64, triton.next_power_of_2(L))
    grid = (Bt, triton.cdiv(Dm, cfg["BLOCK_D"]), R if split else 1)
    n_chunks = triton.cdiv(L, CHUNK)
    tile = cfg["BLOCK_D"] * cfg["NP"]
    programs = grid[0] * grid[1] * grid[2]
    ckpt = _empty((programs, n_chunks, tile), u)
    hist = _empty((programs, CHUNK, tile), u)

    def zeros(shape):
        return torch.zeros(shape, dtype=torch.float32, device=u.device)

    gu, gdelta = zeros(u.shape), zeros(delta.shape)
    gz = zeros(z.shape) if z is not None else gu
    gB, gC = zeros((grid[1], *B.shape)), zeros((grid[1], *C.shape))
    gA, gD, gbias = _empty((Bt, R, Dm, N), u), _empty((Bt, R, Dm), u), _empty((Bt, R, Dm), u)
    gw = _empty((grid[1], Bt, L, R), u) if weights is not None else gu
    _mr_selective_bwd_kernel[grid](
        *ptrs, gy.contiguous(), ckpt, hist, gu, gdelta, gz, gB, gC, gA, gD, gbias, gw,
        L, Dm, N, R, Bt, *strides, Bt * L * Dm if split else 0, B.numel(), C.numel(),
        SPLIT=split, SOFTPLUS=delta_softplus, CHUNK=CHUNK, **flags, **cfg,
    )

    def per_route_sum(g, x):  # partials [Bt, R, ...] -> x's shape: per route [R, ...] or shared
        g = g.sum(0)
        return (g if g.dim() == x.dim() else g.sum(0)).to(x.dtype)

    return (
        gu.to(u.dtype), gdelta.to(delta.dtype), per_route_sum(gA, A), gB.sum(0).to(B.dtype),
        gC.sum(0).to(C.dtype),
        None if D is None else per_route_sum(gD, D),
        None if z is None else gz.to(z.dtype),
        None if delta_bias is None else per_route_sum(gbias, delta_bias),
        None if weights is None else _weight_grad(gw, weights),
    )


@torch.library.custom_op("routec::multi_route_selective_scan", mutates_args=())
def _mr_selective_op(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None, routes: torch.Tensor,
    weights: torch.Tensor | None, delta_softplus: bool, split: bool = False,
) -> torch.Tensor:
    if use_triton(u, delta, A, B, C, D, z, delta_bias, weights):
        return multi_route_selective_scan_triton(
            u, delta, A, B, C, D, z, delta_bias, routes, weights, delta_softplus, split
        )
    with torch.no_grad():
        return multi_route_selective_scan_reference(
            u, delta, A, B, C, D, z, delta_bias, routes, weights, delta_softplus, _combine(split)
        ).contiguous()


@_mr_selective_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, routes, weights, delta_softplus, split=False):
    return u.new_empty((routes.shape[0], *u.shape[-3:]) if split else u.shape[-3:])


def _mr_selective_setup(ctx, inputs, output):
    *tensors, delta_softplus, split = inputs
    ctx.delta_softplus = delta_softplus
    ctx.split = split
    ctx.save_for_backward(*tensors)


def _mr_selective_backward(ctx, gy):
    u, delta, A, B, C, D, z, delta_bias, routes, weights = ctx.saved_tensors
    if use_triton(u, delta, A, B, C, D, z, delta_bias, weights):
        gu, gdelta, gA, gB, gC, gD, gz, gbias, gw = multi_route_selective_scan_triton_backward(
            u, delta, A, B, C, D, z, delta_bias, routes, weights, ctx.delta_softplus, gy, ctx.split
        )
    else:
        def fn(*args):
            return multi_route_selective_scan_reference(*args, ctx.delta_softplus, _combine(ctx.split))

        gu, gdelta, gA, gB, gC, gD, gz, gbias, _, gw = reference_vjp(
            fn, (u, delta, A, B, C, D, z, delta_bias, routes, weights), (gy,)
        )
    return gu, gdelta, gA, gB, gC, gD, gz, gbias, None, gw, None, None


_mr_selective_op.register_autograd(_mr_selective_backward, setup_context=_mr_selective_setup)


def _check_routes(op: str, routes: torch.Tensor, L: int, device: torch.device) -> None:
    if routes.dim() != 2 or routes.shape[1] != L or routes.dtype != torch.int64:
        raise ValueError(f"{op}: routes must be int64 [R, L] with L={L}, got {routes.dtype} {list(routes.shape)}")
    if routes.device != device:
        raise ValueError(f"{op}: routes must be on the inputs' device {device}, got {routes.device}")


def _check_input(op: str, name: str, x: torch.Tensor | None, shape: tuple, R: int) -> None:
    if x is not None and tuple(x.shape) not in (tuple(shape), (R, *shape)):
        raise ValueError(f"{op}: {name} must be {list(shape)} or {[R, *shape]}, got {list(x.shape)}")


def _check_weights(op: str, weights: torch.Tensor | None, Bt: int, L: int, R: int) -> None:
    if weights is not None and tuple(weights.shape) not in ((Bt, R), (Bt, L, R)):
        raise ValueError(f"{op}: weights must be [Bt, R] = {[Bt, R]} or [Bt, L, R] = {[Bt, L, R]}, got {list(weights.shape)}")


def _split(op: str, combine: str, weights: torch.Tensor | None) -> bool:
    if combine not in ("sum", "none"):
        raise ValueError(f"{op}: combine must be 'sum' or 'none', got {combine!r}")
    if combine == "none" and weights is not None:
        raise ValueError(f"{op}: combine='none' returns every route's output and takes no weights")
    return combine == "none"


def multi_route_linear_scan(
    a: torch.Tensor, b: torch.Tensor, routes: torch.Tensor, weights: torch.Tensor | None = None, *,
    combine: str = "sum",
) -> torch.Tensor:
    """y = sum_r w_r * scatter_r(scan(gather_r(a), gather_r(b))).

    a, b: [Bt, L, D] (shared by all routes) or [R, Bt, L, D]; routes int64 [R, L], each row a permutation of
    0..L-1 (not checked on the device); weights None (sum), [Bt, R] or [Bt, L, R]. Returns y [Bt, L, D];
    with combine="none" (weights None) every route's scattered output, [R, Bt, L, D].
    """
    op = "multi_route_linear_scan"
    Bt, L, D = b.shape[-3:]
    R = routes.shape[0]
    split = _split(op, combine, weights)
    _check_routes(op, routes, L, b.device)
    _check_input(op, "a", a, (Bt, L, D), R)
    _check_input(op, "b", b, (Bt, L, D), R)
    _check_weights(op, weights, Bt, L, R)
    return torch.ops.routec.multi_route_linear_scan(a, b, routes, weights, split)


def multi_route_selective_scan(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None, routes: torch.Tensor,
    weights: torch.Tensor | None = None, *, delta_softplus: bool = False, combine: str = "sum",
) -> torch.Tensor:
    """Mamba S6 (DESIGN §5 `selective_scan`) along every route, scattered back and combined.

    u, delta, z: [Bt, L, D] or [R, Bt, L, D]; A: [D, N] or [R, D, N]; B, C: [Bt, L, N] or [R, Bt, L, N];
    D, delta_bias: [D] or [R, D]; routes int64 [R, L]; weights None, [Bt, R] or [Bt, L, R]. Returns
    y [Bt, L, D]; with combine="none" (weights None) every route's scattered output, [R, Bt, L, D].
    """
    op = "multi_route_selective_scan"
    Bt, L, Dm = u.shape[-3:]
    R = routes.shape[0]
    N = A.shape[-1]
    split = _split(op, combine, weights)
    _check_routes(op, routes, L, u.device)
    for name, x, shape in (("u", u, (Bt, L, Dm)), ("delta", delta, (Bt, L, Dm)), ("z", z, (Bt, L, Dm)),
                           ("A", A, (Dm, N)), ("B", B, (Bt, L, N)), ("C", C, (Bt, L, N)),
                           ("D", D, (Dm,)), ("delta_bias", delta_bias, (Dm,))):
        _check_input(op, name, x, shape, R)
    _check_weights(op, weights, Bt, L, R)
    return torch.ops.routec.multi_route_selective_scan(
        u, delta, A, B, C, D, z, delta_bias, routes, weights, delta_softplus, split
    )
