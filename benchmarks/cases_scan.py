"""Scan benchmarks: linear recurrence B8 L4096 D2048 and selective scan B4 L2048 D1536 N16 (fp32, bf16).

Anchors for h[t] = a[t] * h[t-1] + b[t] (all given the same a, b):
  * a PyTorch eager loop over time, run in full (one step = two kernels; no slicing or scaling);
  * torch.compile of torch._higher_order_ops.associative_scan, combine_mode="pointwise" (CUDA only);
  * flash-linear-attention chunk_hgrn / fused_recurrent_hgrn, which compute h = exp(g) * h + x, so they
    get x = b and g = log(a) (computed once, outside the timing);
  * accelerated_scan.scalar.scan(gates, tokens), whose layout is [B, D, L]: the inputs are transposed
    once, outside the timing.
The selective scan is compared with the pure-PyTorch reference (a loop over time), forward and
forward + backward. On CPU (--small) routec runs its reference backend, so the CPU ratios only check that
the suite works; the Triton figures come from a GPU run.
"""

from __future__ import annotations

import torch

from harness import Case, optional_impl
from routec.codegen import ops
from routec.codegen.scan import selective_scan_reference


def _combine(x, y):
    return x[0] * y[0], y[0] * x[1] + y[1]


def _eager_loop(a, b):
    h = torch.zeros_like(b[:, 0])
    out = torch.empty_like(b)
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        out[:, t] = h
    return out


def _grad_runner(fn, inputs):
    """One forward + backward of fn(*inputs) with a fixed upstream gradient."""
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    grad_out = torch.randn_like(fn(*leaves).detach())

    def run():
        out = fn(*leaves)
        return torch.autograd.grad(out, leaves, grad_out)

    return run


def _linear_anchors(a, b, device, with_grad):
    """Anchor label -> callable for one linear-scan workload; `unavailable` collects what cannot run."""
    impls, unavailable = {}, {}

    def wrap(fn, inputs):
        return _grad_runner(fn, inputs) if with_grad else (lambda: fn(*inputs))

    impls["pytorch eager loop"] = wrap(_eager_loop, (a, b))

    def build_assoc():
        if device != "cuda":
            raise RuntimeError("associative_scan combine_mode='pointwise' needs CUDA tensors")
        from torch._higher_order_ops.associative_scan import associative_scan

        compiled = torch.compile(lambda x, y: associative_scan(_combine, (x, y), dim=1, combine_mode="pointwise")[1],
                                 fullgraph=True)
        return wrap(compiled, (a, b))

    optional_impl(impls, unavailable, "torch.compile associative_scan", build_assoc)

    log_a = torch.log(a)

    def build_fla(name):
        def build():
            if device != "cuda":
                raise RuntimeError("flash-linear-attention kernels need CUDA")
            from fla.ops import hgrn

            fn = getattr(hgrn, name)
            return wrap(lambda x, g: fn(x, g)[0], (b, log_a))

        return build

    optional_impl(impls, unavailable, "fla chunk_hgrn", build_fla("chunk_hgrn"))
    optional_impl(impls, unavailable, "fla fused_recurrent_hgrn", build_fla("fused_recurrent_hgrn"))

    def build_accel():
        if device != "cuda":
            raise RuntimeError("accelerated_scan needs CUDA")
        from accelerated_scan.scalar import scan as accel_scan

        a_t, b_t = a.transpose(1, 2).contiguous(), b.transpose(1, 2).contiguous()  # [B, D, L]
        return wrap(accel_scan, (a_t, b_t))

    optional_impl(impls, unavailable, "accelerated_scan.scalar", build_accel)
    impls["routec linear_scan"] = wrap(lambda x, y: ops.linear_scan(x, y), (a, b))
    return impls, unavailable


def _selective_inputs(bsz, length, dim, n_state, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    u, delta, z = rnd(bsz, length, dim), rnd(bsz, length, dim, scale=0.5), rnd(bsz, length, dim)
    A = (-(torch.rand(dim, n_state, generator=g) + 0.5)).to(device=device, dtype=dtype)
    B, C = rnd(bsz, length, n_state), rnd(bsz, length, n_state)
    D, bias = rnd(dim), rnd(dim, scale=0.3)
    return u, delta, A, B, C, D, z, bias


def cases(device: str, small: bool) -> list[Case]:
    out = []
    bsz, length, dim = (2, 256, 64) if small else (8, 4096, 2048)
    g = torch.Generator(device="cpu").manual_seed(0)
    a32 = (torch.rand(bsz, length, dim, generator=g) * 0.1 + 0.9).to(device)
    b32 = torch.randn(bsz, length, dim, generator=g).to(device)
    shape = f"B{bsz} L{length} D{dim}"
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        a, b = a32.to(dtype), b32.to(dtype)
        impls, unavailable = _linear_anchors(a, b, device, with_grad=False)
        out.append(Case(
            name=f"linear_scan fwd {shape} {tag}", group="scan", impls=impls, unavailable=unavailable,
            baseline="pytorch eager loop", ours="routec linear_scan",
            bytes=3 * a.numel() * a.element_size(),
            notes="bytes = read a, b + write h; fla gets g = log a, accelerated_scan gets [B, D, L] copies",
        ))
    impls, unavailable = _linear_anchors(a32, b32, device, with_grad=True)
    out.append(Case(
        name=f"linear_scan fwd+bwd {shape} fp32", group="scan", impls=impls, unavailable=unavailable,
        baseline="pytorch eager loop", ours="routec linear_scan",
        bytes=8 * a32.numel() * a32.element_size(),
        notes="bytes = forward 3 streams + backward 5 (read a, h, dh; write da, db)",
    ))

    sel_shape = (1, 64, 32, 4) if small else (4, 2048, 1536, 16)
    bsz, length, dim, n_state = sel_shape
    shape = f"B{bsz} L{length} D{dim} N{n_state}"
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        inputs = _selective_inputs(*sel_shape, dtype, device)
        elem = inputs[0].element_size()
        io_bytes = (4 * bsz * length * dim + 2 * bsz * length * n_state) * elem
        exps = bsz * length * dim * n_state

        def ours(*x):
            return ops.selective_scan(*x, delta_softplus=True)

        def reference(*x):
            return selective_scan_reference(*x, delta_softplus=True)

        out.append(Case(
            name=f"selective_scan fwd {shape} {tag}", group="scan",
            impls={"pytorch reference loop": lambda x=inputs: reference(*x), "routec selective_scan": lambda x=inputs: ours(*x)},
            baseline="pytorch reference loop", ours="routec selective_scan", bytes=io_bytes,
            notes=f"with D, z gate, delta_bias, softplus; {exps:.3g} exp2 (bound by exp throughput, not bytes)",
        ))
        if dtype == torch.float32 or not small:
            out.append(Case(
                name=f"selective_scan fwd+bwd {shape} {tag}", group="scan",
                impls={"pytorch reference loop": _grad_runner(reference, inputs),
                       "routec selective_scan": _grad_runner(ours, inputs)},
                baseline="pytorch reference loop", ours="routec selective_scan",
                notes="backward recomputes the states per chunk from forward checkpoints",
            ))
    return out
