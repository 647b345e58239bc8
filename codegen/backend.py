"""Backend selection for the runtime ops.

`ROUTEC_BACKEND=reference` forces the pure-PyTorch references on any device (also float64, for gradcheck);
`ROUTEC_BACKEND=triton` forces the Triton kernels (on CPU tensors this needs `TRITON_INTERPRET=1`).
Unset, CUDA tensors take the Triton kernels and everything else the references.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("reference", "triton")


def requested() -> str | None:
    """The backend forced by `ROUTEC_BACKEND`, or None when it is unset or empty."""
    value = os.environ.get("ROUTEC_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"ROUTEC_BACKEND must be one of {', '.join(BACKENDS)}, got {value!r}")
    return value


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether an op called on `tensors` should run its Triton kernel."""
    forced = requested()
    if forced == "reference":
        return False
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if forced == "triton":
        if not (on_cuda or interpreting()):
            raise RuntimeError("ROUTEC_BACKEND=triton needs CUDA tensors or TRITON_INTERPRET=1")
        return True
    return on_cuda


def reference_vjp(fn, inputs: tuple, grad_outputs: tuple) -> tuple:
    """Gradients of `fn(*inputs)` by re-running a differentiable reference under autograd.

    Used as the backward of a custom op whose forward ran without autograd: tensors in `inputs` are
    detached copies that require grad; non-tensor inputs pass through. Returns one entry per input (None
    for non-tensors and for tensors that get no gradient).
    """
    leaves = tuple(
        x.detach().requires_grad_(True) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
        for x in inputs
    )
    with torch.enable_grad():
        out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
    wrt = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
    if not pairs or not wrt:
        return tuple(None for _ in inputs)
    grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True))
    return tuple(next(grads) if isinstance(x, torch.Tensor) and x.requires_grad else None for x in leaves)
