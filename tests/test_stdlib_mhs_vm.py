"""stdlib:mhs_vm against an independent PyTorch MHS-VM block written from the official code (PixDeep/MHS-VM:
models/vmunet/mhsm.py VSSGate, MHSM, ScanHead, ScanPattern, MambaEngine, GFU; vmamba.py VSSBlock and the
4x4 patch embedding with LayerNorm; scanutils.py / routegen.py for the scan routes).

The reference keeps the official layout: channels-first (b, d, h, w) inside the module, the four sequences
of a head stacked as (b, k, d, l) with per-route parameters stored stacked over k (x_proj_weight [4, r + 2N, d],
dt_projs_weight [4, d, r], dt_projs_bias [4, d], A_logs [4 d, N], Ds [4 d]), the selective scan as a loop over
time, sequences 1 and 3 being the flipped routes, outputs gathered back to raster order with the inverse
route. The routes are generated here from their definitions (boustrophedon rows/columns, anti-diagonal
zig-zag and its mirror, clockwise spiral and its vertical mirror, row/column raster).

The whole block (heads C, X, S, and Z where asked) is compared; single heads are also checked on their own,
and the hand-written routes agree with routec's `route_table` (written separately, as a sort by visit key).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stdlib_refs import assert_every_parameter_trained
from stdlib_refs import reference_backend  # noqa: F401  (autouse: ROUTEC_BACKEND=reference)

SMALL = dict(d=12, depth=1, heads=3, state=4, t=0.0, size=16, patch=4)


def snake_rows(h, w):
    return [(i, j) for i in range(h) for j in (range(w) if i % 2 == 0 else reversed(range(w)))]


def snake_columns(h, w):
    return [(i, j) for j in range(w) for i in (range(h) if j % 2 == 0 else reversed(range(h)))]


def diagonal(h, w):
    """Anti-diagonals i + j = k in turn, walking up-right on even k and down-left on odd k."""
    out = []
    for k in range(h + w - 1):
        cells = [(i, k - i) for i in range(h) if 0 <= k - i < w]  # increasing i
        out += cells[::-1] if k % 2 == 0 else cells
    return out


def spiral(h, w):
    """Clockwise from the top-left corner, ring by ring."""
    top, left, bottom, right = 0, 0, h - 1, w - 1
    out = []
    while top <= bottom and left <= right:
        out += [(top, j) for j in range(left, right + 1)]
        out += [(i, right) for i in range(top + 1, bottom + 1)]
        if top < bottom:
            out += [(bottom, j) for j in range(right - 1, left - 1, -1)]
        if left < right:
            out += [(i, left) for i in range(bottom - 1, top, -1)]
        top, left, bottom, right = top + 1, left + 1, bottom - 1, right - 1
    return out


def routes_for(head, h, w):
    """(route0, route1) of a head as raster indices i * w + j."""
    if head == "C":
        pair = snake_rows(h, w), snake_columns(h, w)
    elif head == "X":
        first = diagonal(h, w)
        pair = first, [(i, w - 1 - j) for i, j in first]
    elif head == "S":
        first = spiral(h, w)
        pair = first, [(h - 1 - i, j) for i, j in first]
    else:  # "Z"
        pair = [(i, j) for i in range(h) for j in range(w)], [(i, j) for j in range(w) for i in range(h)]
    return [torch.tensor([i * w + j for i, j in route]) for route in pair]


def test_routes_visit_every_cell_once_and_step_to_neighbours():
    """Sanity of the hand-written routes: permutations of the grid; snakes and spirals move one cell per
    step; the diagonal zig-zag moves within or between adjacent anti-diagonals."""
    for h, w in [(4, 4), (3, 5), (1, 4)]:
        for head in "CXSZ":
            for route in routes_for(head, h, w):
                assert sorted(route.tolist()) == list(range(h * w))
        for route in (*routes_for("C", h, w), *routes_for("S", h, w)):
            i, j = route // w, route % w
            assert torch.all((i.diff().abs() + j.diff().abs()) == 1)
        first = routes_for("X", h, w)[0]
        assert torch.all(torch.isin(((first // w) + (first % w)).diff(), torch.tensor([0, 1])))
    assert routes_for("S", 3, 3)[0].tolist() == [0, 1, 2, 5, 8, 7, 6, 3, 4]
    assert routes_for("X", 3, 3)[0].tolist() == [0, 1, 3, 6, 4, 2, 5, 7, 8]


class RefMambaEngine(nn.Module):
    """S6 over K = 4 sequences with separate parameters: xs (b, k, d, l) → ys (b, k, d, l)."""

    def __init__(self, d: int, state: int):
        super().__init__()
        self.state, self.rank = state, math.ceil(d / 16)
        self.x_proj_weight = nn.Parameter(torch.randn(4, self.rank + 2 * state, d) * d ** -0.5)
        self.dt_projs_weight = nn.Parameter(torch.randn(4, d, self.rank) * self.rank ** -0.5)
        self.dt_projs_bias = nn.Parameter(torch.randn(4, d) * 0.1)
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, state + 1).float()).repeat(4 * d, 1))
        self.Ds = nn.Parameter(torch.ones(4 * d))

    def forward(self, xs):
        b, k, d, l = xs.shape
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [self.rank, self.state, self.state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        delta = F.softplus(dts + self.dt_projs_bias[None, :, :, None])  # (b, k, d, l)
        A = -torch.exp(self.A_logs).view(k, d, self.state)
        D = self.Ds.view(k, d)
        h = xs.new_zeros(b, k, d, self.state)
        ys = []
        for t in range(l):
            dA = torch.exp(delta[..., t, None] * A)  # (b, k, d, N)
            h = dA * h + (delta[..., t] * xs[..., t])[..., None] * Bs[:, :, None, :, t]
            ys.append((h * Cs[:, :, None, :, t]).sum(-1) + D * xs[..., t])
        return torch.stack(ys, dim=-1)


class RefScanHead(nn.Module):
    def __init__(self, d: int, state: int, head: str, h: int, w: int, t: float):
        super().__init__()
        self.t = t
        self.tind0, self.tind1 = routes_for(head, h, w)
        self.pind0, self.pind1 = torch.argsort(self.tind0), torch.argsort(self.tind1)
        self.mambaeng = RefMambaEngine(d, state)

    def forward(self, x):  # (b, d, h, w) → (b, d, l)
        b, d, h, w = x.shape
        flat = x.reshape(b, d, h * w)
        s0, s1 = flat[..., self.tind0], flat[..., self.tind1]
        xs = torch.stack([s0, s0.flip(-1), s1, s1.flip(-1)], dim=1)  # (b, 4, d, l)
        ys = self.mambaeng(xs)
        ys = torch.stack([ys[:, 0][..., self.pind0], ys[:, 1].flip(-1)[..., self.pind0],
                          ys[:, 2][..., self.pind1], ys[:, 3].flip(-1)[..., self.pind1]], dim=1)
        # GFU: element-wise gate from the coefficient of variation over the 4 routes
        cv = ys.std(dim=1) / ((ys - ys.min(dim=1, keepdim=True).values).mean(dim=1) + 1e-5)
        return ys.sum(dim=1) * F.relu(cv - self.t)


class RefVSSBlock(nn.Module):
    """VSSBlock(ln_1 → VSSGate) with the MHSM module, on channels-last (b, h, w, d)."""

    def __init__(self, d: int, h: int, w: int, heads: int, state: int, t: float):
        super().__init__()
        self.sub = d // heads
        self.ln_1 = nn.LayerNorm(d)
        self.in_proj = nn.Linear(d, 2 * d, bias=False)
        self.conv2d = nn.Conv2d(d, d, 3, padding=1, groups=d)
        self.x_ssproj = nn.Linear(d, self.sub * heads, bias=False)
        self.scanheads = nn.ModuleList(RefScanHead(self.sub, state, p, h, w, t) for p in "CXSZ"[:heads])
        self.cat_norm = nn.LayerNorm(heads * self.sub)
        self.y_proj = nn.Linear(heads * self.sub, d, bias=False)
        self.out_norm = nn.LayerNorm(d)

    def forward(self, inp):
        b, h, w, c = inp.shape
        x, z = self.in_proj(self.ln_1(inp)).chunk(2, dim=-1)
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2)))  # (b, d, h, w)
        parts = torch.einsum("bdhw,cd->bchw", x, self.x_ssproj.weight).split(self.sub, dim=1)
        y_cat = torch.cat([head(part) for head, part in zip(self.scanheads, parts)], dim=1)  # (b, heads·sub, l)
        y = self.y_proj(self.cat_norm(y_cat.transpose(-1, -2))).view(b, h, w, -1)
        return inp + self.out_norm(y) * F.silu(z)


class RefMHSVM(nn.Module):
    def __init__(self, d: int, depth: int, heads: int, state: int, t: float, size: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, d, patch, stride=patch)
        self.norm = nn.LayerNorm(d)
        hw = size // patch
        self.blocks = nn.ModuleList(RefVSSBlock(d, hw, hw, heads, state, t) for _ in range(depth))

    def forward(self, img):
        x = self.norm(self.proj(img).permute(0, 2, 3, 1))
        for block in self.blocks:
            x = block(x)
        return x


def name_map(depth: int, heads: int, d: int) -> dict:
    """{routec parameter: (reference parameter, index into it)}; the reference stacks per-route parameters."""
    sub = d // heads
    every = slice(None)
    names = {
        "conv2d.weight": ("proj.weight", every),
        "conv2d.bias": ("proj.bias", every),
        "layernorm.weight": ("norm.weight", every),
        "layernorm.bias": ("norm.bias", every),
    }
    block_names = {
        "layernorm": "ln_1", "linear": "in_proj", "conv2d": "conv2d", "linear_1": "x_ssproj",
        "layernorm_1": "cat_norm", "linear_2": "y_proj", "layernorm_2": "out_norm",
    }
    for i in range(depth):
        ours, theirs = f"layers.{i}.mhsvssblock", f"blocks.{i}"
        for mod, ref_mod in block_names.items():
            for kind in ("weight", "bias"):
                if mod.startswith("linear") and kind == "bias" and mod != "conv2d":
                    continue
                names[f"{ours}.{mod}.{kind}"] = (f"{theirs}.{ref_mod}.{kind}", every)
        for k in range(heads):
            head = "scanhead" if k == 0 else f"scanhead_{k}"
            eng = f"{theirs}.scanheads.{k}.mambaeng"
            for r in range(4):
                s6 = f"{ours}.{head}.s6" + ("" if r == 0 else f"_{r}")
                names[f"{s6}.A_log"] = (f"{eng}.A_logs", slice(r * sub, (r + 1) * sub))
                names[f"{s6}.D"] = (f"{eng}.Ds", slice(r * sub, (r + 1) * sub))
                names[f"{s6}.linear.weight"] = (f"{eng}.x_proj_weight", r)
                names[f"{s6}.linear_1.weight"] = (f"{eng}.dt_projs_weight", r)
                names[f"{s6}.linear_1.bias"] = (f"{eng}.dt_projs_bias", r)
    return names


def copy_into(ref: nn.Module, net: nn.Module, names: dict) -> None:
    src, dst = dict(net.named_parameters()), dict(ref.named_parameters())
    assert sorted(src) == sorted(names), f"unmapped routec parameters: {sorted(set(src) ^ set(names))}"
    targets = {ours for ours, _ in names.values()}
    assert sorted(dst) == sorted(targets), f"unmapped reference parameters: {sorted(set(dst) ^ targets)}"
    covered = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in dst.items()}
    with torch.no_grad():
        for theirs, (ours, index) in names.items():
            dst[ours][index] = src[theirs]
            covered[ours][index] = True
    assert all(c.all() for c in covered.values()), "every reference entry is copied"


def pair(small=SMALL):
    from routec.compiler import load

    net = load("stdlib:mhs_vm", **small)
    ref = RefMHSVM(**small)
    copy_into(ref, net, name_map(small["depth"], small["heads"], small["d"]))
    return net, ref


def head_map(d: int) -> dict:
    """ScanHead's four S6 blocks (route 0, its reverse, route 1, its reverse) → the engine's stacked slots."""
    names = {}
    for r in range(4):
        s6 = "s6" + ("" if r == 0 else f"_{r}")
        names[f"{s6}.A_log"] = ("mambaeng.A_logs", slice(r * d, (r + 1) * d))
        names[f"{s6}.D"] = ("mambaeng.Ds", slice(r * d, (r + 1) * d))
        names[f"{s6}.linear.weight"] = ("mambaeng.x_proj_weight", r)
        names[f"{s6}.linear_1.weight"] = ("mambaeng.dt_projs_weight", r)
        names[f"{s6}.linear_1.bias"] = ("mambaeng.dt_projs_bias", r)
    return names


HEADS = [("C", "snake", "column_snake", 0.0), ("Z", "row", "column", 0.9)]


@pytest.mark.parametrize("head, first, second, t", HEADS)
def test_scan_head_matches_reference(head, first, second, t):
    """One head on a 4 × 5 grid: four routed S6 scans with their own parameters, put back in raster order and
    fused by the coefficient-of-variation gate (t > 0 zeroes some positions)."""
    from routec.compiler import load

    torch.manual_seed(6)
    d, h, w = 4, 4, 5
    net = load("stdlib:mhs_vm", model="ScanHead", d=d, state=4, first=first, second=second, H=h, W=w, t=t)
    ref = RefScanHead(d, 4, head, h, w, t)
    copy_into(ref, net, head_map(d))
    x = torch.randn(2, h * w, d)  # [B, L, d], raster order
    want = ref(x.transpose(1, 2).reshape(2, d, h, w)).transpose(1, 2)
    got = net(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    if t > 0:
        assert (want == 0).any() and (want != 0).any(), "the gate closes some positions and not others"
    got.square().mean().backward()
    assert_every_parameter_trained(net)


@pytest.mark.parametrize("heads", [3, 4])
def test_model_matches_reference_in_eval(heads):
    torch.manual_seed(heads)
    small = dict(SMALL, heads=heads)
    net, ref = pair(small)
    net.eval(), ref.eval()
    img = torch.randn(2, 3, small["size"], small["size"])
    with torch.no_grad():
        torch.testing.assert_close(net(img), ref(img), rtol=1e-4, atol=1e-5)


def test_model_train_step():
    torch.manual_seed(5)
    net, ref = pair()
    net.train()
    img = torch.randn(2, 3, SMALL["size"], SMALL["size"])
    out = net(img)
    torch.testing.assert_close(out, ref(img), rtol=1e-4, atol=1e-5)
    loss = out.square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert_every_parameter_trained(net)


def test_hand_written_routes_equal_route_table():
    from routec.codegen.multiscan import route_table

    for h, w in [(4, 4), (3, 5), (1, 4), (5, 2)]:
        for head, kinds in {"X": ("diagonal", "antidiagonal"), "S": ("spiral", "spiral_mirrored")}.items():
            for kind, route in zip(kinds, routes_for(head, h, w)):
                assert torch.equal(route_table(kind, h * w, h, w), route), (kind, h, w)
