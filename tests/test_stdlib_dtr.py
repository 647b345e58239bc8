"""stdlib:dtr against an independent PyTorch DiT with Denoising Task Routing written from the official code
(byeongjun-park/DTR: models/taskrouting.py — create_mask_tasks("DTR"), TaskRouter.forward;
models/DiT/models.py — DiT, DiTBlock, FinalLayer, TimestepEmbedder, LabelEmbedder, get_2d_sincos_pos_embed).

The reference keeps the official structure: fused qkv timm attention, the mask table [T, d] built once with
numpy's linspace/round as create_mask_tasks does and indexed by t, adaLN-Zero modulation chunks in the
official order. No randomness at inference (label dropout is the caller's business, see the spec header).

The whole model is compared (it uses `arange`, `sin` and `cos` for the timestep embedding, the 2-D sin-cos
positions and the mask table); the routed block (DTRBlock) is also compiled alone and verified, and the
reference is checked on its own.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stdlib_refs import TimmAttention, assert_every_parameter_trained, load_routec_state, timestep_embedding
from stdlib_refs import reference_backend  # noqa: F401  (autouse: ROUTEC_BACKEND=reference)

SMALL = dict(img=8, in_ch=4, patch=2, d=32, depth=2, heads=2, mlp_ratio=4, classes=5, tasks=50, freq=16)


def create_mask_tasks(task_count, unit_count, beta, alpha):
    """The DTR table: row t is 1 on [index_t, index_t + int(unit_count·beta))."""
    mapping = torch.zeros(task_count, unit_count)
    filled = int(unit_count * beta)
    index = ((np.linspace(0, 1, task_count) ** alpha) * (unit_count - filled)).round().astype(np.int64)
    for task in range(task_count):
        mapping[task, index[task]:index[task] + filled] = 1
    return mapping


def sincos_2d(d, g):
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32)), axis=0)
    emb = np.concatenate([one_d(d // 2, grid[0]), one_d(d // 2, grid[1])], axis=1)
    return torch.from_numpy(emb).float()


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RefDiTBlock(nn.Module):
    def __init__(self, d, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = TimmAttention(d, heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(d, d * mlp_ratio), nn.Linear(d * mlp_ratio, d)
        self.adaLN_modulation = nn.Linear(d, 6 * d)

    def forward(self, x, c, active_mask):  # active_mask [B, 1, d]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(F.silu(c)).chunk(6, 1)
        routed = x * active_mask
        routed = routed + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(routed), shift_msa, scale_msa))
        h = modulate(self.norm2(routed), shift_mlp, scale_mlp)
        routed = routed + gate_mlp.unsqueeze(1) * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))
        return routed + x * (1 - active_mask)  # TaskRouter.forward(x, routed)


class RefDTR(nn.Module):
    def __init__(self, img, in_ch, patch, d, depth, heads, mlp_ratio, classes, tasks, freq, beta=0.8, alpha=4.0):
        super().__init__()
        self.patch, self.out_ch, self.freq = patch, 2 * in_ch, freq
        self.x_embedder = nn.Conv2d(in_ch, d, patch, stride=patch)
        self.register_buffer("pos_embed", sincos_2d(d, img // patch)[None])
        self.register_buffer("unit_mapping", create_mask_tasks(tasks, d, beta, alpha))
        self.t_mlp0, self.t_mlp2 = nn.Linear(freq, d), nn.Linear(d, d)
        self.y_embedder = nn.Embedding(classes + 1, d)
        self.blocks = nn.ModuleList(RefDiTBlock(d, heads, mlp_ratio) for _ in range(depth))
        self.final_adaLN = nn.Linear(d, 2 * d)
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_linear = nn.Linear(d, patch * patch * self.out_ch)

    def forward(self, latent, t, y):
        active_mask = torch.index_select(self.unit_mapping, 0, t).unsqueeze(1)
        x = self.x_embedder(latent).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_mlp2(F.silu(self.t_mlp0(timestep_embedding(t, self.freq)))) + self.y_embedder(y)
        for blk in self.blocks:
            x = blk(x, c, active_mask)
        shift, scale = self.final_adaLN(F.silu(c)).chunk(2, 1)
        x = self.final_linear(modulate(self.final_norm(x), shift, scale))
        g, p = int(x.shape[1] ** 0.5), self.patch
        x = x.reshape(x.shape[0], g, g, p, p, self.out_ch)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], self.out_ch, g * p, g * p)


def test_mask_table_matches_the_formula():
    """The official vectorised table against s_t = round((t/(T−1))^α (d − ⌊βd⌋)) computed task by task."""
    for tasks, d, beta, alpha in ((1000, 1152, 0.8, 4.0), (50, 32, 0.8, 4.0), (7, 10, 0.5, 2.0)):
        table = create_mask_tasks(tasks, d, beta, alpha)
        width = int(d * beta)
        for t in range(tasks):
            s = round((t / (tasks - 1)) ** alpha * (d - width))
            want = [1.0 if s <= c < s + width else 0.0 for c in range(d)]
            assert table[t].tolist() == want, (tasks, t)
        # sliding window: the first task starts at channel 0, the last ends at the last channel
        assert table[0, :width].all() and table[-1, -width:].all()


def test_reference_block_routes_and_bypasses():
    """With m_t = 1 everywhere the routed block is the plain DiT block; with a partial mask the block reads
    only the routed channels: changing x on a bypassed channel changes the output by exactly that change."""
    torch.manual_seed(2)
    blk = RefDiTBlock(8, 2, 2).double()
    x, c = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    ones = torch.ones(2, 1, 8, dtype=torch.float64)
    with torch.no_grad():
        s1, sc1, g1, s2, sc2, g2 = blk.adaLN_modulation(F.silu(c)).chunk(6, 1)
        plain = x + g1.unsqueeze(1) * blk.attn(modulate(blk.norm1(x), s1, sc1))
        plain = plain + g2.unsqueeze(1) * blk.fc2(F.gelu(blk.fc1(modulate(blk.norm2(plain), s2, sc2)), approximate="tanh"))
        torch.testing.assert_close(blk(x, c, ones), plain)
        m = torch.zeros(2, 1, 8, dtype=torch.float64)
        m[..., 2:6] = 1
        bump = torch.zeros_like(x)
        bump[..., 0] = 3.0
        bump[..., 7] = -2.0
        torch.testing.assert_close(blk(x + bump, c, m) - blk(x, c, m), bump)
        bump[..., 3] = 1.0  # a routed channel: the whole output moves
        assert not torch.allclose(blk(x + bump, c, m) - blk(x, c, m), bump)


def test_spec_block_routes_like_the_reference():
    """The spec's DTRBlock (the routed block with its identity bypass) compiles on its own today: given the
    same mask it matches the official DiTBlock + TaskRouter, for a sliding-window mask per sample."""
    from routec.compiler import load

    torch.manual_seed(4)
    d, heads = 8, 2
    net = load("stdlib:dtr", model="DTRBlock", d=d, heads=heads, hidden=4 * d)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.3)
    ref = RefDiTBlock(d, heads, 4)

    def block_to_reference(name, value):  # the model's name map, for block 0 without its "blocks.0." prefix
        return {k.removeprefix("blocks.0."): v for k, v in routec_to_reference(f"layers.0.blk.{name}", value).items()}

    load_routec_state(ref, net.state_dict().items(), block_to_reference)
    table = create_mask_tasks(10, d, 0.5, 4.0)
    t = torch.tensor([0, 6, 9])
    x, c, mask = torch.randn(3, 5, d), torch.randn(3, d), table[t]
    assert not torch.equal(mask[0], mask[2])  # different timesteps route different channels
    with torch.no_grad():
        torch.testing.assert_close(net(x, c, mask), ref(x, c, mask[:, None]), atol=1e-5, rtol=1e-4)


def routec_to_reference(name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """The explicit name map: one routec parameter → the reference parameter(s) it becomes."""
    fixed = {
        "patchembed.proj.weight": "x_embedder.weight", "patchembed.proj.bias": "x_embedder.bias",
        "timestepembedder.linear.weight": "t_mlp0.weight", "timestepembedder.linear.bias": "t_mlp0.bias",
        "timestepembedder.linear_1.weight": "t_mlp2.weight", "timestepembedder.linear_1.bias": "t_mlp2.bias",
        "embedding.weight": "y_embedder.weight",
        "linear.weight": "final_adaLN.weight", "linear.bias": "final_adaLN.bias",
        "linear_1.weight": "final_linear.weight", "linear_1.bias": "final_linear.bias",
    }
    if name in fixed:
        return {fixed[name]: value}
    m = re.fullmatch(r"layers\.(\d+)\.blk\.(.+)", name)
    assert m, f"unmapped routec parameter {name}"
    blk, rest = f"blocks.{m[1]}", m[2]
    simple = {
        "linear.weight": "adaLN_modulation.weight", "linear.bias": "adaLN_modulation.bias",
        "selfattention.o.weight": "attn.proj.weight", "selfattention.o.bias": "attn.proj.bias",
        "linear_1.weight": "fc1.weight", "linear_1.bias": "fc1.bias",
        "linear_2.weight": "fc2.weight", "linear_2.bias": "fc2.bias",
    }
    if rest in simple:
        return {f"{blk}.{simple[rest]}": value}
    m = re.fullmatch(r"selfattention\.([qkv])\.(weight|bias)", rest)
    assert m, f"unmapped routec parameter {name}"
    return {f"{blk}.attn.qkv.{m[2]}#{'qkv'.index(m[1])}": value}


def build():
    from routec.compiler import load

    torch.manual_seed(0)
    net = load("stdlib:dtr", **SMALL)
    with torch.no_grad():  # adaLN-Zero starts at zero; random weights make every path count
        for p in net.parameters():
            p.normal_(0.0, 0.2)
    ref = RefDTR(**SMALL)
    load_routec_state(ref, net.state_dict().items(), routec_to_reference, keep=["pos_embed", "unit_mapping"])
    return net, ref


def inputs(n=4):
    latent = torch.randn(n, SMALL["in_ch"], SMALL["img"], SMALL["img"])
    t = torch.tensor([0, 17, 33, 49][:n])  # both ends of the window's slide and two steps between
    y = torch.tensor([0, 3, SMALL["classes"], 1][:n])  # one null (unconditional) label
    return latent, t, y


def test_eval_matches_reference():
    net, ref = build()
    net.eval(), ref.eval()
    latent, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(net(latent, t, y), ref(latent, t, y), atol=1e-5, rtol=1e-4)


def test_train_step_gives_gradients():
    net, ref = build()
    net.train(), ref.train()
    latent, t, y = inputs()
    loss = net(latent, t, y).square().mean()
    torch.testing.assert_close(loss, ref(latent, t, y).square().mean(), atol=1e-5, rtol=1e-4)
    loss.backward()
    assert_every_parameter_trained(net)
