"""The parameter-free tensor functions compiled graphs call: `.route` functions (`mean`, `concat`,
`confidence`, …) and the small helpers the compiler emits around routing (exit buffers, dense gate
weights, constant tables).

Compiled fx graphs call these by reference, and a file written by `routec compile` imports them from here,
so every function a graph calls has a name and lives in `routec.codegen` (never in the compiler).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from . import ops

# ---------------------------------------------------------------- `.route` functions


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.softmax(x, dim)


def log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.log_softmax(x, dim)


def mean(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    return x.mean(dim, keepdim)


def sum_dim(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    return x.sum(dim, keepdim)


def max_dim(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """The largest values along `dim` (values only)."""
    return x.max(dim, keepdim).values


def min_dim(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """The smallest values along `dim` (values only)."""
    return x.min(dim, keepdim).values


def argmax(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    return x.argmax(dim, keepdim)


def flip(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.flip(dim)


def reshape(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    return x.reshape(shape)


def transpose(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    return x.transpose(a, b)


def permute(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    return x.permute(tuple(dims))


def split(x: torch.Tensor, sizes: Any, dim: int = -1) -> tuple[torch.Tensor, ...]:
    return torch.split(x, sizes, dim)


def chunk(x: torch.Tensor, n: int, dim: int = -1) -> tuple[torch.Tensor, ...]:
    return torch.chunk(x, n, dim)


def flatten(x: torch.Tensor, start: int = 0, end: int = -1) -> torch.Tensor:
    return x.flatten(start, end)


def unsqueeze(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.unsqueeze(dim)


def squeeze(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.squeeze(dim)


def topk_values(x: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    return x.topk(k, dim).values


def topk_indices(x: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    return x.topk(k, dim).indices


def gather(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    return x.gather(dim, index)


def narrow(x: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
    return x.narrow(dim, start, length)


def one_hot(ids: torch.Tensor, num: int) -> torch.Tensor:
    return F.one_hot(ids, num)


def pad(x: torch.Tensor, pad: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Constant padding as `torch.nn.functional.pad(x, pad, value=value)`: `pad` holds (left, right) amounts
    for the last dimension, then for the one before it, …; negative amounts crop."""
    return F.pad(x, tuple(pad), mode="constant", value=value)


def std(x: torch.Tensor, dim: int, keepdim: bool = False, unbiased: bool = True) -> torch.Tensor:
    """Standard deviation along `dim`: divided by n - 1 (`unbiased`, Bessel's correction) or by n."""
    return torch.std(x, dim, correction=1 if unbiased else 0, keepdim=keepdim)


def var(x: torch.Tensor, dim: int, keepdim: bool = False, unbiased: bool = True) -> torch.Tensor:
    """Variance along `dim`: divided by n - 1 (`unbiased`, Bessel's correction) or by n."""
    return torch.var(x, dim, correction=1 if unbiased else 0, keepdim=keepdim)


def clamp(x: torch.Tensor, min: float | None = None, max: float | None = None) -> torch.Tensor:
    """`x` limited to [min, max] (either bound may be absent); the gradient passes where min ≤ x ≤ max."""
    return torch.clamp(x, min, max)


def leaky_relu(x: torch.Tensor, slope: float = 0.01) -> torch.Tensor:
    """x where x > 0, else slope * x."""
    return F.leaky_relu(x, slope)


def token_shuffle(
    x: torch.Tensor, dim: int = 1, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder `x` along `dim` by one random permutation shared by the batch: y = x.index_select(dim, perm).
    Returns (y, perm), perm a long tensor [x.shape[dim]] on x's device."""
    perm = torch.randperm(x.shape[dim], generator=generator, device=x.device)
    return x.index_select(dim, perm), perm


def token_unshuffle(y: torch.Tensor, perm: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Undo `token_shuffle`: returns x with x.index_select(dim, perm) == y."""
    return y.index_select(dim, torch.argsort(perm))


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def confidence(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The largest softmax probability along `dim` (computed in at least fp32)."""
    return torch.softmax(_float(logits), dim=dim).amax(dim=dim).to(logits.dtype)


def entropy(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """−Σ p log p of softmax(logits) along `dim`, in nats; classes with p = 0 (logit −inf) add 0."""
    logp = torch.log_softmax(_float(logits), dim=dim)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=dim).to(logits.dtype)


def _tensors(items: Sequence[Any]) -> Sequence[torch.Tensor]:
    """`concat` and `stack` take the items of a list: as separate arguments or as one list."""
    return items[0] if len(items) == 1 and isinstance(items[0], (list, tuple)) else items


def concat(*xs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.cat(list(_tensors(xs)), dim=dim)


def stack(*xs: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return torch.stack(list(_tensors(xs)), dim=dim)


def zeros(*like: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Zeros of `shape`, on the device and dtype of the optional `like` tensor."""
    return like[0].new_zeros(tuple(shape)) if like else torch.zeros(tuple(shape))


def ones(*like: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Ones of `shape`, on the device and dtype of the optional `like` tensor."""
    return like[0].new_ones(tuple(shape)) if like else torch.ones(tuple(shape))


# ---------------------------------------------------------------- helpers the compiler emits


def ones_batch(*sizes: int, like: torch.Tensor) -> torch.Tensor:
    """ones of `sizes` with the dtype and device of `like`."""
    return torch.ones(sizes, dtype=like.dtype, device=like.device)


def ones_for(idx: torch.Tensor) -> torch.Tensor:
    """fp32 ones shaped like `idx`: the weight of a keyed gate's single choice."""
    return torch.ones(idx.shape, dtype=torch.float32, device=idx.device)


def softmax_last(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=-1)


def dense_from_topk(weights: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    """Top-k weights [..., k] at indices [..., k] as dense weights [..., n] (zero where not chosen)."""
    return torch.zeros(*weights.shape[:-1], n, dtype=weights.dtype, device=weights.device).scatter_add(
        -1, indices, weights)


def exit_buffer(head: torch.Tensor, n: int) -> torch.Tensor:
    """The selected-output buffer [n, C] of an exit chain."""
    return head.new_zeros(n, head.shape[1])


def exit_index(head: torch.Tensor, n: int) -> torch.Tensor:
    """The exit each sample took [n], -1 while it runs."""
    return torch.full((n,), -1, dtype=torch.int64, device=head.device)


def arange_like(head: torch.Tensor, n: int) -> torch.Tensor:
    """0 … n - 1 on `head`'s device: the original row of each live row."""
    return torch.arange(n, device=head.device)


def arange_float(start: int, end: int, like: torch.Tensor) -> torch.Tensor:
    """start, start + 1, …, end - 1 as floats (the dtype of `like` when it is floating) on like's device."""
    return torch.arange(start, end, dtype=like.dtype if like.is_floating_point() else torch.float32,
                        device=like.device)


def eye_like(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, dtype=like.dtype if like.is_floating_point() else torch.float32, device=like.device)


def route_table_like(kind: str, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """The token order `kind` of an h × w grid (`routec.codegen.ops.route_table`) on `like`'s device."""
    from .multiscan import route_table

    return route_table(kind, h * w, h, w).to(like.device)


def expand_steps(v: Any, sizes: list) -> torch.Tensor:
    """A recurrence coefficient as a full [B, T, …] tensor: numbers filled, per-step values [B, n] repeated."""
    if not isinstance(v, torch.Tensor):
        return torch.full(sizes, float(v))
    if v.dim() == len(sizes) - 1:  # a per-step value [B, n] is the same at every step
        v = v.unsqueeze(1)
    return v.expand(*sizes)


def linear_scan_nd(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, *, reverse: bool = False) -> torch.Tensor:
    """`ops.linear_scan` for states of any shape: a, b [B, L, *S], h0 [B, *S] are flattened to [B, L, D]."""
    if a.dim() == 3:
        return ops.linear_scan(a, b, h0, reverse=reverse)
    bsz, length = a.shape[:2]
    h = ops.linear_scan(a.reshape(bsz, length, -1), b.reshape(bsz, length, -1), h0.reshape(bsz, -1),
                        reverse=reverse)
    return h.reshape(a.shape)


def full_like_last(u: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full((u.shape[-1],), value, dtype=u.dtype, device=u.device)


def per_neuron(tau: torch.Tensor, n: int) -> torch.Tensor:
    """A scalar or [n] time constant as [n]."""
    return tau.expand(n) if tau.dim() == 0 or tau.numel() == 1 else tau.reshape(n)


# ---------------------------------------------------------------- initial values of `param`s


def param_init(kind: str, shape: Sequence[int], *args: float, **kwargs: float) -> torch.Tensor:
    """The initial value of `param w: [shape] = kind(args…)` (fp32). Raises LookupError for an unknown
    `kind`, IndexError/ValueError/TypeError for bad arguments, RuntimeError when the shape does not fit."""
    dims = tuple(shape)
    if kind == "zeros":
        return torch.zeros(dims)
    if kind == "ones":
        return torch.ones(dims)
    if kind == "constant":
        return torch.full(dims, float(args[0]))
    if kind == "normal":
        std = float(args[0]) if args else float(kwargs.get("std", 1.0))
        mean = float(args[1]) if len(args) > 1 else float(kwargs.get("mean", 0.0))
        return torch.randn(dims) * std + mean
    if kind == "uniform":
        lo, hi = (float(args[0]), float(args[1])) if len(args) == 2 else (
            float(kwargs.get("low", -1.0)), float(kwargs.get("high", 1.0)))
        return torch.empty(dims).uniform_(lo, hi)
    if kind == "xavier":
        return torch.nn.init.xavier_uniform_(torch.empty(dims))
    if kind == "kaiming":
        return torch.nn.init.kaiming_uniform_(torch.empty(dims), a=5 ** 0.5)
    if kind == "arange":
        start = float(args[0]) if args else 0.0
        return (torch.arange(dims[-1], dtype=torch.float32) + start).expand(dims).clone()
    if kind == "s4d_real":  # Mamba's A_log init: log(1 … N) along the last dim
        return torch.log(torch.arange(1, dims[-1] + 1, dtype=torch.float32)).expand(dims).clone()
    if kind == "linspace":
        return torch.linspace(float(args[0]), float(args[1]), dims[-1]).expand(dims).clone()
    raise LookupError(kind)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (GPT-2's)."""
    return torch.nn.functional.gelu(x, approximate="tanh")
