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

Kernels (two launches for `route_tokens`, one for `topk_gate`):
  * `_gate_fwd_kernel`: one program per BLOCK_T rows; softmax and k rounds of argmax in registers; writes
    weights, indices and, for the aux loss, per-block column sums of p.
  * `_expert_sort_kernel`: one program; pass 1 counts the assignments per expert (one-hot sums), then an
    exclusive prefix sum gives the offsets; pass 2 walks the assignments in blocks in flat order, ranks each
    one inside its expert with a cumulative sum of the one-hot matrix plus a running per-expert count, and
    scatters its id to order[offsets[e] + rank] (a stable counting sort). The same kernel sorts for `moe_ffn`.
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


# ----------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------
# Kernels.


@triton.jit
def _gate_fwd_kernel(
    z_ptr, noise_ptr, w_ptr, idx_ptr, psum_ptr,  # z, noise: [T, E]; w, idx: [T, K]; psum: [NB, E]
    T, E, stride_zt, stride_nt,
    K: tl.constexpr, NORMALIZE: tl.constexpr, HAS_NOISE: tl.constexpr, WRITE_PSUM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Softmax + top-k of BLOCK_T rows per program; optionally the block's column sums of p (aux loss)."""
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
    for j in tl.static_range(K):
        best = tl.max(remaining, 1)
        # lowest column holding the maximum: ties go to the lower expert index
        pick = tl.min(tl.where((remaining == best[:, None]) & col_ok[None, :], cols[None, :], BLOCK_E), 1)
        hit = cols[None, :] == pick[:, None]
        w = tl.where(slots[None, :] == j, tl.sum(tl.where(hit, p, 0.0), 1)[:, None], w)
        idx = tl.where(slots[None, :] == j, pick[:, None], idx)
        remaining = tl.where(hit, float("-inf"), remaining)
    if NORMALIZE:
        w = w / tl.sum(w, 1)[:, None]
    out_mask = row_ok[:, None] & (slots[None, :] < K)
    out_off = rows64[:, None] * K + slots[None, :]
    tl.store(w_ptr + out_off, w.to(w_ptr.dtype.element_ty), mask=out_mask)
    tl.store(idx_ptr + out_off, idx.to(tl.int64), mask=out_mask)
    if WRITE_PSUM:
        psum = tl.sum(tl.where(row_ok[:, None], p, 0.0), 0)  # [BLOCK_E]
        tl.store(psum_ptr + pid * E + cols, psum, mask=col_ok)


@triton.jit
def _expert_sort_kernel(
    idx_ptr, w_ptr, psum_ptr,  # idx, w: [A] flat (A = T*K); psum: [NB, E]
    counts_ptr, offsets_ptr, order_ptr, kept_ptr, aux_ptr,  # [E], [E+1], [A], [A], []
    A, E, NB, T, capacity,
    K: tl.constexpr, HAS_CAPACITY: tl.constexpr, DROP_WEIGHTS: tl.constexpr, HAS_AUX: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Stable counting sort of the A assignments by expert, in a single program (see the module docstring)."""
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    lanes = tl.arange(0, BLOCK_A)

    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for a0 in range(0, A, BLOCK_A):
        a = a0 + lanes
        e = tl.load(idx_ptr + a, mask=a < A, other=-1).to(tl.int32)
        counts += tl.sum((e[:, None] == cols[None, :]).to(tl.int32), 0)
    starts = tl.cumsum(counts, 0) - counts  # exclusive prefix sum
    tl.store(counts_ptr + cols, counts.to(tl.int64), mask=col_ok)
    tl.store(offsets_ptr + cols, starts.to(tl.int64), mask=col_ok)
    tl.store(offsets_ptr + E, tl.sum(counts, 0).to(tl.int64))

    if HAS_AUX:
        psum = tl.zeros([BLOCK_E], dtype=tl.float32)
        for b in range(NB):
            psum += tl.load(psum_ptr + b * E + cols, mask=col_ok, other=0.0)
        aux = tl.sum(counts.to(tl.float32) * psum, 0) * E / ((A * 1.0) * T)
        tl.store(aux_ptr, aux.to(aux_ptr.dtype.element_ty))

    seen = tl.zeros([BLOCK_E], dtype=tl.int32)  # assignments of each expert already placed
    for a0 in range(0, A, BLOCK_A):
        a = a0 + lanes
        a_ok = a < A
        e = tl.load(idx_ptr + a, mask=a_ok, other=-1).to(tl.int32)
        onehot = (e[:, None] == cols[None, :]).to(tl.int32)  # [BLOCK_A, BLOCK_E]
        before_in_block = tl.cumsum(onehot, 0) - onehot
        rank = tl.sum(onehot * (before_in_block + seen[None, :]), 1)  # rank inside its expert
        start = tl.sum(onehot * starts[None, :], 1)
        tl.store(order_ptr + start + rank, a.to(tl.int64), mask=a_ok)
        if HAS_CAPACITY:
            keep = rank < capacity
        else:
            keep = rank >= 0
        if DROP_WEIGHTS:
            w = tl.load(w_ptr + a, mask=a_ok, other=0.0)
            tl.store(w_ptr + a, tl.where(keep, w, 0.0).to(w_ptr.dtype.element_ty), mask=a_ok)
        tl.store(kept_ptr + a, keep, mask=a_ok)
        seen += tl.sum(onehot, 0)


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


# ----------------------------------------------------------------------------------------------------------
# Launchers.

_BLOCK_T_GATE = 16


def _gate_blocks(E: int, K: int) -> tuple[int, int, int]:
    block_e = triton.next_power_of_2(E)
    block_t = max(1, min(64, 4096 // block_e)) if not interpreting() else _BLOCK_T_GATE
    return block_t, block_e, triton.next_power_of_2(K)


def _row_stride(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.stride(0)


def _unit_cols(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def gate_forward(logits: Tensor, k: int, normalize: bool, noise: Optional[Tensor], psum: Optional[Tensor]):
    """Launch `_gate_fwd_kernel`; returns (weights [T, k], indices [T, k])."""
    logits = _unit_cols(logits)
    noise = None if noise is None else _unit_cols(noise)
    T, E = logits.shape
    block_t, block_e, block_k = _gate_blocks(E, k)
    weights = _alloc((T, k), logits.dtype, logits.device)
    indices = _alloc((T, k), torch.int64, logits.device)
    _gate_fwd_kernel[(triton.cdiv(T, block_t),)](
        logits, logits if noise is None else noise, weights, indices, weights if psum is None else psum,
        T, E, logits.stride(0), _row_stride(noise),
        K=k, NORMALIZE=normalize, HAS_NOISE=noise is not None, WRITE_PSUM=psum is not None,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k,
    )
    return weights, indices


def sort_by_expert(
    indices: Tensor, num_experts: int, *, weights: Optional[Tensor] = None, capacity: Optional[int] = None,
    psum: Optional[Tensor] = None, aux: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch `_expert_sort_kernel` on indices [T, K]; returns (counts, offsets, order, kept).

    With `capacity`, the overflowing assignments' entries in `weights` (contiguous [T, K]) are set to 0 in
    place. With `psum` ([NB, E] column sums of p from the gate kernel), the aux loss is written to `aux`.
    """
    T, K = indices.shape
    E = num_experts
    A = T * K
    device = indices.device
    indices = indices.contiguous()
    block_e = triton.next_power_of_2(E)
    block_a = max(16, min(1024, 8192 // block_e)) if not interpreting() else max(16, min(256, 4096 // block_e))
    counts = _alloc((E,), torch.int64, device)
    offsets = _alloc((E + 1,), torch.int64, device)
    order = _alloc((A,), torch.int64, device)
    kept = _alloc((T, K), torch.bool, device)
    _expert_sort_kernel[(1,)](
        indices, indices if weights is None else weights, counts if psum is None else psum,
        counts, offsets, order, kept, counts if aux is None else aux,
        A, E, 0 if psum is None else psum.shape[0], T, 0 if capacity is None else capacity,
        K=K, HAS_CAPACITY=capacity is not None, DROP_WEIGHTS=capacity is not None and weights is not None,
        HAS_AUX=psum is not None,
        BLOCK_A=block_a, BLOCK_E=block_e, num_warps=8 if not interpreting() else 4,
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
    """Two launches: the gate kernel (weights, indices, p column sums), then the sort kernel."""
    T, E = logits.shape
    block_t, _, _ = _gate_blocks(E, k)
    psum = torch.empty((triton.cdiv(T, block_t), E), dtype=torch.float32, device=logits.device)
    weights, indices = gate_forward(logits, k, normalize, noise, psum)
    aux = _alloc((), logits.dtype, logits.device)
    counts, offsets, order, kept = sort_by_expert(indices, E, weights=weights, capacity=capacity, psum=psum, aux=aux)
    return RouterOutput(weights, indices, counts, order, offsets, aux, kept)


# ----------------------------------------------------------------------------------------------------------
# Custom ops.


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
        return gate_forward(logits, k, normalize, None, None)
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


# ----------------------------------------------------------------------------------------------------------
# Public API (DESIGN §5).


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
