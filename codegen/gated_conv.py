"""Per-sample channel-gated conv + eval BatchNorm + ReLU (FTWT's gated layer) that skips the gated-off filters.

    y[b, c] = keep[b, c] ? relu((conv(x)[b, c] + bias[c]) * bn_scale[c] + bn_shift[c]) : 0

x [B, Cin, H, W]; weight [Cout, Cin, k, k] with k = 3 (padding 1) or k = 1 (padding 0), stride 1, groups 1;
bias [Cout] or None; bn_scale / bn_shift [Cout]: eval BatchNorm folded (scale = γ / sqrt(var + eps),
shift = β − mean · scale); keep bool [B, Cout].

The kernel compacts the channels per sample: `compact_groups(keep)` (codegen/compaction.py) packs each sample's
kept output channels first (perm [B, Cout], count [B]), on the device, with no host sync. The grid is static,
(B, cdiv(Cout, BLOCK_C), cdiv(H·W, BLOCK_P)); the program for packed channel slots j ∈ [j0, j0 + BLOCK_C) of
sample b runs the implicit-GEMM conv only when j0 < count[b] (a block of off channels does no GEMM at all), and
every program writes its [BLOCK_P, BLOCK_C] tile to the channels' real positions perm[b, j]: the kept ones get
the epilogue's value, the off ones get zeros (so the output needs no separate zero fill).

The op has a backward (through the reference, `reference_vjp`): the compiler only uses it in eval
(`GatedConvBlock`), where BN is an affine map; training keeps the dense ops because BN's batch statistics see
the dense output.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor, nn

from .backend import reference_vjp, use_triton
from .compaction import _empty, compact_groups_forward
from .ctor import recorded


def gated_conv_bn_relu_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_scale: Tensor,
                                 bn_shift: Tensor, keep: Tensor) -> Tensor:
    """Dense torch ops: conv2d (stride 1, 'same' padding), the folded BN affine, ReLU, then the gate."""
    y = F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2)  # [B, Cout, H, W]
    y = torch.relu(y * bn_scale[:, None, None] + bn_shift[:, None, None])
    return torch.where(keep[:, :, None, None], y, torch.zeros((), dtype=y.dtype, device=y.device))


@triton.jit
def _gated_conv_kernel(
    x_ptr,  # [B, Cin, H, W]
    w_ptr,  # [Cout, Cin * KS * KS]
    bias_ptr,  # [Cout] (unused when HAS_BIAS is false)
    scale_ptr,  # [Cout]
    shift_ptr,  # [Cout]
    perm_ptr,  # [B, Cout] int64: sample b's kept channels first
    count_ptr,  # [B] int64: how many channels sample b keeps
    out_ptr,  # [B, Cout, H, W]
    Cin,
    Cout,
    H,
    W,
    KS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (b, jc, jp): packed channel slots j = jc·BLOCK_C + [0, BLOCK_C) of sample b, output positions
    p = jp·BLOCK_P + [0, BLOCK_P). When the block holds a kept channel (jc·BLOCK_C < count[b]) it accumulates
    acc[p, j] = Σ_k patch[p, k] · weight[perm[b, j], k] over k ∈ [0, Cin·KS·KS) in BLOCK_K steps (x patches
    gathered with the padding border masked, weight rows gathered through perm; fp32 accumulate), then applies
    bias, BN and ReLU; slots j ≥ count[b] (off channels) are stored as 0."""
    b = tl.program_id(0).to(tl.int64)
    jc = tl.program_id(1)
    jp = tl.program_id(2)
    PAD: tl.constexpr = KS // 2
    HW = H * W
    K = Cin * KS * KS
    cnt = tl.load(count_ptr + b)
    j = jc * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C] packed slots
    j_in = j < Cout
    ch = tl.load(perm_ptr + b * Cout + j, mask=j_in, other=0)  # [BLOCK_C] int64 real channels
    kept = j_in & (j < cnt)
    p = jp * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P]
    p_in = p < HW
    oh = p // W
    ow = p % W
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    if jc * BLOCK_C < cnt:  # the block holds kept channels: run the GEMM
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
            k_in = k < K
            ci = k // (KS * KS)
            r = k % (KS * KS)
            kh = r // KS
            kw = r % KS
            ih = oh[:, None] + kh[None, :] - PAD  # [BLOCK_P, BLOCK_K]
            iw = ow[:, None] + kw[None, :] - PAD
            xm = p_in[:, None] & k_in[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_off = ((b * Cin + ci[None, :].to(tl.int64)) * H + ih.to(tl.int64)) * W + iw.to(tl.int64)
            a = tl.load(x_ptr + x_off, mask=xm, other=0.0).to(tl.float32)  # [BLOCK_P, BLOCK_K]
            w_off = ch[None, :] * K + k[:, None].to(tl.int64)  # [BLOCK_K, BLOCK_C]
            wt = tl.load(w_ptr + w_off, mask=k_in[:, None] & kept[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(a, wt, acc, input_precision=PRECISION, out_dtype=tl.float32)  # [BLOCK_P, BLOCK_C]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=kept, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    scale = tl.load(scale_ptr + ch, mask=kept, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + ch, mask=kept, other=0.0).to(tl.float32)
    y = tl.maximum(acc * scale[None, :] + shift[None, :], 0.0)
    y = tl.where(kept[None, :], y, 0.0)
    o_off = (b * Cout + ch[None, :]) * HW + p[:, None].to(tl.int64)  # [BLOCK_P, BLOCK_C]
    tl.store(out_ptr + o_off, y.to(out_ptr.dtype.element_ty), mask=p_in[:, None] & j_in[None, :])


def gated_conv_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_scale: Tensor, bn_shift: Tensor,
                       keep: Tensor, *, out: Optional[Tensor] = None, block_p: int = 64, block_c: int = 32,
                       block_k: int = 32) -> Tensor:
    """Launch: compact the gate per sample on the device, then one program per (sample, packed channel block,
    position block). `out` lets a test pass a poisoned buffer (every element is written)."""
    batch, cin, h, w = x.shape
    cout, ks = weight.shape[0], weight.shape[-1]
    y = _empty((batch, cout, h, w), x.dtype, x.device) if out is None else out
    if y.numel() == 0:
        return y
    perm, count = compact_groups_forward(keep.contiguous())  # [B, Cout], [B]
    x = x.contiguous()
    w2 = weight.reshape(cout, cin * ks * ks).contiguous()  # [Cout, Cin·KS·KS]
    scale = bn_scale.contiguous()
    shift = bn_shift.contiguous()
    b_arg = bias.contiguous() if bias is not None else scale  # any pointer; unread without HAS_BIAS
    block_p = max(16, min(block_p, triton.next_power_of_2(h * w)))
    block_c = max(16, min(block_c, triton.next_power_of_2(cout)))
    block_k = max(16, min(block_k, triton.next_power_of_2(cin * ks * ks)))
    grid = (batch, triton.cdiv(cout, block_c), triton.cdiv(h * w, block_p))
    _gated_conv_kernel[grid](
        x, w2, b_arg, scale, shift, perm, count, y, cin, cout, h, w,
        KS=ks, HAS_BIAS=bias is not None,
        PRECISION="ieee" if x.dtype == torch.float32 and weight.dtype == torch.float32 else None,
        BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_K=block_k,
    )
    return y


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_scale: Tensor, bn_shift: Tensor,
           keep: Tensor) -> None:
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"gated_conv_bn_relu: x [B, Cin, H, W] and weight [Cout, Cin, k, k], got "
                         f"{list(x.shape)} and {list(weight.shape)}")
    cout, cin, kh, kw = weight.shape
    if kh != kw or kh not in (1, 3) or cin != x.shape[1]:
        raise ValueError(f"gated_conv_bn_relu: weight must be [Cout, {x.shape[1]}, 3, 3] or [Cout, {x.shape[1]}, "
                         f"1, 1], got {list(weight.shape)}")
    for name, t in (("bias", bias), ("bn_scale", bn_scale), ("bn_shift", bn_shift)):
        if t is not None and tuple(t.shape) != (cout,):
            raise ValueError(f"gated_conv_bn_relu: {name} must be [{cout}], got {list(t.shape)}")
    if keep.dtype != torch.bool or tuple(keep.shape) != (x.shape[0], cout):
        raise ValueError(f"gated_conv_bn_relu: keep must be bool [{x.shape[0]}, {cout}], got {keep.dtype} "
                         f"{list(keep.shape)}")


@torch.library.custom_op("routec::gated_conv_bn_relu", mutates_args=())
def _gated_conv_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_scale: Tensor, bn_shift: Tensor,
                   keep: Tensor) -> Tensor:
    _check(x, weight, bias, bn_scale, bn_shift, keep)
    if use_triton(x, weight, bias, bn_scale, bn_shift, keep):
        return gated_conv_forward(x, weight, bias, bn_scale, bn_shift, keep)
    with torch.no_grad():
        return gated_conv_bn_relu_reference(x, weight, bias, bn_scale, bn_shift, keep)


@_gated_conv_op.register_fake
def _(x, weight, bias, bn_scale, bn_shift, keep):
    _check(x, weight, bias, bn_scale, bn_shift, keep)
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*[t if t is not None else torch.empty(0) for t in inputs])
    ctx.has_bias = inputs[2] is not None


def _backward(ctx, grad):
    # Through the reference (a documented choice: the compiler runs this op in eval only; a backward exists so
    # that a user differentiating through an eval model still gets exact gradients of the gated output).
    x, weight, bias, scale, shift, keep = ctx.saved_tensors
    bias_t: Optional[Tensor] = bias if ctx.has_bias else None

    def fn(x_, w_, s_, h_, *rest):
        return gated_conv_bn_relu_reference(x_, w_, rest[0] if rest else None, s_, h_, keep)

    ins = (x, weight, scale, shift) + ((bias_t,) if bias_t is not None else ())
    gx, gw, gs, gh, *gb = reference_vjp(fn, ins, (grad,))
    return gx, gw, (gb[0] if gb else None), gs, gh, None


_gated_conv_op.register_autograd(_backward, setup_context=_setup)


def gated_conv_bn_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_scale: Tensor, bn_shift: Tensor,
                       keep: Tensor) -> Tensor:
    """keep ? relu((conv(x) + bias) · bn_scale + bn_shift) : 0, per sample and output channel, computing only
    the kept channels (see the module docstring). x [B, Cin, H, W] → [B, Cout, H, W]."""
    return torch.ops.routec.gated_conv_bn_relu(x, weight, bias, bn_scale, bn_shift, keep)


@recorded
class GatedConvBlock(nn.Module):
    """`relu(bn(conv(x))) * mask` with a 0/1 mask [B, Cout, 1, 1] (compiler/passes/channel_gate.py builds it).

    Holds plain references to the graph's own `conv` and `bn` (not submodules: their parameters keep their
    names in the model's state_dict). While this block or the BN is in training mode it runs the original dense
    ops (BN's batch statistics must see the dense output); in eval it calls `gated_conv_bn_relu` with
    keep = mask ≠ 0 and BN folded into a per-channel affine map, so the off filters are not computed."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.__dict__["conv"] = conv  # a plain attribute: not registered a second time
        self.__dict__["bn"] = bn

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        conv: nn.Conv2d = self.__dict__["conv"]
        bn: nn.BatchNorm2d = self.__dict__["bn"]
        if self.training or bn.training or not bn.track_running_stats or bn.running_var is None:
            return F.relu(bn(conv(x))) * mask
        assert bn.running_mean is not None
        inv = torch.rsqrt(bn.running_var.float() + bn.eps)
        scale = inv if bn.weight is None else bn.weight.float() * inv
        shift = -bn.running_mean.float() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.float()
        batch, cout = x.shape[0], conv.out_channels
        keep = (mask != 0).expand(batch, cout, 1, 1).reshape(batch, cout)
        y = gated_conv_bn_relu(x, conv.weight, conv.bias, scale, shift, keep)
        return y.to(torch.result_type(y, mask))
