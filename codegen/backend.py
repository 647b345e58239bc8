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
