"""Exit rules (DESIGN §4 `exit`): halting scores, the exit head with its rule fused, and exit selection.

    exit_scores(logits, *, rule)                          -> score [N]
        confidence: max_c softmax(logits)[c];  entropy: -Σ_c p_c log p_c
    linear_exit(x, weight, bias, *, rule, threshold)      -> (logits [N, C], score [N], exit_mask [N])
        logits = x @ weight.T + bias; exit where score >= threshold (confidence) or <= threshold (entropy),
        the score as returned (dtype of the logits) against the threshold rounded to that dtype: exactly
        what `Linear(d, C)` then `confidence(head) >= t` / `entropy(head) <= t` compute in a .route spec
        (the compiler lowers that pattern to this op; `>` and `<` are not this op's rule)
    select_first_exit(logits_stack, masks)                -> (out [N, C], index [N])
        per sample, the output of the first exit whose mask holds, else the last; and that exit's index

    exit_merge(out, index, logits, rows, alive, i)        -> (out [N, C], index [N])
        out[rows[j]] = logits[j] and index[rows[j]] = i for every packed row j that is alive

`exit_merge` is the sync-free write-back of compacted eval: after exit i, the packed batch's live rows
write their logits (and the exit number) to their original positions; rows that go on are overwritten by
a later exit, so after the last exit (where every live row leaves) each sample holds the output of the
first exit whose rule held. `rows` (int64 [M]: the original row of each packed row, all distinct) and
`alive` (bool [M]) are the compaction's bookkeeping, so shapes stay static and nothing syncs.

`select_first_exit` is the eval-mode semantics of `exit` ("run every exit, then select"): compacted eval
(exited rows leave the batch, survivors go on, results are scattered back) must equal it bit for bit, and
it does, because selection copies values and every head computes each row independently of the others.

Differentiability. `exit_scores` is differentiable (confidence: c·(onehot(argmax) − p); entropy:
−p·(log p + H)); at exact ties of the largest logit the one-hot goes to the first of them, as torch.max does.
In `linear_exit` only `logits` carries gradients: the score and the mask are the halting decision, a
non-differentiable branch (train a learned halting gate through `exit_scores` or its own head instead).
`select_first_exit` routes the gradient of `out` to the selected exit's rows; `index` has none.
`exit_merge` is differentiable in `out` (rows it overwrites get no gradient) and `logits`.

Kernels. `exit_scores`: one program per BLOCK_N rows, an online max / sum-exp (and Σ e·(l − m) for the
entropy) over blocks of classes, so any C works; the backward recomputes those and writes the gradient in
a second pass. `linear_exit`: one program per BLOCK_N rows holding all C ≤ 1024 classes in one tile, a
K loop of `tl.dot`, and the bias, row softmax, score and decision in the epilogue; larger heads run the
matmul in PyTorch and the `exit_scores` kernel after it. Its backward is the linear layer's three
products, left to PyTorch's GEMMs (there is nothing to fuse: the rule has no gradient).
`select_first_exit`: one program per BLOCK_N rows finds the first exit over the masks and copies that
exit's rows; the backward writes the gradient into the selected exit and zeros elsewhere.
`exit_merge`: a copy of `out` and `index`, then one program per BLOCK_M packed rows writes the live rows;
its backward is one kernel too (gather the gradient for the live rows, zero it where they were written).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .backend import reference_vjp, use_triton

__all__ = [
    "RULES",
    "exit_scores",
    "exit_merge",
    "exit_merge_reference",
    "exit_scores_reference",
    "linear_exit",
    "linear_exit_reference",
    "select_first_exit",
    "select_first_exit_reference",
]

RULES = ("confidence", "entropy")
MAX_FUSED_CLASSES = 1024


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


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"exit rule must be one of {', '.join(RULES)}, got {rule!r}")


def exit_scores_reference(logits: Tensor, *, rule: str = "confidence") -> Tensor:
    """Max softmax probability or softmax entropy of each row of logits [N, C] (fp32 or wider math)."""
    _check_rule(rule)
    work = logits if logits.dtype == torch.float64 else logits.float()
    logp = torch.log_softmax(work, dim=-1)  # [N, C]
    if rule == "confidence":
        score = logp.max(dim=-1).values.exp()
    else:
        score = -(logp.exp() * logp).sum(dim=-1)
    return score.to(logits.dtype)


def _decide(score: Tensor, rule: str, threshold: float) -> Tensor:
    """The rule on the score as returned: PyTorch compares a tensor with a Python number in the tensor's
    dtype, so the threshold is rounded to the score's dtype first."""
    return score >= threshold if rule == "confidence" else score <= threshold


def _rule_score(logits: Tensor, rule: str) -> Tensor:
    """The rule's score as `confidence(head)` / `entropy(head)` of a .route spec compute it (routec.codegen
    .functions): softmax in fp32 or wider, max probability or −Σ p log p with p = 0 terms dropped, rounded to
    the logits' dtype."""
    work = logits if logits.dtype == torch.float64 else logits.float()
    if rule == "confidence":
        score = torch.softmax(work, dim=-1).amax(dim=-1)
    else:
        logp = torch.log_softmax(work, dim=-1)
        p = logp.exp()
        score = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=-1)
    return score.to(logits.dtype)


def linear_exit_reference(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], *, rule: str = "confidence", threshold: float = 0.9
) -> tuple[Tensor, Tensor, Tensor]:
    """The exit head (a linear layer) and its halting rule, unfused: exactly `logits = Linear(x)`,
    `score = confidence(logits)` (or `entropy`), `exit = score >= threshold` (or `<=`) as a spec writes them."""
    _check_rule(rule)
    logits = F.linear(x, weight, bias)  # [N, C]
    score = _rule_score(logits, rule)  # [N], dtype of the logits
    return logits, score, _decide(score, rule, threshold)


def select_first_exit_reference(logits_stack: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """logits_stack [E, N, C], masks bool [E, N] -> (out [N, C], index int64 [N])."""
    forced = torch.cat([masks[:-1], torch.ones_like(masks[-1:])])  # the last exit always holds
    index = forced.to(torch.uint8).argmax(dim=0)  # first maximum = first exit that holds
    out = logits_stack.gather(0, index.reshape(1, -1, 1).expand(1, -1, logits_stack.shape[-1])).squeeze(0)
    return out, index.to(torch.int64)


def exit_merge_reference(
    out: Tensor, index: Tensor, logits: Tensor, rows: Tensor, alive: Tensor, i: int
) -> tuple[Tensor, Tensor]:
    """out[rows[j]] = logits[j], index[rows[j]] = i for every alive j; other rows unchanged."""
    keep_old = ~alive
    new_out = torch.where(keep_old[:, None], out.index_select(0, rows), logits.to(out.dtype))
    new_index = torch.where(keep_old, index.index_select(0, rows), torch.full_like(rows, i))
    return out.index_copy(0, rows, new_out), index.index_copy(0, rows, new_index)


@triton.jit
def _row_stats(logits_ptr, rows64, row_ok, C, ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Online softmax statistics of rows: max m, Z = Σ e^(l-m), S = Σ e^(l-m)·(l-m) (entropy only)."""
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    z = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols[None, :] < C)
        lg = tl.load(logits_ptr + rows64[:, None] * C + cols[None, :], mask=mask, other=float("-inf"))
        lg = lg.to(tl.float32)
        m_new = tl.maximum(m, tl.max(lg, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing finite yet
        alpha = tl.exp(m - m_safe)
        e = tl.exp(lg - m_safe[:, None])  # [BN, BC], 0 where masked
        if ENTROPY:
            shift = tl.where(z > 0, m - m_safe, 0.0)
            s = alpha * (s + z * shift) + tl.sum(e * tl.where(e > 0, lg - m_safe[:, None], 0.0), axis=1)
        z = alpha * z + tl.sum(e, axis=1)
        m = m_new
    return tl.where(row_ok, m, 0.0), tl.where(row_ok, z, 1.0), s  # rows past N: keep the stats finite


@triton.jit
def _exit_scores_kernel(
    logits_ptr,  # [N, C]
    score_ptr,  # [N]
    N,
    C,
    ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """score = 1 / Z (confidence, the max probability) or log Z − S / Z (entropy), per row."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    m, z, s = _row_stats(logits_ptr, rows64, row_ok, C, ENTROPY, BLOCK_N, BLOCK_C)
    if ENTROPY:
        score = tl.log(z) - s / z
    else:
        score = 1.0 / z
    tl.store(score_ptr + rows64, score.to(score_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _exit_scores_bwd_kernel(
    logits_ptr,  # [N, C]
    dscore_ptr,  # [N]
    dlogits_ptr,  # [N, C]
    N,
    C,
    ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dlogits = g·c·(onehot(argmax) − p) (confidence) or −g·p·(log p + H) (entropy); stats recomputed."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    m, z, s = _row_stats(logits_ptr, rows64, row_ok, C, ENTROPY, BLOCK_N, BLOCK_C)
    g = tl.load(dscore_ptr + rows64, mask=row_ok, other=0.0).to(tl.float32)
    log_z = tl.log(z)
    entropy = log_z - s / z
    if not ENTROPY:  # the first column holding the maximum takes the one-hot (like torch.max)
        first = tl.full((BLOCK_N,), C, dtype=tl.int32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = row_ok[:, None] & (cols[None, :] < C)
            lg = tl.load(logits_ptr + rows64[:, None] * C + cols[None, :], mask=mask, other=float("-inf"))
            hit = lg.to(tl.float32) == m[:, None]
            first = tl.minimum(first, tl.min(tl.where(hit, cols[None, :], C), axis=1))
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols[None, :] < C)
        offs = rows64[:, None] * C + cols[None, :]
        lg = tl.load(logits_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        logp = lg - m[:, None] - log_z[:, None]
        p = tl.exp(logp)
        if ENTROPY:
            grad = -g[:, None] * p * tl.where(p > 0, logp + entropy[:, None], 0.0)
        else:
            onehot = tl.where(cols[None, :] == first[:, None], 1.0, 0.0)
            grad = (g / z)[:, None] * (onehot - p)
        tl.store(dlogits_ptr + offs, grad.to(dlogits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _linear_exit_kernel(
    x_ptr,  # [N, K]
    w_ptr,  # [C, K]
    b_ptr,  # [C]
    logits_ptr,  # [N, C]
    score_ptr,  # [N]
    exit_ptr,  # [N] uint8
    N,
    C,
    K,
    threshold,
    HAS_BIAS: tl.constexpr,
    ENTROPY: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """logits = x @ w.T + b for BLOCK_N rows and all C classes (one tile), then the row softmax, the score
    and the exit decision in registers before the stores."""
    tl.static_assert(BLOCK_N >= 16 and BLOCK_C >= 16 and BLOCK_K >= 16, "tl.dot tiles must be >= 16")
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    cols = tl.arange(0, BLOCK_C)  # [BC]
    row_ok = rows < N
    col_ok = cols < C
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(x_ptr + rows64[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols64[None, :] * K + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc=acc, input_precision=PRECISION, out_dtype=tl.float32)  # [BN, BC]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(logits_ptr + rows64[:, None] * C + cols64[None, :], acc.to(logits_ptr.dtype.element_ty), mask=out_mask)
    # The rule sees the logits as stored (rounded to the output dtype), like the unfused head would.
    lg = tl.where(col_ok[None, :], acc.to(logits_ptr.dtype.element_ty).to(tl.float32), float("-inf"))
    m = tl.max(lg, axis=1)  # [BN]
    e = tl.exp(lg - m[:, None])
    z = tl.sum(e, axis=1)
    if ENTROPY:
        s = tl.sum(e * tl.where(e > 0, lg - m[:, None], 0.0), axis=1)
        score = tl.log(z) - s / z
    else:
        score = 1.0 / z
    # The decision is on the score as stored; the launcher rounded the threshold to that dtype too.
    stored = score.to(score_ptr.dtype.element_ty)
    if ENTROPY:
        leave = stored.to(tl.float32) <= threshold
    else:
        leave = stored.to(tl.float32) >= threshold
    tl.store(score_ptr + rows64, stored, mask=row_ok)
    tl.store(exit_ptr + rows64, leave.to(tl.uint8), mask=row_ok)


@triton.jit
def _select_first_exit_kernel(
    stack_ptr,  # [E, N, C]
    masks_ptr,  # [E, N] uint8
    out_ptr,  # [N, C]
    index_ptr,  # [N] int64
    E,
    N,
    C,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """index[n] = first e with masks[e, n] (else E − 1); out[n] = stack[index[n], n]."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    index = tl.zeros((BLOCK_N,), dtype=tl.int64) + (E - 1)
    found = tl.zeros((BLOCK_N,), dtype=tl.int1)
    for e in range(0, E - 1):
        hit = tl.load(masks_ptr + e * N + rows64, mask=row_ok, other=0) != 0
        index = tl.where(hit & (found == 0), e, index)
        found = found | hit
    tl.store(index_ptr + rows64, index, mask=row_ok)
    src = index * N * C + rows64 * C  # [BN] int64
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols[None, :] < C)
        v = tl.load(stack_ptr + src[:, None] + cols[None, :], mask=mask, other=0.0)
        tl.store(out_ptr + rows64[:, None] * C + cols[None, :], v, mask=mask)


@triton.jit
def _select_first_exit_bwd_kernel(
    dout_ptr,  # [N, C]
    index_ptr,  # [N] int64
    dstack_ptr,  # [E, N, C]
    N,
    C,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dstack[e, n] = dout[n] if index[n] == e else 0; one program per (row block, exit e)."""
    e = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    chosen = tl.load(index_ptr + rows64, mask=row_ok, other=-1) == e  # [BN]
    base = e.to(tl.int64) * N * C
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols[None, :] < C)
        offs = rows64[:, None] * C + cols[None, :]
        g = tl.load(dout_ptr + offs, mask=mask & chosen[:, None], other=0.0)
        tl.store(dstack_ptr + base + offs, g, mask=mask)


@triton.jit
def _exit_merge_kernel(
    logits_ptr,  # [M, C]
    rows_ptr,  # [M] int64
    alive_ptr,  # [M] uint8
    out_ptr,  # [N, C], a copy of the old out
    index_ptr,  # [N] int64, a copy of the old index
    M,
    C,
    i,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """For the packed rows j of this program that are alive: out[rows[j]] = logits[j], index[rows[j]] = i."""
    j = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    j_ok = j < M
    j64 = j.to(tl.int64)
    live = j_ok & (tl.load(alive_ptr + j64, mask=j_ok, other=0) != 0)
    dst = tl.load(rows_ptr + j64, mask=live, other=0)  # [BM] int64
    tl.store(index_ptr + dst, tl.zeros((BLOCK_M,), dtype=tl.int64) + i, mask=live)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = live[:, None] & (cols[None, :] < C)
        v = tl.load(logits_ptr + j64[:, None] * C + cols[None, :], mask=mask, other=0.0)
        tl.store(out_ptr + dst[:, None] * C + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _exit_merge_bwd_kernel(
    dnew_ptr,  # [N, C]: gradient of the merged out
    rows_ptr,  # [M] int64
    alive_ptr,  # [M] uint8
    dlogits_ptr,  # [M, C]
    dout_ptr,  # [N, C], a copy of dnew
    M,
    C,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dlogits[j] = dnew[rows[j]] if alive[j] else 0; dout[rows[j]] = 0 where alive[j] (overwritten rows)."""
    j = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    j_ok = j < M
    j64 = j.to(tl.int64)
    live = j_ok & (tl.load(alive_ptr + j64, mask=j_ok, other=0) != 0)
    src = tl.load(rows_ptr + j64, mask=live, other=0)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols[None, :] < C
        g = tl.load(dnew_ptr + src[:, None] * C + cols[None, :], mask=live[:, None] & col_ok, other=0.0)
        tl.store(dlogits_ptr + j64[:, None] * C + cols[None, :], g.to(dlogits_ptr.dtype.element_ty), mask=j_ok[:, None] & col_ok)
        zero = tl.zeros((BLOCK_M, BLOCK_C), dtype=dout_ptr.dtype.element_ty)
        tl.store(dout_ptr + src[:, None] * C + cols[None, :], zero, mask=live[:, None] & col_ok)


def _row_tiles(C: int) -> tuple[int, int]:
    block_c = min(triton.next_power_of_2(max(C, 1)), 1024)
    return max(4096 // block_c, 1), block_c


def _check_logits(name: str, logits: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"{name}: logits must be [N, C], got shape {list(logits.shape)}")


def exit_scores_forward(logits: Tensor, rule: str, *, out: Tensor | None = None) -> Tensor:
    """Launch the score kernel; the score has the dtype of the logits."""
    n, c = logits.shape
    score = _empty(n, logits.dtype, logits.device) if out is None else out
    if n == 0:
        return score
    block_n, block_c = _row_tiles(c)
    _exit_scores_kernel[(triton.cdiv(n, block_n),)](
        logits.contiguous(), score, n, c, ENTROPY=rule == "entropy", BLOCK_N=block_n, BLOCK_C=block_c
    )
    return score


def exit_scores_backward(logits: Tensor, dscore: Tensor, rule: str, *, out: Tensor | None = None) -> Tensor:
    n, c = logits.shape
    dlogits = _empty(logits.shape, logits.dtype, logits.device) if out is None else out
    if n == 0:
        return dlogits
    block_n, block_c = _row_tiles(c)
    _exit_scores_bwd_kernel[(triton.cdiv(n, block_n),)](
        logits.contiguous(),
        dscore.contiguous(),
        dlogits,
        n,
        c,
        ENTROPY=rule == "entropy",
        BLOCK_N=block_n,
        BLOCK_C=block_c,
    )
    return dlogits


def _rounded(threshold: float, dtype: torch.dtype) -> float:
    """The threshold as PyTorch compares it with a `dtype` score: rounded to that dtype (exact in fp32 for
    fp32/bf16/fp16, the kernel's comparison type)."""
    return float(torch.tensor(float(threshold), dtype=dtype if dtype != torch.float64 else torch.float32))


def linear_exit_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    rule: str,
    threshold: float,
    *,
    outs: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the fused head (C ≤ 1024) or the matmul + score kernel (larger C)."""
    n, k = x.shape
    c = weight.shape[0]
    dtype = torch.promote_types(x.dtype, weight.dtype)
    if c > MAX_FUSED_CLASSES:
        logits = F.linear(x, weight, bias)
        score = exit_scores_forward(logits, rule)
        return logits, score, _decide(score, rule, threshold)
    if outs is None:
        logits = _empty((n, c), dtype, x.device)
        score = _empty((n,), dtype, x.device)
        leave = _empty((n,), torch.bool, x.device)
    else:
        logits, score, leave = outs
    if n == 0:
        return logits, score, leave
    block_c = max(triton.next_power_of_2(c), 16)
    block_k = max(16, min(64, 8192 // block_c, triton.next_power_of_2(k)))
    x_c, w_c = x.to(dtype).contiguous(), weight.to(dtype).contiguous()
    _linear_exit_kernel[(triton.cdiv(n, 16),)](
        x_c,
        w_c,
        w_c if bias is None else bias.contiguous(),
        logits,
        score,
        leave.view(torch.uint8),
        n,
        c,
        k,
        _rounded(threshold, dtype),
        HAS_BIAS=bias is not None,
        ENTROPY=rule == "entropy",
        PRECISION="ieee" if dtype == torch.float32 else "tf32",
        BLOCK_N=16,
        BLOCK_C=block_c,
        BLOCK_K=block_k,
        num_warps=8 if block_c >= 512 else 4,
    )
    return logits, score, leave


def select_first_exit_forward(
    logits_stack: Tensor, masks: Tensor, *, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    n_exits, n, c = logits_stack.shape
    result = _empty((n, c), logits_stack.dtype, logits_stack.device) if out is None else out
    index = _empty(n, torch.int64, logits_stack.device)
    if n == 0:
        return result, index
    block_n, block_c = _row_tiles(c)
    _select_first_exit_kernel[(triton.cdiv(n, block_n),)](
        logits_stack.contiguous(),
        masks.contiguous().view(torch.uint8),
        result,
        index,
        n_exits,
        n,
        c,
        BLOCK_N=block_n,
        BLOCK_C=block_c,
    )
    return result, index


def select_first_exit_backward(dout: Tensor, index: Tensor, n_exits: int) -> Tensor:
    n, c = dout.shape
    dstack = _empty((n_exits, n, c), dout.dtype, dout.device)
    if n * c == 0:
        return dstack.zero_()
    block_n, block_c = _row_tiles(c)
    _select_first_exit_bwd_kernel[(triton.cdiv(n, block_n), n_exits)](
        dout.contiguous(), index, dstack, n, c, BLOCK_N=block_n, BLOCK_C=block_c
    )
    return dstack


def exit_merge_forward(
    out: Tensor, index: Tensor, logits: Tensor, rows: Tensor, alive: Tensor, i: int
) -> tuple[Tensor, Tensor]:
    new_out, new_index = out.clone(memory_format=torch.contiguous_format), index.clone()
    m, c = logits.shape
    if m * c == 0:
        return new_out, new_index
    block_m, block_c = _row_tiles(c)
    _exit_merge_kernel[(triton.cdiv(m, block_m),)](
        logits.contiguous(), rows, alive.contiguous().view(torch.uint8), new_out, new_index, m, c, i,
        BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return new_out, new_index


def exit_merge_backward(dnew: Tensor, rows: Tensor, alive: Tensor, logits_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    m, c = rows.shape[0], dnew.shape[1]
    dout = dnew.clone(memory_format=torch.contiguous_format)
    dlogits = _empty((m, c), logits_dtype, dnew.device)
    if m * c == 0:
        return dout, dlogits.zero_()
    block_m, block_c = _row_tiles(c)
    _exit_merge_bwd_kernel[(triton.cdiv(m, block_m),)](
        dnew.contiguous(), rows, alive.contiguous().view(torch.uint8), dlogits, dout, m, c,
        BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return dout, dlogits


@torch.library.custom_op("routec::exit_merge", mutates_args=())
def _exit_merge_op(
    out: Tensor, index: Tensor, logits: Tensor, rows: Tensor, alive: Tensor, i: int
) -> tuple[Tensor, Tensor]:
    m = logits.shape[0]
    if (
        out.dim() != 2 or logits.dim() != 2 or logits.shape[1] != out.shape[1] or index.shape != out.shape[:1]
        or rows.shape != (m,) or alive.shape != (m,) or rows.dtype != torch.int64 or index.dtype != torch.int64
        or alive.dtype != torch.bool
    ):
        raise ValueError(
            f"exit_merge: need out [N, C], index int64 [N], logits [M, C], rows int64 [M], alive bool [M]; got "
            f"{list(out.shape)}, {index.dtype} {list(index.shape)}, {list(logits.shape)}, {rows.dtype} "
            f"{list(rows.shape)}, {alive.dtype} {list(alive.shape)}"
        )
    if use_triton(out, index, logits, rows, alive):
        return exit_merge_forward(out, index, logits, rows, alive, i)
    with torch.no_grad():
        return exit_merge_reference(out, index, logits, rows, alive, i)


@_exit_merge_op.register_fake
def _(out: Tensor, index: Tensor, logits: Tensor, rows: Tensor, alive: Tensor, i: int):
    return torch.empty_like(out, memory_format=torch.contiguous_format), torch.empty_like(index)


def _merge_setup(ctx, inputs, output) -> None:
    out, index, logits, rows, alive, i = inputs
    ctx.save_for_backward(out, index, logits, rows, alive)
    ctx.i = i
    ctx.mark_non_differentiable(output[1])


def _merge_backward(ctx, dnew: Tensor, _dindex):
    out, index, logits, rows, alive = ctx.saved_tensors
    if use_triton(dnew, rows, alive):
        dout, dlogits = exit_merge_backward(dnew, rows, alive, logits.dtype)
        return dout, None, dlogits, None, None, None
    grads = reference_vjp(
        lambda o, lg: exit_merge_reference(o, index, lg, rows, alive, ctx.i), (out, logits), (dnew, None)
    )
    return grads[0], None, grads[1], None, None, None


_exit_merge_op.register_autograd(_merge_backward, setup_context=_merge_setup)


@torch.library.custom_op("routec::exit_scores", mutates_args=())
def _exit_scores_op(logits: Tensor, rule: str) -> Tensor:
    _check_logits("exit_scores", logits)
    _check_rule(rule)
    if use_triton(logits):
        return exit_scores_forward(logits, rule)
    with torch.no_grad():
        return exit_scores_reference(logits, rule=rule)


@_exit_scores_op.register_fake
def _(logits: Tensor, rule: str) -> Tensor:
    return logits.new_empty(logits.shape[:1])


def _scores_setup(ctx, inputs, output) -> None:
    logits, rule = inputs
    ctx.save_for_backward(logits)
    ctx.rule = rule


def _scores_backward(ctx, dscore: Tensor):
    (logits,) = ctx.saved_tensors
    if use_triton(logits, dscore):
        return exit_scores_backward(logits, dscore, ctx.rule), None
    grads = reference_vjp(lambda lg: exit_scores_reference(lg, rule=ctx.rule), (logits,), (dscore,))
    return grads[0], None


_exit_scores_op.register_autograd(_scores_backward, setup_context=_scores_setup)


@torch.library.custom_op("routec::linear_exit", mutates_args=())
def _linear_exit_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], rule: str, threshold: float
) -> tuple[Tensor, Tensor, Tensor]:
    _check_rule(rule)
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"linear_exit: x must be [N, d] and weight [C, d], got {list(x.shape)} and {list(weight.shape)}"
        )
    if use_triton(x, weight, bias):
        return linear_exit_forward(x, weight, bias, rule, threshold)
    with torch.no_grad():
        return linear_exit_reference(x, weight, bias, rule=rule, threshold=threshold)


@_linear_exit_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor], rule: str, threshold: float):
    dtype = torch.promote_types(x.dtype, weight.dtype)
    n, c = x.shape[0], weight.shape[0]
    return x.new_empty((n, c), dtype=dtype), x.new_empty((n,), dtype=dtype), x.new_empty((n,), dtype=torch.bool)


def _linear_exit_setup(ctx, inputs, output) -> None:
    x, weight, bias, _, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[1], output[2])


def _linear_exit_backward(ctx, dlogits: Tensor, _dscore, _dmask):
    # Only the logits are differentiable (module doc); the three products of a linear layer's backward.
    x, weight = ctx.saved_tensors
    dlogits = dlogits.to(torch.promote_types(x.dtype, weight.dtype))
    dx = (dlogits @ weight.to(dlogits.dtype)).to(x.dtype)
    dweight = (dlogits.t() @ x.to(dlogits.dtype)).to(weight.dtype)
    dbias = dlogits.sum(0) if ctx.has_bias else None
    return dx, dweight, dbias, None, None


_linear_exit_op.register_autograd(_linear_exit_backward, setup_context=_linear_exit_setup)


@torch.library.custom_op("routec::select_first_exit", mutates_args=())
def _select_first_exit_op(logits_stack: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    if logits_stack.dim() != 3 or logits_stack.shape[0] < 1 or masks.shape != logits_stack.shape[:2]:
        raise ValueError(
            f"select_first_exit: need logits_stack [E >= 1, N, C] and masks [E, N], got "
            f"{list(logits_stack.shape)} and {list(masks.shape)}"
        )
    if masks.dtype != torch.bool:
        raise ValueError(f"select_first_exit: masks must be bool, got {masks.dtype}")
    if use_triton(logits_stack, masks):
        return select_first_exit_forward(logits_stack, masks)
    with torch.no_grad():
        return select_first_exit_reference(logits_stack, masks)


@_select_first_exit_op.register_fake
def _(logits_stack: Tensor, masks: Tensor):
    n = logits_stack.shape[1]
    return logits_stack.new_empty(logits_stack.shape[1:]), logits_stack.new_empty((n,), dtype=torch.int64)


def _select_setup(ctx, inputs, output) -> None:
    logits_stack, masks = inputs
    ctx.save_for_backward(logits_stack, masks, output[1])
    ctx.mark_non_differentiable(output[1])


def _select_backward(ctx, dout: Tensor, _dindex):
    logits_stack, masks, index = ctx.saved_tensors
    if use_triton(dout, index):
        return select_first_exit_backward(dout, index, logits_stack.shape[0]), None
    grads = reference_vjp(lambda s: select_first_exit_reference(s, masks), (logits_stack,), (dout, None))
    return grads[0], None


_select_first_exit_op.register_autograd(_select_backward, setup_context=_select_setup)


def exit_scores(logits: Tensor, *, rule: str = "confidence") -> Tensor:
    """Halting score of each row of logits [N, C]: max softmax probability ("confidence") or softmax
    entropy ("entropy"); [N], dtype of the logits. Differentiable."""
    return torch.ops.routec.exit_scores(logits, rule)


def linear_exit(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, rule: str = "confidence", threshold: float = 0.9
) -> tuple[Tensor, Tensor, Tensor]:
    """Exit head with its rule fused: x [N, d], weight [C, d], bias [C] -> (logits [N, C], score [N],
    exit_mask bool [N]); exit where score >= threshold (confidence) or score <= threshold (entropy).
    Gradients flow through the logits only."""
    return torch.ops.routec.linear_exit(x, weight, bias, rule, float(threshold))


def select_first_exit(logits_stack: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """logits_stack [E, N, C], masks bool [E, N] -> (out [N, C]: per sample the output of the first exit
    whose mask holds, else the last; index int64 [N]: that exit). Differentiable in logits_stack."""
    return torch.ops.routec.select_first_exit(logits_stack, masks)


def exit_merge(
    out: Tensor, index: Tensor, logits: Tensor, rows: Tensor, alive: Tensor, i: int
) -> tuple[Tensor, Tensor]:
    """Write exit `i`'s logits of the live packed rows back to their original rows: out [N, C], index int64
    [N], logits [M, C], rows int64 [M] (original row of each packed row, distinct), alive bool [M] ->
    (out with out[rows[j]] = logits[j], index with index[rows[j]] = i, for every alive j). Sync-free;
    differentiable in out and logits."""
    return torch.ops.routec.exit_merge(out, index, logits, rows, alive, i)
