"""Sync-free row compaction for pre-gates, skip gates and exits.

A keep-mask over the N rows of a batch becomes a stable permutation and a live count, both on the device:

    perm, count = compact(keep)                          # keep: bool [N] -> perm: int64 [N], count: int64 [1]
    packed = gather_rows(x, perm, count, capacity)       # [capacity, ...]: x[perm[j]] for j < count, else 0
    y = block(packed)                                    # the skipped-into block runs on the packed batch
    out = scatter_rows(y, perm, count, base=x)           # base with rows perm[:count] replaced by y[:count]

`perm` lists the kept rows in their original order, then the dropped rows in their original order, so the
packed batch keeps the order of the batch and `scatter_rows` puts results back where they came from. No
step reads `count` on the host: there is no `.item()`, `nonzero` or boolean indexing.

`capacity` is a Python int, the static row count of the packed batch. Under `torch.compile` it is the only
shape the graph sees (the count stays a device tensor), so a graph is specialised once per capacity
bucket: `bucket_capacity` rounds an upper bound of the live count up to a power of two (at most N), so a
model recompiles at most log2(N) times. The capacity must be at least the live count; rows beyond it are
not packed, and `scatter_rows` then leaves their `base` rows unchanged. An upper bound that needs no sync
is any earlier count (exits only remove rows), e.g. one copied to the host asynchronously a layer before.

Kernels. `compact` is a single program that walks the mask in blocks twice: once to count the survivors,
once to place every row with `tl.cumsum` inside a block plus a carried running offset (N is a batch or
token count, so one program suffices). `gather_rows` runs one program per [BLOCK_R, BLOCK_F] tile of the
packed output; `scatter_rows` one program per tile of perm positions j (each output row is written once,
from `packed[j]` if j < count, else from `base`). Gradients: gather and scatter are each other's adjoint
(the backward of gather is a scatter onto zeros; the backward of scatter is a gather for `packed` and a
scatter of zeros for `base`); `perm` and `count` get none.

Policy. `should_compact` says whether packing pays: a packed block saves time only where it is
compute-bound (DESIGN §6).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backend import reference_vjp, use_triton

__all__ = [
    "bucket_capacity",
    "compact",
    "compact_groups",
    "compact_groups_reference",
    "compact_reference",
    "gather_rows",
    "gather_rows_reference",
    "scatter_rows",
    "scatter_rows_reference",
    "should_compact",
]


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


def compact_reference(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Stable sort of the rows by "dropped": kept rows first, each group in its original order."""
    perm = torch.sort((~keep).to(torch.uint8), stable=True).indices  # [N]
    count = keep.sum(dtype=torch.int64).reshape(1)
    return perm, count


def _live(count: Tensor, rows: int, limit: int) -> Tensor:
    j = torch.arange(rows, device=count.device)
    return (j < count.clamp(max=limit)) & (j < limit)  # [rows]


def gather_rows_reference(x: Tensor, perm: Tensor, count: Tensor, capacity: int) -> Tensor:
    """packed[j] = x[perm[j]] for j < min(count, capacity), zero for the other rows; shape [capacity, ...]."""
    n = x.shape[0]
    if n == 0:
        return x.new_zeros((capacity, *x.shape[1:]))
    j = torch.arange(capacity, device=x.device).clamp(max=n - 1)
    rows = x.index_select(0, perm[j])  # [capacity, ...]
    live = _live(count, capacity, n).reshape(capacity, *([1] * (x.dim() - 1)))
    return torch.where(live, rows, torch.zeros((), dtype=x.dtype, device=x.device))


def scatter_rows_reference(packed: Tensor, perm: Tensor, count: Tensor, base: Tensor) -> Tensor:
    """base with row perm[j] replaced by packed[j] for every j < min(count, capacity)."""
    n, capacity = base.shape[0], packed.shape[0]
    if capacity == 0 or n == 0:
        return base.clone()
    rank = torch.empty_like(perm)
    rank[perm] = torch.arange(n, device=perm.device)  # rank[i]: where row i sits in perm
    live = (rank < count.clamp(max=capacity)).reshape(n, *([1] * (base.dim() - 1)))
    return torch.where(live, packed.index_select(0, rank.clamp(max=capacity - 1)), base)


@triton.jit
def _compact_kernel(
    keep_ptr,  # [N] uint8
    perm_ptr,  # [N] int64
    count_ptr,  # [1] int64
    N,
    BLOCK: tl.constexpr,
):
    """Single program: count the kept rows, then place row i at its rank among the kept rows (kept) or at
    count + its rank among the dropped rows (dropped), with a block cumsum plus a carried offset."""
    total = tl.sum(tl.zeros((BLOCK,), dtype=tl.int32), axis=0)
    for start in range(0, N, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        k = tl.load(keep_ptr + idx, mask=idx < N, other=0).to(tl.int32)
        total += tl.sum((k != 0).to(tl.int32), axis=0)
    kept_before = tl.sum(tl.zeros((BLOCK,), dtype=tl.int32), axis=0)
    for start in range(0, N, BLOCK):
        idx = start + tl.arange(0, BLOCK)  # [BLOCK]
        in_range = idx < N
        k = (tl.load(keep_ptr + idx, mask=in_range, other=0) != 0).to(tl.int32)
        kept_excl = kept_before + tl.cumsum(k, axis=0) - k  # kept rows before idx
        pos = tl.where(k != 0, kept_excl, total + idx - kept_excl)
        tl.store(perm_ptr + pos.to(tl.int64), idx.to(tl.int64), mask=in_range)
        kept_before += tl.sum(k, axis=0)
    tl.store(count_ptr, total.to(tl.int64))


@triton.jit
def _gather_rows_kernel(
    x_ptr,  # [N, F]
    perm_ptr,  # [N] int64
    count_ptr,  # [1] int64
    out_ptr,  # [CAP, F]
    N,
    CAP,
    F,
    BLOCK_R: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """out[j] = x[perm[j]] for j < min(count, N), else 0; one program per [BLOCK_R, BLOCK_F] tile of out."""
    j = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)  # [BF]
    col_ok = cols[None, :] < F
    count = tl.load(count_ptr)
    live = (j < count) & (j < N)
    src = tl.load(perm_ptr + j, mask=live, other=0)  # [BR] int64
    x = tl.load(x_ptr + src[:, None] * F + cols[None, :], mask=live[:, None] & col_ok, other=0.0)
    tl.store(out_ptr + j.to(tl.int64)[:, None] * F + cols[None, :], x, mask=(j < CAP)[:, None] & col_ok)


@triton.jit
def _scatter_rows_kernel(
    packed_ptr,  # [CAP, F]
    perm_ptr,  # [N] int64
    count_ptr,  # [1] int64
    base_ptr,  # [N, F]
    out_ptr,  # [N, F]
    N,
    CAP,
    F,
    PACKED_ZERO: tl.constexpr,  # treat packed as zeros (backward for base)
    BASE_ZERO: tl.constexpr,  # treat base as zeros (backward of gather)
    BLOCK_R: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """For perm position j: out[perm[j]] = packed[j] if j < min(count, CAP) else base[perm[j]]; one program
    per [BLOCK_R, BLOCK_F] tile of positions. perm is a permutation, so every out row is written once."""
    j = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)  # [BF]
    col_ok = cols[None, :] < F
    in_range = j < N
    count = tl.minimum(tl.load(count_ptr), CAP)
    dst = tl.load(perm_ptr + j, mask=in_range, other=0)  # [BR] int64
    from_packed = in_range & (j < count)
    from_base = in_range & (j >= count)
    if PACKED_ZERO:
        v_packed = tl.zeros((BLOCK_R, BLOCK_F), dtype=out_ptr.dtype.element_ty)
    else:
        v_packed = tl.load(
            packed_ptr + j.to(tl.int64)[:, None] * F + cols[None, :], mask=from_packed[:, None] & col_ok, other=0.0
        )
    if BASE_ZERO:
        v_base = tl.zeros((BLOCK_R, BLOCK_F), dtype=out_ptr.dtype.element_ty)
    else:
        v_base = tl.load(base_ptr + dst[:, None] * F + cols[None, :], mask=from_base[:, None] & col_ok, other=0.0)
    v = tl.where(from_packed[:, None], v_packed, v_base)
    tl.store(out_ptr + dst[:, None] * F + cols[None, :], v, mask=in_range[:, None] & col_ok)


def _tiles(F: int) -> tuple[int, int]:
    block_f = min(triton.next_power_of_2(max(F, 1)), 512)
    return max(4096 // block_f, 1), block_f


def compact_forward(keep: Tensor, *, perm_out: Tensor | None = None, block: int = 1024) -> tuple[Tensor, Tensor]:
    """Launch the compaction kernel (one program). `perm_out` lets a test pass a poisoned buffer."""
    n = keep.shape[0]
    perm = _empty(n, torch.int64, keep.device) if perm_out is None else perm_out
    count = _empty(1, torch.int64, keep.device)
    _compact_kernel[(1,)](keep.contiguous().view(torch.uint8), perm, count, n, BLOCK=block)
    return perm, count


def gather_rows_forward(
    x: Tensor, perm: Tensor, count: Tensor, capacity: int, *, out: Tensor | None = None
) -> Tensor:
    """Launch the gather kernel: [capacity, ...] packed rows (zero past the count)."""
    n, feat = x.shape[0], math.prod(x.shape[1:])
    out = _empty((capacity, *x.shape[1:]), x.dtype, x.device) if out is None else out
    if capacity * feat == 0:
        return out
    block_r, block_f = _tiles(feat)
    grid = (triton.cdiv(capacity, block_r), triton.cdiv(feat, block_f))
    _gather_rows_kernel[grid](x.contiguous(), perm, count, out, n, capacity, feat, BLOCK_R=block_r, BLOCK_F=block_f)
    return out


def scatter_rows_forward(
    packed: Tensor | None,
    perm: Tensor,
    count: Tensor,
    base: Tensor | None,
    *,
    like: Tensor | None = None,
    capacity: int | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Launch the scatter kernel. `packed` or `base` may be None (read as zeros, for the backwards); then
    `like` gives the out shape/dtype and `capacity` the packed row count."""
    ref = base if base is not None else like
    capacity = packed.shape[0] if packed is not None else capacity
    n, feat = ref.shape[0], math.prod(ref.shape[1:])
    out = _empty(ref.shape, ref.dtype, ref.device) if out is None else out
    if n * feat == 0:
        return out
    block_r, block_f = _tiles(feat)
    grid = (triton.cdiv(n, block_r), triton.cdiv(feat, block_f))
    _scatter_rows_kernel[grid](
        out if packed is None else packed.contiguous(),
        perm,
        count,
        out if base is None else base.contiguous(),
        out,
        n,
        capacity,
        feat,
        PACKED_ZERO=packed is None,
        BASE_ZERO=base is None,
        BLOCK_R=block_r,
        BLOCK_F=block_f,
    )
    return out


def _check_rows(name: str, perm: Tensor, count: Tensor, n: int) -> None:
    if perm.dtype != torch.int64 or perm.shape != (n,):
        raise ValueError(f"{name}: perm must be int64 [{n}], got {perm.dtype} {list(perm.shape)}")
    if count.dtype != torch.int64 or count.shape != (1,):
        raise ValueError(f"{name}: count must be int64 [1], got {count.dtype} {list(count.shape)}")


@torch.library.custom_op("routec::compact", mutates_args=())
def _compact_op(keep: Tensor) -> tuple[Tensor, Tensor]:
    if keep.dtype != torch.bool or keep.dim() != 1:
        raise ValueError(f"compact: keep must be a bool [N] mask, got {keep.dtype} {list(keep.shape)}")
    if use_triton(keep):
        return compact_forward(keep)
    return compact_reference(keep)


@_compact_op.register_fake
def _(keep: Tensor) -> tuple[Tensor, Tensor]:
    return keep.new_empty(keep.shape, dtype=torch.int64), keep.new_empty((1,), dtype=torch.int64)


@torch.library.custom_op("routec::gather_rows", mutates_args=())
def _gather_rows_op(x: Tensor, perm: Tensor, count: Tensor, capacity: int) -> Tensor:
    _check_rows("gather_rows", perm, count, x.shape[0])
    if use_triton(x, perm, count):
        return gather_rows_forward(x, perm, count, capacity)
    with torch.no_grad():
        return gather_rows_reference(x, perm, count, capacity)


@_gather_rows_op.register_fake
def _(x: Tensor, perm: Tensor, count: Tensor, capacity: int) -> Tensor:
    return x.new_empty((capacity, *x.shape[1:]))


def _gather_setup(ctx, inputs, output) -> None:
    x, perm, count, capacity = inputs
    ctx.save_for_backward(x, perm, count)
    ctx.capacity = capacity


def _gather_backward(ctx, dpacked: Tensor):
    x, perm, count = ctx.saved_tensors
    if use_triton(dpacked, perm, count):
        return scatter_rows_forward(dpacked, perm, count, None, like=x), None, None, None
    return reference_vjp(gather_rows_reference, (x, perm, count, ctx.capacity), (dpacked,))


_gather_rows_op.register_autograd(_gather_backward, setup_context=_gather_setup)


@torch.library.custom_op("routec::scatter_rows", mutates_args=())
def _scatter_rows_op(packed: Tensor, perm: Tensor, count: Tensor, base: Tensor) -> Tensor:
    _check_rows("scatter_rows", perm, count, base.shape[0])
    if packed.shape[1:] != base.shape[1:] or packed.dtype != base.dtype:
        raise ValueError(
            f"scatter_rows: packed rows must match base rows, got {packed.dtype} {list(packed.shape)} "
            f"and {base.dtype} {list(base.shape)}"
        )
    if use_triton(packed, perm, count, base):
        return scatter_rows_forward(packed, perm, count, base)
    with torch.no_grad():
        return scatter_rows_reference(packed, perm, count, base)


@_scatter_rows_op.register_fake
def _(packed: Tensor, perm: Tensor, count: Tensor, base: Tensor) -> Tensor:
    return torch.empty_like(base, memory_format=torch.contiguous_format)


def _scatter_setup(ctx, inputs, output) -> None:
    packed, perm, count, base = inputs
    ctx.save_for_backward(packed, perm, count, base)


def _scatter_backward(ctx, dout: Tensor):
    packed, perm, count, base = ctx.saved_tensors
    if use_triton(dout, perm, count):
        capacity = packed.shape[0]
        dpacked = gather_rows_forward(dout, perm, count, capacity)
        dbase = scatter_rows_forward(None, perm, count, dout, capacity=capacity)
        return dpacked, None, None, dbase
    return reference_vjp(scatter_rows_reference, (packed, perm, count, base), (dout,))


_scatter_rows_op.register_autograd(_scatter_backward, setup_context=_scatter_setup)


def compact(keep: Tensor) -> tuple[Tensor, Tensor]:
    """keep: bool [N] -> (perm int64 [N]: kept rows then dropped rows, each in original order;
    count int64 [1]: the number of kept rows). Both stay on the device; not differentiable."""
    return torch.ops.routec.compact(keep)


def gather_rows(x: Tensor, perm: Tensor, count: Tensor, capacity: int) -> Tensor:
    """x: [N, ...] -> packed [capacity, ...] with packed[j] = x[perm[j]] for j < count, zero after.
    Differentiable in x."""
    return torch.ops.routec.gather_rows(x, perm, count, capacity)


def scatter_rows(packed: Tensor, perm: Tensor, count: Tensor, base: Tensor) -> Tensor:
    """base [N, ...] with rows perm[:count] replaced by packed[:count] (packed: [capacity, ...]; only the
    first min(count, capacity) rows are used). perm must be a permutation of range(N), as `compact` gives.
    Differentiable in packed and base."""
    return torch.ops.routec.scatter_rows(packed, perm, count, base)


def bucket_capacity(n_live_upper: int, n: int, *, steps_per_octave: int = 1) -> int:
    """The static packed row count for at most `n_live_upper` live rows out of `n`, never more than `n`,
    at least 1. By default the next power of two, so a compiled graph sees at most log2(n) + 1 shapes.
    `steps_per_octave` = 2**k splits each octave into that many equal steps (a multiple of
    next_pow2 / 2**k): less padding for slowly shrinking batches (an exit profile losing 6% a layer wastes
    up to 2x with powers of two), at the price of up to 2**k times more shapes to compile."""
    if n_live_upper < 0 or n < 0:
        raise ValueError(f"bucket_capacity: counts must be >= 0, got {n_live_upper} of {n}")
    if steps_per_octave < 1 or steps_per_octave & (steps_per_octave - 1):
        raise ValueError(f"bucket_capacity: steps_per_octave must be a power of two, got {steps_per_octave}")
    top = triton.next_power_of_2(max(n_live_upper, 1))
    step = max(top // steps_per_octave, 1)
    return max(1, min(n, -(-max(n_live_upper, 1) // step) * step))


# Rows above which a 4096-wide bf16 layer is compute-bound (ridge point: measured matmul FLOP/s over
# copy bandwidth, DESIGN §6 / KERNEL_NOTES §1). Below it the layer streams its weights in the same time
# whatever the row count, so removing rows saves nothing and the compaction is pure overhead.
RIDGE_ROWS = {"H200": 170, "H100": 250}
RIDGE_ROWS_DEFAULT = 250
RIDGE_WIDTH = 4096


def compaction_threshold(width: int, device: torch.device | str) -> int:
    """Live rows from which compacting a `width`-wide layer pays on `device` (0 on CPU: always compact).

    On a GPU the ridge is scaled by 4096 / width for narrower layers: the work per row falls with the width
    while the per-layer fixed costs (weight streaming, launch latency, the compaction itself) do not, so a
    narrower layer needs proportionally more rows before dropping rows shows in its time. Wider layers
    keep the ridge. The constants are calibrated at width 4096; the crossover sweep in
    benchmarks/cases_exit.py measures the real point on a card.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    name = torch.cuda.get_device_name(device)
    ridge = next((rows for card, rows in RIDGE_ROWS.items() if card in name), RIDGE_ROWS_DEFAULT)
    return math.ceil(ridge * max(1.0, RIDGE_WIDTH / max(width, 1)))


def should_compact(live_rows: int | Tensor, width: int, device: torch.device | str) -> bool | Tensor:
    """Whether to pack `live_rows` rows of a `width`-wide layer on `device` rather than run it masked.

    With an int (a host-side upper bound, e.g. the capacity bucket) the answer is a bool. With a device
    count tensor it is a bool tensor on the device, so the decision needs no host sync (use it with
    `torch.where` or `torch.cond`). On CPU always compact.
    """
    return live_rows >= compaction_threshold(width, device)


# ----------------------------------------------------------------------------------------------------------
# pack_rows: the data-dependent form, used by named-branch routes and by the compiler's exits when traced
# (eager exits use compact + gather_rows with bucketed capacities instead: runtime.ExitPoint). This op's body
# is always eager and reads the live count (one sync); a traced graph sees one opaque op whose output size is
# an unbacked symbol, so torch.compile(fullgraph=True) and torch.export keep it whole.


def pack_rows_reference(keep: Tensor, xs: list[Tensor], min_rows: int = 0) -> list[Tensor]:
    """[rows, x[rows] for x in xs]: the kept rows in order, padded by repeating the last kept row up to
    min(min_rows, N) rows (a floor that keeps BLAS on its batched kernels, see runtime.survivors)."""
    rows = keep.nonzero().squeeze(-1)
    floor = min(min_rows, keep.shape[0])
    if 0 < rows.numel() < floor:
        rows = torch.cat([rows, rows[-1:].expand(floor - rows.numel())])
    return [rows] + [x.index_select(0, rows) for x in xs]


def _pack_rows_triton(keep: Tensor, xs: list[Tensor], min_rows: int) -> list[Tensor]:
    perm, count = compact_forward(keep)
    live = int(count.item())  # the op's body is eager: the packed size is read once, here
    rows = perm[:live]
    floor = min(min_rows, keep.shape[0])
    if 0 < live < floor:
        rows = torch.cat([rows, rows[-1:].expand(floor - live)])
    source = rows.contiguous()  # gather_rows reads x[source[j]] for j < count
    n = torch.full_like(count, rows.numel())
    packed = [gather_rows_forward(x.reshape(x.shape[0], -1), source, n, rows.numel()).reshape(rows.numel(), *x.shape[1:])
              for x in xs]
    return [rows.clone()] + packed


@torch.library.custom_op("routec::pack_rows", mutates_args=())
def _pack_rows_op(keep: Tensor, xs: list[Tensor], min_rows: int) -> list[Tensor]:
    if use_triton(keep, *xs) and all(x.is_floating_point() for x in xs):
        return _pack_rows_triton(keep, xs, min_rows)
    return [t.clone() for t in pack_rows_reference(keep, xs, min_rows)]


@_pack_rows_op.register_fake
def _(keep: Tensor, xs: list[Tensor], min_rows: int) -> list[Tensor]:
    n = torch.library.get_ctx().new_dynamic_size()
    return [keep.new_empty(n, dtype=torch.int64)] + [x.new_empty(n, *x.shape[1:]) for x in xs]


def _pack_setup(ctx, inputs, output) -> None:
    keep, xs, _ = inputs
    ctx.shapes = [x.shape for x in xs]
    ctx.save_for_backward(output[0], keep)


def _pack_backward(ctx, grads: list[Tensor]):
    rows, keep = ctx.saved_tensors
    real = int(keep.sum().item())  # padded duplicates carry copies of a real row's gradient: count it once
    dxs = []
    for shape, g in zip(ctx.shapes, grads[1:]):
        if g is None:
            dxs.append(None)
            continue
        dxs.append(g.new_zeros(shape).index_add(0, rows[:real], g[:real]))
    return None, dxs, None


_pack_rows_op.register_autograd(_pack_backward, setup_context=_pack_setup)


def pack_rows(keep: Tensor, xs: list[Tensor], *, min_rows: int = 0) -> list[Tensor]:
    """keep: bool [N]; xs: tensors [N, ...] -> [rows int64 [n], x[rows] [n, ...] for each x]: the kept rows
    in their original order (n = the kept count, or min(min_rows, N) when fewer are kept: the last kept row
    repeats, and these padding copies are detached — gradients reach x through the real rows only).
    Differentiable in xs (Triton path: `compact` + `gather_rows` on floating tensors)."""
    return torch.ops.routec.pack_rows(keep, list(xs), int(min_rows))


# ----------------------------------------------------------------------------------------------------------
# compact_groups: `compact` over G masks at once, for callers that need every group's count on the host in
# one transfer (runtime.BranchRoute: one group per branch, or per (branch, sample) in "tokens" mode).


def compact_groups_reference(keep: Tensor) -> tuple[Tensor, Tensor]:
    """keep: bool [G, N] -> (perm int64 [G, N], count int64 [G]): for each group g, a stable sort of the
    rows by "dropped" (kept rows first, each group in its original order) and the number of kept rows."""
    perm = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices  # [G, N]
    count = keep.sum(dim=-1, dtype=torch.int64)  # [G]
    return perm, count


@triton.jit
def _compact_groups_kernel(
    keep_ptr,  # [G, N] uint8
    perm_ptr,  # [G, N] int64
    count_ptr,  # [G] int64
    N,
    BLOCK: tl.constexpr,
):
    """One program per group g: count the kept rows of keep[g], then place row i at its rank among the kept
    rows (kept) or at count + its rank among the dropped rows (dropped), with a block cumsum plus a carried
    offset (as `_compact_kernel`, on the group's row of the [G, N] mask)."""
    g = tl.program_id(0).to(tl.int64)
    keep_row = keep_ptr + g * N  # 64-bit: G * N may pass 2**31
    perm_row = perm_ptr + g * N
    total = tl.sum(tl.zeros((BLOCK,), dtype=tl.int32), axis=0)
    for start in range(0, N, BLOCK):
        idx = start + tl.arange(0, BLOCK)  # [BLOCK]
        k = tl.load(keep_row + idx, mask=idx < N, other=0).to(tl.int32)
        total += tl.sum((k != 0).to(tl.int32), axis=0)
    kept_before = tl.sum(tl.zeros((BLOCK,), dtype=tl.int32), axis=0)
    for start in range(0, N, BLOCK):
        idx = start + tl.arange(0, BLOCK)  # [BLOCK]
        in_range = idx < N
        k = (tl.load(keep_row + idx, mask=in_range, other=0) != 0).to(tl.int32)
        kept_excl = kept_before + tl.cumsum(k, axis=0) - k  # kept rows of the group before idx
        pos = tl.where(k != 0, kept_excl, total + idx - kept_excl)
        tl.store(perm_row + pos.to(tl.int64), idx.to(tl.int64), mask=in_range)
        kept_before += tl.sum(k, axis=0)
    tl.store(count_ptr + g, total.to(tl.int64))


def compact_groups_forward(
    keep: Tensor, *, perm_out: Tensor | None = None, count_out: Tensor | None = None, block: int = 1024
) -> tuple[Tensor, Tensor]:
    """Launch the grouped compaction kernel (one program per group). `perm_out` / `count_out` let a test
    pass poisoned buffers."""
    groups, n = keep.shape
    perm = _empty((groups, n), torch.int64, keep.device) if perm_out is None else perm_out
    count = _empty(groups, torch.int64, keep.device) if count_out is None else count_out
    if groups == 0:
        return perm, count
    block = min(block, triton.next_power_of_2(max(n, 1)))
    _compact_groups_kernel[(groups,)](keep.contiguous().view(torch.uint8), perm, count, n, BLOCK=block)
    return perm, count


@torch.library.custom_op("routec::compact_groups", mutates_args=())
def _compact_groups_op(keep: Tensor) -> tuple[Tensor, Tensor]:
    if keep.dtype != torch.bool or keep.dim() != 2:
        raise ValueError(f"compact_groups: keep must be a bool [G, N] mask, got {keep.dtype} {list(keep.shape)}")
    if use_triton(keep):
        return compact_groups_forward(keep)
    return compact_groups_reference(keep)


@_compact_groups_op.register_fake
def _(keep: Tensor) -> tuple[Tensor, Tensor]:
    return keep.new_empty(keep.shape, dtype=torch.int64), keep.new_empty(keep.shape[:1], dtype=torch.int64)


def compact_groups(keep: Tensor) -> tuple[Tensor, Tensor]:
    """keep: bool [G, N] -> (perm int64 [G, N]: per group, its kept rows then its dropped rows, each in
    original order; count int64 [G]: each group's kept rows). `compact` on every row of `keep` in one
    launch, so all G counts can reach the host in one transfer. Both stay on the device; not
    differentiable. `perm[g]` with `count[g:g + 1]` is what `gather_rows` / `scatter_rows` take."""
    return torch.ops.routec.compact_groups(keep)
