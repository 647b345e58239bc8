"""Nonlinear recurrent cells as fused sequential scans: leaky-tau RNN, GRU, LSTM.

The input projection is done beforehand for all steps at once (one big GEMM, `x_proj = x @ w_ih.T + b_ih`);
what remains is inherently sequential: h[t] depends on h[t-1] through the recurrent weights. Each kernel runs
one program per block of BLOCK_B (>= 16) batch rows, loads the recurrent weight tile(s) once, keeps them in
registers for the whole time loop and does `h @ W.T` with `tl.dot` (fp32 accumulation). The dots use
input_precision="tf32x3": three TF32 tensor-core products, about fp32 accuracy, so long recurrences do not
drift as with plain TF32, while IEEE-fp32 (FMA) dots spill the n = 128 tiles to local memory (seen in the
sm_90 resource usage of both). The hidden size is padded to a power of two NP >= 16 with masks. This holds
while the weights fit on chip: n <= MAX_N = 128 (GRU: three n x n tiles, LSTM: four; the n = 128 backward
kernels already spill part of their dW accumulators). For larger n the GRU and LSTM fall back to the
reference with a warning; leaky_rnn_scan has a second, streaming variant for MAX_N < n <= MAX_STREAM_N = 1024
MAX_STREAM_SCRATCH = 2**31  # bytes of dW partials the streaming backward may allocate (else: the reference)
(one program per BLOCK_B rows computes all n outputs each step, reading W tiles from global memory / L2 in a
loop over (output block, K block), h[t-1] read back from the output with a barrier between steps; backward
the same way with per-program fp32 dW partials [programs, n, n]), and the reference above that.

    leaky_rnn_scan: form "pre":  h[t] = h[t-1] + (act(h[t-1] @ w_rec.T + x_proj[t]) - h[t-1]) / tau
                    form "post": h[t] = act((1 - 1/tau) * h[t-1] + (h[t-1] @ w_rec.T + x_proj[t]) / tau)
                    act: tanh, relu, sigmoid, identity, leaky_relu(slope)
    gru_scan:       torch.nn.GRUCell equations, gates (r, z, n) in that order along the 3n axis
    lstm_scan:      torch.nn.LSTMCell equations, gates (i, f, g, o) in that order along the 4n axis

All return every state, [B, T, n] (LSTM: h and c). Backward is BPTT in Triton, in reverse time, from the
saved states: the gate pre-activations are recomputed with the same dots, dW and db are accumulated in fp32
registers per program and summed over programs on the host.
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from .backend import reference_vjp, use_triton

ACTIVATIONS = ("tanh", "relu", "sigmoid", "identity", "leaky_relu")
FORMS = ("pre", "post")
MAX_N = 128
BLOCK_B = 16
# leaky_rnn_scan for MAX_N < n <= MAX_STREAM_N: the streaming kernels (W read in tiles from global memory / L2
# every step, see _leaky_stream_fwd_kernel). Their backward keeps a per-program fp32 dW partial
# [cdiv(B, BLOCK_B), n, n] in global memory (4 MiB per program at n = 1024). Tests lower STREAM_MIN_N to force
# the streaming kernels at small n and STREAM_BLOCK to get several tiles.
MAX_STREAM_N = 1024
MAX_STREAM_SCRATCH = 2**31  # bytes of dW partials the streaming backward may allocate (else: the reference)
STREAM_MIN_N = MAX_N + 1
STREAM_BLOCK = 64


def _act_reference(p: torch.Tensor, activation: str, slope: float = 0.01) -> torch.Tensor:
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(p, slope)
    if activation == "tanh":
        return torch.tanh(p)
    if activation == "relu":
        return torch.relu(p)
    if activation == "sigmoid":
        return torch.sigmoid(p)
    return p


def leaky_rnn_scan_reference(x_proj, w_rec, tau, h0=None, activation="tanh", form="pre", slope=0.01):
    """Loop over time. x_proj [B, T, n], w_rec [n, n] (out x in), tau [n], h0 [B, n] -> h [B, T, n].

    form "pre":  h = h + (act(h @ w_rec.T + x_t) - h) / tau
    form "post": h = act((1 - 1/tau) * h + (h @ w_rec.T + x_t) / tau)
    """
    B, T, n = x_proj.shape
    h = x_proj.new_zeros(B, n) if h0 is None else h0
    hs = []
    for t in range(T):
        if form == "post":
            h = _act_reference((1 - 1 / tau) * h + (h @ w_rec.T + x_proj[:, t]) / tau, activation, slope)
        else:
            h = h + (_act_reference(h @ w_rec.T + x_proj[:, t], activation, slope) - h) / tau
        hs.append(h)
    return torch.stack(hs, 1) if hs else x_proj.new_zeros(B, 0, n)


def gru_scan_reference(x_proj, w_hh, b_hh, h0=None):
    """torch.nn.GRUCell over time. x_proj [B, T, 3n] = x @ w_ih.T + b_ih; w_hh [3n, n]; b_hh [3n]."""
    B, T, n3 = x_proj.shape
    n = n3 // 3
    h = x_proj.new_zeros(B, n) if h0 is None else h0
    hs = []
    for t in range(T):
        xr, xz, xn = x_proj[:, t].chunk(3, dim=-1)
        hr, hz, hn = (h @ w_hh.T + b_hh).chunk(3, dim=-1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        cand = torch.tanh(xn + r * hn)
        h = (1 - z) * cand + z * h
        hs.append(h)
    return torch.stack(hs, 1)


def lstm_scan_reference(x_proj, w_hh, b_hh, h0=None, c0=None):
    """torch.nn.LSTMCell over time. x_proj [B, T, 4n]; w_hh [4n, n]; b_hh [4n] -> (h, c) [B, T, n]."""
    B, T, n4 = x_proj.shape
    n = n4 // 4
    h = x_proj.new_zeros(B, n) if h0 is None else h0
    c = x_proj.new_zeros(B, n) if c0 is None else c0
    hs, cs = [], []
    for t in range(T):
        i, f, g, o = (x_proj[:, t] + h @ w_hh.T + b_hh).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        hs.append(h)
        cs.append(c)
    return torch.stack(hs, 1), torch.stack(cs, 1)


@triton.jit
def _tanh(x):
    # exp formula (no libdevice): saturates correctly to +-1 when exp over/underflows
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _act(p, ACT: tl.constexpr, slope):
    if ACT == 0:
        return _tanh(p)
    elif ACT == 1:
        return tl.maximum(p, 0.0)
    elif ACT == 2:
        return _sigmoid(p)
    elif ACT == 4:
        return tl.where(p > 0.0, p, p * slope)
    else:
        return p


@triton.jit
def _act_grad(a, p, ACT: tl.constexpr, slope):
    """d act / d p, in terms of the output a = act(p) (leaky_relu: of the input p, as torch does)."""
    if ACT == 0:
        return 1.0 - a * a
    elif ACT == 1:
        return (a > 0.0).to(tl.float32)
    elif ACT == 2:
        return a * (1.0 - a)
    elif ACT == 4:
        return tl.where(p > 0.0, 1.0, slope)
    else:
        return tl.full(a.shape, 1.0, tl.float32)


@triton.jit
def _leaky_cell(h, dot, x, tau, ACT: tl.constexpr, POST: tl.constexpr, slope):
    """One step of either form from h[t-1] and dot = h[t-1] @ W.T: returns (h[t], q, z) with
    z = act(dot + x) (pre) or dot + x (post), q = h + (z - h) / tau, h[t] = q (pre) or act(q) (post)."""
    p = dot + x
    if POST:
        z = p
    else:
        z = _act(p, ACT, slope)
    q = h + (z - h) / tau
    if POST:
        h_new = _act(q, ACT, slope)
    else:
        h_new = q
    return h_new, q, z, p


@triton.jit
def _leaky_cell_grad(g, h_prev, h_new, q, z, p, tau, ACT: tl.constexpr, POST: tl.constexpr, slope):
    """From g = dL/dh[t] (all paths): (gp = dL/dp, the recurrent part dL/dh[t-1] without the W path,
    the tau gradient contribution)."""
    if POST:
        gq = g * _act_grad(h_new, q, ACT, slope)
        gp = gq / tau
    else:
        gq = g
        gp = g / tau * _act_grad(z, p, ACT, slope)
    return gp, gq * (1.0 - 1.0 / tau), -gq * (z - h_prev) / (tau * tau)


@triton.jit
def _load_wT(w_ptr, gate, n, NP: tl.constexpr):
    """Gate `gate` of a [G*n, n] weight, transposed and zero-padded: wT[k, j] = w[gate*n + j, k], [NP, NP]."""
    k = tl.arange(0, NP)[:, None]
    j = tl.arange(0, NP)[None, :]
    return tl.load(w_ptr + (gate * n + j) * n + k, mask=(k < n) & (j < n), other=0.0).to(tl.float32)


@triton.jit
def _load_vec(ptr, gate, n, NP: tl.constexpr):
    j = tl.arange(0, NP)
    return tl.load(ptr + gate * n + j, mask=j < n, other=0.0).to(tl.float32)


@triton.jit
def _store_wgrad(ptr, gw, gate, n, NP: tl.constexpr):
    """Store a [NP(out j), NP(in k)] fp32 tile into rows gate*n.. of a [G*n, n] per-program partial."""
    j = tl.arange(0, NP)[:, None]
    k = tl.arange(0, NP)[None, :]
    tl.store(ptr + (gate * n + j) * n + k, gw, mask=(j < n) & (k < n))


@triton.jit
def _hdot(h, wT, PREC: tl.constexpr):
    return tl.dot(h, wT, input_precision=PREC, out_dtype=tl.float32)


@triton.jit
def _leaky_fwd_kernel(
    x_ptr, w_ptr, tau_ptr, h0_ptr, h_ptr,  # x, h: [B, T, n]; w: [n, n]; tau: [n]; h0: [B, n]
    B, T, n, slope,
    HAS_H0: tl.constexpr, ACT: tl.constexpr, POST: tl.constexpr, NP: tl.constexpr, BLOCK_B: tl.constexpr,
    PREC: tl.constexpr,
):
    """One program per BLOCK_B batch rows; w_rec.T stays in registers across the sequential time loop."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, NP)
    m2 = (rows < B)[:, None] & (cols < n)[None, :]  # [BB, NP]
    rows64 = rows.to(tl.int64)[:, None]
    wT = _load_wT(w_ptr, 0, n, NP)  # [NP, NP]
    tau = tl.load(tau_ptr + cols, mask=cols < n, other=1.0).to(tl.float32)[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + rows64 * n + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_B, NP], dtype=tl.float32)
    base = rows64 * T * n + cols[None, :]
    for t in range(T):
        x = tl.load(x_ptr + base + t * n, mask=m2, other=0.0).to(tl.float32)
        h_new, q, z, p = _leaky_cell(h, _hdot(h, wT, PREC), x, tau, ACT, POST, slope)
        h = tl.where(m2, h_new, 0.0)
        tl.store(h_ptr + base + t * n, h.to(h_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _leaky_bwd_kernel(
    x_ptr, w_ptr, tau_ptr, h0_ptr, h_ptr, gh_ptr,  # as forward; gh: dL/dh [B, T, n]
    gx_ptr, gw_ptr, gtau_ptr, gh0_ptr,  # gx: [B, T, n]; gw: [P, n, n]; gtau: [P, n] per program; gh0: [B, n]
    B, T, n, slope,
    HAS_H0: tl.constexpr, ACT: tl.constexpr, POST: tl.constexpr, NP: tl.constexpr, BLOCK_B: tl.constexpr,
    PREC: tl.constexpr,
):
    """Reverse-time BPTT over the same row blocks; p[t] is recomputed from the saved h[t-1]."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, NP)
    m2 = (rows < B)[:, None] & (cols < n)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    wT = _load_wT(w_ptr, 0, n, NP)  # [NP(k), NP(j)]
    tau = tl.load(tau_ptr + cols, mask=cols < n, other=1.0).to(tl.float32)[None, :]
    if HAS_H0:
        h_init = tl.load(h0_ptr + rows64 * n + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    else:
        h_init = tl.zeros([BLOCK_B, NP], dtype=tl.float32)
    base = rows64 * T * n + cols[None, :]
    carry = tl.zeros([BLOCK_B, NP], dtype=tl.float32)  # dL/dh[t] from the future
    gw = tl.zeros([NP, NP], dtype=tl.float32)
    gtau = tl.zeros([NP], dtype=tl.float32)
    for i in range(T):
        t = T - 1 - i
        t_prev = tl.maximum(t - 1, 0)
        h_prev = tl.load(h_ptr + base + t_prev * n, mask=m2, other=0.0).to(tl.float32)
        h_prev = tl.where(t > 0, h_prev, h_init)
        h_cur = tl.load(h_ptr + base + t * n, mask=m2, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + base + t * n, mask=m2, other=0.0).to(tl.float32)
        h_new, q, z, p = _leaky_cell(h_prev, _hdot(h_prev, wT, PREC), x, tau, ACT, POST, slope)
        g = tl.load(gh_ptr + base + t * n, mask=m2, other=0.0).to(tl.float32) + carry
        gp, g_leak, g_tau = _leaky_cell_grad(g, h_prev, h_cur, q, z, p, tau, ACT, POST, slope)
        gp = tl.where(m2, gp, 0.0)
        tl.store(gx_ptr + base + t * n, gp.to(gx_ptr.dtype.element_ty), mask=m2)
        gtau += tl.sum(tl.where(m2, g_tau, 0.0), axis=0)
        gw += tl.dot(tl.trans(gp), h_prev, input_precision=PREC, out_dtype=tl.float32)
        carry = tl.where(m2, g_leak + _hdot(gp, tl.trans(wT), PREC), 0.0)
    tl.store(gh0_ptr + rows64 * n + cols[None, :], carry.to(gh0_ptr.dtype.element_ty), mask=m2)
    _store_wgrad(gw_ptr + pid.to(tl.int64) * n * n, gw, 0, n, NP)
    tl.store(gtau_ptr + pid * n + cols, gtau, mask=cols < n)


@triton.jit
def _stream_h_prev(h_ptr, h0_ptr, rows64, rmask, c, n, T, t, HAS_H0: tl.constexpr):
    """h[t-1][rows, c] from the output (t > 0) or h0 / zeros (t == 0), fp32; `.cg` loads (L2, not L1), so
    values other threads of this program stored in the previous step are seen after the barrier."""
    m = rmask[:, None] & (c < n)[None, :]
    tv = (c * 0 + t)[None, :]  # t as a tensor: masks are tensors in the interpreter too
    t_prev = tl.maximum(t - 1, 0)
    v = tl.load(h_ptr + (rows64 * T + t_prev) * n + c[None, :], mask=m & (tv > 0), other=0.0,
                cache_modifier=".cg").to(tl.float32)
    if HAS_H0:
        v += tl.load(h0_ptr + rows64 * n + c[None, :], mask=m & (tv == 0), other=0.0).to(tl.float32)
    return v


@triton.jit
def _leaky_stream_fwd_kernel(
    x_ptr, w_ptr, tau_ptr, h0_ptr, h_ptr,  # x, h: [B, T, n]; w: [n, n]; tau: [n]; h0: [B, n]
    B, T, n, slope,
    HAS_H0: tl.constexpr, ACT: tl.constexpr, POST: tl.constexpr, BLOCK_B: tl.constexpr, BN: tl.constexpr,
    PREC: tl.constexpr,
):
    """For n too large to keep W in registers: one program per BLOCK_B batch rows; each step computes all n
    outputs block by block (BN columns), streaming W tiles [BN(k), BN(j)] from global memory (L2-resident)
    in a loop over the K blocks with tl.dot, reading h[t-1] back from the output (h0 at t = 0) and storing
    h[t] there; a barrier between steps makes the whole new h visible to every thread of the program."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows64 = rows.to(tl.int64)[:, None]
    ar = tl.arange(0, BN)
    for t in range(T):
        for j0 in range(0, n, BN):
            cj = j0 + ar
            mj = rmask[:, None] & (cj < n)[None, :]
            acc = tl.zeros([BLOCK_B, BN], dtype=tl.float32)
            for k0 in range(0, n, BN):
                ck = k0 + ar
                hk = _stream_h_prev(h_ptr, h0_ptr, rows64, rmask, ck, n, T, t, HAS_H0)  # [BB, BN(k)]
                wT = tl.load(w_ptr + cj[None, :].to(tl.int64) * n + ck[:, None],
                             mask=(ck < n)[:, None] & (cj < n)[None, :], other=0.0).to(tl.float32)  # [BN(k), BN(j)]
                acc += _hdot(hk, wT, PREC)
            hj = _stream_h_prev(h_ptr, h0_ptr, rows64, rmask, cj, n, T, t, HAS_H0)
            x = tl.load(x_ptr + (rows64 * T + t) * n + cj[None, :], mask=mj, other=0.0).to(tl.float32)
            tau = tl.load(tau_ptr + cj, mask=cj < n, other=1.0).to(tl.float32)[None, :]
            h_new, q, z, p = _leaky_cell(hj, acc, x, tau, ACT, POST, slope)
            tl.store(h_ptr + (rows64 * T + t) * n + cj[None, :], h_new.to(h_ptr.dtype.element_ty), mask=mj)
        tl.debug_barrier()


@triton.jit
def _leaky_stream_bwd_kernel(
    x_ptr, w_ptr, tau_ptr, h0_ptr, h_ptr, gh_ptr,  # as forward; gh: dL/dh [B, T, n]
    gx_ptr, gw_ptr, gtau_ptr, gh0_ptr,  # gx: [B, T, n]; gw: [P, n, n]; gtau: [P, n]; gh0: [B, n] fp32
    gq_ptr, gp_ptr,  # fp32 scratch [B, n]
    B, T, n, slope,
    HAS_H0: tl.constexpr, ACT: tl.constexpr, POST: tl.constexpr, BLOCK_B: tl.constexpr, BN: tl.constexpr,
    PREC: tl.constexpr,
):
    """Reverse-time BPTT of the streaming forward, same row blocks. gh0 holds the carry dL/dh[t] between steps
    (dL/dh0 at the end). Each step: (1) per output block j, recompute p[t] (streaming W), g = gh[t] + carry,
    store gp = dL/dp into gx[t] and into the fp32 scratch gp, the leak part of dL/dh[t-1] into the scratch
    gq, accumulate dtau in the program's fp32 partial; barrier; (2) per input block k,
    carry[k] = gq[k] + sum_j gp[j] @ W[j, k] and dW[j, k] += gp[j].T @ h[t-1][k] into the program's fp32
    partial [n, n]; barrier. Partials are summed on the host."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows64 = rows.to(tl.int64)[:, None]
    ar = tl.arange(0, BN)
    gw_prog = gw_ptr + pid.to(tl.int64) * n * n
    gtau_prog = gtau_ptr + pid.to(tl.int64) * n
    for i in range(T):
        t = T - 1 - i
        acc_on = (tl.zeros([BN], dtype=tl.int32) + i) > 0  # [BN]: whether the partials already hold a value
        for j0 in range(0, n, BN):  # phase 1
            cj = j0 + ar
            mj = rmask[:, None] & (cj < n)[None, :]
            acc = tl.zeros([BLOCK_B, BN], dtype=tl.float32)
            for k0 in range(0, n, BN):
                ck = k0 + ar
                hk = _stream_h_prev(h_ptr, h0_ptr, rows64, rmask, ck, n, T, t, HAS_H0)
                wT = tl.load(w_ptr + cj[None, :].to(tl.int64) * n + ck[:, None],
                             mask=(ck < n)[:, None] & (cj < n)[None, :], other=0.0).to(tl.float32)
                acc += _hdot(hk, wT, PREC)
            hj = _stream_h_prev(h_ptr, h0_ptr, rows64, rmask, cj, n, T, t, HAS_H0)
            offs = (rows64 * T + t) * n + cj[None, :]
            x = tl.load(x_ptr + offs, mask=mj, other=0.0).to(tl.float32)
            h_cur = tl.load(h_ptr + offs, mask=mj, other=0.0).to(tl.float32)
            tau = tl.load(tau_ptr + cj, mask=cj < n, other=1.0).to(tl.float32)[None, :]
            h_new, q, z, p = _leaky_cell(hj, acc, x, tau, ACT, POST, slope)
            carry = tl.load(gh0_ptr + rows64 * n + cj[None, :], mask=mj & acc_on[None, :], other=0.0,
                            cache_modifier=".cg").to(tl.float32)
            g = tl.load(gh_ptr + offs, mask=mj, other=0.0).to(tl.float32) + carry
            gp, g_leak, g_tau = _leaky_cell_grad(g, hj, h_cur, q, z, p, tau, ACT, POST, slope)
            gp = tl.where(mj, gp, 0.0)
            tl.store(gx_ptr + offs, gp.to(gx_ptr.dtype.element_ty), mask=mj)
            tl.store(gp_ptr + rows64 * n + cj[None, :], gp, mask=mj)
            tl.store(gq_ptr + rows64 * n + cj[None, :], g_leak, mask=mj)
            gtau = tl.sum(tl.where(mj, g_tau, 0.0), axis=0)
            gtau += tl.load(gtau_prog + cj, mask=(cj < n) & acc_on, other=0.0, cache_modifier=".cg")
            tl.store(gtau_prog + cj, gtau, mask=cj < n)
        tl.debug_barrier()
        for k0 in range(0, n, BN):  # phase 2
            ck = k0 + ar
            mk = rmask[:, None] & (ck < n)[None, :]
            hk = _stream_h_prev(h_ptr, h0_ptr, rows64, rmask, ck, n, T, t, HAS_H0)  # [BB, BN(k)]
            carry = tl.load(gq_ptr + rows64 * n + ck[None, :], mask=mk, other=0.0, cache_modifier=".cg")
            for j0 in range(0, n, BN):
                cj = j0 + ar
                mj = rmask[:, None] & (cj < n)[None, :]
                gp = tl.load(gp_ptr + rows64 * n + cj[None, :], mask=mj, other=0.0,
                             cache_modifier=".cg")  # [BB, BN(j)] fp32
                wjk = (cj < n)[:, None] & (ck < n)[None, :]
                w_offs = cj[:, None].to(tl.int64) * n + ck[None, :]
                w = tl.load(w_ptr + w_offs, mask=wjk, other=0.0).to(tl.float32)  # [BN(j), BN(k)]
                carry += _hdot(gp, w, PREC)
                gw = tl.dot(tl.trans(gp), hk, input_precision=PREC, out_dtype=tl.float32)
                gw += tl.load(gw_prog + w_offs, mask=wjk & acc_on[:, None], other=0.0, cache_modifier=".cg")
                tl.store(gw_prog + w_offs, gw, mask=wjk)
            tl.store(gh0_ptr + rows64 * n + ck[None, :], carry.to(gh0_ptr.dtype.element_ty), mask=mk)
        tl.debug_barrier()


@triton.jit
def _gru_fwd_kernel(
    x_ptr, w_ptr, b_ptr, h0_ptr, h_ptr,  # x: [B, T, 3n]; w: [3n, n]; b: [3n]; h0: [B, n]; h: [B, T, n]
    B, T, n,
    HAS_H0: tl.constexpr, NP: tl.constexpr, BLOCK_B: tl.constexpr, PREC: tl.constexpr,
):
    """GRUCell over time, one program per BLOCK_B rows, the three recurrent tiles held in registers."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, NP)
    m2 = (rows < B)[:, None] & (cols < n)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    wr, wz, wn = _load_wT(w_ptr, 0, n, NP), _load_wT(w_ptr, 1, n, NP), _load_wT(w_ptr, 2, n, NP)
    br = _load_vec(b_ptr, 0, n, NP)[None, :]
    bz = _load_vec(b_ptr, 1, n, NP)[None, :]
    bn = _load_vec(b_ptr, 2, n, NP)[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + rows64 * n + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_B, NP], dtype=tl.float32)
    xbase = rows64 * T * 3 * n + cols[None, :]
    hbase = rows64 * T * n + cols[None, :]
    for t in range(T):
        xt = xbase + t * 3 * n
        r = _sigmoid(tl.load(x_ptr + xt, mask=m2, other=0.0).to(tl.float32) + _hdot(h, wr, PREC) + br)
        z = _sigmoid(tl.load(x_ptr + xt + n, mask=m2, other=0.0).to(tl.float32) + _hdot(h, wz, PREC) + bz)
        hn = _hdot(h, wn, PREC) + bn
        cand = _tanh(tl.load(x_ptr + xt + 2 * n, mask=m2, other=0.0).to(tl.float32) + r * hn)
        h = tl.where(m2, (1.0 - z) * cand + z * h, 0.0)
        tl.store(h_ptr + hbase + t * n, h.to(h_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _gru_bwd_kernel(
    x_ptr, w_ptr, b_ptr, h0_ptr, h_ptr, gh_ptr,
    gx_ptr, gw_ptr, gb_ptr, gh0_ptr,  # gx: [B, T, 3n]; gw: [P, 3n, n]; gb: [P, 3n]; gh0: [B, n]
    B, T, n,
    HAS_H0: tl.constexpr, NP: tl.constexpr, BLOCK_B: tl.constexpr, PREC: tl.constexpr,
):
    """Reverse-time BPTT for the GRU; gates recomputed from the saved h[t-1]."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, NP)
    m2 = (rows < B)[:, None] & (cols < n)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    wr, wz, wn = _load_wT(w_ptr, 0, n, NP), _load_wT(w_ptr, 1, n, NP), _load_wT(w_ptr, 2, n, NP)
    br = _load_vec(b_ptr, 0, n, NP)[None, :]
    bz = _load_vec(b_ptr, 1, n, NP)[None, :]
    bn = _load_vec(b_ptr, 2, n, NP)[None, :]
    if HAS_H0:
        h_init = tl.load(h0_ptr + rows64 * n + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    else:
        h_init = tl.zeros([BLOCK_B, NP], dtype=tl.float32)
    xbase = rows64 * T * 3 * n + cols[None, :]
    hbase = rows64 * T * n + cols[None, :]
    carry = tl.zeros([BLOCK_B, NP], dtype=tl.float32)
    gwr = tl.zeros([NP, NP], dtype=tl.float32)
    gwz = tl.zeros([NP, NP], dtype=tl.float32)
    gwn = tl.zeros([NP, NP], dtype=tl.float32)
    gbr = tl.zeros([NP], dtype=tl.float32)
    gbz = tl.zeros([NP], dtype=tl.float32)
    gbn = tl.zeros([NP], dtype=tl.float32)
    for i in range(T):
        t = T - 1 - i
        t_prev = tl.maximum(t - 1, 0)
        h_prev = tl.load(h_ptr + hbase + t_prev * n, mask=m2, other=0.0).to(tl.float32)
        h_prev = tl.where(t > 0, h_prev, h_init)
        xt = xbase + t * 3 * n
        r = _sigmoid(tl.load(x_ptr + xt, mask=m2, other=0.0).to(tl.float32) + _hdot(h_prev, wr, PREC) + br)
        z = _sigmoid(tl.load(x_ptr + xt + n, mask=m2, other=0.0).to(tl.float32) + _hdot(h_prev, wz, PREC) + bz)
        hn = _hdot(h_prev, wn, PREC) + bn
        cand = _tanh(tl.load(x_ptr + xt + 2 * n, mask=m2, other=0.0).to(tl.float32) + r * hn)
        g = tl.load(gh_ptr + hbase + t * n, mask=m2, other=0.0).to(tl.float32) + carry
        gpn = tl.where(m2, g * (1.0 - z) * (1.0 - cand * cand), 0.0)  # d pre-activation of the candidate
        gpz = tl.where(m2, g * (h_prev - cand) * z * (1.0 - z), 0.0)
        gpr = tl.where(m2, gpn * hn * r * (1.0 - r), 0.0)
        ghn = gpn * r  # d (h @ w_n.T + b_n)
        tl.store(gx_ptr + xt, gpr.to(gx_ptr.dtype.element_ty), mask=m2)
        tl.store(gx_ptr + xt + n, gpz.to(gx_ptr.dtype.element_ty), mask=m2)
        tl.store(gx_ptr + xt + 2 * n, gpn.to(gx_ptr.dtype.element_ty), mask=m2)
        gbr += tl.sum(gpr, axis=0)
        gbz += tl.sum(gpz, axis=0)
        gbn += tl.sum(ghn, axis=0)
        gwr += tl.dot(tl.trans(gpr), h_prev, input_precision=PREC, out_dtype=tl.float32)
        gwz += tl.dot(tl.trans(gpz), h_prev, input_precision=PREC, out_dtype=tl.float32)
        gwn += tl.dot(tl.trans(ghn), h_prev, input_precision=PREC, out_dtype=tl.float32)
        back = _hdot(gpr, tl.trans(wr), PREC) + _hdot(gpz, tl.trans(wz), PREC) + _hdot(ghn, tl.trans(wn), PREC)
        carry = tl.where(m2, g * z + back, 0.0)
    tl.store(gh0_ptr + rows64 * n + cols[None, :], carry.to(gh0_ptr.dtype.element_ty), mask=m2)
    gw_prog = gw_ptr + pid.to(tl.int64) * 3 * n * n
    _store_wgrad(gw_prog, gwr, 0, n, NP)
    _store_wgrad(gw_prog, gwz, 1, n, NP)
    _store_wgrad(gw_prog, gwn, 2, n, NP)
    gb_prog = gb_ptr + pid * 3 * n
    tl.store(gb_prog + cols, gbr, mask=cols < n)
    tl.store(gb_prog + n + cols, gbz, mask=cols < n)
    tl.store(gb_prog + 2 * n + cols, gbn, mask=cols < n)


@triton.jit
def _lstm_fwd_kernel(
    x_ptr, w_ptr, b_ptr, h0_ptr, c0_ptr, h_ptr, c_ptr,  # x: [B, T, 4n]; w: [4n, n]; b: [4n]; h, c: [B, T, n]
    B, T, n,
    HAS_H0: tl.constexpr, HAS_C0: tl.constexpr, NP: tl.constexpr, BLOCK_B: tl.constexpr, PREC: tl.constexpr,
):
    """LSTMCell over time, one program per BLOCK_B rows, the four recurrent tiles held in registers."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, NP)
    m2 = (rows < B)[:, None] & (cols < n)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    wi, wf = _load_wT(w_ptr, 0, n, NP), _load_wT(w_ptr, 1, n, NP)
    wg, wo = _load_wT(w_ptr, 2, n, NP), _load_wT(w_ptr, 3, n, NP)
    bi = _load_vec(b_ptr, 0, n, NP)[None, :]
    bf = _load_vec(b_ptr, 1, n, NP)[None, :]
    bg = _load_vec(b_ptr, 2, n, NP)[None, :]
    bo = _load_vec(b_ptr, 3, n, NP)[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + rows64 * n + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_B, NP], dtype=tl.float32)
    if HAS_C0:
        c = tl.load(c0_ptr + rows64 * n + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    else:
        c = tl.zeros([BLOCK_B, NP], dtype=tl.float32)
    xbase = rows64 * T * 4 * n + cols[None, :]
    hbase = rows64 * T * n + cols[None, :]
    for t in range(T):
        xt = xbase + t * 4 * n
        ig = _sigmoid(tl.load(x_ptr + xt, mask=m2, other=0.0).to(tl.float32) + _hdot(h, wi, PREC) + bi)
        fg = _sigmoid(tl.load(x_ptr + xt + n, mask=m2, other=0.0).to(tl.float32) + _hdot(h, wf, PREC) + bf)
        gg = _tanh(tl.load(x_ptr + xt + 2 * n, mask=m2, other=0.0).to(tl.float32) + _hdot(h, wg, PREC) + bg)
        og = _sigmoid(tl.load(x_ptr + xt + 3 * n, mask=m2, other=0.0).to(tl.float32) + _hdot(h, wo, PREC) + bo)
        c = tl.where(m2, fg * c + ig * gg, 0.0)
        h = tl.where(m2, og * _tanh(c), 0.0)
        tl.store(h_ptr + hbase + t * n, h.to(h_ptr.dtype.element_ty), mask=m2)
        tl.store(c_ptr + hbase + t * n, c.to(c_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _lstm_bwd_kernel(
    x_ptr, w_ptr, b_ptr, h0_ptr, c0_ptr, h_ptr, c_ptr, gh_ptr, gc_ptr,
    gx_ptr, gw_ptr, gb_ptr, gh0_ptr, gc0_ptr,  # gx: [B, T, 4n]; gw: [P, 4n, n]; gb: [P, 4n]; gh0, gc0: [B, n]
    B, T, n,
    HAS_H0: tl.constexpr, HAS_C0: tl.constexpr, NP: tl.constexpr, BLOCK_B: tl.constexpr, PREC: tl.constexpr,
):
    """Reverse-time BPTT for the LSTM; gates recomputed from the saved h[t-1], c[t-1]."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, NP)
    m2 = (rows < B)[:, None] & (cols < n)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    wi, wf = _load_wT(w_ptr, 0, n, NP), _load_wT(w_ptr, 1, n, NP)
    wg, wo = _load_wT(w_ptr, 2, n, NP), _load_wT(w_ptr, 3, n, NP)
    bi = _load_vec(b_ptr, 0, n, NP)[None, :]
    bf = _load_vec(b_ptr, 1, n, NP)[None, :]
    bg = _load_vec(b_ptr, 2, n, NP)[None, :]
    bo = _load_vec(b_ptr, 3, n, NP)[None, :]
    if HAS_H0:
        h_init = tl.load(h0_ptr + rows64 * n + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    else:
        h_init = tl.zeros([BLOCK_B, NP], dtype=tl.float32)
    if HAS_C0:
        c_init = tl.load(c0_ptr + rows64 * n + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    else:
        c_init = tl.zeros([BLOCK_B, NP], dtype=tl.float32)
    xbase = rows64 * T * 4 * n + cols[None, :]
    hbase = rows64 * T * n + cols[None, :]
    carry_h = tl.zeros([BLOCK_B, NP], dtype=tl.float32)
    carry_c = tl.zeros([BLOCK_B, NP], dtype=tl.float32)
    gwi = tl.zeros([NP, NP], dtype=tl.float32)
    gwf = tl.zeros([NP, NP], dtype=tl.float32)
    gwg = tl.zeros([NP, NP], dtype=tl.float32)
    gwo = tl.zeros([NP, NP], dtype=tl.float32)
    gbi = tl.zeros([NP], dtype=tl.float32)
    gbf = tl.zeros([NP], dtype=tl.float32)
    gbg = tl.zeros([NP], dtype=tl.float32)
    gbo = tl.zeros([NP], dtype=tl.float32)
    for i in range(T):
        t = T - 1 - i
        t_prev = tl.maximum(t - 1, 0)
        h_prev = tl.load(h_ptr + hbase + t_prev * n, mask=m2, other=0.0).to(tl.float32)
        h_prev = tl.where(t > 0, h_prev, h_init)
        c_prev = tl.load(c_ptr + hbase + t_prev * n, mask=m2, other=0.0).to(tl.float32)
        c_prev = tl.where(t > 0, c_prev, c_init)
        c = tl.load(c_ptr + hbase + t * n, mask=m2, other=0.0).to(tl.float32)
        xt = xbase + t * 4 * n
        ig = _sigmoid(tl.load(x_ptr + xt, mask=m2, other=0.0).to(tl.float32) + _hdot(h_prev, wi, PREC) + bi)
        fg = _sigmoid(tl.load(x_ptr + xt + n, mask=m2, other=0.0).to(tl.float32) + _hdot(h_prev, wf, PREC) + bf)
        gg = _tanh(tl.load(x_ptr + xt + 2 * n, mask=m2, other=0.0).to(tl.float32) + _hdot(h_prev, wg, PREC) + bg)
        og = _sigmoid(tl.load(x_ptr + xt + 3 * n, mask=m2, other=0.0).to(tl.float32) + _hdot(h_prev, wo, PREC) + bo)
        tc = _tanh(c)
        gh = tl.load(gh_ptr + hbase + t * n, mask=m2, other=0.0).to(tl.float32) + carry_h
        gcell = tl.load(gc_ptr + hbase + t * n, mask=m2, other=0.0).to(tl.float32) + carry_c
        gcell += gh * og * (1.0 - tc * tc)
        gpi = tl.where(m2, gcell * gg * ig * (1.0 - ig), 0.0)
        gpf = tl.where(m2, gcell * c_prev * fg * (1.0 - fg), 0.0)
        gpg = tl.where(m2, gcell * ig * (1.0 - gg * gg), 0.0)
        gpo = tl.where(m2, gh * tc * og * (1.0 - og), 0.0)
        tl.store(gx_ptr + xt, gpi.to(gx_ptr.dtype.element_ty), mask=m2)
        tl.store(gx_ptr + xt + n, gpf.to(gx_ptr.dtype.element_ty), mask=m2)
        tl.store(gx_ptr + xt + 2 * n, gpg.to(gx_ptr.dtype.element_ty), mask=m2)
        tl.store(gx_ptr + xt + 3 * n, gpo.to(gx_ptr.dtype.element_ty), mask=m2)
        gbi += tl.sum(gpi, axis=0)
        gbf += tl.sum(gpf, axis=0)
        gbg += tl.sum(gpg, axis=0)
        gbo += tl.sum(gpo, axis=0)
        gwi += tl.dot(tl.trans(gpi), h_prev, input_precision=PREC, out_dtype=tl.float32)
        gwf += tl.dot(tl.trans(gpf), h_prev, input_precision=PREC, out_dtype=tl.float32)
        gwg += tl.dot(tl.trans(gpg), h_prev, input_precision=PREC, out_dtype=tl.float32)
        gwo += tl.dot(tl.trans(gpo), h_prev, input_precision=PREC, out_dtype=tl.float32)
        back = _hdot(gpi, tl.trans(wi), PREC) + _hdot(gpf, tl.trans(wf), PREC)
        back += _hdot(gpg, tl.trans(wg), PREC) + _hdot(gpo, tl.trans(wo), PREC)
        carry_h = tl.where(m2, back, 0.0)
        carry_c = tl.where(m2, gcell * fg, 0.0)
    tl.store(gh0_ptr + rows64 * n + cols[None, :], carry_h.to(gh0_ptr.dtype.element_ty), mask=m2)
    tl.store(gc0_ptr + rows64 * n + cols[None, :], carry_c.to(gc0_ptr.dtype.element_ty), mask=m2)
    gw_prog = gw_ptr + pid.to(tl.int64) * 4 * n * n
    _store_wgrad(gw_prog, gwi, 0, n, NP)
    _store_wgrad(gw_prog, gwf, 1, n, NP)
    _store_wgrad(gw_prog, gwg, 2, n, NP)
    _store_wgrad(gw_prog, gwo, 3, n, NP)
    gb_prog = gb_ptr + pid * 4 * n
    tl.store(gb_prog + cols, gbi, mask=cols < n)
    tl.store(gb_prog + n + cols, gbf, mask=cols < n)
    tl.store(gb_prog + 2 * n + cols, gbg, mask=cols < n)
    tl.store(gb_prog + 3 * n + cols, gbo, mask=cols < n)


def _poison() -> bool:
    """Tests set ROUTEC_POISON=1 so launchers fill outputs with NaN before the kernel writes them."""
    return os.environ.get("ROUTEC_POISON", "") == "1"


def _empty(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    dtype = like.dtype if dtype is None else dtype
    if _poison():
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _launch_cfg(B: int, n: int):
    NP = max(16, triton.next_power_of_2(n))
    num_warps = 8 if NP >= 128 else 4
    return (triton.cdiv(B, BLOCK_B),), dict(NP=NP, BLOCK_B=BLOCK_B, PREC="tf32x3", num_warps=num_warps)


def _fits_on_chip(op: str, n: int) -> bool:
    if n <= MAX_N:
        return True
    warnings.warn(
        f"{op}: hidden size n={n} > {MAX_N}: the recurrent weights do not fit on chip for the fused kernel; "
        "running the PyTorch reference instead",
        stacklevel=3,
    )
    return False


def _opt(t: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    return fallback if t is None else t.contiguous()


_ACT_CODE = {name: code for code, name in enumerate(ACTIVATIONS)}


def _leaky_variant(n: int) -> str:
    """"registers" (W on chip), "stream" (W tiles from L2 each step) or "reference" (with a warning)."""
    if n < STREAM_MIN_N and n <= MAX_N:
        return "registers"
    if n <= MAX_STREAM_N:
        return "stream"
    warnings.warn(
        f"leaky_rnn_scan: hidden size n={n} > {MAX_STREAM_N}: the fused kernels' dW partials would not fit; "
        "running the PyTorch reference instead",
        stacklevel=3,
    )
    return "reference"


def _stream_cfg(B: int):
    return (triton.cdiv(B, BLOCK_B),), dict(BLOCK_B=BLOCK_B, BN=STREAM_BLOCK, PREC="tf32x3", num_warps=4)


@torch.library.custom_op("routec::leaky_rnn_scan", mutates_args=())
def _leaky_op(
    x_proj: torch.Tensor, w_rec: torch.Tensor, tau: torch.Tensor, h0: torch.Tensor | None, activation: str,
    form: str = "pre", slope: float = 0.01,
) -> torch.Tensor:
    B, T, n = x_proj.shape
    if use_triton(x_proj, w_rec, tau, h0) and T > 0 and B > 0:
        variant = _leaky_variant(n)
        if variant != "reference":
            x = x_proj.contiguous()
            h = _empty(x.shape, x)
            args = (x, w_rec.contiguous(), tau.contiguous(), _opt(h0, x), h, B, T, n, float(slope))
            flags = dict(HAS_H0=h0 is not None, ACT=_ACT_CODE[activation], POST=form == "post")
            if variant == "registers":
                grid, cfg = _launch_cfg(B, n)
                _leaky_fwd_kernel[grid](*args, **flags, **cfg)
            else:
                grid, cfg = _stream_cfg(B)
                _leaky_stream_fwd_kernel[grid](*args, **flags, **cfg)
            return h
    with torch.no_grad():
        return leaky_rnn_scan_reference(x_proj, w_rec, tau, h0, activation, form, slope).contiguous()


@_leaky_op.register_fake
def _(x_proj, w_rec, tau, h0, activation, form="pre", slope=0.01):
    return torch.empty_like(x_proj)


def _leaky_setup(ctx, inputs, output):
    x_proj, w_rec, tau, h0, activation, form, slope = inputs
    ctx.activation, ctx.form, ctx.slope = activation, form, slope
    ctx.has_h0 = h0 is not None
    ctx.save_for_backward(x_proj, w_rec, tau, h0, output)


def _leaky_backward(ctx, gh):
    x_proj, w_rec, tau, h0, h = ctx.saved_tensors
    B, T, n = x_proj.shape
    variant = "reference"
    if use_triton(x_proj, w_rec, tau, h0) and T > 0 and B > 0:
        variant = "registers" if n < STREAM_MIN_N and n <= MAX_N else "stream" if n <= MAX_STREAM_N else "reference"
        scratch = triton.cdiv(B, BLOCK_B) * n * n * 4
        if variant == "stream" and scratch > MAX_STREAM_SCRATCH:
            warnings.warn(f"leaky_rnn_scan backward: the per-program dW partials would take {scratch / 2**30:.1f} "
                          f"GiB (> {MAX_STREAM_SCRATCH / 2**30:.1f} GiB); running the PyTorch reference instead")
            variant = "reference"
    if variant != "reference":
        x = x_proj.contiguous()
        flags = dict(HAS_H0=h0 is not None, ACT=_ACT_CODE[ctx.activation], POST=ctx.form == "post")
        grid, cfg = _launch_cfg(B, n) if variant == "registers" else _stream_cfg(B)
        gx = _empty(x.shape, x)
        gw = _empty((grid[0], n, n), x, torch.float32)
        gtau = _empty((grid[0], n), x, torch.float32)
        args = (x, w_rec.contiguous(), tau.contiguous(), _opt(h0, x), h, gh.contiguous(), gx, gw, gtau)
        if variant == "registers":
            gh0 = _empty((B, n), x)
            _leaky_bwd_kernel[grid](*args, gh0, B, T, n, float(ctx.slope), **flags, **cfg)
        else:
            gh0 = _empty((B, n), x, torch.float32)  # the carry between steps, fp32
            gq = _empty((B, n), x, torch.float32)  # scratch: the leak part of dL/dh[t-1]
            gp = _empty((B, n), x, torch.float32)  # scratch: dL/dp[t] of the current step
            _leaky_stream_bwd_kernel[grid](*args, gh0, gq, gp, B, T, n, float(ctx.slope), **flags, **cfg)
            gh0 = gh0.to(x.dtype)
        gw, gtau = gw.sum(0).to(w_rec.dtype), gtau.sum(0).to(tau.dtype)
    else:
        def fn(x, w, tau, h0):
            return leaky_rnn_scan_reference(x, w, tau, h0, ctx.activation, ctx.form, ctx.slope)

        gx, gw, gtau, gh0 = reference_vjp(fn, (x_proj, w_rec, tau, h0), (gh,))
    return gx, gw, gtau, gh0 if ctx.has_h0 else None, None, None, None


_leaky_op.register_autograd(_leaky_backward, setup_context=_leaky_setup)


@torch.library.custom_op("routec::gru_scan", mutates_args=())
def _gru_op(x_proj: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    B, T, n3 = x_proj.shape
    n = n3 // 3
    if use_triton(x_proj, w_hh, b_hh, h0) and _fits_on_chip("gru_scan", n):
        x = x_proj.contiguous()
        h = _empty((B, T, n), x)
        grid, cfg = _launch_cfg(B, n)
        _gru_fwd_kernel[grid](
            x, w_hh.contiguous(), b_hh.contiguous(), _opt(h0, x), h, B, T, n, HAS_H0=h0 is not None, **cfg
        )
        return h
    with torch.no_grad():
        return gru_scan_reference(x_proj, w_hh, b_hh, h0).contiguous()


@_gru_op.register_fake
def _(x_proj, w_hh, b_hh, h0):
    B, T, n3 = x_proj.shape
    return x_proj.new_empty(B, T, n3 // 3)


def _gru_setup(ctx, inputs, output):
    x_proj, w_hh, b_hh, h0 = inputs
    ctx.has_h0 = h0 is not None
    ctx.save_for_backward(x_proj, w_hh, b_hh, h0, output)


def _gru_backward(ctx, gh):
    x_proj, w_hh, b_hh, h0, h = ctx.saved_tensors
    B, T, n3 = x_proj.shape
    n = n3 // 3
    if use_triton(x_proj, w_hh, b_hh, h0) and n <= MAX_N:
        x = x_proj.contiguous()
        grid, cfg = _launch_cfg(B, n)
        gx = _empty(x.shape, x)
        gw = _empty((grid[0], 3 * n, n), x, torch.float32)
        gb = _empty((grid[0], 3 * n), x, torch.float32)
        gh0 = _empty((B, n), x)
        _gru_bwd_kernel[grid](
            x, w_hh.contiguous(), b_hh.contiguous(), _opt(h0, x), h, gh.contiguous(), gx, gw, gb, gh0,
            B, T, n, HAS_H0=h0 is not None, **cfg,
        )
        gw, gb = gw.sum(0).to(w_hh.dtype), gb.sum(0).to(b_hh.dtype)
    else:
        gx, gw, gb, gh0 = reference_vjp(gru_scan_reference, (x_proj, w_hh, b_hh, h0), (gh,))
    return gx, gw, gb, gh0 if ctx.has_h0 else None


_gru_op.register_autograd(_gru_backward, setup_context=_gru_setup)


@torch.library.custom_op("routec::lstm_scan", mutates_args=())
def _lstm_op(
    x_proj: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor, h0: torch.Tensor | None, c0: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, n4 = x_proj.shape
    n = n4 // 4
    if use_triton(x_proj, w_hh, b_hh, h0, c0) and _fits_on_chip("lstm_scan", n):
        x = x_proj.contiguous()
        h, c = _empty((B, T, n), x), _empty((B, T, n), x)
        grid, cfg = _launch_cfg(B, n)
        _lstm_fwd_kernel[grid](
            x, w_hh.contiguous(), b_hh.contiguous(), _opt(h0, x), _opt(c0, x), h, c, B, T, n,
            HAS_H0=h0 is not None, HAS_C0=c0 is not None, **cfg,
        )
        return h, c
    with torch.no_grad():
        h, c = lstm_scan_reference(x_proj, w_hh, b_hh, h0, c0)
    return h.contiguous(), c.contiguous()


@_lstm_op.register_fake
def _(x_proj, w_hh, b_hh, h0, c0):
    B, T, n4 = x_proj.shape
    return x_proj.new_empty(B, T, n4 // 4), x_proj.new_empty(B, T, n4 // 4)


def _lstm_setup(ctx, inputs, output):
    x_proj, w_hh, b_hh, h0, c0 = inputs
    ctx.has_h0, ctx.has_c0 = h0 is not None, c0 is not None
    ctx.save_for_backward(x_proj, w_hh, b_hh, h0, c0, *output)


def _lstm_backward(ctx, gh, gc):
    x_proj, w_hh, b_hh, h0, c0, h, c = ctx.saved_tensors
    B, T, n4 = x_proj.shape
    n = n4 // 4
    gh = torch.zeros_like(h) if gh is None else gh
    gc = torch.zeros_like(c) if gc is None else gc
    if use_triton(x_proj, w_hh, b_hh, h0, c0) and n <= MAX_N:
        x = x_proj.contiguous()
        grid, cfg = _launch_cfg(B, n)
        gx = _empty(x.shape, x)
        gw = _empty((grid[0], 4 * n, n), x, torch.float32)
        gb = _empty((grid[0], 4 * n), x, torch.float32)
        gh0, gc0 = _empty((B, n), x), _empty((B, n), x)
        _lstm_bwd_kernel[grid](
            x, w_hh.contiguous(), b_hh.contiguous(), _opt(h0, x), _opt(c0, x), h, c, gh.contiguous(),
            gc.contiguous(), gx, gw, gb, gh0, gc0, B, T, n, HAS_H0=h0 is not None, HAS_C0=c0 is not None, **cfg,
        )
        gw, gb = gw.sum(0).to(w_hh.dtype), gb.sum(0).to(b_hh.dtype)
    else:
        gx, gw, gb, gh0, gc0 = reference_vjp(lstm_scan_reference, (x_proj, w_hh, b_hh, h0, c0), (gh, gc))
    return gx, gw, gb, gh0 if ctx.has_h0 else None, gc0 if ctx.has_c0 else None


_lstm_op.register_autograd(_lstm_backward, setup_context=_lstm_setup)


def _check(op: str, x_proj: torch.Tensor, w: torch.Tensor, gates: int) -> int:
    if x_proj.dim() != 3 or x_proj.shape[-1] % gates:
        raise ValueError(f"{op}: x_proj must be [B, T, {gates}*n], got shape {list(x_proj.shape)}")
    n = x_proj.shape[-1] // gates
    if tuple(w.shape) != (gates * n, n):
        raise ValueError(f"{op}: recurrent weight must be [{gates * n}, {n}] for x_proj {list(x_proj.shape)}, got {list(w.shape)}")
    return n


def leaky_rnn_scan(
    x_proj: torch.Tensor, w_rec: torch.Tensor, tau: torch.Tensor, h0: torch.Tensor | None = None, *,
    activation: str = "tanh", form: str = "pre", slope: float = 0.01,
) -> torch.Tensor:
    """Leaky-tau RNN over all steps; x_proj [B, T, n] -> h [B, T, n].

    form "pre" (default):  h[t] = h[t-1] + (act(h[t-1] @ w_rec.T + x_proj[t]) - h[t-1]) / tau
    form "post":           h[t] = act((1 - 1/tau) * h[t-1] + (h[t-1] @ w_rec.T + x_proj[t]) / tau)
    activation: tanh, relu, sigmoid, identity or leaky_relu (negative slope `slope`).
    tau [n] is used as given (clamp it yourself). Triton: W in registers for n <= MAX_N, streamed from L2 for
    n <= MAX_STREAM_N, the reference (with a warning) above.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"leaky_rnn_scan: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if form not in FORMS:
        raise ValueError(f"leaky_rnn_scan: form must be 'pre' or 'post', got {form!r}")
    _check("leaky_rnn_scan", x_proj, w_rec, 1)
    return torch.ops.routec.leaky_rnn_scan(x_proj, w_rec, tau, h0, activation, form, float(slope))


def gru_scan(
    x_proj: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor | None, h0: torch.Tensor | None = None
) -> torch.Tensor:
    """torch.nn.GRUCell over all steps. x_proj = x @ w_ih.T + b_ih [B, T, 3n]; w_hh [3n, n] -> h [B, T, n]."""
    n = _check("gru_scan", x_proj, w_hh, 3)
    b_hh = x_proj.new_zeros(3 * n) if b_hh is None else b_hh
    return torch.ops.routec.gru_scan(x_proj, w_hh, b_hh, h0)


def lstm_scan(
    x_proj: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor | None, h0: torch.Tensor | None = None,
    c0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.nn.LSTMCell over all steps. x_proj [B, T, 4n]; w_hh [4n, n] -> (h, c) [B, T, n]."""
    n = _check("lstm_scan", x_proj, w_hh, 4)
    b_hh = x_proj.new_zeros(4 * n) if b_hh is None else b_hh
    return torch.ops.routec.lstm_scan(x_proj, w_hh, b_hh, h0, c0)
