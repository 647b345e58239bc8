"""stdlib:s4d_moae against an independent PyTorch S4D fine-tuning model written from the official code
(MSA-LMC/S4D: finetune/s4d/videomae.py — VisionTransformerMoE with moe_type "moe_adapters", i.e.
BlockMoEAdapters + SparseMoEWithCapacity + NoisyTopkRouter).

The reference keeps the official structure: a Conv3d tubelet embedding, the fixed sinusoid table of
`get_sinusoid_encoding_table`, VideoMAE attention (bias-free fused qkv plus separate q and v biases),
MoAE blocks `x + MLP(x1) + MoE(x1)` whose router keeps the top-k (noisy) logits, sets the others to −inf and
softmaxes, and whose experts take at most int(B·L·k / E · capacity_factor) tokens each, in token order,
through a loop over experts with `index_add_`; then mean pooling, fc_norm and one head per task.

Randomness: the official router samples noise in eval too; the spec samples it in training only (see its
header), so the reference's noise is switched by `self.training` and the eval comparison is exact.
Capacity: the sizes below make B·L·k / E an integer, where the spec's ceil and the official floor agree.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from stdlib_refs import (TimmMlp, assert_every_parameter_trained, capture, expert_linears, load_routec_state,
                         sinusoid_table)
from stdlib_refs import reference_backend  # noqa: F401  (autouse: ROUTEC_BACKEND=reference)

SMALL = dict(img=32, frames=4, d=32, depth=3, heads=2, moe_from=1)  # 2·2·2 = 8 tokens per video
E, K = 4, 2


class RefAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1))


class RefNoisyTopkRouter(nn.Module):
    def __init__(self, dim, experts, k):
        super().__init__()
        self.k = k
        self.topkroute_linear = nn.Linear(dim, experts)
        self.noise_linear = nn.Linear(dim, experts)

    def forward(self, x):
        logits = self.topkroute_linear(x)
        if self.training:  # the official router also samples in eval (a documented deviation of the spec)
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise_linear(x))
        top, indices = logits.topk(self.k, dim=-1)
        sparse = torch.full_like(logits, float("-inf")).scatter(-1, indices, top)
        self.last_indices = indices
        return F.softmax(sparse, dim=-1), indices


class RefSparseMoEWithCapacity(nn.Module):
    def __init__(self, dim, experts, k, capacity_factor):
        super().__init__()
        self.router = RefNoisyTopkRouter(dim, experts, k)
        self.experts = nn.ModuleList(TimmMlp(dim, dim // 4) for _ in range(experts))
        self.k, self.capacity_factor, self.num_experts = k, capacity_factor, experts
        self.kept = None

    def forward(self, x):
        B, L, _ = x.shape
        gating, indices = self.router(x)
        flat_x = x.reshape(-1, x.shape[-1])
        flat_gating = gating.reshape(-1, gating.shape[-1])
        capacity = int((B * L * self.k / self.num_experts) * self.capacity_factor)
        updates = torch.zeros_like(flat_x)
        self.kept = []
        for i, expert in enumerate(self.experts):
            selected = torch.nonzero((indices == i).any(dim=-1).reshape(-1)).squeeze(-1)
            limited = selected[:capacity]
            self.kept.append(limited)
            if limited.numel() > 0:
                out = expert(flat_x[limited]) * flat_gating[limited, i].unsqueeze(1)
                updates.index_add_(0, limited, out)
        return updates.reshape(B, L, -1)


class RefBlock(nn.Module):
    def __init__(self, dim, heads, hidden, moe: bool, capacity_factor=1.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TimmMlp(dim, hidden)
        self.moe_layer = RefSparseMoEWithCapacity(dim, E, K, capacity_factor) if moe else None

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        x1 = self.norm2(x)
        if self.moe_layer is None:
            return x + self.mlp(x1)
        return x + (self.mlp(x1) + self.moe_layer(x1))


class RefS4D(nn.Module):
    def __init__(self, img, frames, d, depth, heads, moe_from, patch=16, tubelet=2, classes=7):
        super().__init__()
        self.proj = nn.Conv3d(3, d, (tubelet, patch, patch), stride=(tubelet, patch, patch))
        n = (frames // tubelet) * (img // patch) ** 2
        self.register_buffer("pos_embed", sinusoid_table(n, d))
        self.blocks = nn.ModuleList(RefBlock(d, heads, 4 * d, i >= moe_from) for i in range(depth))
        self.fc_norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.ModuleDict({"image": nn.Linear(d, classes), "video": nn.Linear(d, classes)})

    def forward(self, video):
        x = self.proj(video).flatten(2).transpose(1, 2) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        feat = self.fc_norm(x.mean(1))
        return self.head["video"](feat), self.head["image"](feat)


def routec_to_reference(name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """The explicit name map: one routec tensor → the reference tensor(s) it becomes."""
    top = {
        "fc_norm.weight": "fc_norm.weight", "fc_norm.bias": "fc_norm.bias",
        "head_dfer.weight": "head.video.weight", "head_dfer.bias": "head.video.bias",
        "head_sfer.weight": "head.image.weight", "head_sfer.bias": "head.image.bias",
        "embed.bias": "proj.bias",
    }
    if name in top:
        return {top[name]: value}
    if name == "embed.weight":  # Linear over (c, t, row, col)-flattened tubelets = the Conv3d weight
        return {"proj.weight": value.reshape(value.shape[0], 3, 2, 16, 16)}
    m = re.fullmatch(r"layers\.(\d+)\.blk\.(.+)", name)
    assert m, f"unmapped routec parameter {name}"
    blk, rest = f"blocks.{m[1]}", m[2]
    simple = {
        "layernorm.weight": "norm1.weight", "layernorm.bias": "norm1.bias",
        "layernorm_1.weight": "norm2.weight", "layernorm_1.bias": "norm2.bias",
        "selfattention.q.bias": "attn.q_bias", "selfattention.v.bias": "attn.v_bias",
        "selfattention.o.weight": "attn.proj.weight", "selfattention.o.bias": "attn.proj.bias",
        "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
        "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
        "g.linear.weight": "moe_layer.router.topkroute_linear.weight",
        "g.linear.bias": "moe_layer.router.topkroute_linear.bias",
    }
    if rest in simple:
        return {f"{blk}.{simple[rest]}": value}
    if rest == "selfattention.k.bias":  # VideoMAE has no key bias; softmax cancels it (see the spec)
        return {}
    m = re.fullmatch(r"selfattention\.([qkv])\.weight", rest)
    if m:
        return {f"{blk}.attn.qkv.weight#{'qkv'.index(m[1])}": value}
    if rest == "g.gate.w_noise":  # [d, E]; the official noise_linear also has a bias, zero here
        return {f"{blk}.moe_layer.router.noise_linear.weight": value.T,
                f"{blk}.moe_layer.router.noise_linear.bias": torch.zeros(value.shape[1])}
    m = re.fullmatch(r"experts\.(w1|b1|w2|b2)", rest)
    if m:
        return expert_linears(f"{blk}.moe_layer.experts", m[1], value)
    raise AssertionError(f"unmapped routec parameter {name}")


def build(**params):
    from routec.compiler import load

    torch.manual_seed(0)
    net = load("stdlib:s4d_moae", **params)
    ref = RefS4D(**params)
    return net, ref


def test_reference_tubelet_linear_equals_conv3d():
    """The spec's flatten-then-Linear tubelet embedding is the Conv3d of the official PatchEmbed."""
    torch.manual_seed(2)
    conv = nn.Conv3d(3, 5, (2, 16, 16), stride=(2, 16, 16))
    video = torch.randn(2, 3, 4, 32, 48)
    tokens = video.reshape(2, 3, 2, 2, 2, 16, 3, 16).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(2, 12, -1)
    want = conv(video).flatten(2).transpose(1, 2)
    torch.testing.assert_close(F.linear(tokens, conv.weight.reshape(5, -1), conv.bias), want)


def test_eval_matches_reference():
    net, ref = build(**SMALL)
    load_routec_state(ref, net.state_dict().items(), routec_to_reference, keep=["pos_embed"])
    net.eval(), ref.eval()
    # the top-k gates' (weights, indices, aux)
    seen = {i: capture(net, f"layers.{i}.blk.g.gate") for i in range(SMALL["moe_from"], SMALL["depth"])}
    video = torch.randn(3, 3, SMALL["frames"], SMALL["img"], SMALL["img"])
    with torch.no_grad():
        got = net(video)
        dfer, sfer = ref(video)
    torch.testing.assert_close(got.dfer, dfer, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.sfer, sfer, atol=1e-5, rtol=1e-4)
    for i, outs in seen.items():  # the routing decisions: the same two experts per token
        indices = outs[-1][1].reshape(-1, K).sort(-1).values
        want = ref.blocks[i].moe_layer.router.last_indices.reshape(-1, K).sort(-1).values
        torch.testing.assert_close(indices, want)


def test_capacity_overflow_drops_the_same_tokens():
    """Bias every router towards expert 0: it is chosen by all 24 tokens but takes only 12 (capacity)."""
    net, ref = build(**SMALL)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("g.linear.bias"):
                p[0] += 30.0
    load_routec_state(ref, net.state_dict().items(), routec_to_reference, keep=["pos_embed"])
    net.eval(), ref.eval()
    video = torch.randn(3, 3, SMALL["frames"], SMALL["img"], SMALL["img"])
    with torch.no_grad():
        got = net(video)
        dfer, sfer = ref(video)
    kept = ref.blocks[1].moe_layer.kept
    assert kept[0].numel() == 12 and kept[0].tolist() == list(range(12))  # tokens 12 … 23 overflow expert 0
    torch.testing.assert_close(got.dfer, dfer, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.sfer, sfer, atol=1e-5, rtol=1e-4)


def test_train_step_gives_gradients():
    net, _ = build(**SMALL)
    net.train()
    video = torch.randn(3, 3, SMALL["frames"], SMALL["img"], SMALL["img"])
    out = net(video)
    loss = F.cross_entropy(out.dfer, torch.tensor([0, 3, 6])) + F.cross_entropy(out.sfer, torch.tensor([1, 2, 5]))
    loss = loss + 1e-3 * out.aux_loss  # the official aux_loss_coeff
    assert torch.isfinite(loss)
    loss.backward()
    assert_every_parameter_trained(net)
