"""The layer modules `.route` calls build (`Linear(d, 3)`, `MambaMixer(d, inner)`, …) that torch lacks.

PyTorch semantics and parameter names throughout (so `state_dict`s load), channels-last `[B, L, C]` for
sequence layers, `[B, C, H, W]` for image layers. The compiler's registry (`routec.compiler.layers`) pairs
each with its arguments and shape rule; a file written by `routec compile` builds them directly. Torch's own
layers (`nn.Linear`, `nn.LayerNorm`, …) are used as they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .ctor import recorded
from .mamba import MambaMixer

__all__ = [
    "ACTIVATIONS", "CausalConv1d", "Conv1d", "CrossAttention", "LSTMCell", "MLP", "MambaMixer", "PatchEmbed",
    "PosEmbed", "SelfAttention", "TransformerBlock", "sincos_table",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


@recorded
class Conv1d(nn.Conv1d):
    """nn.Conv1d on channels-last input: [B, L, C_in] → [B, L', C_out]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, C_in]
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


@recorded
class CausalConv1d(nn.Conv1d):
    """Depthwise causal convolution on [B, L, C]: y[t] depends on x[t - kernel + 1 … t] only."""

    def __init__(self, channels: int, kernel: int = 4, bias: bool = True) -> None:
        super().__init__(channels, channels, kernel, groups=channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, C]
        x = F.pad(x.transpose(1, 2), (self.kernel_size[0] - 1, 0))  # [B, C, kernel - 1 + L]
        return super().forward(x).transpose(1, 2)


@recorded
class PatchEmbed(nn.Module):
    """Image to patch tokens: [B, C, H, W] → conv(kernel=patch, stride) → [B, N, d], N = H' · W'."""

    def __init__(self, in_channels: int, d: int, patch: int = 16, stride: int | None = None) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, d, patch, stride=patch if stride is None else stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, H' * W', d]


def sincos_table(length: int, d: int, *, device=None, dtype=None) -> torch.Tensor:
    """The Transformer's sinusoidal positions [length, d]: sin in even channels, cos in odd ones."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]  # [L, 1]
    freq = torch.exp(torch.arange(0, d, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d))
    angle = position * freq  # [L, ceil(d / 2)]
    table = torch.empty(length, d, device=device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : d // 2])
    return table.to(dtype) if dtype is not None else table


@recorded
class PosEmbed(nn.Module):
    """Adds positions to [B, L, d]: a learned table `weight` [length, d] (L ≤ length; the first L rows are
    used), or with kind="sincos" the fixed sinusoidal table, which has no parameters and fits any L."""

    def __init__(self, d: int, length: int = 0, kind: str = "learned") -> None:
        super().__init__()
        self.kind = kind
        self.d = d
        if kind == "learned":
            if length < 1:
                raise ValueError('PosEmbed: a learned embedding needs `length` (or use kind="sincos")')
            self.weight = nn.Parameter(torch.empty(length, d))
            nn.init.trunc_normal_(self.weight, std=0.02)
        elif kind != "sincos":
            raise ValueError(f'PosEmbed: kind must be "learned" or "sincos", got {kind!r}')

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, d]
        if self.kind == "learned":
            return x + self.weight[: x.shape[1]]
        return x + sincos_table(x.shape[1], self.d, device=x.device, dtype=x.dtype)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:  # [..., L, d] → [..., heads, L, d / heads]
    return x.unflatten(-1, (heads, -1)).transpose(-2, -3)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:  # [..., heads, L, dh] → [..., L, heads * dh]
    return x.transpose(-2, -3).flatten(-2)


@recorded
class SelfAttention(nn.Module):
    """Multi-head self-attention on [B, L, d]: softmax(q kᵀ / √(d/heads)) v per head, then `o`.
    Uses F.scaled_dot_product_attention (flash / memory-efficient kernels where available)."""

    def __init__(self, d: int, heads: int, causal: bool = False, bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"SelfAttention: d={d} is not divisible by heads={heads}")
        self.heads, self.causal, self.dropout = heads, causal, dropout
        self.q = nn.Linear(d, d, bias=bias)
        self.k = nn.Linear(d, d, bias=bias)
        self.v = nn.Linear(d, d, bias=bias)
        self.o = nn.Linear(d, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, d]
        q, k, v = (_split_heads(proj(x), self.heads) for proj in (self.q, self.k, self.v))  # [B, H, L, dh]
        real = _token_padding(x)
        if real is None:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=self.causal
            )
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=_key_padding_mask(real, self.causal),
                dropout_p=self.dropout if self.training else 0.0,
            )
        return self.o(_merge_heads(y))


def _token_padding(x: torch.Tensor) -> torch.Tensor | None:
    """The real-token mask bool [B, L] a capacity-bounded token route set for the sequences `x` [B, L, d]
    (`runtime.token_padding`), or None when every token is real."""
    from .runtime import token_padding  # runtime builds on these layers' package: import at call time

    real = token_padding.mask
    if real is None or tuple(real.shape) != tuple(x.shape[:2]):
        return None
    return real


def _key_padding_mask(real: torch.Tensor, causal: bool) -> torch.Tensor:
    """bool [B, 1, L, L], True where query i may attend key j: j is a real token (and j <= i when causal).
    Each query also keeps its own key, so that a padding query (all of whose keys may be padding) never has
    an all-masked softmax row (NaN, whose gradient would poison the projections); a real query's own key is
    real anyway, so real queries attend exactly the real keys."""
    n = real.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=real.device)  # [L, L]
    allowed = real[:, None, :] | eye  # [B, L, L]
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=real.device).tril()
    return allowed.unsqueeze(1)


@recorded
class CrossAttention(nn.Module):
    """Queries [B, Lq, d] attend to a context [B, Lk, kv_dim]; → [B, Lq, d]."""

    def __init__(self, d: int, heads: int, kv_dim: int | None = None, bias: bool = True) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"CrossAttention: d={d} is not divisible by heads={heads}")
        kv_dim = d if kv_dim is None else kv_dim
        self.heads = heads
        self.q = nn.Linear(d, d, bias=bias)
        self.k = nn.Linear(kv_dim, d, bias=bias)
        self.v = nn.Linear(kv_dim, d, bias=bias)
        self.o = nn.Linear(d, d, bias=bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # [B, Lq, d], [B, Lk, kv_dim]
        q = _split_heads(self.q(x), self.heads)  # [B, H, Lq, dh]
        k = _split_heads(self.k(context), self.heads)  # [B, H, Lk, dh]
        v = _split_heads(self.v(context), self.heads)
        return self.o(_merge_heads(F.scaled_dot_product_attention(q, k, v)))


@recorded
class MLP(nn.Module):
    """fc1 → act → fc2 on the last dimension: [..., d] → [..., out]."""

    def __init__(self, d: int, hidden: int, out: int | None = None, act: str = "gelu", bias: bool = True) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"MLP: act must be one of {', '.join(ACTIVATIONS)}, got {act!r}")
        self.fc1 = nn.Linear(d, hidden, bias=bias)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, d if out is None else out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


@recorded
class TransformerBlock(nn.Module):
    """Pre-norm Transformer block on [B, L, d]: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(
        self, d: int, heads: int, hidden: int = 0, causal: bool = False, dropout: float = 0.0, act: str = "gelu"
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, heads, causal=causal, dropout=dropout)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = MLP(d, hidden if hidden > 0 else 4 * d, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, d]
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@recorded
class LSTMCell(nn.LSTMCell):
    """nn.LSTMCell with the state as two separate inputs: (x [B, input], h, c [B, hidden]) → (h, c)."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, h: torch.Tensor | None = None, c: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if h is None and c is None:
            return super().forward(x)
        if h is None:
            assert c is not None
            h = torch.zeros_like(c)
        if c is None:
            c = torch.zeros_like(h)
        return super().forward(x, (h, c))
