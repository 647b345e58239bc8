"""stdlib:dit_routing against an independent PyTorch implementation of DiT's routing space, written from the
paper (Ma, Fei, Huang; ICCV 2023; no public code — the gate estimators are the reconstruction the spec's
header states).

The reference builds the grid node by node,
    F_{i,j} = G_row ⊙ B_{i,j-1}(F_{i,j-1}) + (1 − G_row) ⊙ F_{i,j-1} + G_col ⊙ P_{i-1,j}(F_{i-1,j}),
running each row block on the tokens its gate picked, image by image (the picked tokens of one image attend to
each other only; the others keep their features), with G_row = argmax of a per-token Linear(d, 2) over
{skip, run} and G_col = [σ(Linear(d, 1)(P(F))) ≥ 0.5]. The hard gates are deterministic: no randomness at
inference, and the training-mode forward value is the same.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from stdlib_refs import assert_every_parameter_trained, capture, tensor_out
from stdlib_refs import reference_backend  # noqa: F401  (autouse: ROUTEC_BACKEND=reference)

SMALL = dict(img=32, dims=[8, 8, 16, 16], heads=[1, 1, 2, 2], ratios=[2, 2, 2, 2], stages=2, classes=5)


class RefBlock(nn.Module):
    """Pre-norm Transformer block on one token set [1, n, d]."""

    def __init__(self, d, heads, hidden):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        b, n, d = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).reshape(b, n, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class RefRow(nn.Module):
    def __init__(self, d, heads, hidden):
        super().__init__()
        self.gate = nn.Linear(d, 2)
        self.block = RefBlock(d, heads, hidden)
        self.last_gate = None

    def forward(self, x):
        run = self.gate(x).argmax(-1) == 1  # [B, N]
        self.last_gate = run
        out = x.clone()
        for b in range(x.shape[0]):
            idx = run[b].nonzero().squeeze(1)
            if idx.numel():
                out[b, idx] = self.block(x[b, idx][None])[0]
        return out


class RefDown(nn.Module):
    def __init__(self, cin, d, side):
        super().__init__()
        self.side = side
        self.proj = nn.Conv2d(cin, d, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        b, n, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, self.side, self.side)
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class RefGatedDown(nn.Module):
    def __init__(self, cin, d, side):
        super().__init__()
        self.down = RefDown(cin, d, side)
        self.gate = nn.Linear(d, 1)
        self.last_gate = None

    def forward(self, x):
        p = self.down(x)
        g = (torch.sigmoid(self.gate(p)) >= 0.5).to(p.dtype)  # [B, N, 1]
        self.last_gate = g
        return g * p


class RefDiT(nn.Module):
    def __init__(self, img, dims, heads, ratios, stages, classes):
        super().__init__()
        side = img // 4
        sides = [side, side // 2, side // 4]
        self.stem = nn.Conv2d(3, dims[0], 7, stride=4, padding=3)
        self.stem_norm = nn.LayerNorm(dims[0])
        self.downs = nn.ModuleList(RefDown(dims[i], dims[i + 1], sides[i]) for i in range(3))
        self.rows = nn.ModuleList(
            nn.ModuleList(RefRow(dims[i], heads[i], ratios[i] * dims[i]) for i in range(4)) for _ in range(stages)
        )
        self.cols = nn.ModuleList(
            nn.ModuleList(RefGatedDown(dims[i], dims[i + 1], sides[i]) for i in range(3)) for _ in range(stages)
        )
        self.norm = nn.LayerNorm(dims[3])
        self.head = nn.Linear(dims[3], classes)

    def forward(self, img):
        f = [self.stem_norm(self.stem(img).flatten(2).transpose(1, 2))]
        for down in self.downs:
            f.append(down(f[-1]))
        for rows, cols in zip(self.rows, self.cols):
            new = [rows[0](f[0])]
            for i in range(1, 4):
                new.append(rows[i](f[i]) + cols[i - 1](new[i - 1]))
            f = new
        return self.head(self.norm(f[3]).mean(1))


def routec_to_reference(name: str) -> str | None:
    """The explicit name map: one routec tensor name → its reference tensor name (None: an alias entry)."""
    if re.search(r"\.route_g_row\.branches\.\d+\.", name):
        return None  # the route's own handle on the branch modules; the spec-named entries carry the tensors
    m = re.fullmatch(r"(stem|stem_norm|norm|head)\.(weight|bias)", name)
    if m:
        return name
    m = re.fullmatch(r"down(\d)\.(proj|norm)\.(.+)", name)
    if m:
        return f"downs.{int(m[1]) - 1}.{m[2]}.{m[3]}"
    m = re.fullmatch(r"layers\.(\d+)\.row(\d)\.g_row\.linear\.(.+)", name)
    if m:
        return f"rows.{m[1]}.{m[2]}.gate.{m[3]}"
    m = re.fullmatch(r"layers\.(\d+)\.row(\d)\.run\.transformerblock\.(.+)", name)
    if m:
        rest = {"attn.q": "q", "attn.k": "k", "attn.v": "v", "attn.o": "o", "mlp.fc1": "fc1", "mlp.fc2": "fc2"}
        key, leaf = m[3].rsplit(".", 1)
        return f"rows.{m[1]}.{m[2]}.block.{rest.get(key, key)}.{leaf}"
    m = re.fullmatch(r"layers\.(\d+)\.col(\d)\.down\.(proj|norm)\.(.+)", name)
    if m:
        return f"cols.{m[1]}.{int(m[2]) - 1}.down.{m[3]}.{m[4]}"
    m = re.fullmatch(r"layers\.(\d+)\.col(\d)\.g_col\.linear\.(.+)", name)
    if m:
        return f"cols.{m[1]}.{int(m[2]) - 1}.gate.{m[3]}"
    raise AssertionError(f"unmapped routec tensor {name}")


def copy_into_reference(net: nn.Module, ref: nn.Module) -> None:
    state = {}
    for name, value in net.state_dict().items():
        key = routec_to_reference(name)
        if key is not None:
            state[key] = value.detach().clone()
    ref.load_state_dict(state, strict=True)


def build():
    from routec.compiler import load

    torch.manual_seed(0)
    net = load("stdlib:dit_routing", **SMALL)
    ref = RefDiT(**SMALL)
    copy_into_reference(net, ref)
    return net, ref


def test_reference_row_step_is_per_image():
    """A routed row block is a function of each image alone: shuffling the other images changes nothing."""
    torch.manual_seed(3)
    row = RefRow(8, 2, 16).double()
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    with torch.no_grad():
        full = row(x)
        for b in range(3):
            torch.testing.assert_close(row(x[b:b + 1])[0], full[b])
        run = row.last_gate
        skip = ~(row.gate(x).argmax(-1) == 1)
        torch.testing.assert_close(full[skip], x[skip])  # skipped tokens keep their features
        assert run.any()


def test_eval_matches_reference():
    net, ref = build()
    net.eval(), ref.eval()
    seen: dict[str, list] = {}
    for j in range(SMALL["stages"]):  # the hard gates' 0/1 decisions
        rows = [f"layers.{j}.row{i}.g_row.gate" for i in range(4)]
        for name in rows + [f"layers.{j}.col{i}.g_col.gate" for i in (1, 2, 3)]:
            seen[name] = capture(net, name)
    torch.manual_seed(1)
    img = torch.randn(3, 3, SMALL["img"], SMALL["img"])
    with torch.no_grad():
        got = net(img)
        want = ref(img)
    torch.testing.assert_close(tensor_out(got), want, atol=1e-5, rtol=1e-4)
    for j in range(SMALL["stages"]):  # routec's routing decisions are the reference's
        for i in range(4):
            run = seen[f"layers.{j}.row{i}.g_row.gate"][-1].argmax(-1) == 1
            torch.testing.assert_close(run, ref.rows[j][i].last_gate)
        for i in (1, 2, 3):
            torch.testing.assert_close(seen[f"layers.{j}.col{i}.g_col.gate"][-1], ref.cols[j][i - 1].last_gate)
    row = ref.rows[0][0].last_gate
    assert row.any() and not row.all()  # some tokens run the block, some stop early
    assert any(not torch.equal(row[0], row[b]) for b in (1, 2))  # images choose different token sets


def test_train_step_matches_reference_and_gives_gradients():
    net, ref = build()
    net.train(), ref.train()
    torch.manual_seed(1)
    img = torch.randn(3, 3, SMALL["img"], SMALL["img"])
    out = net(img)
    logits = tensor_out(out)
    torch.testing.assert_close(logits, ref(img), atol=1e-5, rtol=1e-4)  # hard gates: same forward value
    loss = F.cross_entropy(logits, torch.tensor([0, 1, 2]))
    assert torch.isfinite(loss)
    loss.backward()
    # the 1/32 scale has one token per image here: softmax over one key ignores q and k
    assert_every_parameter_trained(net, zero_ok=r"row3\..*\.attn\.[qk]\.")
