"""Top-k routers: `topk_gate` (DESIGN §5) and the full MoE router `route_tokens`.

    p        = softmax(logits + noise)                                    # [T, E]
    indices  = the k largest entries of (logits + noise) per row          # [T, k], int64, descending
    weights  = p[indices]  (divided by their sum when normalize=True)     # [T, k]

Ties are broken toward the lower expert index: among equal scores, expert 3 is chosen before expert 5.
Selection is made on the (noisy) logits, not on the rounded probabilities, so ties mean equal logits.

`route_tokens` also sorts the T*k assignments by expert (a counting sort, no host synchronisation):
    counts[e]   assignments routed to expert e (before capacity drops)                       # [E] int64
    offsets     exclusive prefix sum of counts, offsets[E] = T*k                              # [E+1] int64
    order       flat assignment ids a = t*k + j (token t, slot j), grouped by expert in
                expert order and in token order inside an expert: order[offsets[e]:offsets[e+1]]
                are expert e's assignments                                                    # [T*k] int64
    kept        False for the assignments beyond `capacity` for their expert, counted in
                token order (slot order within a token); those get weight 0                   # [T, k] bool
    aux_loss    Switch load-balance loss E * sum_e f_e * P_e, f_e = counts[e] / (T*k) (not
                differentiable, counted before drops as in Switch/Mesh-TF), P_e = mean_t p[t, e]  # []

`noise` is pre-sampled by the caller (std-scaled Gaussian for noisy top-k), so the op is deterministic; it
gets the same gradient as the logits.

Kernels (two launches for `route_tokens`, one for `topk_gate`, two for sorting given indices):
  * `_gate_fwd_kernel`: one program per block of BLOCK_T rows; softmax and k rounds of argmax in
    registers; writes weights, indices and, for the sort and the aux loss, the block's histogram of chosen
    experts and column sums of p ([NB, E] each).
  * `_expert_scatter_kernel`: one program per row block; reduces the [NB, E] histograms to the totals
    (-> offsets by an exclusive prefix sum) and to this block's per-expert prefix, ranks each assignment
    inside its expert with a cumulative sum of the block's one-hot matrix, and writes its id to
    order[offsets[e] + rank]: a stable counting sort without atomics, deterministic. Program 0 also writes
    counts, offsets and the aux loss. `_expert_hist_kernel` makes the histograms when only indices are
    given (`moe_ffn`).
  * `_gate_bwd_kernel`: one program per BLOCK_T rows; recomputes p and applies the softmax (or, with
    normalize, the renormalised-softmax) backward to the gradient scattered onto the chosen experts, plus
    the aux-loss term.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backend import interpreting, reference_vjp, use_triton


class RouterOutput(NamedTuple):
    weights: Tensor  # [T, k] routing weights (0 where dropped by capacity)
    indices: Tensor  # [T, k] int64 expert ids, best first
    counts: Tensor  # [E] int64 assignments per expert
    order: Tensor  # [T*k] int64 flat assignment ids t*k + j, grouped by expert
    offsets: Tensor  # [E+1] int64 start of each expert's group in `order`
    aux_loss: Tensor  # [] Switch load-balance loss
    kept: Tensor  # [T, k] bool, False where capacity dropped the assignment


def _poison() -> bool:
    """Tests set ROUTEC_POISON=1 so launchers fill outputs with NaN (or -1) before the kernels write them."""
    return os.environ.get("ROUTEC_POISON", "") == "1"


def _alloc(shape, dtype, device) -> Tensor:
    if not _poison():
        return torch.empty(shape, dtype=dtype, device=device)
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    if dtype == torch.bool:
        return torch.full(shape, True, dtype=dtype, device=device)
    return torch.full(shape, -1, dtype=dtype, device=device)


def _check(logits: Tensor, k: int, noise: Optional[Tensor] = None, capacity: Optional[int] = None) -> None:
    if logits.dim() != 2:
        raise ValueError(f"router logits must be [T, E], got shape {list(logits.shape)}")
    E = logits.shape[1]
    if not 1 <= k <= E:
        raise ValueError(f"top-k needs 1 <= k <= E, got k={k} with E={E}")
    if noise is not None and noise.shape != logits.shape:
        raise ValueError(f"noise must have the logits' shape {list(logits.shape)}, got {list(noise.shape)}")
    if capacity is not None and capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")


# References: readable loops over the k slots and the experts, differentiable, float64-capable.


def _softmax(z: Tensor) -> Tensor:
    if z.dtype in (torch.float16, torch.bfloat16):
        return torch.softmax(z.float(), -1).to(z.dtype)
    return torch.softmax(z, -1)


def topk_gate_reference(logits: Tensor, k: int, normalize: bool = False) -> tuple[Tensor, Tensor]:
    """k rounds of "take the best remaining expert"; argmax returns the first maximum, so ties go low."""
    probs = _softmax(logits)  # [T, E]
    remaining = logits.detach().clone()
    picked = []
    for _ in range(k):
        best = remaining.argmax(-1)  # [T]
        picked.append(best)
        remaining[torch.arange(len(best)), best] = float("-inf")
    indices = torch.stack(picked, 1)  # [T, k]
    weights = probs.gather(1, indices)  # [T, k]
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, indices


def route_tokens_reference(
    logits: Tensor, k: int, normalize: bool = False, noise: Optional[Tensor] = None,
    capacity: Optional[int] = None,
) -> RouterOutput:
    """The full router with boolean masks per expert; see the module docstring for each field."""
    T, E = logits.shape
    z = logits if noise is None else logits + noise
    weights, indices = topk_gate_reference(z, k, normalize)
    flat = indices.reshape(-1)  # [T*k], flat assignment id a = t*k + j
    counts = torch.zeros(E, dtype=torch.int64, device=logits.device)
    groups, kept = [], torch.zeros(T * k, dtype=torch.bool, device=logits.device)
    for e in range(E):
        mine = flat == e  # [T*k]
        counts[e] = mine.sum()
        groups.append(mine.nonzero().flatten())  # ascending a = token order, then slot order
        rank = torch.cumsum(mine.long(), 0) - 1  # position of each of e's assignments among e's
        kept |= mine if capacity is None else mine & (rank < capacity)
    kept = kept.reshape(T, k)
    order = torch.cat(groups)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    weights = torch.where(kept, weights, torch.zeros_like(weights))
    f = counts.to(logits.dtype) / (T * k)
    P = _softmax(z).mean(0)
    aux_loss = E * (f * P).sum()
    return RouterOutput(weights, indices, counts, order, offsets, aux_loss, kept)


@triton.jit
def _gate_fwd_kernel(
    z_ptr, noise_ptr, w_ptr, idx_ptr, hist_ptr, psum_ptr,
    # z, noise: [T, E]; w, idx: [T, K]; hist, psum: [NB, E] per row block
    T, E, stride_zt, stride_nt,
    K: tl.constexpr, NORMALIZE: tl.constexpr, HAS_NOISE: tl.constexpr, WRITE_STATS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Softmax + top-k of BLOCK_T rows per program; with WRITE_STATS also the block's histogram of chosen
    experts (for the sort) and its column sums of p (for the aux loss)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, BLOCK_K)
    row_ok = rows < T
    col_ok = cols < E
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    z = tl.load(z_ptr + rows64[:, None] * stride_zt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        z += tl.load(noise_ptr + rows64[:, None] * stride_nt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.where(col_ok[None, :], z, float("-inf"))  # [BLOCK_T, BLOCK_E]
    ex = tl.exp(z - tl.max(z, 1)[:, None])
    p = ex / tl.sum(ex, 1)[:, None]

    remaining = z
    w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    idx = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    chosen = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.max(remaining, 1)
        # lowest column holding the maximum: ties go to the lower expert index
        pick = tl.min(tl.where((remaining == best[:, None]) & col_ok[None, :], cols[None, :], BLOCK_E), 1)
        hit = cols[None, :] == pick[:, None]
        w = tl.where(slots[None, :] == j, tl.sum(tl.where(hit, p, 0.0), 1)[:, None], w)
        idx = tl.where(slots[None, :] == j, pick[:, None], idx)
        remaining = tl.where(hit, float("-inf"), remaining)
        chosen += hit.to(tl.int32)
    if NORMALIZE:
        w = w / tl.sum(w, 1)[:, None]
    out_mask = row_ok[:, None] & (slots[None, :] < K)
    out_off = rows64[:, None] * K + slots[None, :]
    tl.store(w_ptr + out_off, w.to(w_ptr.dtype.element_ty), mask=out_mask)
    tl.store(idx_ptr + out_off, idx.to(tl.int64), mask=out_mask)
    if WRITE_STATS:
        tl.store(hist_ptr + pid * E + cols, tl.sum(tl.where(row_ok[:, None], chosen, 0), 0), mask=col_ok)
        tl.store(psum_ptr + pid * E + cols, tl.sum(tl.where(row_ok[:, None], p, 0.0), 0), mask=col_ok)


@triton.jit
def _expert_hist_kernel(
    idx_ptr, hist_ptr,  # idx: [T, K]; hist: [NB, E]
    T, E, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """hist[b, e] = number of the (t, j) in row block b with idx[t, j] == e (one program per block)."""
    pid = tl.program_id(0)
    q = tl.arange(0, BLOCK_T * BLOCK_K)
    t = pid * BLOCK_T + q // BLOCK_K
    j = q % BLOCK_K
    ok = (t < T) & (j < K)
    e = tl.load(idx_ptr + t.to(tl.int64) * K + j, mask=ok, other=-1).to(tl.int32)
    cols = tl.arange(0, BLOCK_E)
    tl.store(hist_ptr + pid * E + cols, tl.sum((e[:, None] == cols[None, :]).to(tl.int32), 0), mask=cols < E)


@triton.jit
def _expert_scatter_kernel(
    idx_ptr, w_ptr, hist_ptr, psum_ptr,  # idx, w: [T, K]; hist, psum: [NB, E]
    counts_ptr, offsets_ptr, order_ptr, kept_ptr, aux_ptr,  # [E], [E+1], [T*K], [T, K], []
    T, E, NB, capacity,
    K: tl.constexpr, HAS_CAPACITY: tl.constexpr, DROP_WEIGHTS: tl.constexpr, HAS_AUX: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_NB: tl.constexpr,
):
    """Stable counting sort, one program per row block b (see the module docstring).

    From the histograms: totals -> starts (exclusive prefix sum over experts), and prefix[e] = assignments
    of e in blocks before b. Inside the block, an assignment's rank among its expert's is a cumulative sum
    of the one-hot matrix in flat (t, j) order. It goes to order[starts[e] + prefix[e] + rank].
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    total = tl.zeros([BLOCK_E], dtype=tl.int32)
    prefix = tl.zeros([BLOCK_E], dtype=tl.int32)
    for b0 in range(0, NB, BLOCK_NB):
        rb = b0 + tl.arange(0, BLOCK_NB)
        h = tl.load(hist_ptr + rb[:, None] * E + cols[None, :], mask=(rb < NB)[:, None] & col_ok[None, :], other=0)
        total += tl.sum(h, 0)
        prefix += tl.sum(tl.where((rb < pid)[:, None], h, 0), 0)
    starts = tl.cumsum(total, 0) - total

    if pid == 0:
        tl.store(counts_ptr + cols, total.to(tl.int64), mask=col_ok)
        tl.store(offsets_ptr + cols, starts.to(tl.int64), mask=col_ok)
        tl.store(offsets_ptr + E, tl.sum(total, 0).to(tl.int64))
        if HAS_AUX:
            psum = tl.zeros([BLOCK_E], dtype=tl.float32)
            for b0 in range(0, NB, BLOCK_NB):
                rb = b0 + tl.arange(0, BLOCK_NB)
                psum += tl.sum(tl.load(psum_ptr + rb[:, None] * E + cols[None, :],
                                       mask=(rb < NB)[:, None] & col_ok[None, :], other=0.0), 0)
            aux = tl.sum(total.to(tl.float32) * psum, 0) * E / ((T * 1.0) * K * T)
            tl.store(aux_ptr, aux.to(aux_ptr.dtype.element_ty))

    q = tl.arange(0, BLOCK_T * BLOCK_K)  # flat (t, j) order inside the block
    t = pid * BLOCK_T + q // BLOCK_K
    j = q % BLOCK_K
    ok = (t < T) & (j < K)
    a = t.to(tl.int64) * K + j  # flat assignment id
    e = tl.load(idx_ptr + a, mask=ok, other=-1).to(tl.int32)
    onehot = (e[:, None] == cols[None, :]).to(tl.int32)  # [BLOCK_T * BLOCK_K, BLOCK_E]
    before_in_block = tl.cumsum(onehot, 0) - onehot
    rank = tl.sum(onehot * (before_in_block + prefix[None, :]), 1)  # rank among expert e's assignments
    start = tl.sum(onehot * starts[None, :], 1)
    tl.store(order_ptr + start + rank, a, mask=ok)
    if HAS_CAPACITY:
        keep = rank < capacity
    else:
        keep = rank >= 0
    if DROP_WEIGHTS:
        w = tl.load(w_ptr + a, mask=ok, other=0.0)
        tl.store(w_ptr + a, tl.where(keep, w, 0.0).to(w_ptr.dtype.element_ty), mask=ok)
    tl.store(kept_ptr + a, keep, mask=ok)


@triton.jit
def _gate_bwd_kernel(
    z_ptr, noise_ptr, idx_ptr, gw_ptr, kept_ptr, counts_ptr, gaux_ptr, dz_ptr,
    # z, noise, dz: [T, E]; idx, gw, kept: [T, K]; counts: [E]; gaux: []
    T, E, stride_zt, stride_nt,
    K: tl.constexpr, NORMALIZE: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_KEPT: tl.constexpr,
    HAS_AUX: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dL/dz for BLOCK_T rows per program, with p recomputed from z.

    Without normalize, w_j = p[i_j]: dz = p * (g - sum(p * g)) with g = the slot gradients scattered onto
    the chosen experts. With normalize, w_j = q[i_j] where q is the softmax restricted to the chosen
    experts, so dz = q * (g - sum(q * g)) on the chosen experts and 0 elsewhere. The aux loss adds
    p * (a - sum(p * a)) with a_e = gaux * E * f_e / T.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, BLOCK_K)
    row_ok = rows < T
    col_ok = cols < E
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    z = tl.load(z_ptr + rows64[:, None] * stride_zt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        z += tl.load(noise_ptr + rows64[:, None] * stride_nt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.where(col_ok[None, :], z, float("-inf"))
    ex = tl.exp(z - tl.max(z, 1)[:, None])
    p = ex / tl.sum(ex, 1)[:, None]  # [BLOCK_T, BLOCK_E]

    slot_mask = row_ok[:, None] & (slots[None, :] < K)
    slot_off = rows64[:, None] * K + slots[None, :]
    gw = tl.load(gw_ptr + slot_off, mask=slot_mask, other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_K]
    if HAS_KEPT:
        gw = tl.where(tl.load(kept_ptr + slot_off, mask=slot_mask, other=0) != 0, gw, 0.0)
    idx = tl.load(idx_ptr + slot_off, mask=slot_mask, other=0).to(tl.int32)
    g = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    chosen = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
    for j in tl.static_range(K):
        g_j = tl.sum(tl.where(slots[None, :] == j, gw, 0.0), 1)
        i_j = tl.sum(tl.where(slots[None, :] == j, idx, 0), 1)
        hit = cols[None, :] == i_j[:, None]
        g += tl.where(hit, g_j[:, None], 0.0)
        chosen += hit.to(tl.int32)
    if NORMALIZE:
        q = tl.where(chosen > 0, p, 0.0)
        q = q / tl.sum(q, 1)[:, None]
        dz = q * (g - tl.sum(q * g, 1)[:, None])
    else:
        dz = p * (g - tl.sum(p * g, 1)[:, None])
    if HAS_AUX:
        cnt = tl.load(counts_ptr + cols, mask=col_ok, other=0).to(tl.float32)
        gaux = tl.load(gaux_ptr).to(tl.float32)
        da = gaux * E * cnt / ((T * 1.0) * K * T)  # [BLOCK_E]
        dz += p * (da[None, :] - tl.sum(p * da[None, :], 1)[:, None])
    tl.store(dz_ptr + rows64[:, None] * E + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)


def _gate_blocks(E: int, K: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_E, BLOCK_K) of the gate and sort kernels: one row block is BLOCK_T tokens, sized so
    the sort's [BLOCK_T * BLOCK_K, BLOCK_E] one-hot tile stays around 16K elements (8 rows in the
    interpreter, so that small tests span several blocks)."""
    block_e, block_k = triton.next_power_of_2(E), triton.next_power_of_2(K)
    if interpreting():
        return 8, block_e, block_k
    return max(16, min(256, 16384 // (block_e * block_k))), block_e, block_k


def _row_stride(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.stride(0)


def _unit_cols(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def gate_forward(logits: Tensor, k: int, normalize: bool, noise: Optional[Tensor],
                 stats: Optional[tuple[Tensor, Tensor]] = None):
    """Launch `_gate_fwd_kernel`; returns (weights [T, k], indices [T, k]). `stats` = (hist, psum) [NB, E]."""
    logits = _unit_cols(logits)
    noise = None if noise is None else _unit_cols(noise)
    T, E = logits.shape
    block_t, block_e, block_k = _gate_blocks(E, k)
    weights = _alloc((T, k), logits.dtype, logits.device)
    indices = _alloc((T, k), torch.int64, logits.device)
    hist, psum = (indices, weights) if stats is None else stats
    _gate_fwd_kernel[(triton.cdiv(T, block_t),)](
        logits, logits if noise is None else noise, weights, indices, hist, psum,
        T, E, logits.stride(0), _row_stride(noise),
        K=k, NORMALIZE=normalize, HAS_NOISE=noise is not None, WRITE_STATS=stats is not None,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k,
    )
    return weights, indices


def sort_by_expert(
    indices: Tensor, num_experts: int, *, weights: Optional[Tensor] = None, capacity: Optional[int] = None,
    hist: Optional[Tensor] = None, psum: Optional[Tensor] = None, aux: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Counting sort of indices [T, K] by expert; returns (counts, offsets, order, kept).

    `hist` ([NB, E] per row block, from the gate kernel) saves the histogram launch. With `capacity`, the
    overflowing assignments' entries of `weights` (contiguous [T, K]) are set to 0 in place. With `psum`
    ([NB, E] column sums of p from the gate kernel), the aux loss is written to `aux`.
    """
    T, K = indices.shape
    E = num_experts
    device = indices.device
    indices = indices.contiguous()
    block_t, block_e, block_k = _gate_blocks(E, K)
    nb = triton.cdiv(T, block_t)
    if hist is None:
        hist = torch.empty((nb, E), dtype=torch.int32, device=device)
        _expert_hist_kernel[(nb,)](indices, hist, T, E, K=K, BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_E=block_e)
    counts = _alloc((E,), torch.int64, device)
    offsets = _alloc((E + 1,), torch.int64, device)
    order = _alloc((T * K,), torch.int64, device)
    kept = _alloc((T, K), torch.bool, device)
    _expert_scatter_kernel[(nb,)](
        indices, indices if weights is None else weights, hist, hist if psum is None else psum,
        counts, offsets, order, kept, counts if aux is None else aux,
        T, E, nb, 0 if capacity is None else capacity,
        K=K, HAS_CAPACITY=capacity is not None, DROP_WEIGHTS=capacity is not None and weights is not None,
        HAS_AUX=psum is not None,
        BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_E=block_e, BLOCK_NB=max(1, 4096 // block_e),
        num_warps=4 if interpreting() else 8,
    )
    return counts, offsets, order, kept


def gate_backward(
    logits: Tensor, noise: Optional[Tensor], indices: Tensor, grad_weights: Tensor, kept: Optional[Tensor],
    counts: Optional[Tensor], grad_aux: Optional[Tensor], normalize: bool,
) -> Tensor:
    """Launch `_gate_bwd_kernel`; returns dL/dlogits [T, E] (also dL/dnoise)."""
    logits = _unit_cols(logits)
    noise = None if noise is None else _unit_cols(noise)
    T, E = logits.shape
    K = indices.shape[1]
    block_t, block_e, block_k = _gate_blocks(E, K)
    dz = _alloc((T, E), logits.dtype, logits.device)
    has_aux = grad_aux is not None and counts is not None
    _gate_bwd_kernel[(triton.cdiv(T, block_t),)](
        logits, logits if noise is None else noise, indices.contiguous(), grad_weights.contiguous(),
        indices if kept is None else kept, counts if has_aux else indices,
        grad_aux if has_aux else grad_weights, dz,
        T, E, logits.stride(0), _row_stride(noise),
        K=K, NORMALIZE=normalize, HAS_NOISE=noise is not None, HAS_KEPT=kept is not None, HAS_AUX=has_aux,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k,
    )
    return dz


def route_tokens_triton(
    logits: Tensor, k: int, normalize: bool, noise: Optional[Tensor], capacity: Optional[int],
) -> RouterOutput:
    """Two launches: the gate kernel (weights, indices, per-block histograms and p sums), then the scatter."""
    T, E = logits.shape
    nb = triton.cdiv(T, _gate_blocks(E, k)[0])
    hist = torch.empty((nb, E), dtype=torch.int32, device=logits.device)
    psum = torch.empty((nb, E), dtype=torch.float32, device=logits.device)
    weights, indices = gate_forward(logits, k, normalize, noise, (hist, psum))
    aux = _alloc((), logits.dtype, logits.device)
    counts, offsets, order, kept = sort_by_expert(
        indices, E, weights=weights, capacity=capacity, hist=hist, psum=psum, aux=aux)
    return RouterOutput(weights, indices, counts, order, offsets, aux, kept)


@torch.library.custom_op("routec::router_backward", mutates_args=())
def _router_backward_op(
    logits: Tensor, noise: Optional[Tensor], grad_weights: Tensor, grad_aux: Optional[Tensor], indices: Tensor,
    kept: Optional[Tensor], counts: Optional[Tensor], normalize: bool, capacity: Optional[int],
) -> Tensor:
    """The Triton backward, dL/dlogits (= dL/dnoise), of topk_gate (kept, counts, grad_aux None) and route_tokens.

    An op of its own so that AOTAutograd traces the backward through its fake implementation instead of into
    a kernel launch. (The reference backward is plain autograd, traced directly: a custom op's body runs
    below the autograd dispatch key, where re-running the reference would record no graph.)
    """
    return gate_backward(logits, noise, indices, grad_weights, kept, counts, grad_aux, normalize)


def _reference_backward(logits, noise, grad_weights, grad_aux, k, normalize, capacity):
    def weights_and_aux(lg, nz):
        out = route_tokens_reference(lg, k, normalize, nz, capacity)
        return out.weights, out.aux_loss

    return reference_vjp(weights_and_aux, (logits, noise), (grad_weights, grad_aux))


@_router_backward_op.register_fake
def _(logits, noise, grad_weights, grad_aux, indices, kept, counts, normalize, capacity):
    return torch.empty_like(logits)


@torch.library.custom_op("routec::topk_gate", mutates_args=())
def _topk_gate_op(logits: Tensor, k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    if use_triton(logits):
        return gate_forward(logits, k, normalize, None)
    with torch.no_grad():
        return topk_gate_reference(logits, k, normalize)


@_topk_gate_op.register_fake
def _(logits, k, normalize):
    T = logits.shape[0]
    return logits.new_empty((T, k)), logits.new_empty((T, k), dtype=torch.int64)


def _topk_gate_setup(ctx, inputs, output):
    logits, k, normalize = inputs
    ctx.normalize = normalize
    ctx.triton = use_triton(logits)
    ctx.save_for_backward(logits, output[1])


def _topk_gate_backward(ctx, grad_weights, _grad_indices):
    logits, indices = ctx.saved_tensors
    if grad_weights is None:
        return None, None, None
    if ctx.triton:
        dz = torch.ops.routec.router_backward(logits, None, grad_weights, None, indices, None, None, ctx.normalize,
                                              None)
    else:
        dz, _ = _reference_backward(logits, None, grad_weights, None, indices.shape[1], ctx.normalize, None)
    return dz, None, None


_topk_gate_op.register_autograd(_topk_gate_backward, setup_context=_topk_gate_setup)


@torch.library.custom_op("routec::route_tokens", mutates_args=())
def _route_tokens_op(
    logits: Tensor, k: int, normalize: bool, noise: Optional[Tensor], capacity: Optional[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if use_triton(logits, noise):
        return tuple(route_tokens_triton(logits, k, normalize, noise, capacity))
    with torch.no_grad():
        return tuple(route_tokens_reference(logits, k, normalize, noise, capacity))


@_route_tokens_op.register_fake
def _(logits, k, normalize, noise, capacity):
    T, E = logits.shape
    i64 = torch.int64
    return (
        logits.new_empty((T, k)), logits.new_empty((T, k), dtype=i64), logits.new_empty((E,), dtype=i64),
        logits.new_empty((T * k,), dtype=i64), logits.new_empty((E + 1,), dtype=i64), logits.new_empty(()),
        logits.new_empty((T, k), dtype=torch.bool),
    )


def _route_tokens_setup(ctx, inputs, output):
    logits, k, normalize, noise, capacity = inputs
    ctx.normalize, ctx.capacity = normalize, capacity
    ctx.has_noise = noise is not None
    ctx.triton = use_triton(logits, noise)
    _, indices, counts, _, _, _, kept = output
    ctx.save_for_backward(logits, noise, indices, counts, kept)


def _route_tokens_backward(ctx, grad_weights, _gi, _gc, _go, _goff, grad_aux, _gk):
    logits, noise, indices, counts, kept = ctx.saved_tensors
    if grad_weights is None and grad_aux is None:
        return None, None, None, None, None
    if grad_weights is None:
        grad_weights = torch.zeros(indices.shape, dtype=logits.dtype, device=logits.device)
    if not ctx.triton:
        dz, dn = _reference_backward(logits, noise, grad_weights, grad_aux, indices.shape[1], ctx.normalize,
                                     ctx.capacity)
        return dz, None, None, dn, None
    dz = torch.ops.routec.router_backward(
        logits, noise, grad_weights, grad_aux, indices, kept, counts, ctx.normalize, ctx.capacity)
    return dz, None, None, dz if ctx.has_noise else None, None


_route_tokens_op.register_autograd(_route_tokens_backward, setup_context=_route_tokens_setup)


def topk_gate(logits: Tensor, k: int, *, normalize: bool = False) -> tuple[Tensor, Tensor]:
    """logits [T, E] -> (weights [T, k], indices [T, k] int64): top-k of softmax(logits), ties to the lower index."""
    _check(logits, k)
    return torch.ops.routec.topk_gate(logits, k, normalize)


def route_tokens(
    logits: Tensor, k: int, *, normalize: bool = False, noise: Optional[Tensor] = None,
    capacity: Optional[int] = None,
) -> RouterOutput:
    """The MoE router: top-k gate, expert counts and stable expert order, Switch aux loss, capacity drops."""
    _check(logits, k, noise, capacity)
    return RouterOutput(*torch.ops.routec.route_tokens(logits, k, normalize, noise, capacity))
