"""compiler.layers and codegen.layers/mamba: the layer/function registry, shape rules, messages, and the modules
against independent hand-written formulas (loops, explicit softmax attention, the Mamba recurrence)."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from routec.compiler.layers import (
    FUNCS,
    LAYERS,
    REQUIRED,
    Ref,
    bind_args,
    render_shape,
    token_shuffle,
    token_unshuffle,
)
from routec.codegen.mamba import MambaMixer


def _concrete(shape):
    """Sizes for symbolic dims; expressions such as `L - 1` are evaluated with them."""
    sizes = {"B": 2, "T": 5, "L": 5, "H": 8, "W": 8}
    return tuple(d if isinstance(d, int) else eval(d, {}, sizes) for d in shape)


# (layer, args, kwargs, input shapes, expected output shape with B=2, L=T=5; H=W=8 for images)
LAYER_CASES = [
    ("Linear", [8, 16], {}, [("B", "T", 8)], ("B", "T", 16)),
    ("Linear", [8, 3], {"bias": False}, [(8,)], (3,)),
    ("Conv1d", [6, 4, 3], {}, [("B", 7, 6)], ("B", 5, 4)),
    ("Conv1d", [6, 4, 3], {"stride": 2, "padding": 1, "groups": 2}, [("B", 7, 6)], ("B", 4, 4)),
    ("Conv1d", [6, 4, 3], {"padding": 1}, [("B", "L", 6)], ("B", "L", 4)),
    ("Conv1d", [6, 4, 2], {}, [("B", "L", 6)], ("B", "L - 1", 4)),
    ("CausalConv1d", [6], {}, [("B", "L", 6)], ("B", "L", 6)),
    ("Conv2d", [3, 5, 3], {"padding": 1}, [("B", 3, "H", "W")], ("B", 5, "H", "W")),
    ("Conv2d", [3, 5, 3], {"stride": 2}, [("B", 3, 9, 7)], ("B", 5, 4, 3)),
    ("LayerNorm", [8], {}, [("B", "T", 8)], ("B", "T", 8)),
    ("LayerNorm", [8], {"bias": False}, [("B", 8)], ("B", 8)),
    ("RMSNorm", [8], {}, [("B", "T", 8)], ("B", "T", 8)),
    ("Embedding", [11, 8], {}, [("B", "T")], ("B", "T", 8)),
    ("PatchEmbed", [3, 8], {"patch": 4}, [("B", 3, 8, 12)], ("B", 6, 8)),
    ("PatchEmbed", [3, 8], {"patch": 4, "stride": 2}, [("B", 3, 8, 8)], ("B", 9, 8)),
    ("PosEmbed", [8], {"length": 6}, [("B", "T", 8)], ("B", "T", 8)),
    ("PosEmbed", [7], {"kind": "sincos"}, [("B", "T", 7)], ("B", "T", 7)),
    ("SelfAttention", [8, 2], {"causal": True}, [("B", "T", 8)], ("B", "T", 8)),
    ("MultiheadAttention", [8, 4], {}, [("B", "T", 8)], ("B", "T", 8)),
    ("CrossAttention", [8, 2], {"kv_dim": 6}, [("B", "T", 8), ("B", 3, 6)], ("B", "T", 8)),
    ("MLP", [8, 32], {}, [("B", "T", 8)], ("B", "T", 8)),
    ("MLP", [8, 32], {"out": 3, "act": "silu", "bias": False}, [("B", 8)], ("B", 3)),
    ("TransformerBlock", [8], {"heads": 2}, [("B", "T", 8)], ("B", "T", 8)),
    ("GRUCell", [6, 8], {}, [("B", 6), ("B", 8)], ("B", 8)),
    ("GRUCell", [6, 8], {}, [("B", 6)], ("B", 8)),
    ("Dropout", [0.1], {}, [("B", "T", 8)], ("B", "T", 8)),
    ("Identity", [], {}, [("B", "T", 8)], ("B", "T", 8)),
    ("MambaMixer", [8, 16], {"state": 4}, [("B", "T", 8)], ("B", "T", 8)),
]


def _random_input(shape, layer):
    if layer == "Embedding":
        return torch.randint(0, 11, shape)
    return torch.randn(shape)


@pytest.mark.parametrize("name,args,kwargs,in_shapes,expected", LAYER_CASES)
def test_layer_builds_and_gives_the_documented_shape(name, args, kwargs, in_shapes, expected, monkeypatch):
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")
    defn = LAYERS[name]
    bound, errors = bind_args(defn, args, kwargs)
    assert errors == []
    assert defn.check(bound, in_shapes) is None
    assert defn.out_shape(bound, in_shapes) == expected
    module = defn.build(**bound).eval()
    inputs = [_random_input(_concrete(s), name) for s in in_shapes]
    y = module(*inputs)
    assert tuple(y.shape) == _concrete(expected)
    assert torch.isfinite(y.float()).all()


def test_lstm_cell_takes_separate_states_and_matches_torch():
    defn = LAYERS["LSTMCell"]
    kw, _ = bind_args(defn, [6, 8], {})
    assert defn.out_shape(kw, [("B", 6), ("B", 8), ("B", 8)]) == [("B", 8), ("B", 8)]
    cell = defn.build(**kw)
    x, h, c = torch.randn(3, 6), torch.randn(3, 8), torch.randn(3, 8)
    h1, c1 = cell(x, h, c)
    h2, c2 = torch.nn.LSTMCell.forward(cell, x, (h, c))
    torch.testing.assert_close(h1, h2)
    torch.testing.assert_close(c1, c2)
    h0, c0 = cell(x)
    h3, c3 = cell(x, torch.zeros(3, 8), torch.zeros(3, 8))
    torch.testing.assert_close(h0, h3)
    torch.testing.assert_close(c0, c3)


def test_state_dict_names_follow_pytorch():
    keys = {
        "Linear": ["weight", "bias"],
        "CausalConv1d": ["weight", "bias"],
        "PatchEmbed": ["proj.weight", "proj.bias"],
        "PosEmbed": ["weight"],
        "SelfAttention": [f"{p}.{w}" for p in "qkvo" for w in ("weight", "bias")],
        "MLP": ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"],
        "GRUCell": ["weight_ih", "weight_hh", "bias_ih", "bias_hh"],
    }
    args = {
        "Linear": [4, 4],
        "CausalConv1d": [4],
        "PatchEmbed": [3, 4],
        "PosEmbed": [4, 2],
        "SelfAttention": [4, 2],
        "MLP": [4, 8],
        "GRUCell": [4, 4],
    }
    for name, want in keys.items():
        kw, _ = bind_args(LAYERS[name], args[name], {})
        assert list(LAYERS[name].build(**kw).state_dict()) == want, name


def test_causal_conv1d_is_causal_and_matches_a_loop():
    conv = LAYERS["CausalConv1d"].build(channels=3, kernel=4).double()
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    y = conv(x)
    w, b = conv.weight[:, 0, :], conv.bias  # [C, K], [C]
    for t in range(9):
        expect = b.clone()
        for j in range(4):
            s = t - 3 + j
            if s >= 0:
                expect = expect + w[:, j] * x[:, s]
        torch.testing.assert_close(y[:, t], expect)
    for t in range(9):
        changed = x.clone()
        changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
        torch.testing.assert_close(conv(changed)[:, : t + 1], y[:, : t + 1], rtol=0, atol=0)


def test_conv1d_is_channels_last():
    conv = LAYERS["Conv1d"].build(in_channels=2, out_channels=3, kernel=2).double()
    x = torch.randn(1, 4, 2, dtype=torch.float64)  # [B, L, C]
    y = conv(x)
    for t in range(3):
        expect = conv.bias + sum(conv.weight[:, :, j] @ x[0, t + j] for j in range(2))
        torch.testing.assert_close(y[0, t], expect)


def test_rms_norm_matches_its_formula():
    norm = LAYERS["RMSNorm"].build(d=6, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    for b in range(2):
        for t in range(3):
            row = x[b, t].tolist()
            scale = 1 / math.sqrt(sum(v * v for v in row) / 6 + 1e-6)
            want = torch.tensor([v * scale for v in row], dtype=torch.float64) * norm.weight
            torch.testing.assert_close(norm(x)[b, t], want)


def test_patch_embed_orders_tokens_row_major():
    embed = LAYERS["PatchEmbed"].build(in_channels=2, d=3, patch=2).double()
    img = torch.randn(1, 2, 4, 6, dtype=torch.float64)  # a 2 x 3 grid of 2 x 2 patches
    tokens = embed(img)
    w, b = embed.proj.weight, embed.proj.bias  # [3, 2, 2, 2], [3]
    for row in range(2):
        for col in range(3):
            patch = img[0, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2]
            want = torch.stack([(w[k] * patch).sum() for k in range(3)]) + b
            torch.testing.assert_close(tokens[0, row * 3 + col], want)


def _attention_by_hand(q, k, v, heads, causal):
    """softmax(q kᵀ / √dh) v per head, with explicit loops over batch and heads."""
    batch, lq, d = q.shape
    dh = d // heads
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            cols = slice(h * dh, (h + 1) * dh)
            scores = q[b, :, cols] @ k[b, :, cols].T / math.sqrt(dh)  # [Lq, Lk]
            if causal:
                scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
            weights = scores.exp() / scores.exp().sum(-1, keepdim=True)
            out[b, :, cols] = weights @ v[b, :, cols]
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_equals_softmax_qk_v(causal):
    attn = LAYERS["SelfAttention"].build(d=8, heads=2, causal=causal).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    q, k, v = attn.q(x), attn.k(x), attn.v(x)
    expect = attn.o(_attention_by_hand(q, k, v, 2, causal))
    torch.testing.assert_close(attn(x), expect)


def test_cross_attention_equals_softmax_qk_v():
    attn = LAYERS["CrossAttention"].build(d=8, heads=4, kv_dim=6).double()
    x, ctx = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 7, 6, dtype=torch.float64)
    expect = attn.o(_attention_by_hand(attn.q(x), attn.k(ctx), attn.v(ctx), 4, False))
    torch.testing.assert_close(attn(x, ctx), expect)


def test_sincos_pos_embed_matches_the_formula():
    d, length = 7, 6
    embed = LAYERS["PosEmbed"].build(d=d, kind="sincos")
    assert list(embed.parameters()) == []
    x = torch.zeros(1, length, d, dtype=torch.float64)
    table = embed(x)[0]
    for pos in range(length):
        for i in range(d):
            angle = pos / 10000 ** ((i - i % 2) / d)
            want = math.sin(angle) if i % 2 == 0 else math.cos(angle)
            assert abs(table[pos, i].item() - want) < 1e-6


def test_learned_pos_embed_adds_the_first_rows():
    embed = LAYERS["PosEmbed"].build(d=4, length=6)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(embed(x), x + embed.weight[:3])


def _softplus(x):
    return torch.log1p(torch.exp(x))


def _mamba_by_loop(m, x):
    """The Mamba-1 mixer step by step from its equations (float64): causal depthwise conv, silu, projections,
    h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, y_t = C_t h_t + D u_t, gated by silu(z_t)."""
    batch, length, _ = x.shape
    inner, n, r = m.inner, m.state, m.dt_rank
    kernel = m.conv1d.weight.shape[-1]
    xz = x @ m.in_proj.weight.T  # [B, L, 2 inner]
    xs, z = xz[..., :inner], xz[..., inner:]
    A = -torch.exp(m.A_log)  # [inner, N]
    h = torch.zeros(batch, inner, n, dtype=x.dtype)
    outputs = []
    for t in range(length):
        c = m.conv1d.bias.expand(batch, inner).clone()
        for j in range(kernel):
            s = t - (kernel - 1) + j
            if s >= 0:
                c = c + m.conv1d.weight[:, 0, j] * xs[:, s]
        u = c * torch.sigmoid(c)  # [B, inner]
        proj = u @ m.x_proj.weight.T
        dt_low, Bt, Ct = proj[:, :r], proj[:, r : r + n], proj[:, r + n :]
        dt = _softplus(dt_low @ m.dt_proj.weight.T + m.dt_proj.bias)  # [B, inner]
        h = torch.exp(dt[:, :, None] * A) * h + dt[:, :, None] * Bt[:, None, :] * u[:, :, None]
        y = (h * Ct[:, None, :]).sum(-1) + m.D * u
        y = y * z[:, t] * torch.sigmoid(z[:, t])
        outputs.append(y @ m.out_proj.weight.T)
    return torch.stack(outputs, 1)


def test_mamba_mixer_equals_the_recurrence(monkeypatch):
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")
    torch.manual_seed(0)
    m = MambaMixer(8, 12, state=4, conv=3).double()
    assert m.dt_rank == 1
    x = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y, _mamba_by_loop(m, x))
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, m.A_log, m.dt_proj.bias, m.conv1d.weight], gy)
    want = torch.autograd.grad(_mamba_by_loop(m, x), [x, m.A_log, m.dt_proj.bias, m.conv1d.weight], gy)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


def test_mamba_mixer_parameters_use_mamba_names_shapes_and_init():
    m = MambaMixer(32, 64, state=16, conv=4)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "A_log": (64, 16),
        "D": (64,),
        "in_proj.weight": (128, 32),
        "conv1d.weight": (64, 1, 4),
        "conv1d.bias": (64,),
        "x_proj.weight": (2 + 32, 64),
        "dt_proj.weight": (64, 2),
        "dt_proj.bias": (64,),
        "out_proj.weight": (32, 64),
    }
    torch.testing.assert_close(m.A_log.exp()[5], torch.arange(1.0, 17.0))
    assert torch.equal(m.D, torch.ones(64))
    step = F.softplus(m.dt_proj.bias)
    assert step.min() >= 1e-4 and step.max() <= 0.1 + 1e-6
    assert m.dt_proj.weight.abs().max() <= 2**-0.5


def test_mamba_mixer_triton_scan_matches_reference(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(1)
    m = MambaMixer(4, 6, state=4, conv=2)
    x = torch.randn(1, 5, 4, requires_grad=True)
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")
    y_ref = m(x)
    (g_ref,) = torch.autograd.grad(y_ref.sum(), [x])
    monkeypatch.setenv("ROUTEC_BACKEND", "triton")
    y = m(x)
    (g,) = torch.autograd.grad(y.sum(), [x])
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_mamba_mixer_compiles_fullgraph(monkeypatch):
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")
    torch._dynamo.reset()
    m = MambaMixer(4, 6, state=2, conv=2)
    x = torch.randn(2, 3, 4)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), m(x))


@pytest.mark.parametrize(
    "name,args,kwargs,in_shapes,message",
    [
        ("Linear", [512, 10], {}, [("B", "T", 256)], "`Linear(512, …)` expects the last dimension to be 512, got [B, T, 256]"),
        ("Linear", [0, 10], {}, [("B", 4)], "`Linear` argument `in_features` must be at least 1, got 0"),
        ("Conv1d", [16, 8, 3], {}, [("B", 16)], "`Conv1d(16, …)` expects a 3-d input [B, L, C] (channels last), got [B, 16]"),
        ("Conv1d", [16, 8, 3], {}, [("B", "L", 8)], "`Conv1d(16, …)` expects the last dimension to be 16, got [B, L, 8]"),
        ("Conv1d", [16, 8, 5], {}, [("B", 3, 16)], "`Conv1d(16, …)` needs dimension 1 to be at least 5 for kernel 5 and padding 0, got [B, 3, 16]"),
        ("Conv1d", [6, 4, 3], {"groups": 4}, [("B", "L", 6)], "`Conv1d` needs in_channels and out_channels divisible by groups, got 6, 4 and groups=4"),
        ("Conv2d", [3, 8, 3], {}, [("B", 4, 32, 32)], "`Conv2d(3, …)` expects dimension 1 (channels) to be 3, got [B, 4, 32, 32]"),
        ("LayerNorm", [64], {}, [("B", "T", 32)], "`LayerNorm(64, …)` expects the last dimension to be 64, got [B, T, 32]"),
        ("PatchEmbed", [3, 64], {}, [("B", 3, 8, 8)], "`PatchEmbed(3, …)` needs an image of at least 16×16 for patch=16, got [B, 3, 8, 8]"),
        ("PosEmbed", [64], {}, [("B", "T", 64)], '`PosEmbed(64, …)` needs `length`, the number of learned positions (or kind="sincos")'),
        ("PosEmbed", [64], {}, [("B", 196, 64)], '`PosEmbed(64, …)` needs length=196 for [B, 196, 64], the number of learned positions (or kind="sincos")'),
        ("PosEmbed", [64, 16], {}, [("B", 32, 64)], "`PosEmbed(64, 16, …)` has positions for 16 tokens, got [B, 32, 64]"),
        ("SelfAttention", [64, 5], {}, [("B", "T", 64)], "`SelfAttention(64, 5, …)` needs d divisible by heads, got d=64 and heads=5"),
        ("CrossAttention", [64, 4], {}, [("B", "T", 64)], "`CrossAttention(64, …)` takes 2 inputs, got 1"),
        ("CrossAttention", [64, 4], {"kv_dim": 32}, [("B", "T", 64), ("B", "S", 64)], "`CrossAttention(64, 4, 32, …)` expects the context's last dimension to be 32, got [B, S, 64]"),
        ("MLP", [64, 256], {"act": "swish"}, [("B", 64)], '`MLP` argument `act` must be one of gelu, silu, relu, tanh, sigmoid, identity, got "swish"'),
        ("GRUCell", [6, 8], {}, [("B", 6), ("B", 4)], "`GRUCell(6, 8)` expects a state [B, 8] for input [B, 6], got [B, 4]"),
        ("Dropout", [1.5], {}, [("B", 4)], "`Dropout` argument `p` must be between 0 and 1, got 1.5"),
        ("MambaMixer", [64, 128], {}, [("B", "L", 32)], "`MambaMixer(64, …)` expects the last dimension to be 64, got [B, L, 32]"),
    ],
)
def test_check_messages(name, args, kwargs, in_shapes, message):
    defn = LAYERS[name]
    bound, errors = bind_args(defn, args, kwargs)
    assert errors == []
    assert defn.check(bound, in_shapes) == message


def test_symbolic_dims_are_never_assumed_different():
    assert LAYERS["Linear"].check({"in_features": 512, "out_features": 3}, [("B", "T", "d")]) is None
    conv = {"in_channels": 4, "out_channels": 4, "kernel": 3}
    assert LAYERS["Conv1d"].out_shape(conv, [("B", "L", 4)]) == ("B", "L - 2", 4)
    assert LAYERS["Conv1d"].out_shape({**conv, "padding": 2}, [("B", "L", 4)]) == ("B", "L + 2", 4)
    assert LAYERS["Conv1d"].out_shape({**conv, "stride": 2}, [("B", "L", 4)]) == ("B", "?", 4)


@pytest.mark.parametrize(
    "name,args,kwargs,errors",
    [
        ("Linear", [4], {"bais": False}, ["`Linear` has no argument `bais`; did you mean `bias`?", "`Linear` is missing argument `out_features`"]),
        ("Linear", [2.5, 3], {}, ["`Linear` argument `in_features` must be int, got float 2.5"]),
        ("Linear", [4, 3, True, 1], {}, ["`Linear` takes at most 3 arguments, got 4"]),
        ("Linear", [4, 3], {"in_features": 4}, ["`Linear` got argument `in_features` twice, by position and by name"]),
        ("LayerNorm", [8], {"zzz": 1}, ["`LayerNorm` has no argument `zzz`; it takes `d`, `eps`, `bias`"]),
        ("SelfAttention", [8, 2], {"causal": 1}, ["`SelfAttention` argument `causal` must be bool, got int 1"]),
        ("MLP", [8, 16], {"act": 3}, ["`MLP` argument `act` must be str, got int 3"]),
        ("Identity", [], {"x": 1}, ["`Identity` has no argument `x`; it takes no arguments"]),
        ("Identity", [1], {}, ["`Identity` takes no arguments, got 1"]),
    ],
)
def test_bind_args_errors(name, args, kwargs, errors):
    assert bind_args(LAYERS[name], args, kwargs)[1] == errors


def test_bind_args_fills_defaults_refs_and_widens_ints():
    assert bind_args(LAYERS["PatchEmbed"], [3, 64], {"patch": 8}) == (
        {"in_channels": 3, "d": 64, "patch": 8, "stride": 8},
        [],
    )
    assert bind_args(LAYERS["Dropout"], [0], {}) == ({"p": 0.0}, [])
    assert bind_args(LAYERS["MLP"], [8, 32], {"out": 4})[0]["out"] == 4
    assert bind_args(FUNCS["reshape"], ["B", -1, 4], {}) == ({"shape": ("B", -1, 4)}, [])
    assert bind_args(FUNCS["reshape"], [[2, 3]], {}) == ({"shape": (2, 3)}, [])
    assert bind_args(FUNCS["permute"], [0, "random"], {})[1] == ["`permute` argument `dims` must be ints, got list [0, \"random\"]"]
    assert bind_args(FUNCS["zeros"], [["B", 4]], {}) == ({"shape": ("B", 4)}, [])


def test_layer_build_rejects_bad_arguments():
    with pytest.raises(TypeError, match="missing argument `out_features`"):
        LAYERS["Linear"].build(in_features=3)


def test_render_shape():
    assert render_shape(("B", "T", 256)) == "[B, T, 256]"
    assert render_shape(()) == "[]"


# (function, args, kwargs, input shapes [symbolic], expected symbolic result)
FUNC_CASES = [
    ("gelu", [], {}, [("B", "T", 4)], ("B", "T", 4)),
    ("softmax", [], {}, [("B", 4)], ("B", 4)),
    ("log_softmax", [1], {}, [("B", 4, 3)], ("B", 4, 3)),
    ("mean", [1], {}, [("B", "T", 4)], ("B", 4)),
    ("sum", [-1], {"keepdim": True}, [("B", "T", 4)], ("B", "T", 1)),
    ("max", [1], {}, [("B", "T", 4)], ("B", 4)),
    ("argmax", [-1], {}, [("B", 4)], ("B",)),
    ("flip", [1], {}, [("B", "T", 4)], ("B", "T", 4)),
    ("reshape", ["B", "T", 2, -1], {}, [("B", "T", 6)], ("B", "T", 2, 3)),
    ("reshape", ["B", -1], {}, [("B", "T", 6)], ("B", "6 * T")),
    ("reshape", [-1, 4], {}, [(2, 3, 4)], (6, 4)),
    ("transpose", [1, 2], {}, [("B", "T", 4)], ("B", 4, "T")),
    ("permute", [0, 2, 1], {}, [("B", "T", 4)], ("B", 4, "T")),
    ("concat", [-1], {}, [("B", "T", 4), ("B", "T", 3)], ("B", "T", 7)),
    ("concat", [1], {}, [("B", "T", 4), ("B", 2, 4)], ("B", "T + 2", 4)),
    ("stack", [], {}, [("B", 4), ("B", 4), ("B", 4)], (3, "B", 4)),
    ("stack", [-1], {}, [("B", 4), ("B", 4)], ("B", 4, 2)),
    ("split", [[1, 3]], {}, [("B", 4)], [("B", 1), ("B", 3)]),
    ("split", [3, 1], {}, [("B", 7, 2)], [("B", 3, 2), ("B", 3, 2), ("B", 1, 2)]),
    ("chunk", [2], {}, [("B", 6)], [("B", 3), ("B", 3)]),
    ("flatten", [1], {}, [("B", 3, "H", "W")], ("B", "3 * H * W")),
    ("flatten", [], {}, [(2, 3, 4)], (24,)),
    ("unsqueeze", [-1], {}, [("B", 4)], ("B", 4, 1)),
    ("squeeze", [1], {}, [("B", 1, 4)], ("B", 4)),
    ("confidence", [], {}, [("B", 10)], ("B",)),
    ("entropy", [], {}, [("B", "T", 10)], ("B", "T")),
    ("topk_values", [2], {}, [("B", 5)], ("B", 2)),
    ("topk_indices", [3, 0], {}, [(4, "B")], (3, "B")),
    ("narrow", [1, 1, 2], {}, [("B", 5)], ("B", 2)),
    ("one_hot", [5], {}, [("B", "T")], ("B", "T", 5)),
    ("detach", [], {}, [("B", 4)], ("B", 4)),
    ("identity", [], {}, [("B", 4)], ("B", 4)),
    ("shuffle", [1], {}, [("B", "T", 4)], [("B", "T", 4), ("T",)]),
]


@pytest.mark.parametrize("name,args,kwargs,in_shapes,expected", FUNC_CASES)
def test_function_shape_rule_and_result(name, args, kwargs, in_shapes, expected):
    defn = FUNCS[name]
    bound, errors = bind_args(defn, args, kwargs)
    assert errors == []
    assert defn.shape(in_shapes, bound) == expected
    sizes = {"B": 2, "T": 5, "H": 3, "W": 2}
    inputs = [torch.randn(*[sizes.get(d, d) for d in s]) for s in in_shapes]
    if name == "one_hot":
        inputs = [torch.randint(0, 5, (2, 5))]
    if name in ("reshape",):
        bound = {"shape": tuple(sizes.get(d, d) for d in bound["shape"])}
    result = defn.apply(*inputs, **bound)
    results = list(result) if isinstance(result, (tuple, list)) else [result]
    wanted = expected if isinstance(expected, list) else [expected]
    assert len(results) == len(wanted)
    for r, w in zip(results, wanted):
        assert tuple(r.shape) == tuple(eval(str(d), {}, dict(sizes)) for d in w)


def test_elementwise_functions_match_their_formulas():
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(FUNCS["silu"].apply(x), x / (1 + torch.exp(-x)))
    torch.testing.assert_close(FUNCS["softplus"].apply(x), torch.log(1 + torch.exp(x)))
    torch.testing.assert_close(FUNCS["gelu"].apply(x), x * 0.5 * (1 + torch.erf(x / math.sqrt(2))))
    torch.testing.assert_close(FUNCS["relu"].apply(x), torch.where(x > 0, x, 0.0))


def test_confidence_and_entropy_match_a_loop():
    logits = torch.randn(3, 5, dtype=torch.float64)
    logits[1, 2] = float("-inf")  # a masked class contributes nothing
    conf, ent = FUNCS["confidence"].apply(logits), FUNCS["entropy"].apply(logits)
    for row in range(3):
        exps = [math.exp(v) for v in logits[row].tolist()]
        probs = [e / sum(exps) for e in exps]
        assert abs(conf[row].item() - max(probs)) < 1e-12
        assert abs(ent[row].item() + sum(p * math.log(p) for p in probs if p > 0)) < 1e-12
    assert FUNCS["confidence"].apply(torch.randn(2, 5).bfloat16()).dtype == torch.bfloat16


def test_token_shuffle_roundtrip():
    x = torch.randn(2, 7, 3)
    gen = torch.Generator().manual_seed(3)
    y, perm = token_shuffle(x, 1, gen)
    assert sorted(perm.tolist()) == list(range(7))
    for i in range(7):
        assert torch.equal(y[:, i], x[:, perm[i]])
    assert torch.equal(token_unshuffle(y, perm, 1), x)
    assert torch.equal(FUNCS["unpermute"].apply(y, perm, dim=1), x)
    assert FUNCS["unpermute"].shape([("B", "T", 3), ("T",)], {"dim": 1}) == ("B", "T", 3)


@pytest.mark.parametrize(
    "name,args,in_shapes,message",
    [
        ("mean", [3], [("B", "T", 256)], "`mean(3)`: dimension 3 is out of range for [B, T, 256] (valid: -3 to 2)"),
        ("reshape", [4, -1], [(2, 3)], "`reshape(4, -1)` cannot reshape [2, 3] (6 elements) into [4, -1]"),
        ("reshape", [-1, -1], [(2, 3)], "`reshape(-1, -1)` can infer at most one dimension (-1), got [-1, -1]"),
        ("concat", [-1], [("B", 4, 4), ("B", 5, 4)], "`concat(-1)` needs inputs of equal shapes outside dimension -1, got [B, 4, 4] and [B, 5, 4]"),
        ("stack", [], [("B", 4), ("B", 3)], "`stack(0)` needs inputs of equal shapes, got [B, 4] and [B, 3]"),
        ("permute", [0, 2], [("B", "T", 4)], "`permute(0, 2)` needs an order of all 3 dimensions of [B, T, 4], each once"),
        ("split", [[1, 2]], [("B", 4)], "`split([1, 2])` needs sizes adding up to dimension -1 of [B, 4], got 3"),
        ("chunk", [3], [("B", 4)], "`chunk(3)` needs dimension -1 divisible by 3, got [B, 4]"),
        ("squeeze", [1], [("B", 4)], "`squeeze(1)` needs dimension 1 to be 1, got [B, 4]"),
        ("topk_values", [6], [("B", 5)], "`topk_values(6)` needs 1 ≤ k ≤ 5 along dimension -1 of [B, 5], got 6"),
        ("transpose", [0, 3], [("B", 4)], "`transpose(0, 3)`: dimension 3 is out of range for [B, 4] (valid: -2 to 1)"),
        ("gelu", [], [("B", 4), ("B", 4)], "`gelu` takes 1 input, got 2"),
    ],
)
def test_function_messages(name, args, in_shapes, message):
    defn = FUNCS[name]
    bound, errors = bind_args(defn, args, {})
    assert errors == []
    assert defn.shape(in_shapes, bound) == message


def test_python_defaults_agree_with_params():
    for name, defn in FUNCS.items():
        try:
            signature = inspect.signature(defn.fn)
        except ValueError:  # builtins without a signature take no arguments beyond the tensor
            continue
        for p in defn.params:
            if p.name in signature.parameters and not p.variadic:
                default = signature.parameters[p.name].default
                want = inspect.Parameter.empty if p.default is REQUIRED else p.default
                assert default == want, (name, p.name)
    for name, defn in LAYERS.items():
        for p in defn.params:
            assert p.default is REQUIRED or isinstance(p.default, (int, float, bool, str, Ref)), (name, p.name)
