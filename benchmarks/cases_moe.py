"""Mixture of experts: routing + expert MLP, routec's kernels against the usual PyTorch pipelines.

Layer (DESIGN §6 anchor): x [T, d] -> router logits x @ gate [d, E] -> top-k of the softmax -> each token
through its k experts gelu(x @ w1[e]) @ w2[e], weighted and summed. bf16 on CUDA, fp32 on CPU.
    torch loop          per expert: nonzero, gather, two matmuls, weight, index_add_ (the usual eager code)
    torch._grouped_mm   stable argsort by expert, bincount/cumsum offsets, gather, two grouped GEMMs,
                        weight, index_add_ (the sort+gather pipeline)
    dense floor         one dense matmul pair of the same FLOPs: [T*k, d] @ [d, h] @ [h, d], no routing
    routec              `route_tokens` (gate + counting sort, 2 launches) + `moe_ffn` (sort, gather-fused
                        grouped GEMM with the gelu epilogue, weighted scatter GEMM, slot sum)
    routec moe_ffn only the expert part alone, routing given
Shapes: coarse T16384 d1024 h2816 E8 k2 and fine-grained T16384 d1024 h512 E64 k8, forward, plus the
coarse layer forward+backward; the router alone (route_tokens vs the torch ops that prepare a sort).

On CPU, routec runs its Triton kernels only with TRITON_INTERPRET=1 (far too slow to time): without it,
the numbers are those of the reference backend (a loop over experts), so CPU ratios say little about
the kernels. `small=True` shrinks the layer for CPU (T512 d64 h128).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from harness import Case, optional_impl  # benchmarks/ is on sys.path: run.py puts it there

from routec.codegen.ops import moe_ffn, route_tokens


class _Layer:
    def __init__(self, T, d, h, E, k, device, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)

        def init(*shape, fan_in):
            return (torch.randn(*shape, generator=g) / math.sqrt(fan_in)).to(device=device, dtype=dtype)

        self.T, self.d, self.h, self.E, self.k = T, d, h, E, k
        self.x = init(T, d, fan_in=1)  # [T, d]
        self.gate = init(d, E, fan_in=d)  # [d, E]
        self.w1 = init(E, d, h, fan_in=d)  # [E, d, h]
        self.w2 = init(E, h, d, fan_in=h)  # [E, h, d]

    @property
    def flops(self):  # the two expert GEMMs of the routed rows
        return 4 * self.T * self.k * self.d * self.h

    @property
    def bytes(self):
        es = self.x.element_size()
        return es * (2 * self.E * self.d * self.h + 2 * self.T * self.d)


def _torch_route(x, gate, k):
    probs = torch.softmax((x @ gate).float(), -1)
    w, idx = probs.topk(k, dim=-1)
    return w.to(x.dtype), idx


def _torch_loop(layer, x, gate, w1, w2):
    w, idx = _torch_route(x, gate, layer.k)
    y = torch.zeros_like(x)
    for e in range(layer.E):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        out = F.gelu(x[tok] @ w1[e]) @ w2[e]
        y = y.index_add(0, tok, out * w[tok, slot, None])
    return y


def _grouped(layer, x, gate, w1, w2):
    w, idx = _torch_route(x, gate, layer.k)
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    offs = torch.bincount(flat, minlength=layer.E).cumsum(0).to(torch.int32)
    tok = order // layer.k
    hidden = F.gelu(torch._grouped_mm(x[tok], w1, offs=offs))
    out = torch._grouped_mm(hidden, w2, offs=offs) * w.flatten()[order, None]
    return torch.zeros_like(x).index_add(0, tok, out)


def _routec(layer, x, gate, w1, w2):
    r = route_tokens(x @ gate, layer.k)
    return moe_ffn(x, r.weights, r.indices, w1, w2, activation="gelu")


def _column_major(w):
    """Same values, the last two dims stored transposed: the layout grouped GEMM libraries prefer for B."""
    return w.transpose(1, 2).contiguous().transpose(1, 2)


def _build_grouped(layer, w1, w2):
    """`torch._grouped_mm` in the first weight layout it accepts (checked on a real call)."""
    errors = []
    for a, b in ((w1, w2), (_column_major(w1), _column_major(w2))):
        try:
            _grouped(layer, layer.x, layer.gate, a, b)
            return a, b
        except Exception as exc:  # layout or dtype not supported here: try the next, report the last
            errors.append(exc)
    raise errors[-1]


def _fwd_bwd(fn, inputs, gy):
    y = fn(*inputs)
    return torch.autograd.grad(y, inputs, gy)


def _sizes(small, fine):
    if small:
        return (512, 64, 64, 16, 4) if fine else (512, 64, 128, 8, 2)
    return (16384, 1024, 512, 64, 8) if fine else (16384, 1024, 2816, 8, 2)


def _forward_case(device, small, fine):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    T, d, h, E, k = _sizes(small, fine)
    L = _Layer(T, d, h, E, k, device, dtype)
    routed = route_tokens(L.x @ L.gate, k)
    xd = torch.randn(T * k, d, generator=torch.Generator().manual_seed(5)).to(device=device, dtype=dtype)
    impls = {
        "torch loop": lambda: _torch_loop(L, L.x, L.gate, L.w1, L.w2),
        "dense floor": lambda: (xd @ L.w1[0]) @ L.w2[0],
        "routec": lambda: _routec(L, L.x, L.gate, L.w1, L.w2),
        "routec moe_ffn only": lambda: moe_ffn(L.x, routed.weights, routed.indices, L.w1, L.w2),
    }
    unavailable = {}

    def grouped():
        g1, g2 = _build_grouped(L, L.w1, L.w2)
        return lambda: _grouped(L, L.x, L.gate, g1, g2)

    optional_impl(impls, unavailable, "torch._grouped_mm", grouped)
    return Case(
        name=f"moe_fwd_T{T}_d{d}_h{h}_E{E}_k{k}", group="moe", impls=impls, baseline="torch loop", ours="routec",
        bytes=L.bytes, flops=L.flops, unavailable=unavailable,
        notes=f"{dtype} on {device}; routing included except in 'moe_ffn only'; dense floor = same GEMM FLOPs "
              f"without routing (target: routec <= 1.25x dense floor)",
    )


def _train_case(device, small):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    T, d, h, E, k = _sizes(small, False)
    L = _Layer(T, d, h, E, k, device, dtype)
    leaves = [t.clone().requires_grad_() for t in (L.x, L.gate, L.w1, L.w2)]
    gy = torch.randn(T, d, generator=torch.Generator().manual_seed(6)).to(device=device, dtype=dtype)
    xd = torch.randn(T * k, d, generator=torch.Generator().manual_seed(5)).to(device=device, dtype=dtype)
    dense = [xd.requires_grad_(), L.w1[0].clone().requires_grad_(), L.w2[0].clone().requires_grad_()]
    return Case(
        name=f"moe_fwd_bwd_T{T}_d{d}_h{h}_E{E}_k{k}", group="moe",
        impls={
            "torch loop": lambda: _fwd_bwd(lambda *a: _torch_loop(L, *a), leaves, gy),
            "dense floor": lambda: _fwd_bwd(lambda a, b, c: (a @ b) @ c, dense, torch.cat([gy] * k)),
            "routec": lambda: _fwd_bwd(lambda *a: _routec(L, *a), leaves, gy),
        },
        baseline="torch loop", ours="routec", bytes=None, flops=3 * L.flops,
        notes=f"{dtype} on {device}; forward + backward wrt x, gate, w1, w2",
    )


def _router_case(device, small, fine):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    T, _, _, E, k = _sizes(small, fine)
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(7)).to(device=device, dtype=dtype)

    def torch_prep():
        probs = torch.softmax(logits.float(), -1)
        w, idx = probs.topk(k, dim=-1)
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=E)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        aux = E * (counts.float() / (T * k) * probs.mean(0)).sum()
        return w, idx, order, offsets, aux

    return Case(
        name=f"router_T{T}_E{E}_k{k}", group="moe",
        impls={"torch ops": torch_prep, "routec route_tokens": lambda: route_tokens(logits, k)},
        baseline="torch ops", ours="routec route_tokens", bytes=logits.numel() * logits.element_size(),
        notes="softmax, top-k, stable sort by expert, offsets, aux loss (target <= 100 us on H100)",
    )


def cases(device: str, small: bool) -> list[Case]:
    return [
        _forward_case(device, small, fine=False),
        _forward_case(device, small, fine=True),
        _train_case(device, small),
        _router_case(device, small, fine=False),
        _router_case(device, small, fine=True),
    ]
