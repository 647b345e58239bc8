"""The nn.Modules the compiler places in a routed graph for gates, routes, paths, exits and scans.

Each module holds the construct's parameters and its train/eval semantics (DESIGN §4) and calls the runtime
ops of `routec.codegen.ops`, so a compiled model (and the file `routec compile` writes) needs only this
module, `ops` and torch. Nothing here keeps hidden state between calls.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor

from . import functions, ops
from .ctor import recorded

__all__ = [
    "TopKGate", "SoftGate", "HardGate", "Experts", "BranchRoute", "PathCombine", "ExitPoint", "ExitScore", "ExitFinal",
    "ScanLoop", "LiveBound", "branch_capacity", "exit_policy", "exit_rows", "batch_dim", "token_shuffle",
    "token_unshuffle", "zeros_batch",
]


def batch_dim(x: Tensor, dim: int) -> int:
    """`x.size(dim)` as a graph-friendly call (fx records it as one node)."""
    return x.size(dim)


def zeros_batch(*sizes: int, like: Tensor) -> Tensor:
    """zeros of `sizes` with the dtype and device of `like`."""
    return torch.zeros(sizes, dtype=like.dtype, device=like.device)


def token_shuffle(x: Tensor, dim: int = 1) -> tuple[Tensor, Tensor]:
    """A fresh random token order along `dim`, shared by the batch: (x reordered, the permutation)."""
    perm = torch.randperm(x.size(dim), device=x.device)
    return x.index_select(dim, perm), perm


def token_unshuffle(y: Tensor, perm: Tensor, dim: int = 1) -> Tensor:
    """Undo `token_shuffle`: put row j of `y` back at position perm[j]."""
    return y.index_select(dim, torch.argsort(perm))


@recorded
class TopKGate(nn.Module):
    """Top-k routing over `experts` choices from scores [..., E].

    Training with `noisy`: the noisy top-k of Shazeer et al. — scores + N(0, 1) · softplus(x W_noise), with
    `w_noise` [d, E] learned (zero-initialised, as in the paper's code). `capacity_factor` bounds the tokens
    per expert to ceil(capacity_factor · T · k / E) (overflow dropped). Returns (weights [..., k],
    indices [..., k], aux) where aux is the Switch load-balance loss.
    """

    def __init__(self, k: int, experts: int, d: int | None = None, noisy: bool = False,
                 normalize: bool = False, capacity_factor: float = 0.0):
        super().__init__()
        self.k, self.experts, self.normalize = k, experts, normalize
        self.capacity_factor = capacity_factor
        self.w_noise = nn.Parameter(torch.zeros(d, experts)) if noisy and d else None

    def forward(self, scores: Tensor, x: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        lead = scores.shape[:-1]
        logits = scores.reshape(-1, self.experts)
        noise = None
        if self.training and self.w_noise is not None and x is not None:
            std = F.softplus(x.reshape(-1, x.shape[-1]) @ self.w_noise)
            noise = torch.randn_like(logits) * std
        capacity = None
        if self.capacity_factor > 0:
            capacity = max(1, math.ceil(self.capacity_factor * logits.shape[0] * self.k / self.experts))
        r = ops.route_tokens(logits, self.k, normalize=self.normalize, noise=noise, capacity=capacity)
        return r.weights.reshape(*lead, self.k), r.indices.reshape(*lead, self.k), r.aux_loss


@recorded
class SoftGate(nn.Module):
    """Dense gate weights over the last dim: softmax(scores / temperature), or sigmoid per choice."""

    def __init__(self, kind: str = "softmax", temperature: float = 1.0):
        super().__init__()
        self.kind, self.temperature = kind, temperature

    def forward(self, scores: Tensor) -> Tensor:
        if self.kind == "sigmoid":
            return torch.sigmoid(scores)
        return torch.softmax(scores / self.temperature, dim=-1)


@recorded
class HardGate(nn.Module):
    """Hard decisions with straight-through gradients.

    * `threshold`: one choice per score, 1 where sigmoid(score) >= t (gradient of the sigmoid);
    * `bernoulli`: sample 1 with probability sigmoid(score) in training, threshold 0.5 in eval;
    * `gumbel`: one-hot over the last dim from Gumbel-softmax(tau) in training (hard), argmax in eval;
    * `argmax`: one-hot argmax of softmax(scores), straight-through.
    The forward value is exactly 0/1; the backward is that of the soft value.
    """

    def __init__(self, kind: str, threshold: float = 0.5, tau: float = 1.0):
        super().__init__()
        self.kind, self.threshold, self.tau = kind, threshold, tau

    def forward(self, scores: Tensor) -> Tensor:
        if self.kind in ("threshold", "bernoulli"):
            soft = torch.sigmoid(scores)
            if self.kind == "bernoulli" and self.training:
                hard = (torch.rand_like(soft) < soft).to(soft.dtype)
            else:
                hard = (soft >= self.threshold).to(soft.dtype)
        else:
            if self.kind == "gumbel" and self.training:
                u = torch.rand_like(scores).clamp(1e-20, 1.0)
                g = -torch.log((-torch.log(u)).clamp_min(1e-20))  # Gumbel(0, 1) noise
                soft = torch.softmax((scores + g) / self.tau, dim=-1)
            else:
                soft = torch.softmax(scores, dim=-1)
            hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
        return hard + soft - soft.detach()


@recorded
class Experts(nn.Module):
    """E copies of `Linear(d, h) -> act -> Linear(h, out)` stored stacked, run by the `moe_ffn` op.

    w1 [E, d, h], w2 [E, h, out] (x @ w layout), optional w3 [E, d, h] for gated activations and biases
    b1 [E, h], b2 [E, out], all passed to the op as they are (no copies).
    """

    def __init__(self, experts: int, d: int, hidden: int, out: int, activation: str = "gelu",
                 bias: bool = True, gated: bool = False):
        super().__init__()
        self.activation = activation
        bound1, bound2 = 1 / math.sqrt(d), 1 / math.sqrt(hidden)
        self.w1 = nn.Parameter(torch.empty(experts, d, hidden).uniform_(-bound1, bound1))
        self.w2 = nn.Parameter(torch.empty(experts, hidden, out).uniform_(-bound2, bound2))
        self.w3 = nn.Parameter(torch.empty(experts, d, hidden).uniform_(-bound1, bound1)) if gated else None
        self.b1 = nn.Parameter(torch.empty(experts, hidden).uniform_(-bound1, bound1)) if bias else None
        self.b2 = nn.Parameter(torch.empty(experts, out).uniform_(-bound2, bound2)) if bias else None

    def forward(self, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        lead = x.shape[:-1]
        xs = x.reshape(-1, x.shape[-1])  # [T, d]
        w = weights.reshape(xs.shape[0], -1)  # [T, k]
        idx = indices.reshape(xs.shape[0], -1)  # [T, k]
        y = ops.moe_ffn(xs, w, idx, self.w1, self.w2, activation=self.activation, w3=self.w3, b1=self.b1,
                        b2=self.b2)  # [T, out]
        return y.reshape(*lead, y.shape[-1])


@recorded
class BranchRoute(nn.Module):
    """Send each row to the branches its gate chose, run only those rows, and combine weighted.

    `weights` [..., k] and `indices` [..., k]; branch p runs on the rows that chose it (gathered, run,
    scattered back: pre-gate semantics, no masked-away compute). Modes: "rows" (token rows of all samples
    together, for row-wise branches), "tokens" (each sample's chosen tokens as one sequence, for branches
    that mix tokens such as attention), "samples" (a per-sample gate sends whole samples).

    `capacity_factor` > 0 (modes "rows" and "tokens"): each branch runs on a static batch of
    C = `branch_capacity(rows, k, branches, capacity_factor)` rows, the first C rows (in row order) that
    chose it, zero-padded when fewer did; the rows over a branch's capacity are dropped from it (they add
    0, as `route_tokens` drops tokens over an expert's capacity). Shapes then come from the input's shape
    alone: no host read, and a static graph under torch.compile. In "tokens" mode the capacity counts the
    tokens of each (sample, branch): C = `branch_capacity(L, k, branches, capacity_factor)`, the branch runs
    once on [B, C, d] with `token_padding` marking the real tokens (see `_route_tokens_capped`).
    """

    def __init__(self, branches: Sequence[nn.Module], mode: str = "rows", extras: Optional[list] = None,
                 capacity_factor: float = 0.0):
        super().__init__()
        # the branches' modules are registered on the model at their spec paths; holding the branch graphs
        # outside the registry keeps each parameter under one name in state_dict
        object.__setattr__(self, "branches", list(branches))
        self.mode = mode
        if capacity_factor < 0 or (capacity_factor > 0 and mode == "samples"):
            raise ValueError(f"BranchRoute: capacity_factor must be >= 0 and needs mode 'rows' or 'tokens', "
                             f"got {capacity_factor} in mode {mode!r}")
        self.capacity_factor = float(capacity_factor)
        # per branch, for each outside tensor it reads: whether it travels with the rows (same leading dims)
        self.extras = [list(e) for e in (extras or [[] for _ in branches])]

    def _split(self, extra: tuple) -> list[list[Tensor]]:
        out, i = [], 0
        for flags in self.extras:
            out.append(list(extra[i: i + len(flags)]))
            i += len(flags)
        return out

    def forward(self, x: Tensor, weights: Tensor, indices: Tensor, *extra: Tensor) -> Tensor:
        per_branch = self._split(extra)
        if self.mode == "samples":  # whole samples [B, ...] go to a branch
            return self._route(x, weights, indices, per_branch)
        if self.mode == "tokens":  # each sample's chosen tokens form one sequence for a token-mixing branch
            if self.capacity_factor > 0:
                return self._route_tokens_capped(x, weights, indices, per_branch)
            return self._route_tokens(x, weights, indices, per_branch)
        lead = x.shape[:-1]
        flat = [[e.reshape(-1, *e.shape[len(lead):]) if rowwise else e for e, rowwise in zip(es, flags)]
                for es, flags in zip(per_branch, self.extras)]
        route = self._route_capped if self.capacity_factor > 0 else self._route
        out = route(x.reshape(-1, x.shape[-1]), weights, indices, flat)
        return out.reshape(*lead, out.shape[-1])

    def capacity(self, rows: int, k: int) -> int:
        """The static row count each branch runs on for `rows` rows choosing `k` branches each."""
        return branch_capacity(rows, k, len(self.branches), self.capacity_factor)

    def _route_capped(self, xs: Tensor, weights: Tensor, indices: Tensor, per_branch: list) -> Tensor:
        """`_route` with a declared capacity: every shape is static, nothing is read on the host.

        Per branch p: `compact_groups` puts the rows that chose p first (in row order), `gather_rows` packs
        the first C of them into a [C, ...] batch (zero past the count), the branch runs on it, and the
        result is added back at rows perm[p, :C] with the padding rows (j >= count) masked to 0. Entries
        j >= count of perm[p] are rows that did not choose p (weight 0): all C rows are distinct, so the
        index_add is deterministic. Rows that chose p past its capacity are not in perm[p, :C]: dropped.
        """
        n, k = xs.shape[0], indices.shape[-1]
        w = weights.reshape(n, weights.shape[-1])  # [N, k] (explicit k: N may be 0)
        idx = indices.reshape(n, k)  # [N, k]
        cap = self.capacity(n, k)
        keep = (idx.unsqueeze(0) == self._branch_ids(idx)).any(-1)  # [P, N]
        perms, counts = ops.compact_groups(keep)  # [P, N], [P] (on the device)
        live = torch.arange(cap, device=xs.device).unsqueeze(0) < counts.unsqueeze(1)  # [P, C]
        out: Optional[Tensor] = None
        for p, branch in enumerate(self.branches):
            wp = (w * (idx == p).to(w.dtype)).sum(-1)  # [N]
            rows = perms[p, :cap]  # [C]: the first C rows of branch p, then rows that did not choose it
            travelling = [e for e, rowwise in zip(per_branch[p], self.extras[p]) if rowwise]
            chosen, *moved = [_gather(t, perms[p], counts[p: p + 1], cap) for t in (xs, *travelling)]
            gathered = iter(moved)
            inputs = [next(gathered) if rowwise else e for e, rowwise in zip(per_branch[p], self.extras[p])]
            yp = branch(chosen, *inputs)  # [C, ...]
            yp = yp * wp.index_select(0, rows).reshape(-1, *([1] * (yp.dim() - 1)))
            mask = live[p].reshape(-1, *([1] * (yp.dim() - 1)))
            yp = torch.where(mask, yp, yp.new_zeros(()))  # padding rows add exactly 0 (even if yp is inf)
            if out is None:
                out = xs.new_zeros(n, *yp.shape[1:], dtype=yp.dtype)
            out = out.index_add(0, rows, yp)
        assert out is not None
        return out

    # At run time each branch needs its row count on the host (a branch is an ordinary module: its shapes
    # are Python ints). Eager mode finds every branch's rows on the device first (`compact_groups`: one
    # group per branch, or per (branch, sample) in "tokens" mode), copies all the counts to the host in ONE
    # transfer, then gathers each branch's rows with `gather_rows` (capacity = the count: no padding, since
    # pack_rows is called without a row floor here). Under tracing a Python int cannot follow the data, so
    # the traced form keeps one opaque `pack_rows` per branch (an unbacked size, no host read in the graph).
    # Both forms give the same rows in the same order, so the results are the same bit for bit.

    def _route(self, xs: Tensor, weights: Tensor, indices: Tensor, per_branch: list) -> Tensor:
        w = weights.reshape(xs.shape[0], weights.shape[-1])  # [N, k] (explicit k: N may be 0)
        idx = indices.reshape(xs.shape[0], indices.shape[-1])  # [N, k]
        if tracing(xs, weights, indices):
            def pack(p: int, chosen: Tensor, tensors: list) -> list:
                return ops.pack_rows(chosen, tensors)  # each reads its count inside the op's body
        else:
            keep = (idx.unsqueeze(0) == self._branch_ids(idx)).any(-1)  # [P, N]
            perms, counts = ops.compact_groups(keep)  # [P, N], [P]
            sizes = counts.tolist()  # the route's one host read: every branch's row count

            def pack(p: int, chosen: Tensor, tensors: list) -> list:
                rows = perms[p, : sizes[p]]  # [n_p]
                return [rows] + [_gather(t, perms[p], counts[p: p + 1], sizes[p]) for t in tensors]
        out: Optional[Tensor] = None
        for p, branch in enumerate(self.branches):
            hit = idx == p  # [N, k]
            wp = (w * hit.to(w.dtype)).sum(-1)  # [N]
            travelling = [e for e, rowwise in zip(per_branch[p], self.extras[p]) if rowwise]
            rows, chosen, *moved = pack(p, hit.any(-1), [xs, *travelling])
            gathered = iter(moved)
            inputs = [next(gathered) if rowwise else e for e, rowwise in zip(per_branch[p], self.extras[p])]
            yp = branch(chosen, *inputs)
            yp = yp * wp.index_select(0, rows).reshape(-1, *([1] * (yp.dim() - 1)))
            if out is None:
                out = xs.new_zeros(xs.shape[0], *yp.shape[1:], dtype=yp.dtype)
            out = out.index_add(0, rows, yp)
        assert out is not None
        return out

    def _branch_ids(self, indices: Tensor) -> Tensor:
        """[P, 1, ..., 1]: the branch numbers, shaped to compare against `indices` with a leading P axis."""
        ids = torch.arange(len(self.branches), dtype=indices.dtype, device=indices.device)
        return ids.reshape(-1, *([1] * indices.dim()))

    def _route_tokens_capped(self, x: Tensor, weights: Tensor, indices: Tensor, per_branch: list) -> Tensor:
        """`_route_tokens` with a declared capacity: one batched call per branch, static shapes, no host read.

        x [B, L, d]. Per (branch p, sample b), `compact_groups` over the [P * B, L] choice masks puts the
        tokens of b that chose p first (in token order); the first C = `capacity(L, k)` of them, zero-padded
        past the count, form row b of a [B, C, d] batch, and the branch runs once on it while
        `token_padding` holds the [B, C] real-token mask (attention ignores the padding keys). The results
        are weighted, the padding rows masked to 0 and added back at their tokens; tokens of b that chose p
        past the capacity are dropped from p (they add 0), as in "rows" mode.
        """
        n_samples, n_tokens, k = x.shape[0], x.shape[1], indices.shape[-1]
        cap = self.capacity(n_tokens, k)
        keep = (indices.unsqueeze(0) == self._branch_ids(indices)).any(-1)  # [P, B, L]
        perms, counts = ops.compact_groups(keep.reshape(-1, n_tokens))  # [P * B, L], [P * B] (on the device)
        live = torch.arange(cap, device=x.device).unsqueeze(0) < counts.unsqueeze(1)  # [P * B, C]
        base = (torch.arange(n_samples, device=x.device) * n_tokens).unsqueeze(1)  # [B, 1]: first flat row of b
        out: Optional[Tensor] = None
        for p, branch in enumerate(self.branches):
            wp = (weights * (indices == p).to(weights.dtype)).sum(-1)  # [B, L]
            groups = range(p * n_samples, (p + 1) * n_samples)
            rows = perms[p * n_samples: (p + 1) * n_samples, :cap]  # [B, C]: first C tokens of p per sample
            travelling = [e for e, rowwise in zip(per_branch[p], self.extras[p]) if rowwise]
            chosen, *moved = [torch.stack([_gather(t[b], perms[g], counts[g: g + 1], cap)
                                           for b, g in enumerate(groups)]) if n_samples else
                              t.new_zeros(0, cap, *t.shape[2:])
                              for t in (x, *travelling)]  # each [B, C, ...]
            gathered = iter(moved)
            inputs = [next(gathered) if rowwise else e for e, rowwise in zip(per_branch[p], self.extras[p])]
            real = live[p * n_samples: (p + 1) * n_samples]  # [B, C]
            previous = token_padding.mask
            token_padding.mask = real
            try:
                yp = branch(chosen, *inputs)  # [B, C, e]
            finally:
                token_padding.mask = previous
            yp = yp * torch.gather(wp, 1, rows).unsqueeze(-1)
            yp = torch.where(real.unsqueeze(-1), yp, yp.new_zeros(()))  # padding adds exactly 0 (even inf)
            if out is None:
                out = x.new_zeros(n_samples * n_tokens, yp.shape[-1], dtype=yp.dtype)
            out = out.index_add(0, (rows + base).reshape(-1), yp.reshape(-1, yp.shape[-1]))
        assert out is not None
        return out.reshape(n_samples, n_tokens, out.shape[-1])

    def _route_tokens(self, x: Tensor, weights: Tensor, indices: Tensor, per_branch: list) -> Tensor:
        """Each sample's chosen tokens, per branch, as one sequence. Eager: every (branch, sample) order and
        count from one `compact_groups` and ONE host read of the counts, rows gathered with `gather_rows`.
        Traced: one opaque `pack_rows` per (branch, sample) (an unbacked size)."""
        n_samples = x.shape[0]
        if tracing(x, weights, indices):
            def pack(p: int, b: int, chosen: Tensor, tensors: list) -> list:
                return ops.pack_rows(chosen, tensors)
        else:
            keep = (indices.unsqueeze(0) == self._branch_ids(indices)).any(-1)  # [P, B, N]
            perms, counts = ops.compact_groups(keep.reshape(-1, keep.shape[-1]))  # [P * B, N], [P * B]
            sizes = counts.tolist()  # the route's one host read: every (branch, sample) token count

            def pack(p: int, b: int, chosen: Tensor, tensors: list) -> list:
                g = p * n_samples + b
                rows = perms[g, : sizes[g]]  # [n_pb]
                return [rows] + [_gather(t, perms[g], counts[g: g + 1], sizes[g]) for t in tensors]
        out: Optional[Tensor] = None
        for p, branch in enumerate(self.branches):
            hit = indices == p  # [B, N, k]
            wp = (weights * hit.to(weights.dtype)).sum(-1)  # [B, N]
            chosen = hit.any(-1)  # [B, N]
            for b in range(n_samples):
                travelling = [e[b] for e, rowwise in zip(per_branch[p], self.extras[p]) if rowwise]
                rows, tokens, *moved = pack(p, b, chosen[b], [x[b], *travelling])
                gathered = iter(moved)
                inputs = [next(gathered).unsqueeze(0) if rowwise else e
                          for e, rowwise in zip(per_branch[p], self.extras[p])]
                yb = branch(tokens.unsqueeze(0), *inputs).squeeze(0)
                yb = yb * wp[b].index_select(0, rows).unsqueeze(-1)
                if out is None:
                    out = x.new_zeros(*x.shape[:-1], yb.shape[-1], dtype=yb.dtype)
                out = out.index_put((torch.full_like(rows, b), rows), yb, accumulate=True)
        assert out is not None
        return out


class TokenPadding:
    """Which rows of the sequences a token-mixing module sees are real tokens: `mask` bool [B, L] (True: a
    real token, False: padding), or None (every token is real). A capacity-bounded "tokens" route
    (`BranchRoute._route_tokens_capped`) sets it around each branch call; `SelfAttention` then keeps padding
    keys out of every real query's softmax. A plain attribute (not a ContextVar) so that torch.compile
    traces its reads and writes without a graph break; it is only set for the duration of one branch call."""

    mask: Optional[Tensor] = None


token_padding = TokenPadding()


def _gather(t: Tensor, perm: Tensor, count: Tensor, size: int) -> Tensor:
    """Rows perm[:size] of t [N, ...] (size: the group's count, already on the host, or a static capacity):
    `gather_rows` for floating tensors (differentiable; its Triton kernel on the GPU; zero past the count),
    plain `index_select` for the others (size <= N)."""
    if t.is_floating_point():
        return ops.gather_rows(t, perm, count, size)
    return t.index_select(0, perm[:size])


def branch_capacity(rows: int, k: int, branches: int, factor: float) -> int:
    """C = ceil(factor · rows · k / branches), at least 1 and at most `rows` (0 for no rows): the static
    number of rows a branch of a capacity-bounded route runs on (the rule of `TopKGate`'s capacity)."""
    if rows <= 0:
        return 0
    return max(1, min(rows, math.ceil(factor * rows * k / branches)))


@recorded
class EnsemblePaths(nn.Module):
    """`paths … combine mode ensemble(n=E)`: the branches as graphs of their own (each reading its inputs
    from `captured`), combined by `mode` with per-sample path dropping in training; eval averages E full
    passes — every pass re-runs the branches, so whatever they sample (pathways, shuffles, drops) is drawn
    afresh: the sub-model ensemble of Information Pathways / SSA. The branch modules are registered on the
    model at their spec paths; the graphs are held outside the registry."""

    def __init__(self, branches: Sequence[nn.Module], inputs: Sequence[int], mode: str, dim: int = -1,
                 drop: float = 0.0, ensemble: int = 1):
        super().__init__()
        object.__setattr__(self, "branches", list(branches))
        self.inputs, self.ensemble = list(inputs), ensemble
        self.combine = PathCombine(mode, dim=dim, drop=drop)

    def _once(self, captured: tuple) -> Tensor:
        outs, i = [], 0
        for branch, n in zip(self.branches, self.inputs):
            outs.append(branch(*captured[i: i + n]))
            i += n
        return self.combine(*outs, sampled=True)

    def forward(self, *captured: Tensor) -> Tensor:
        if self.training or self.ensemble <= 1:
            return self._once(captured)
        return torch.stack([self._once(captured) for _ in range(self.ensemble)]).mean(0)


@recorded
class PathCombine(nn.Module):
    """The aggregator of `paths`: sum, mean, max, concat(dim) or a weighted sum by gate weights.

    `drop` > 0 drops each path per sample with that probability in training (rescaling the kept ones, as
    stochastic depth does), and in eval when called with `sampled=True` by an ensemble pass.
    """

    def __init__(self, mode: str, dim: int = -1, drop: float = 0.0):
        super().__init__()
        self.mode, self.dim, self.drop = mode, dim, drop

    def _dropped(self, stacked: Tensor) -> Tensor:
        keep = torch.rand(stacked.shape[0], stacked.shape[1], device=stacked.device) >= self.drop
        scale = keep.to(stacked.dtype) / (1 - self.drop)
        return stacked * scale.reshape(*scale.shape, *([1] * (stacked.dim() - 2)))

    def forward(self, *paths: Tensor, weights: Optional[Tensor] = None, sampled: bool = False) -> Tensor:
        stacked = torch.stack(paths, 0)  # [P, *S]
        if self.drop > 0 and (self.training or sampled):
            stacked = self._dropped(stacked)
        return self._combine(stacked, weights)

    def _combine(self, stacked: Tensor, weights: Optional[Tensor]) -> Tensor:
        if self.mode == "sum":
            return stacked.sum(0)
        if self.mode == "mean":
            return stacked.mean(0)
        if self.mode == "max":
            return stacked.max(0).values
        if self.mode == "concat":
            return torch.cat(list(stacked.unbind(0)), dim=self.dim)
        assert weights is not None, "a gated combine needs weights"
        return ops.gated_combine(stacked, weights)


# ---------------------------------------------------------------------------------------------- exits
#
# Eval-mode exits run sync-free in eager mode. The rows of the batch an exit chain still computes are
# described by one int64 state tensor [M] (M: the packed batch's static capacity): entry r >= 0 is original
# row r, still running; entry -1 - r is original row r, which has left (or pads the packed batch). Each exit
# writes the rows that leave into `out`/`index` with `ops.exit_merge` (masked by the running flags, so a row
# that left is never written again), counts the rows that go on on the device, and picks the next capacity
# from a host-side upper bound of that count that never waits for the device (`LiveBound`), bucketed by
# `bucket_capacity`. When the bucket shrinks and the policy says packing pays (`should_compact`, or
# ROUTEC_EXIT_POLICY), the batch is packed with `compact` + `gather_rows`; otherwise it runs masked: same
# rows, only the running flags change. Rows past the live count are padding whose results are never written.
# Under tracing (torch.compile, torch.export) a Python int bound cannot follow the data, so the traced form
# packs with the opaque `pack_rows` op instead (an unbacked size: a graph without host reads in it).

# Packed batches keep at least this many rows: BLAS takes other kernels (other summation orders) for very
# small matrices, so without the floor a sample's result would depend on how many others left; padding rows
# cost little and are never written back.
MIN_PACKED_ROWS = 8
# Capacity buckets per octave of the live bound (`bucket_capacity`): at most 1 + 1/4 padding, at most
# 4 * log2(B) + 1 distinct packed shapes.
EXIT_STEPS_PER_OCTAVE = 4
EXIT_POLICIES = ("auto", "compact", "masked")
# The attribute of an exit chain's state tensor that carries the chain's LiveBound to the next exit.
LIVE_BOUND_ATTR = "_routec_live_bound"


def exit_policy() -> str:
    """`ROUTEC_EXIT_POLICY`: "auto" (default; pack where `should_compact` says a block on the packed rows
    pays, else run masked), "compact" (always pack when the capacity bucket shrinks) or "masked" (never pack:
    every row keeps running, the write-back is masked)."""
    policy = os.environ.get("ROUTEC_EXIT_POLICY", "") or "auto"
    if policy not in EXIT_POLICIES:
        raise ValueError(f"ROUTEC_EXIT_POLICY must be one of {', '.join(EXIT_POLICIES)}, got {policy!r}")
    return policy


def tracing(*tensors: Tensor) -> bool:
    """Whether the exits run under a tracer (torch.compile, torch.export, fx) rather than eagerly."""
    if torch.compiler.is_compiling():
        return True
    return any(isinstance(t, (torch.fx.Proxy, FakeTensor)) for t in tensors)


class LiveBound:
    """A host-side upper bound of an exit chain's live row count that never waits for the device.

    `push(count)` starts copying a device count (int64 [1]) to pinned host memory without blocking and
    records an event; `get()` folds in every copy whose event has completed and returns the smallest count
    seen (the first capacity until one has landed). Counts only shrink along a chain, so any landed count
    bounds every later one. A CPU tensor is host memory already, written when the op that made it returned:
    its value is the bound at once (there is no device to wait for). Other devices keep the first bound.
    """

    def __init__(self, first: int):
        self.bound = first
        self.pending: list[tuple[Any, Any]] = []  # (host view of the count, its event or None)

    def push(self, count: Tensor) -> None:
        if count.device.type == "cuda":
            host = torch.empty(1, dtype=torch.int64, pin_memory=True)
            host.copy_(count.reshape(1), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending.append((host.numpy(), event))
        elif count.device.type == "cpu":
            self.pending.append((count.detach().reshape(1).numpy(), None))

    def get(self) -> int:
        while self.pending and (self.pending[0][1] is None or self.pending[0][1].query()):
            value, _ = self.pending.pop(0)
            self.bound = min(self.bound, int(value[0]))
        return self.bound


def exit_rows(state: Tensor) -> tuple[Tensor, Tensor]:
    """An exit chain's state int64 [M] -> (rows int64 [M]: the original row of each packed row, all
    distinct; running bool [M]: whether that row is still in the batch)."""
    running = state >= 0
    return torch.where(running, state, -1 - state), running


def _exit_state(rows: Tensor, running: Tensor, bound: LiveBound) -> Tensor:
    state = torch.where(running, rows, -1 - rows)
    setattr(state, LIVE_BOUND_ATTR, bound)
    return state


def _chain_bound(state: Tensor) -> LiveBound:
    bound = getattr(state, LIVE_BOUND_ATTR, None)
    return bound if isinstance(bound, LiveBound) else LiveBound(state.shape[0])


def _next_capacity(bound: LiveBound, still: Tensor) -> int:
    """Push the live count of `still` and bucket the newest landed bound (never above the current rows,
    never below min(MIN_PACKED_ROWS, rows))."""
    rows = still.shape[0]
    bound.push(still.sum(dtype=torch.int64).reshape(1))
    if rows == 0:
        return 0
    capacity = ops.bucket_capacity(min(bound.get(), rows), rows, steps_per_octave=EXIT_STEPS_PER_OCTAVE)
    return max(capacity, min(MIN_PACKED_ROWS, rows))


def _packing_pays(capacity: int, tensors: Sequence[Tensor], device: torch.device) -> bool:
    """The compact-or-masked policy for a batch shrinking to `capacity` samples. "auto" asks
    `should_compact` about the widest floating batch tensor: its last dim is the layer width, and each sample
    is prod(middle dims) rows of it (tokens)."""
    policy = exit_policy()
    if policy != "auto":
        return policy == "compact"
    floating = [t for t in tensors if t.is_floating_point() and t.dim() >= 2]
    if not floating:
        return True
    widest = max(floating, key=lambda t: t.numel())
    return bool(ops.should_compact(capacity * math.prod(widest.shape[1:-1]), widest.shape[-1], device))


def _pack(still: Tensor, rows: Tensor, capacity: int, tensors: Sequence[Tensor]) -> tuple[Tensor, Tensor, list]:
    """Pack the running rows to `capacity` rows on the device: (rows, running, packed tensors). Floating
    tensors go through `gather_rows` (zero padding), others through index_select of the permutation."""
    perm, count = ops.compact(still)  # [M], [1]: kept rows first, in order
    take = perm[:capacity]
    running = torch.arange(capacity, device=still.device) < count  # [capacity]
    packed = [ops.gather_rows(t, perm, count, capacity) if t.is_floating_point() else t.index_select(0, take)
              for t in tensors]
    return rows.index_select(0, take), running, packed


@recorded
class ExitPoint(nn.Module):
    """An exit in the batch: decides which samples leave and, in eval mode, removes them from the batch.

    State tensors carried from exit to exit: `out` [N, C] (the selected outputs so far), `index` [N] (the
    exit each sample took, -1 while running), `alive` [M] (the chain's row state, see `exit_rows`: the
    original row of each packed row and whether it still runs). Returns the new state, the head's rows and
    every live batch tensor, packed the same way. In training nothing leaves. In eval the running rows whose
    rule holds write their head output into `out` (`exit_merge`) and leave; when the capacity bucket of the
    remaining rows shrinks and packing pays, the live batch tensors are packed to it (`compact` +
    `gather_rows`), else they keep their rows and only the running flags change (masked). No host sync.
    """

    def __init__(self, position: int):
        super().__init__()
        self.position = position

    def forward(self, logits: Tensor, decision: Tensor, out: Tensor, index: Tensor, alive: Tensor,
                *live: Tensor) -> tuple[Tensor, ...]:
        if self.training:
            return (out, index, alive, logits, *live)
        if tracing(logits, alive):
            return self._traced(logits, decision, out, index, alive, *live)
        rows, running = exit_rows(alive)
        leave = decision.reshape(-1).to(torch.bool) & running  # [M]
        out, index = ops.exit_merge(out, index, logits, rows, leave, self.position)
        still = running & ~leave
        bound = _chain_bound(alive)
        capacity = _next_capacity(bound, still)
        if capacity < still.shape[0] and _packing_pays(capacity, (logits, *live), logits.device):
            rows, still, (logits, *live) = _pack(still, rows, capacity, (logits, *live))
        return (out, index, _exit_state(rows, still, bound), logits, *live)

    def _traced(self, logits: Tensor, decision: Tensor, out: Tensor, index: Tensor, alive: Tensor,
                *live: Tensor) -> tuple[Tensor, ...]:
        """The traced form: the survivors packed exactly by `pack_rows` (an unbacked row count; padded by
        repeating a survivor up to MIN_PACKED_ROWS, rows that write identical values)."""
        leave = decision.reshape(-1).to(torch.bool)
        out = out.index_put((alive,), torch.where(leave[:, None], logits.to(out.dtype), out[alive]))
        index = index.index_put((alive,), torch.where(leave, torch.full_like(alive, self.position), index[alive]))
        _, alive, logits, *live = ops.pack_rows(~leave, [alive, logits, *live], min_rows=MIN_PACKED_ROWS)
        return (out, index, alive, logits, *live)


@recorded
class ExitScore(nn.Module):
    """The score of a fused exit rule, as a model returns it in training (`exit_scores`).

    When the compiler lowers `Linear(d, C)` + `confidence(head) >= t` (or `entropy(head) <= t`) into one
    `linear_exit` call, the op's score carries no gradient. In training this module recomputes the rule's
    score from the logits with `confidence`/`entropy` (differentiable, exactly the unfused lowering); in eval,
    where only the decision is used, it passes the fused op's score through at no cost.
    """

    def __init__(self, rule: str):
        super().__init__()
        self.rule = rule

    def forward(self, logits: Tensor, fused_score: Tensor) -> Tensor:
        if not self.training:
            return fused_score
        return functions.confidence(logits) if self.rule == "confidence" else functions.entropy(logits)


@recorded
class ExitFinal(nn.Module):
    """After the last layer: in eval mode the running rows take the final output and exit index `position`."""

    def __init__(self, position: int):
        super().__init__()
        self.position = position

    def forward(self, logits: Tensor, out: Tensor, index: Tensor, alive: Tensor) -> tuple[Tensor, Tensor]:
        if self.training:
            return logits, index
        if tracing(logits, alive):  # the traced chain's rows are all running
            out = out.index_put((alive,), logits.to(out.dtype))
            index = index.index_put((alive,), torch.full_like(alive, self.position))
            return out, index
        rows, running = exit_rows(alive)
        return ops.exit_merge(out, index, logits, rows, running, self.position)


@recorded
class ScanLoop(nn.Module):
    """A general recurrence: runs the step graph over the scanned axis one step at a time.

    `step(states..., slices..., captured...) -> (new states..., emits... [, head, exit decision])`; sequences
    are scanned along dim 1 (in reverse when asked). Returns the final states and the emits stacked along
    dim 1 in the sequence's order. The step's modules are registered on the model at their spec paths, not
    here, so the step is held outside the module registry.

    With an exit in the body (exit over time, DESIGN §4) three more outputs follow: per sample the head
    output of the first step whose rule holds (else the last step), that step's index, and the head at every
    step [B, T, C]. In eval mode samples that exit leave the batch: later steps run on the survivors only
    (states, sequences and the `batched` captured tensors are packed, as the depth exits pack them: bucketed
    capacities from a `LiveBound`, `compact` + `gather_rows`, or masked by the policy; no host sync), their
    final states and emits are frozen at the exit step (emits are zero after it), and the every-step output
    holds the selected output at every step. In training every sample runs every step.
    """

    def __init__(self, step, n_states: int, n_seqs: int, n_emits: int, reverse: bool = False,
                 exit: bool = False, batched: tuple = ()):
        super().__init__()
        object.__setattr__(self, "_step", step)
        self.n_states, self.n_seqs, self.n_emits, self.reverse = n_states, n_seqs, n_emits, reverse
        self.exit, self.batched = exit, tuple(batched)

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        states = list(args[: self.n_states])
        seqs = args[self.n_states: self.n_states + self.n_seqs]
        captured = args[self.n_states + self.n_seqs:]
        if self.exit and not self.training:
            if tracing(*seqs):
                return self._compacted_traced(states, seqs, captured)
            return self._compacted(states, seqs, captured)
        length = seqs[0].size(1)
        steps = range(length - 1, -1, -1) if self.reverse else range(length)
        emitted: list[list[Tensor]] = [[] for _ in range(self.n_emits + (2 if self.exit else 0))]
        for t in steps:
            result = self._step(*states, *(s[:, t] for s in seqs), *captured)
            result = result if isinstance(result, tuple) else (result,)
            states = list(result[: self.n_states])
            for slot, value in zip(emitted, result[self.n_states:]):
                slot.append(value)
        if self.reverse:
            for slot in emitted:
                slot.reverse()
        stacked = [torch.stack(slot, 1) for slot in emitted]
        if not self.exit:
            return (*states, *stacked)
        heads, decisions = stacked[-2], stacked[-1].to(torch.bool)  # [B, T, C], [B, T]
        order = torch.arange(length, device=heads.device)
        if self.reverse:
            order = order.flip(0)
        hit = decisions[:, order]
        first = torch.where(hit.any(1), hit.int().argmax(1), torch.full_like(hit[:, 0], length - 1, dtype=torch.int64))
        index = order[first]
        selected = heads[torch.arange(heads.size(0), device=heads.device), index]
        return (*states, *stacked[:-2], selected, index, heads)

    def _compacted(self, states: list[Tensor], seqs: tuple, captured: tuple) -> tuple[Tensor, ...]:
        """Eval with an exit over time, eager and sync-free: `rows` (original row of each packed row) and
        `running` (still in the batch) describe the packed batch; every write-back is masked by `running`."""
        n, length = seqs[0].size(0), seqs[0].size(1)
        steps = list(range(length - 1, -1, -1) if self.reverse else range(length))
        device = seqs[0].device
        rows = torch.arange(n, device=device)  # [M]
        running = torch.ones(n, dtype=torch.bool, device=device)  # [M]
        bound = LiveBound(n)
        final = [s.clone() for s in states]
        emits: list[Optional[Tensor]] = [None] * self.n_emits
        out: Optional[Tensor] = None
        index = torch.full((n,), steps[-1], dtype=torch.int64, device=device)
        live_captured = list(captured)
        for step_no, t in enumerate(steps):
            result = self._step(*states, *(s[rows, t] for s in seqs), *live_captured)
            states = list(result[: self.n_states])
            at_t = torch.full_like(rows, t)
            for j, value in enumerate(result[self.n_states: self.n_states + self.n_emits]):
                if emits[j] is None:
                    emits[j] = value.new_zeros(n, length, *value.shape[1:])
                old = emits[j][rows, at_t]
                emits[j] = emits[j].index_put((rows, at_t), torch.where(_rows(running, value), value, old))
            head, decision = result[-2], result[-1].reshape(-1).to(torch.bool)
            if out is None:
                out = head.new_zeros(n, *head.shape[1:])
            leave = (decision if step_no < length - 1 else torch.ones_like(decision)) & running
            out = out.index_put((rows,), torch.where(_rows(leave, head), head, out[rows]))
            index = index.index_put((rows,), torch.where(leave, at_t, index[rows]))
            final = [f.index_put((rows,), torch.where(_rows(leave, s), s, f[rows])) for f, s in zip(final, states)]
            running = running & ~leave
            if step_no == length - 1:
                break
            capacity = _next_capacity(bound, running)
            travelling = [c for c, b in zip(live_captured, self.batched) if b]
            if capacity < running.shape[0] and _packing_pays(capacity, (*states, *travelling), device):
                rows, running, packed = _pack(running, rows, capacity, (*states, *travelling))
                states, moved = packed[: len(states)], iter(packed[len(states):])
                live_captured = [next(moved) if b else c for c, b in zip(live_captured, self.batched)]
        assert out is not None
        stacked = [e if e is not None else out.new_zeros(n, length) for e in emits]
        return (*final, *stacked, out, index, out.unsqueeze(1).expand(n, length, *out.shape[1:]))

    def _compacted_traced(self, states: list[Tensor], seqs: tuple, captured: tuple) -> tuple[Tensor, ...]:
        """The traced form of `_compacted`: survivors packed exactly by `pack_rows` (an unbacked size)."""
        n, length = seqs[0].size(0), seqs[0].size(1)
        steps = list(range(length - 1, -1, -1) if self.reverse else range(length))
        alive = torch.arange(n, device=seqs[0].device)
        final = [s.clone() for s in states]
        emits: list[Optional[Tensor]] = [None] * self.n_emits
        out: Optional[Tensor] = None
        index = torch.full((n,), steps[-1], dtype=torch.int64, device=alive.device)
        live_captured = list(captured)
        for step_no, t in enumerate(steps):
            result = self._step(*states, *(s[alive, t] for s in seqs), *live_captured)
            states = list(result[: self.n_states])
            for j, value in enumerate(result[self.n_states: self.n_states + self.n_emits]):
                if emits[j] is None:
                    emits[j] = value.new_zeros(n, length, *value.shape[1:])
                emits[j] = emits[j].index_put((alive, torch.full_like(alive, t)), value)
            head, decision = result[-2], result[-1].reshape(-1).to(torch.bool)
            if out is None:
                out = head.new_zeros(n, *head.shape[1:])
            leave = decision if step_no < length - 1 else torch.ones_like(decision)
            out = out.index_put((alive,), torch.where(_rows(leave, head), head, out[alive]))
            index = index.index_put((alive,), torch.where(leave, torch.full_like(alive, t), index[alive]))
            final = [f.index_put((alive,), torch.where(_rows(leave, s), s, f[alive])) for f, s in zip(final, states)]
            travelling = [c for c, b in zip(live_captured, self.batched) if b]
            _, alive, *packed = ops.pack_rows(~leave, [alive, *states, *travelling], min_rows=MIN_PACKED_ROWS)
            states, moved = packed[: len(states)], iter(packed[len(states):])
            live_captured = [next(moved) if b else c for c, b in zip(live_captured, self.batched)]
        assert out is not None
        stacked = [e if e is not None else out.new_zeros(n, length) for e in emits]
        return (*final, *stacked, out, index, out.unsqueeze(1).expand(n, length, *out.shape[1:]))


def lif(x: Tensor, beta: float = 1.0, threshold: float = 1.0, reset: str = "subtract") -> Tensor:
    """Spikes of (leaky) integrate-and-fire neurons driven by x [B, T, ...] along time (dim 1), one neuron
    per trailing element: `ops.lif_scan` on the flattened channels (beta = 1 is IF)."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    spikes, _ = ops.lif_scan(flat, beta=beta, threshold=threshold, reset=reset)
    return spikes.reshape(x.shape)


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    """A per-row mask [n] shaped to broadcast against `like` [n, ...]."""
    return mask.reshape(-1, *([1] * (like.dim() - 1)))
