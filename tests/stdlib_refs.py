"""What the stdlib tests (tests/test_stdlib_*.py) share: the reference-backend fixture, the published building
blocks several papers' code reuses (timm's ViT attention and MLP, RMSNorm, HF's Mamba mixer, sinusoid tables),
and the plumbing of "copy routec's weights into the reference, run both, check the routing and the training step".

Each test file keeps its paper's reference model next to the spec it checks; only what is the same in several
of them lives here. Nothing here imports routec: the references stay independent of the code they verify.
A plain module (conftest.py puts tests/ on sys.path): `from stdlib_refs import TimmAttention, ...`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    """Autouse in every module that imports it: the stdlib tests compare models, not kernels, so routec's ops
    run their PyTorch references (ROUTEC_BACKEND=reference)."""
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")


def sinusoid_table(n_position: int, d_hid: int) -> torch.Tensor:
    """get_sinusoid_encoding_table (VideoMAE, T2T-ViT), in float64 then float32 [1, n_position, d_hid]:
    angle(pos, j) = pos / 10000^(2 (j // 2) / d); sin on even j, cos on odd j."""
    table = np.array([[pos / np.power(10000, 2 * (j // 2) / d_hid) for j in range(d_hid)] for pos in range(n_position)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.tensor(table, dtype=torch.float32)[None]


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """DiT's / ADM's timestep features [B, dim]: [cos(t·f), sin(t·f)] for f = 10000^(−i / (dim/2)), i < dim/2."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimmAttention(nn.Module):
    """timm's ViT Attention: one fused qkv projection whose rows are [q; k; v], softmax(q kᵀ / √d_head) v, proj."""

    def __init__(self, dim, heads, qkv_bias=True):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # [B, N, C]
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class TimmMlp(nn.Module):
    """timm's Mlp: fc1 → GELU (exact) → fc2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class RMSNorm(nn.Module):
    """Root-mean-square norm, weight · x / √(mean(x²) + eps): no mean subtraction, no bias (T5LayerNorm,
    LlamaRMSNorm, MixtralRMSNorm, Mamba's RMSNorm)."""

    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class MambaMixer(nn.Module):
    """The Mamba-1 mixer as in HF `MambaMixer.slow_forward` (a plain loop over time): [B, L, d] → [B, L, d]."""

    def __init__(self, d: int, inner: int, state: int = 16, conv: int = 4):
        super().__init__()
        self.state = state
        self.dt_rank = math.ceil(d / 16)
        self.in_proj = nn.Linear(d, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(inner, inner, conv, groups=inner, padding=conv - 1, bias=True)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, d, bias=False)

    def forward(self, hidden):  # [B, L, d]
        L = hidden.shape[1]
        gate_in, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # [B, inner, L] each
        u = F.silu(self.conv1d(gate_in)[..., :L])  # [B, inner, L]
        params = self.x_proj(u.transpose(1, 2))  # [B, L, rank + 2N]
        dt, Bm, Cm = torch.split(params, [self.dt_rank, self.state, self.state], dim=-1)
        dt = F.softplus(self.dt_proj(dt)).transpose(1, 2)  # [B, inner, L]
        A = -torch.exp(self.A_log)  # [inner, N]
        h = hidden.new_zeros(hidden.shape[0], u.shape[1], self.state)  # [B, inner, N]
        ys = []
        for t in range(L):
            dA = torch.exp(A[None] * dt[:, :, t, None])
            dBu = dt[:, :, t, None] * Bm[:, None, t, :] * u[:, :, t, None]
            h = dA * h + dBu
            ys.append((h * Cm[:, None, t, :]).sum(-1))  # [B, inner]
        y = torch.stack(ys, dim=-1) + u * self.D[None, :, None]  # [B, inner, L]
        y = y * F.silu(z)
        return self.out_proj(y.transpose(1, 2))


def mamba_names(ours: str, theirs: str) -> dict[str, str]:
    """The {routec name: reference name} entries of one Mamba mixer: routec's `<ours>.<p>` is `<theirs>.<p>` of
    a MambaMixer."""
    return {f"{ours}.{p}": f"{theirs}.{p}" for p in (
        "in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "A_log",
        "D", "out_proj.weight")}


def canonical_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The routec module's tensors under their spec names. A `route … to { … }` keeps its branches' modules
    also under `route_<gate>.branches.<n>.<spec name>`: those entries must alias the spec-named tensors."""
    state = net.state_dict()
    canonical = {}
    for name, value in state.items():
        m = re.fullmatch(r".*?\.route_\w+\.branches\.\d+\.(.+)", name)
        if m:
            assert state[m[1]].data_ptr() == value.data_ptr(), f"{name} is not the same tensor as {m[1]}"
            continue
        canonical[name] = value
    return canonical


def load_routec_state(
    ref: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    to_reference: Callable[[str, torch.Tensor], Mapping[str, torch.Tensor]],
    keep: Iterable[str] = (),
) -> None:
    """Load routec's (name, tensor) pairs into the reference through the explicit name map `to_reference`
    (one routec tensor → {reference key: tensor}). A key `<base>#<i>` is part i of a fused projection whose
    rows are [q; k; v]: the three parts are concatenated along dim 0. `keep` names reference buffers routec
    does not hold (fixed tables), left as they are; strict loading checks that nothing else is missing."""
    own = ref.state_dict()
    state: dict[str, torch.Tensor] = {key: own[key] for key in keep}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for name, value in tensors:
        for key, v in to_reference(name, value.detach()).items():
            if "#" in key:
                base, part = key.split("#")
                parts.setdefault(base, {})[int(part)] = v
            else:
                state[key] = v.clone()
    for base, pieces in parts.items():
        state[base] = torch.cat([pieces[p] for p in range(3)], dim=0)
    ref.load_state_dict(state, strict=True)


def expert_linears(prefix: str, leaf: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """routec's stacked expert MLP tensor `experts.<leaf>` (w1 [E, d, h], b1 [E, h], w2 [E, h, d], b2 [E, d]) as
    the reference's per-expert Linear entries `<prefix>.<e>.fc1|fc2.weight|bias` (Linear weights are [out, in])."""
    fc, kind = {"w1": ("fc1", "weight"), "b1": ("fc1", "bias"), "w2": ("fc2", "weight"), "b2": ("fc2", "bias")}[leaf]
    return {f"{prefix}.{e}.{fc}.{kind}": (value[e].T if kind == "weight" else value[e]) for e in range(value.shape[0])}


def copy_parameters(ref: nn.Module, net: nn.Module, names: Mapping[str, str], reshape: bool = False) -> None:
    """Copy routec's parameters into the reference by an explicit {routec name: reference name} map that must
    cover every parameter on both sides, one to one. Shapes must agree (with `reshape`, only sizes: the routec
    tensor is reshaped to the reference's shape)."""
    src, dst = dict(net.named_parameters()), dict(ref.named_parameters())
    assert sorted(src) == sorted(names), f"unmapped routec parameters: {sorted(set(src) ^ set(names))}"
    assert sorted(dst) == sorted(names.values()), (
        f"unmapped reference parameters: {sorted(set(dst) ^ set(names.values()))}")
    with torch.no_grad():
        for theirs, ours in names.items():
            if reshape:
                assert src[theirs].numel() == dst[ours].numel(), (theirs, ours)
                dst[ours].copy_(src[theirs].reshape(dst[ours].shape))
            else:
                assert src[theirs].shape == dst[ours].shape, (theirs, ours)
                dst[ours].copy_(src[theirs])


def randomise_running_stats(net: nn.Module, mean_std: float, var_range: tuple[float, float]) -> None:
    """Non-trivial BatchNorm statistics, so that eval mode exercises them: running_mean ~ N(0, mean_std²),
    running_var ~ U(var_range), drawn from the global generator in buffer order."""
    with torch.no_grad():
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0.0, mean_std)
            elif name.endswith("running_var"):
                b.uniform_(*var_range)


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The language-model loss: cross-entropy of the logits at t [B, T, V] against the token at t + 1."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def tensor_out(out):
    """A model's main output: the tensor itself, or the first field of its named outputs."""
    return out if isinstance(out, torch.Tensor) else out[0]


def capture(net: nn.Module, name: str) -> list:
    """Record the outputs of the routec submodule `name` (a gate) at every forward."""
    seen: list = []
    net.get_submodule(name).register_forward_hook(lambda module, args, out: seen.append(out))
    return seen


def assert_same_topk(weights, indices, ref_weights, ref_indices, k: int) -> None:
    """The same k experts per token with the same weights, in whatever order each side lists them."""
    order, ref_order = indices.reshape(-1, k).sort(-1), ref_indices.reshape(-1, k).sort(-1)
    torch.testing.assert_close(order.values, ref_order.values)
    torch.testing.assert_close(weights.reshape(-1, k).gather(1, order.indices),
                               ref_weights.reshape(-1, k).gather(1, ref_order.indices), atol=1e-5, rtol=1e-4)


def record_randperm(monkeypatch) -> list[torch.Tensor]:
    """Wrap torch.randperm so that the test sees every permutation routec draws (to hand them to the reference)."""
    drawn = []
    real = torch.randperm

    def spy(*args, **kwargs):
        perm = real(*args, **kwargs)
        drawn.append(perm.clone())
        return perm

    monkeypatch.setattr(torch, "randperm", spy)
    return drawn


def assert_every_parameter_trained(net: nn.Module, nonzero: bool = True, zero_ok: str | None = None) -> None:
    """After backward: every parameter got a finite gradient and, with `nonzero`, one that is not all zero
    (except the parameters whose names `zero_ok`, a regular expression, finds)."""
    for name, p in net.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} got a non-finite gradient"
        if nonzero and not (zero_ok and re.search(zero_ok, name)):
            assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"
