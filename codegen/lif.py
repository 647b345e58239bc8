"""`lif_scan`: leaky integrate-and-fire neurons over time, with a surrogate gradient (DESIGN §5).

    u[t] = beta * v[t-1] + x[t]                      membrane before the spike (v[-1] = v0 or 0)
    s[t] = (u[t] >= threshold)                        the spike, emitted as 0./1. in x's dtype
    v[t] = u[t] - s[t] * threshold      reset="subtract"   (soft reset)
    v[t] = u[t] * (1 - s[t])            reset="zero"       (hard reset)

`beta` is a float (beta=1 is a plain integrate-and-fire neuron) or a per-channel tensor [D] (a trainable
leak, which then gets a gradient). The op returns the spikes and the post-reset membrane, both [B, T, D].

Backward: the step has no useful derivative, so ds/du is replaced by the arctan surrogate of SpikingJelly
(`surrogate.ATan`, alpha=2): ds/du = (alpha/2) / (1 + (pi/2 * alpha * (u - threshold))**2), i.e.
1 / (1 + (pi * (u - threshold))**2). The reset is *not* detached (SpikingJelly's default,
`detach_reset=False`): the gradient also flows through s[t] in the reset term, in the kernel and in the
reference alike. `surrogate="none"` gives the step its true derivative instead, ds/du = 0 (the gradient of
a comparison `u >= threshold` in a plain step loop, what the compiler's fused `scan` lowering must match).

`threshold_scan` is the compiler's lowering of an integrate-and-fire `scan` body (compiler/scans.py): any
channel shape, a threshold given as a tensor (the scale trick below) and no surrogate by default.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .backend import reference_vjp, use_triton

RESETS = ("subtract", "zero")
SURROGATES = ("atan", "none")
SURROGATE_ALPHA = 2.0


def _atan_surrogate_primitive(x: torch.Tensor) -> torch.Tensor:
    """An antiderivative of the ATan surrogate: atan(pi/2 * alpha * x) / pi + 1/2."""
    return torch.atan(math.pi / 2 * SURROGATE_ALPHA * x) / math.pi + 0.5


def _spike(u: torch.Tensor, threshold: float, surrogate: str = "atan") -> torch.Tensor:
    """Heaviside step in the forward; in the backward the ATan surrogate's derivative ("atan") or the
    step's own derivative, zero ("none") (plain autograd)."""
    hard = (u >= threshold).to(u.dtype)
    if surrogate == "none":
        return hard
    soft = _atan_surrogate_primitive(u - threshold)
    return hard + (soft - soft.detach())


def lif_scan_reference(
    x: torch.Tensor, beta: torch.Tensor | float, threshold: float = 1.0, reset: str = "subtract",
    v0: torch.Tensor | None = None, surrogate: str = "atan",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop over time in plain PyTorch; differentiable by autograd (surrogate gradient through `_spike`)."""
    B, T, D = x.shape
    v = x.new_zeros(B, D) if v0 is None else v0  # [B, D]
    spikes, vs = [], []
    for t in range(T):
        u = beta * v + x[:, t]
        s = _spike(u, threshold, surrogate)
        v = u - s * threshold if reset == "subtract" else u * (1.0 - s)
        spikes.append(s)
        vs.append(v)
    return torch.stack(spikes, 1), torch.stack(vs, 1)


@triton.jit
def _surrogate(u, threshold):
    # d/du of the ATan surrogate with alpha = 2: 1 / (1 + (pi * (u - threshold))^2)
    w = 3.141592653589793 * (u - threshold)
    return 1.0 / (1.0 + w * w)


@triton.jit
def _lif_fwd_kernel(
    x_ptr, beta_ptr, v0_ptr, s_ptr, v_ptr,  # x, s, v: [B, T, D]; beta: [D]; v0: [B, D]
    T, D, threshold,
    HAS_V0: tl.constexpr, ZERO_RESET: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (batch row, block of channels); sequential over T with v held in registers."""
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = d < D
    beta = tl.load(beta_ptr + d, mask=mask, other=0.0).to(tl.float32)
    if HAS_V0:
        v = tl.load(v0_ptr + pid_b.to(tl.int64) * D + d, mask=mask, other=0.0).to(tl.float32)
    else:
        v = tl.zeros([BLOCK_D], dtype=tl.float32)
    row = pid_b.to(tl.int64) * T * D
    for t in range(T):
        off = row + t * D + d
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        u = beta * v + x
        s = (u >= threshold).to(tl.float32)
        if ZERO_RESET:
            v = u * (1.0 - s)
        else:
            v = u - s * threshold
        tl.store(s_ptr + off, s.to(s_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + off, v.to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lif_bwd_kernel(
    x_ptr, beta_ptr, v0_ptr, v_ptr, gs_ptr, gv_ptr,  # x, v, gs, gv: [B, T, D]; beta: [D]; v0: [B, D]
    gx_ptr, gbeta_ptr, gv0_ptr,  # gx: [B, T, D]; gbeta: [B, D] (per-row partials); gv0: [B, D]
    T, D, threshold,
    HAS_V0: tl.constexpr, ZERO_RESET: tl.constexpr, ATAN: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Reverse-time BPTT, one program per (batch row, block of channels).

    u[t] is recomputed from x[t] and the saved v[t-1]; `carry` is dL/dv[t] from the future. ATAN: ds/du is
    the ATan surrogate; otherwise ds/du = 0 (the step's own derivative) and dL/ds does not reach u.
    """
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = d < D
    beta = tl.load(beta_ptr + d, mask=mask, other=0.0).to(tl.float32)
    brow = pid_b.to(tl.int64) * D
    if HAS_V0:
        v_init = tl.load(v0_ptr + brow + d, mask=mask, other=0.0).to(tl.float32)
    else:
        v_init = tl.zeros([BLOCK_D], dtype=tl.float32)
    row = pid_b.to(tl.int64) * T * D
    carry = tl.zeros([BLOCK_D], dtype=tl.float32)
    gbeta = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(T):
        t = T - 1 - i
        off = row + t * D + d
        t_prev = tl.maximum(t - 1, 0)  # v[t-1], clamped in range; replaced by v_init at t = 0
        prev = tl.load(v_ptr + row + t_prev * D + d, mask=mask, other=0.0).to(tl.float32)
        v_prev = tl.where(t > 0, prev, v_init)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        u = beta * v_prev + x
        s = (u >= threshold).to(tl.float32)
        gv = tl.load(gv_ptr + off, mask=mask, other=0.0).to(tl.float32) + carry
        gs = tl.load(gs_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if ZERO_RESET:
            gs = gs - gv * u
            gu = gv * (1.0 - s)
        else:
            gs = gs - gv * threshold
            gu = gv
        if ATAN:
            gu = gu + gs * _surrogate(u, threshold)
        tl.store(gx_ptr + off, gu.to(gx_ptr.dtype.element_ty), mask=mask)
        gbeta += gu * v_prev
        carry = gu * beta
    tl.store(gbeta_ptr + brow + d, gbeta, mask=mask)
    tl.store(gv0_ptr + brow + d, carry.to(gv0_ptr.dtype.element_ty), mask=mask)


def _poison() -> bool:
    """Tests set ROUTEC_POISON=1 so launchers fill outputs with NaN before the kernel writes them."""
    return os.environ.get("ROUTEC_POISON", "") == "1"


def _empty(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    dtype = like.dtype if dtype is None else dtype
    if _poison():
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _block_d(D: int) -> int:
    return min(triton.next_power_of_2(D), 128)


def lif_scan_triton(x, beta, threshold, reset, v0):
    """Launch the forward kernel. x [B, T, D], beta [D] -> (spikes, v) [B, T, D]."""
    B, T, D = x.shape
    x = x.contiguous()
    spikes, v = _empty(x.shape, x), _empty(x.shape, x)
    BLOCK_D = _block_d(D)
    grid = (B, triton.cdiv(D, BLOCK_D))
    _lif_fwd_kernel[grid](
        x, beta.contiguous(), x if v0 is None else v0.contiguous(), spikes, v, T, D, float(threshold),
        HAS_V0=v0 is not None, ZERO_RESET=reset == "zero", BLOCK_D=BLOCK_D,
    )
    return spikes, v


def lif_scan_triton_backward(x, beta, threshold, reset, v0, v, grad_s, grad_v, surrogate="atan"):
    """Launch the BPTT kernel; returns (gx [B, T, D], gbeta [D] fp32, gv0 [B, D])."""
    B, T, D = x.shape
    gx = _empty(x.shape, x)
    gbeta = _empty((B, D), x, torch.float32)
    gv0 = _empty((B, D), x)
    BLOCK_D = _block_d(D)
    grid = (B, triton.cdiv(D, BLOCK_D))
    _lif_bwd_kernel[grid](
        x.contiguous(), beta.contiguous(), x if v0 is None else v0.contiguous(), v.contiguous(),
        grad_s.contiguous(), grad_v.contiguous(), gx, gbeta, gv0, T, D, float(threshold),
        HAS_V0=v0 is not None, ZERO_RESET=reset == "zero", ATAN=surrogate == "atan", BLOCK_D=BLOCK_D,
    )
    return gx, gbeta.sum(0), gv0


@torch.library.custom_op("routec::lif_scan", mutates_args=())
def _lif_scan_op(
    x: torch.Tensor, beta: torch.Tensor, threshold: float, reset: str, v0: torch.Tensor | None, surrogate: str = "atan"
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x, beta, v0):
        return lif_scan_triton(x, beta, threshold, reset, v0)  # the forward does not depend on the surrogate
    with torch.no_grad():
        s, v = lif_scan_reference(x, beta, threshold, reset, v0, surrogate)
    return s.contiguous(), v.contiguous()


@_lif_scan_op.register_fake
def _(x, beta, threshold, reset, v0, surrogate="atan"):
    return torch.empty_like(x), torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, beta, threshold, reset, v0, surrogate = inputs
    ctx.threshold, ctx.reset, ctx.surrogate = threshold, reset, surrogate
    ctx.has_v0 = v0 is not None
    ctx.save_for_backward(x, beta, v0, output[1])


def _backward(ctx, grad_s, grad_v):
    x, beta, v0, v = ctx.saved_tensors
    grad_s = torch.zeros_like(x) if grad_s is None else grad_s
    grad_v = torch.zeros_like(x) if grad_v is None else grad_v
    if use_triton(x, beta, v0):
        gx, gbeta, gv0 = lif_scan_triton_backward(x, beta, ctx.threshold, ctx.reset, v0, v, grad_s, grad_v,
                                                  ctx.surrogate)
        gbeta = gbeta.to(beta.dtype)
    else:
        def fn(x, beta, v0):
            return lif_scan_reference(x, beta, ctx.threshold, ctx.reset, v0, ctx.surrogate)

        gx, gbeta, gv0 = reference_vjp(fn, (x, beta, v0), (grad_s, grad_v))
    return gx, gbeta, None, None, gv0 if ctx.has_v0 else None, None


_lif_scan_op.register_autograd(_backward, setup_context=_setup_context)


def lif_scan(
    x: torch.Tensor, *, beta: torch.Tensor | float, threshold: float = 1.0, reset: str = "subtract",
    v0: torch.Tensor | None = None, surrogate: str = "atan",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leaky integrate-and-fire over time. x [B, T, D]; beta float or [D]; v0 [B, D] -> (spikes, v) [B, T, D].

    Surrogate gradient: arctan (alpha=2) by default, or "none" (ds/du = 0, the comparison's own derivative);
    the reset is not detached (see the module docstring).
    """
    if reset not in RESETS:
        raise ValueError(f"lif_scan: reset must be one of {', '.join(RESETS)}, got {reset!r}")
    if surrogate not in SURROGATES:
        raise ValueError(f"lif_scan: surrogate must be one of {', '.join(SURROGATES)}, got {surrogate!r}")
    if x.dim() != 3:
        raise ValueError(f"lif_scan: x must be [B, T, D], got shape {list(x.shape)}")
    D = x.shape[-1]
    if isinstance(beta, torch.Tensor):
        if beta.dim() == 0:
            beta = beta.expand(D)
        if beta.shape != (D,):
            raise ValueError(f"lif_scan: beta must be a float or a [D] tensor with D={D}, got {list(beta.shape)}")
    else:
        beta = x.new_full((D,), float(beta))
    return torch.ops.routec.lif_scan(x, beta, float(threshold), reset, v0, surrogate)


def threshold_scan(
    x: torch.Tensor, v0: torch.Tensor, theta: torch.Tensor | float, beta: torch.Tensor | float = 1.0, *,
    reset: str = "subtract", surrogate: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    """An integrate-and-fire `scan` body on `lif_scan`, for any channel shape (the compiler's lowering).

        u[t] = beta * v[t-1] + x[t];  s[t] = (u[t] >= theta);  v[t] = u[t] - s[t] * theta  (or u[t] * (1 - s[t]))

    x [B, T, *C]; v0 [B, *C] (broadcast); theta a float, or a tensor broadcastable to C that must be POSITIVE;
    beta a float or a tensor broadcastable to C. Returns (s as 0./1. in x's dtype, v), both [B, T, *C].

    A tensor threshold uses scale invariance: the neuron on (x / theta, v0 / theta) with threshold 1 spikes at
    the same steps and its membrane is v / theta, so lif_scan runs with a float threshold and v is scaled
    back (gradients reach theta through x / theta, v0 / theta and the final scaling). This holds for
    theta > 0 only: a threshold <= 0 (which fires at every step with u >= theta) is not supported as a
    tensor. Float thresholds are passed through unchanged. The comparison is made on u / theta instead of u,
    so a step whose u is within rounding of theta may decide differently from an unscaled loop.
    """
    B, T = x.shape[:2]
    channels = tuple(x.shape[2:])
    scaled = isinstance(theta, torch.Tensor)
    if scaled:
        x = x / theta
        v0 = v0 / theta
        threshold = 1.0
    else:
        threshold = float(theta)
    flat = x.reshape(B, T, -1)  # [B, T, D], D = prod(C)
    v0 = torch.broadcast_to(v0, (B, *channels)).reshape(B, -1).to(flat.dtype)  # [B, D]
    if isinstance(beta, torch.Tensor):
        beta = torch.broadcast_to(beta, channels).reshape(-1).to(flat.dtype)  # [D]
    s, v = lif_scan(flat, beta=beta, threshold=threshold, reset=reset, v0=v0, surrogate=surrogate)
    s, v = s.reshape(x.shape), v.reshape(x.shape)
    if scaled:
        v = v * theta
    return s, v
