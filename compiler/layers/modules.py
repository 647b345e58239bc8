"""Layers with parameters or state (`LAYERS`): the nn.Modules a `.route` call like `Linear(d, 3)` builds.

PyTorch semantics and parameter names throughout (so `state_dict`s load), channels-last `[B, L, C]` for
sequence layers, `[B, C, H, W]` for image layers. Each `LayerDef` pairs a module factory with a shape rule.
"""

from __future__ import annotations

from torch import nn

from ...codegen.ctor import construct
from ...codegen.layers import (
    ACTIVATIONS,
    CausalConv1d,
    Conv1d,
    CrossAttention,
    LSTMCell,
    MLP,
    MambaMixer,
    PatchEmbed,
    PosEmbed,
    SelfAttention,
    TransformerBlock,
)
from .registry import (
    UNKNOWN,
    LayerDef,
    Param,
    Ref,
    Shape,
    ShapeResult,
    conv_length,
    differ,
    product,
    render_call,
    render_shape,
)


def _rank_error(defn: LayerDef, kw: dict, shape: Shape, rank: int, layout: str) -> str | None:
    if len(shape) != rank:
        return f"`{render_call(defn, kw)}` expects a {rank}-d input {layout}, got {render_shape(shape)}"
    return None


def _last_dim_error(defn: LayerDef, kw: dict, shape: Shape, want, shown: int = 1, what: str = "") -> str | None:
    if not shape:
        return f"`{render_call(defn, kw, shown)}` expects{what} an input with at least one dimension, got []"
    if differ(shape[-1], want):
        return (
            f"`{render_call(defn, kw, shown)}` expects{what} the last dimension to be {want}, "
            f"got {render_shape(shape)}"
        )
    return None


def _positive(defn: LayerDef, kw: dict, *names: str) -> str | None:
    for name in names:
        if kw[name] < 1:
            return f"`{defn.name}` argument `{name}` must be at least 1, got {kw[name]}"
    return None


def _heads_error(defn: LayerDef, kw: dict) -> str | None:
    if kw["heads"] < 1 or kw["d"] % kw["heads"]:
        return f"`{render_call(defn, kw, 2)}` needs d divisible by heads, got d={kw['d']} and heads={kw['heads']}"
    return None


def _linear(kw: dict, shapes: list[Shape]) -> ShapeResult:
    (x,) = shapes
    err = _positive(LINEAR, kw, "in_features", "out_features") or _last_dim_error(LINEAR, kw, x, kw["in_features"])
    return err or x[:-1] + (kw["out_features"],)


def _groups_error(defn: LayerDef, kw: dict) -> str | None:
    c_in, c_out, g = kw["in_channels"], kw["out_channels"], kw["groups"]
    if g < 1 or c_in % g or c_out % g:
        return (
            f"`{defn.name}` needs in_channels and out_channels divisible by groups, "
            f"got {c_in}, {c_out} and groups={g}"
        )
    return None


def _conv_error(defn: LayerDef, kw: dict, out, axis: int, shape: Shape) -> str | None:
    if isinstance(out, int) and out < 1:
        return (
            f"`{render_call(defn, kw)}` needs dimension {axis} to be at least {kw['kernel'] - 2 * kw['padding']} "
            f"for kernel {kw['kernel']} and padding {kw['padding']}, got {render_shape(shape)}"
        )
    return None


def _conv1d(kw: dict, shapes: list[Shape]) -> ShapeResult:
    (x,) = shapes
    err = _positive(CONV1D, kw, "in_channels", "out_channels", "kernel", "stride") or _groups_error(CONV1D, kw)
    err = err or _rank_error(CONV1D, kw, x, 3, "[B, L, C] (channels last)")
    err = err or _last_dim_error(CONV1D, kw, x, kw["in_channels"])
    if err:
        return err
    length = conv_length(x[1], kw["kernel"], kw["stride"], kw["padding"])
    return _conv_error(CONV1D, kw, length, 1, x) or (x[0], length, kw["out_channels"])


def _causal_conv1d(kw: dict, shapes: list[Shape]) -> ShapeResult:
    (x,) = shapes
    err = _positive(CAUSAL_CONV1D, kw, "channels", "kernel")
    err = err or _rank_error(CAUSAL_CONV1D, kw, x, 3, "[B, L, C] (channels last)")
    return err or _last_dim_error(CAUSAL_CONV1D, kw, x, kw["channels"]) or x


def _conv2d(kw: dict, shapes: list[Shape]) -> ShapeResult:
    (x,) = shapes
    err = _positive(CONV2D, kw, "in_channels", "out_channels", "kernel", "stride") or _groups_error(CONV2D, kw)
    err = err or _rank_error(CONV2D, kw, x, 4, "[B, C, H, W]")
    if err:
        return err
    if differ(x[1], kw["in_channels"]):
        return (
            f"`{render_call(CONV2D, kw)}` expects dimension 1 (channels) to be {kw['in_channels']}, "
            f"got {render_shape(x)}"
        )
    h, w = (conv_length(s, kw["kernel"], kw["stride"], kw["padding"]) for s in x[2:])
    err = _conv_error(CONV2D, kw, h, 2, x) or _conv_error(CONV2D, kw, w, 3, x)
    return err or (x[0], kw["out_channels"], h, w)


def _norm(defn_name: str):
    def rule(kw: dict, shapes: list[Shape]) -> ShapeResult:
        (x,) = shapes
        defn = LAYERS[defn_name]
        return _positive(defn, kw, "d") or _last_dim_error(defn, kw, x, kw["d"]) or x

    return rule


def _embedding(kw: dict, shapes: list[Shape]) -> ShapeResult:
    (ids,) = shapes
    return _positive(EMBEDDING, kw, "num", "d") or ids + (kw["d"],)


def _patch_embed(kw: dict, shapes: list[Shape]) -> ShapeResult:
    (x,) = shapes
    err = _positive(PATCH_EMBED, kw, "in_channels", "d", "patch", "stride")
    err = err or _rank_error(PATCH_EMBED, kw, x, 4, "[B, C, H, W]")
    if err:
        return err
    if differ(x[1], kw["in_channels"]):
        return (
            f"`{render_call(PATCH_EMBED, kw)}` expects dimension 1 (channels) to be {kw['in_channels']}, "
            f"got {render_shape(x)}"
        )
    grid = [conv_length(s, kw["patch"], kw["stride"], 0) for s in x[2:]]
    for size in grid:
        if isinstance(size, int) and size < 1:
            return (
                f"`{render_call(PATCH_EMBED, kw)}` needs an image of at least {kw['patch']}×{kw['patch']} "
                f"for patch={kw['patch']}, got {render_shape(x)}"
            )
    return (x[0], product(grid), kw["d"])


def _pos_embed(kw: dict, shapes: list[Shape]) -> ShapeResult:
    (x,) = shapes
    if kw["kind"] not in ("learned", "sincos"):
        return f'`PosEmbed` argument `kind` must be "learned" or "sincos", got "{kw["kind"]}"'
    if kw["kind"] == "learned" and kw["length"] < 1:
        hint = f"length={x[1]} for {render_shape(x)}, " if len(x) == 3 and isinstance(x[1], int) else "`length`, "
        return f'`{render_call(POS_EMBED, kw)}` needs {hint}the number of learned positions (or kind="sincos")'
    err = _rank_error(POS_EMBED, kw, x, 3, "[B, L, d]") or _last_dim_error(POS_EMBED, kw, x, kw["d"])
    if err:
        return err
    if kw["kind"] == "learned" and isinstance(x[1], int) and x[1] > kw["length"]:
        return (
            f"`{render_call(POS_EMBED, kw, 2)}` has positions for {kw['length']} tokens, "
            f"got {render_shape(x)}"
        )
    return x


def _self_attention(defn_name: str):
    def rule(kw: dict, shapes: list[Shape]) -> ShapeResult:
        (x,) = shapes
        defn = LAYERS[defn_name]
        err = _heads_error(defn, kw)
        if err is None and len(x) < 2:
            err = f"`{render_call(defn, kw)}` expects a sequence [B, L, d], got {render_shape(x)}"
        return err or _last_dim_error(defn, kw, x, kw["d"]) or x

    return rule


def _cross_attention(kw: dict, shapes: list[Shape]) -> ShapeResult:
    x, context = shapes
    err = _heads_error(CROSS_ATTENTION, kw)
    err = err or _rank_error(CROSS_ATTENTION, kw, x, 3, "[B, Lq, d] as queries")
    err = err or _rank_error(CROSS_ATTENTION, kw, context, 3, "[B, Lk, kv_dim] as context")
    err = err or _last_dim_error(CROSS_ATTENTION, kw, x, kw["d"], what=" of the queries")
    if err:
        return err
    if differ(context[-1], kw["kv_dim"]):
        return (
            f"`{render_call(CROSS_ATTENTION, kw, 3)}` expects the context's last dimension to be "
            f"{kw['kv_dim']}, got {render_shape(context)}"
        )
    if differ(x[0], context[0]):
        return (
            f"`{render_call(CROSS_ATTENTION, kw)}` needs queries and context with the same batch size, "
            f"got {render_shape(x)} and {render_shape(context)}"
        )
    return x


def _mlp(kw: dict, shapes: list[Shape]) -> ShapeResult:
    (x,) = shapes
    if kw["act"] not in ACTIVATIONS:
        return f"`MLP` argument `act` must be one of {', '.join(ACTIVATIONS)}, got \"{kw['act']}\""
    err = _positive(MLP_DEF, kw, "d", "hidden", "out") or _last_dim_error(MLP_DEF, kw, x, kw["d"])
    return err or x[:-1] + (kw["out"],)


def _transformer_block(kw: dict, shapes: list[Shape]) -> ShapeResult:
    (x,) = shapes
    if kw["act"] not in ACTIVATIONS:
        return f"`TransformerBlock` argument `act` must be one of {', '.join(ACTIVATIONS)}, got \"{kw['act']}\""
    err = _heads_error(TRANSFORMER_BLOCK, kw) or _last_dim_error(TRANSFORMER_BLOCK, kw, x, kw["d"])
    return err or x


def _cell(defn_name: str, outputs: int):
    """x [B, input] or [input], states [B, hidden] → the new state(s)."""

    def rule(kw: dict, shapes: list[Shape]) -> ShapeResult:
        defn = LAYERS[defn_name]
        x, states = shapes[0], shapes[1:]
        if len(x) not in (1, 2):
            return f"`{render_call(defn, kw)}` expects an input [B, input] or [input], got {render_shape(x)}"
        err = _last_dim_error(defn, kw, x, kw["input"])
        if err:
            return err
        out = x[:-1] + (kw["hidden"],)
        for state in states:
            if len(state) != len(x) or differ(state[-1], kw["hidden"]) or (len(x) == 2 and differ(state[0], x[0])):
                return (
                    f"`{render_call(defn, kw, 2)}` expects a state {render_shape(out)} for input "
                    f"{render_shape(x)}, got {render_shape(state)}"
                )
        return [out] * outputs if outputs > 1 else out

    return rule


def _same_shape(kw: dict, shapes: list[Shape]) -> ShapeResult:
    return shapes[0]


def _dropout(kw: dict, shapes: list[Shape]) -> ShapeResult:
    if not 0.0 <= kw["p"] <= 1.0:
        return f"`Dropout` argument `p` must be between 0 and 1, got {kw['p']}"
    return shapes[0]


def _mamba(kw: dict, shapes: list[Shape]) -> ShapeResult:
    (x,) = shapes
    err = _positive(MAMBA, kw, "d", "inner", "state", "conv")
    if err is None and kw["dt_rank"] < 0:
        err = f"`MambaMixer` argument `dt_rank` must be at least 0 (0: ceil(d / 16)), got {kw['dt_rank']}"
    err = err or _rank_error(MAMBA, kw, x, 3, "[B, L, d]") or _last_dim_error(MAMBA, kw, x, kw["d"])
    return err or x


_BIAS = Param("bias", "bool", True, "learn an additive bias")

LINEAR = LayerDef(
    "Linear",
    (Param("in_features", "int"), Param("out_features", "int"), _BIAS),
    lambda in_features, out_features, bias: construct(nn.Linear, in_features, out_features, bias=bias),
    _linear,
    "y = x Wᵀ + b on the last dimension: [..., in_features] → [..., out_features]",
)
CONV1D = LayerDef(
    "Conv1d",
    (
        Param("in_channels", "int"),
        Param("out_channels", "int"),
        Param("kernel", "int"),
        Param("stride", "int", 1),
        Param("padding", "int", 0),
        Param("groups", "int", 1),
        _BIAS,
    ),
    lambda in_channels, out_channels, kernel, stride, padding, groups, bias: construct(
        Conv1d, in_channels, out_channels, kernel, stride=stride, padding=padding, groups=groups, bias=bias
    ),
    _conv1d,
    "1-d convolution over the sequence, channels last: [B, L, in_channels] → [B, L', out_channels]",
)
CAUSAL_CONV1D = LayerDef(
    "CausalConv1d",
    (Param("channels", "int"), Param("kernel", "int", 4), _BIAS),
    CausalConv1d,
    _causal_conv1d,
    "depthwise causal convolution (each step sees the previous kernel - 1 steps): [B, L, C] → [B, L, C]",
)
CONV2D = LayerDef(
    "Conv2d",
    CONV1D.params,
    lambda in_channels, out_channels, kernel, stride, padding, groups, bias: construct(
        nn.Conv2d, in_channels, out_channels, kernel, stride=stride, padding=padding, groups=groups, bias=bias
    ),
    _conv2d,
    "2-d convolution: [B, in_channels, H, W] → [B, out_channels, H', W']",
)
EMBEDDING = LayerDef(
    "Embedding",
    (Param("num", "int", doc="vocabulary size"), Param("d", "int")),
    lambda num, d: construct(nn.Embedding, num, d),
    _embedding,
    "a learned vector per integer id: [...] long → [..., d]",
)
PATCH_EMBED = LayerDef(
    "PatchEmbed",
    (
        Param("in_channels", "int"),
        Param("d", "int"),
        Param("patch", "int", 16),
        Param("stride", "int", Ref("patch"), "patch step (overlapping patches when < patch)"),
    ),
    PatchEmbed,
    _patch_embed,
    "image to patch tokens by a strided convolution: [B, C, H, W] → [B, N, d]",
)
POS_EMBED = LayerDef(
    "PosEmbed",
    (
        Param("d", "int"),
        Param("length", "int", 0, "number of learned positions (needed unless kind is sincos)"),
        Param("kind", "str", "learned", '"learned" or "sincos"'),
    ),
    PosEmbed,
    _pos_embed,
    "adds a learned (or fixed sinusoidal) position embedding: [B, L, d] → [B, L, d]",
)
_ATTENTION_PARAMS = (
    Param("d", "int"),
    Param("heads", "int"),
    Param("causal", "bool", False),
    _BIAS,
    Param("dropout", "float", 0.0, "attention dropout in training"),
)
CROSS_ATTENTION = LayerDef(
    "CrossAttention",
    (Param("d", "int"), Param("heads", "int"), Param("kv_dim", "int", Ref("d")), _BIAS),
    CrossAttention,
    _cross_attention,
    "multi-head attention of queries [B, Lq, d] over a context [B, Lk, kv_dim] → [B, Lq, d]",
    arity=2,
)
MLP_DEF = LayerDef(
    "MLP",
    (
        Param("d", "int"),
        Param("hidden", "int"),
        Param("out", "int", Ref("d")),
        Param("act", "str", "gelu", ", ".join(ACTIVATIONS)),
        _BIAS,
    ),
    MLP,
    _mlp,
    "two-layer perceptron fc1 → act → fc2: [..., d] → [..., out]",
)
TRANSFORMER_BLOCK = LayerDef(
    "TransformerBlock",
    (
        Param("d", "int"),
        Param("heads", "int"),
        Param("hidden", "int", 0, "MLP width (0: 4 * d)"),
        Param("causal", "bool", False),
        Param("dropout", "float", 0.0),
        Param("act", "str", "gelu"),
    ),
    TransformerBlock,
    _transformer_block,
    "pre-norm Transformer block (self-attention and MLP, each residual): [B, L, d] → [B, L, d]",
)
_CELL_PARAMS = (Param("input", "int"), Param("hidden", "int"))
MAMBA = LayerDef(
    "MambaMixer",
    (
        Param("d", "int"),
        Param("inner", "int", doc="expanded width, usually 2 * d"),
        Param("state", "int", 16, "SSM state size N"),
        Param("conv", "int", 4, "causal convolution width"),
        Param("dt_rank", "int", 0, "rank of the step-size projection (0: ceil(d / 16))"),
    ),
    MambaMixer,
    _mamba,
    "the Mamba-1 selective-state-space mixer: [B, L, d] → [B, L, d]",
)

LAYERS: dict[str, LayerDef] = {
    defn.name: defn
    for defn in (
        LINEAR,
        CONV1D,
        CAUSAL_CONV1D,
        CONV2D,
        LayerDef(
            "LayerNorm",
            (Param("d", "int"), Param("eps", "float", 1e-5), _BIAS),
            lambda d, eps, bias: construct(nn.LayerNorm, d, eps=eps, bias=bias),
            _norm("LayerNorm"),
            "layer normalisation over the last dimension: [..., d] → [..., d]",
        ),
        LayerDef(
            "RMSNorm",
            (Param("d", "int"), Param("eps", "float", 1e-6)),
            lambda d, eps: construct(nn.RMSNorm, d, eps=eps),
            _norm("RMSNorm"),
            "root-mean-square normalisation over the last dimension: [..., d] → [..., d]",
        ),
        EMBEDDING,
        PATCH_EMBED,
        POS_EMBED,
        LayerDef(
            "SelfAttention",
            _ATTENTION_PARAMS,
            SelfAttention,
            _self_attention("SelfAttention"),
            "multi-head self-attention (q, k, v, o projections): [B, L, d] → [B, L, d]",
        ),
        LayerDef(
            "MultiheadAttention",
            _ATTENTION_PARAMS,
            SelfAttention,
            _self_attention("MultiheadAttention"),
            "another name for SelfAttention: [B, L, d] → [B, L, d]",
        ),
        CROSS_ATTENTION,
        MLP_DEF,
        TRANSFORMER_BLOCK,
        LayerDef(
            "GRUCell",
            _CELL_PARAMS,
            lambda input, hidden: construct(nn.GRUCell, input, hidden),
            _cell("GRUCell", 1),
            "one GRU step: (x [B, input], h [B, hidden]) → h [B, hidden]; h defaults to zeros",
            arity=2,
            min_arity=1,
        ),
        LayerDef(
            "LSTMCell",
            _CELL_PARAMS,
            lambda input, hidden: LSTMCell(input, hidden),
            _cell("LSTMCell", 2),
            "one LSTM step: (x [B, input], h, c [B, hidden]) → (h, c); states default to zeros",
            arity=3,
            min_arity=1,
        ),
        LayerDef(
            "Dropout",
            (Param("p", "float", doc="probability of zeroing an element in training"),),
            lambda p: construct(nn.Dropout, p),
            _dropout,
            "zeroes elements with probability p in training (scaling the rest by 1 / (1 - p)); identity in eval",
        ),
        LayerDef("Identity", (), lambda: construct(nn.Identity), _same_shape, "returns its input"),
        MAMBA,
    )
}
