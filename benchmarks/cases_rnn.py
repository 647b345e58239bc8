"""Recurrent-cell, spiking and multi-route scan benchmarks.

  * leaky-tau RNN, B64 T1024 n128, h += (tanh(W h + x) - h) / tau: routec's fused kernel (W held on chip
    for the whole sequence) against a PyTorch loop over time with nn.Linear; forward and forward + backward.
  * LIF neurons, B32 T256 D4096: routec's lif_scan against a PyTorch loop over time (subtract reset).
  * RSMamba-style selective scan over 3 routes (forward, reverse, a random permutation) with per-sample
    gate weights, B4 L2048 D1536 N16: routec's one-launch multi_route_selective_scan against three separate
    `ops.selective_scan` calls on gathered inputs, scattered back and summed with the weights.
With --small the shapes shrink and, on CPU, routec runs its reference backend: the CPU ratios only check
that the cases run; the kernel figures come from a GPU run.
"""

from __future__ import annotations

import torch

from harness import Case
from routec.codegen import ops


def _grad_runner(fn, inputs):
    """One forward + backward of fn(*inputs) w.r.t. its floating-point inputs, fixed upstream gradient."""
    leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    wrt = [x for x in leaves if x.requires_grad]
    out = fn(*leaves)
    grad_out = torch.randn_like(out[0] if isinstance(out, tuple) else out)

    def run():
        y = fn(*leaves)
        return torch.autograd.grad(y[0] if isinstance(y, tuple) else y, wrt, grad_out)

    return run


def _leaky_cases(device: str, small: bool) -> list[Case]:
    B, T, n = (4, 32, 16) if small else (64, 1024, 128)
    g = torch.Generator(device="cpu").manual_seed(0)
    x_proj = torch.randn(B, T, n, generator=g).to(device)
    linear = torch.nn.Linear(n, n, bias=False).to(device)
    with torch.no_grad():
        linear.weight.mul_(0.8)
    w = linear.weight.detach().clone()
    tau = (2.0 + 8.0 * torch.rand(n, generator=g)).to(device)

    def torch_loop(x, w, tau):
        h = torch.zeros_like(x[:, 0])
        hs = []
        for t in range(x.shape[1]):
            h = h + (torch.tanh(torch.nn.functional.linear(h, w) + x[:, t]) - h) / tau
            hs.append(h)
        return torch.stack(hs, 1)

    def ours(x, w, tau):
        return ops.leaky_rnn_scan(x, w, tau)

    shape = f"B{B} T{T} n{n} fp32"
    bytes_fwd = 2 * x_proj.numel() * 4
    return [
        Case(
            name=f"leaky_rnn_scan fwd {shape}", group="rnn",
            impls={"pytorch loop (nn.Linear)": lambda: torch_loop(x_proj, w, tau), "routec leaky_rnn_scan": lambda: ours(x_proj, w, tau)},
            baseline="pytorch loop (nn.Linear)", ours="routec leaky_rnn_scan",
            bytes=bytes_fwd, flops=2.0 * B * T * n * n,
            notes="tanh; sequential in time: latency-bound, one program per 16 batch rows",
        ),
        Case(
            name=f"leaky_rnn_scan fwd+bwd {shape}", group="rnn",
            impls={"pytorch loop (nn.Linear)": _grad_runner(torch_loop, (x_proj, w, tau)),
                   "routec leaky_rnn_scan": _grad_runner(ours, (x_proj, w, tau))},
            baseline="pytorch loop (nn.Linear)", ours="routec leaky_rnn_scan",
            flops=6.0 * B * T * n * n,
            notes="gradients for x_proj, W and tau; the Triton BPTT recomputes the pre-activations",
        ),
    ]


def _lif_cases(device: str, small: bool) -> list[Case]:
    B, T, D = (2, 32, 64) if small else (32, 256, 4096)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.rand(B, T, D, generator=g) * 0.6).to(device)
    beta = (0.8 + 0.2 * torch.rand(D, generator=g)).to(device)

    def torch_loop(x, beta):
        v = torch.zeros_like(x[:, 0])
        spikes, vs = [], []
        for t in range(x.shape[1]):
            v = beta * v + x[:, t]
            s = (v >= 1.0).to(x.dtype)
            v = v - s
            spikes.append(s)
            vs.append(v)
        return torch.stack(spikes, 1), torch.stack(vs, 1)

    shape = f"B{B} T{T} D{D} fp32"
    return [Case(
        name=f"lif_scan fwd {shape}", group="rnn",
        impls={"pytorch loop": lambda: torch_loop(x, beta), "routec lif_scan": lambda: ops.lif_scan(x, beta=beta)},
        baseline="pytorch loop", ours="routec lif_scan",
        bytes=3 * x.numel() * 4,
        notes="per-channel beta, threshold 1, subtract reset; bytes = read x, write spikes and v",
    )]


def _multi_route_cases(device: str, small: bool) -> list[Case]:
    Bt, L, D, N = (1, 64, 32, 4) if small else (4, 2048, 1536, 16)
    R = 3
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    u, delta, z = rnd(Bt, L, D), rnd(Bt, L, D, scale=0.5), rnd(Bt, L, D)
    A = (-(torch.rand(D, N, generator=g) + 0.5)).to(device)
    B, C = rnd(Bt, L, N), rnd(Bt, L, N)
    Dskip, bias = rnd(D), rnd(D, scale=0.3)
    weights = torch.softmax(rnd(Bt, R), -1)
    routes = torch.stack([ops.route_table(k, L, generator=g) for k in ("forward", "reverse", "random")]).to(device)
    inverse = torch.argsort(routes, dim=1)  # gathering with the inverse permutation scatters back

    def separate(u, delta, A, B, C, Dskip, z, bias, weights):
        y = 0.0
        for r in range(R):
            idx, inv = routes[r], inverse[r]
            y_r = ops.selective_scan(
                u[:, idx], delta[:, idx], A, B[:, idx], C[:, idx], Dskip, z[:, idx], bias, delta_softplus=True
            )
            y = y + weights[:, r, None, None] * y_r[:, inv]
        return y

    def ours(u, delta, A, B, C, Dskip, z, bias, weights):
        return ops.multi_route_selective_scan(u, delta, A, B, C, Dskip, z, bias, routes, weights, delta_softplus=True)

    inputs = (u, delta, A, B, C, Dskip, z, bias, weights)
    shape = f"R{R} B{Bt} L{L} D{D} N{N} fp32"
    label = "3 x selective_scan + gather/scatter + sum"
    return [
        Case(
            name=f"multi_route_selective_scan fwd {shape}", group="multiscan",
            impls={label: lambda: separate(*inputs), "routec multi_route_selective_scan": lambda: ours(*inputs)},
            baseline=label, ours="routec multi_route_selective_scan",
            bytes=(R * (3 * Bt * L * D + 2 * Bt * L * N) + Bt * L * D) * 4,
            notes="RSMamba routes forward / reverse / random, per-sample weights; with D, z gate, bias, softplus",
        ),
        Case(
            name=f"multi_route_selective_scan fwd+bwd {shape}", group="multiscan",
            impls={label: _grad_runner(separate, inputs), "routec multi_route_selective_scan": _grad_runner(ours, inputs)},
            baseline=label, ours="routec multi_route_selective_scan",
            notes="gradients for every float input including the route weights",
        ),
    ]


def cases(device: str, small: bool) -> list[Case]:
    return _leaky_cases(device, small) + _lif_cases(device, small) + _multi_route_cases(device, small)
