"""Image layers for CNN backbones (Dynamic Perceiver, FTWT, AFA's U-Nets): batch norm, pooling.

Torch's own modules with their parameter names; shapes are [B, C, H, W] (or [B, C] / [B, C, L] for
BatchNorm1d). Merged into `LAYERS` by the package.
"""

from __future__ import annotations

from torch import nn

from ...codegen.ctor import construct
from .registry import LayerDef, Param, Shape, ShapeResult, conv_length, render_shape


def _channels(name: str, ranks: tuple[int, ...], layout: str):
    def rule(kw: dict, shapes: list[Shape]) -> ShapeResult:
        (x,) = shapes
        if len(x) not in ranks:
            return f"`{name}` expects {layout}, got {render_shape(x)}"
        c = x[1]
        if isinstance(c, int) and c != kw["channels"]:
            return f"`{name}({kw['channels']})` expects {kw['channels']} channels in dimension 1, got {render_shape(x)}"
        return x

    return rule


def _pool(name: str):
    def rule(kw: dict, shapes: list[Shape]) -> ShapeResult:
        (x,) = shapes
        if len(x) != 4:
            return f"`{name}` expects [B, C, H, W], got {render_shape(x)}"
        stride = kw["stride"] or kw["kernel"]
        return x[:2] + tuple(conv_length(s, kw["kernel"], stride, kw["padding"]) for s in x[2:])

    return rule


def _adaptive(kw: dict, shapes: list[Shape]) -> ShapeResult:
    (x,) = shapes
    if len(x) != 4:
        return f"`AdaptiveAvgPool2d` expects [B, C, H, W], got {render_shape(x)}"
    return x[:2] + (kw["size"], kw["size"])


def _triple(v) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v, v)


def _conv3d(kw: dict, shapes: list[Shape]) -> ShapeResult:
    (x,) = shapes
    if len(x) != 5:
        return f"`Conv3d` expects [B, C, T, H, W], got {render_shape(x)}"
    if isinstance(x[1], int) and x[1] != kw["in_channels"]:
        return f"`Conv3d({kw['in_channels']}, …)` expects {kw['in_channels']} channels in dimension 1, got {render_shape(x)}"
    k, s, p = _triple(kw["kernel"]), _triple(kw["stride"]), _triple(kw["padding"])
    if len(k) != 3 or len(s) != 3 or len(p) != 3 or not all(isinstance(v, int) for v in k + s + p):
        return "`Conv3d` kernel, stride and padding are ints or three ints each"
    return (x[0], kw["out_channels"]) + tuple(conv_length(n, k[i], s[i], p[i]) for i, n in enumerate(x[2:]))


_POOL_PARAMS = (Param("kernel", "int"), Param("stride", "int", 0, "0: the kernel size"), Param("padding", "int", 0))

VISION_LAYERS = (
    LayerDef("BatchNorm2d", (Param("channels", "int"), Param("eps", "float", 1e-5), Param("momentum", "float", 0.1)),
             lambda channels, eps, momentum: construct(nn.BatchNorm2d, channels, eps=eps, momentum=momentum),
             _channels("BatchNorm2d", (4,), "[B, C, H, W]"),
             "batch normalisation over [B, C, H, W] (running statistics in eval)"),
    LayerDef("BatchNorm1d", (Param("channels", "int"), Param("eps", "float", 1e-5), Param("momentum", "float", 0.1)),
             lambda channels, eps, momentum: construct(nn.BatchNorm1d, channels, eps=eps, momentum=momentum),
             _channels("BatchNorm1d", (2, 3), "[B, C] or [B, C, L]"),
             "batch normalisation over [B, C] or [B, C, L]"),
    LayerDef("Conv3d", (Param("in_channels", "int"), Param("out_channels", "int"), Param("kernel", "any"),
                        Param("stride", "any", 1), Param("padding", "any", 0), Param("bias", "bool", True)),
             lambda in_channels, out_channels, kernel, stride, padding, bias: construct(
                 nn.Conv3d, in_channels, out_channels, _triple(kernel), stride=_triple(stride),
                 padding=_triple(padding), bias=bias),
             _conv3d, "3-d convolution (video tubelets): [B, C, T, H, W] → [B, C', T', H', W']"),
    LayerDef("GroupNorm", (Param("groups", "int"), Param("channels", "int"), Param("eps", "float", 1e-5)),
             lambda groups, channels, eps: construct(nn.GroupNorm, groups, channels, eps=eps),
             _channels("GroupNorm", (2, 3, 4, 5), "[B, C, …]"),
             "group normalisation over channels (dimension 1) in groups: [B, C, …] → [B, C, …]"),
    LayerDef("MaxPool2d", _POOL_PARAMS,
             lambda kernel, stride, padding: construct(nn.MaxPool2d, kernel, stride or kernel, padding),
             _pool("MaxPool2d"), "max pooling: [B, C, H, W] → [B, C, H', W']"),
    LayerDef("AvgPool2d", _POOL_PARAMS,
             lambda kernel, stride, padding: construct(nn.AvgPool2d, kernel, stride or kernel, padding),
             _pool("AvgPool2d"), "average pooling: [B, C, H, W] → [B, C, H', W']"),
    LayerDef("AdaptiveAvgPool2d", (Param("size", "int", 1),),
             lambda size: construct(nn.AdaptiveAvgPool2d, size), _adaptive,
             "average pooling to a fixed size: [B, C, H, W] → [B, C, size, size]"),
)
