"""The Mamba-1 mixer (Gu & Dao 2023) as an nn.Module, for `MambaMixer(d, inner)` in `.route` specs.

Same structure, initialisation and parameter names as `mamba_ssm`'s `mamba_simple.Mamba` and Hugging Face's
`MambaMixer`, so their checkpoints load with `load_state_dict` (HF prefixes aside):
in_proj.weight, conv1d.weight/bias, x_proj.weight, dt_proj.weight/bias, A_log, D, out_proj.weight.
The selective scan is `routec.codegen.ops.selective_scan` (Triton on GPU, reference on CPU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .ctor import recorded


@recorded
class MambaMixer(nn.Module):
    """x [B, L, d] → [B, L, d]:

        x, z = in_proj(x).chunk(2)                       # [B, L, inner] each
        u = silu(causal_depthwise_conv1d(x))             # [B, L, inner]
        dt, B, C = x_proj(u).split(dt_rank, state, state)
        y = selective_scan(u, dt @ dt_proj.weightᵀ, -exp(A_log), B, C, D, z, dt_proj.bias, softplus)
        return out_proj(y)

    `dt_rank=0` means ceil(d / 16), Mamba's "auto".
    """

    def __init__(
        self,
        d: int,
        inner: int,
        state: int = 16,
        conv: int = 4,
        dt_rank: int = 0,
        *,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
        conv_bias: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        for arg, value in (("d", d), ("inner", inner), ("state", state), ("conv", conv)):
            if value < 1:
                raise ValueError(f"MambaMixer: {arg} must be at least 1, got {value}")
        self.d = d
        self.inner = inner
        self.state = state
        self.dt_rank = dt_rank if dt_rank > 0 else math.ceil(d / 16)

        self.in_proj = nn.Linear(d, 2 * inner, bias=bias)
        self.conv1d = nn.Conv1d(inner, inner, conv, groups=inner, padding=conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner, bias=True)
        self.out_proj = nn.Linear(inner, d, bias=bias)

        # Mamba's dt initialisation: weights uniform in ±dt_rank^-0.5, and a bias whose softplus is a
        # log-uniform step size in [dt_min, dt_max].
        std = self.dt_rank**-0.5 * dt_scale
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]

        # S4D-real initialisation: A = -[1, 2, …, state] for every channel.
        A = torch.arange(1, state + 1, dtype=torch.float32).repeat(inner, 1)  # [inner, state]
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(inner))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D._no_weight_decay = True  # type: ignore[attr-defined]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, L, d]
        length = hidden.shape[1]
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # [B, L, inner] each
        x = self.conv1d(x.transpose(1, 2))[..., :length]  # [B, inner, L]: the causal part of a padded conv
        # Contiguous like the scan's output, so that compiled graphs see the strides the kernel produces.
        u = F.silu(x).transpose(1, 2).contiguous()  # [B, L, inner]
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.state, self.state], dim=-1)  # B, C: [B, L, state]
        delta = F.linear(dt, self.dt_proj.weight)  # [B, L, inner]; the bias is added inside the scan
        A = -torch.exp(self.A_log.float())  # [inner, state]
        y = ops.selective_scan(
            u, delta, A, B, C, self.D.float(), z, self.dt_proj.bias.float(), delta_softplus=True
        )  # [B, L, inner]
        return self.out_proj(y)

    def extra_repr(self) -> str:
        return f"d={self.d}, inner={self.inner}, state={self.state}, dt_rank={self.dt_rank}"
