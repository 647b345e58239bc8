"""stdlib:path_ensemble_vit against an independent PyTorch ViT-as-path-ensemble written from the paper
(Chang et al., "Revisiting Vision Transformer from the View of Path Ensemble", ICCV 2023): a timm-style ViT
(fused qkv, class token, learned positions, LayerNorm eps 1e-6) whose forward collects the ensemble stream
z = γ0·x0 + Σ_l (α_l a_l + β_l f_l) next to the usual feature stream, with pruned paths left out of z.
No randomness at inference.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stdlib_refs import TimmAttention, assert_every_parameter_trained, load_routec_state
from stdlib_refs import reference_backend  # noqa: F401  (autouse: ROUTEC_BACKEND=reference)

SMALL = dict(img=32, patch=16, d=32, depth=3, heads=2, mlp_ratio=2, classes=5)


class RefBlock(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TimmAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def paths(self, x):
        """The block's two non-identity paths: MSA and MSA→FFN."""
        a = self.attn(self.norm1(x))
        f = self.fc2(F.gelu(self.fc1(self.norm2(x + a))))
        return a, f


class RefPathEnsembleViT(nn.Module):
    def __init__(self, img, patch, d, depth, heads, mlp_ratio, classes, prune_attn=0, prune_ffn=0):
        super().__init__()
        n = (img // patch) ** 2
        self.patch_embed = nn.Conv2d(3, d, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, d))
        self.blocks = nn.ModuleList(RefBlock(d, heads, d * mlp_ratio) for _ in range(depth))
        self.gamma0 = nn.Parameter(torch.ones(()))
        # EnsembleScale: one scalar per kept path; a pruned path has no scale (it is not in the ensemble)
        self.alpha = nn.ParameterDict({str(i): nn.Parameter(torch.ones(())) for i in range(prune_attn, depth)})
        self.beta = nn.ParameterDict({str(i): nn.Parameter(torch.ones(())) for i in range(prune_ffn, depth)})
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, classes)

    def forward(self, img):
        x = self.patch_embed(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        ensemble = [self.gamma0 * x]
        for i, blk in enumerate(self.blocks):
            a, f = blk.paths(x)
            x = x + a + f  # the feature stream is the plain ViT
            if str(i) in self.alpha:
                ensemble.append(self.alpha[str(i)] * a)
            if str(i) in self.beta:
                ensemble.append(self.beta[str(i)] * f)
        z = torch.stack(ensemble).sum(0)
        return self.head(self.norm(z)[:, 0])


def routec_to_reference(name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """The explicit name map: one routec parameter → the reference parameter it becomes."""
    if name == "cls":
        return {"cls_token": value.reshape(1, 1, -1)}
    if name == "posembed.weight":
        return {"pos_embed": value[None]}
    if name == "gamma0":
        return {"gamma0": value.reshape(())}
    fixed = {
        "patchembed.proj.weight": "patch_embed.weight", "patchembed.proj.bias": "patch_embed.bias",
        "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
        "linear.weight": "head.weight", "linear.bias": "head.bias",
    }
    if name in fixed:
        return {fixed[name]: value}
    m = re.fullmatch(r"layers\.(\d+)\.(alpha|beta)", name)
    if m:
        return {f"{m[2]}.{m[1]}": value.reshape(())}
    m = re.fullmatch(r"layers\.(\d+)\.blk\.(.+)", name)
    assert m, f"unmapped routec parameter {name}"
    blk, rest = f"blocks.{m[1]}", m[2]
    simple = {
        "layernorm.weight": "norm1.weight", "layernorm.bias": "norm1.bias",
        "layernorm_1.weight": "norm2.weight", "layernorm_1.bias": "norm2.bias",
        "selfattention.o.weight": "attn.proj.weight", "selfattention.o.bias": "attn.proj.bias",
        "mlp.fc1.weight": "fc1.weight", "mlp.fc1.bias": "fc1.bias",
        "mlp.fc2.weight": "fc2.weight", "mlp.fc2.bias": "fc2.bias",
    }
    if rest in simple:
        return {f"{blk}.{simple[rest]}": value}
    m = re.fullmatch(r"selfattention\.([qkv])\.(weight|bias)", rest)
    assert m, f"unmapped routec parameter {name}"
    return {f"{blk}.attn.qkv.{m[2]}#{'qkv'.index(m[1])}": value}


def build(**prune):
    from routec.compiler import load

    torch.manual_seed(0)
    net = load("stdlib:path_ensemble_vit", **SMALL, **prune)
    with torch.no_grad():  # scales away from 1, so that each path's weight matters
        for name, p in net.named_parameters():
            if re.search(r"(alpha|beta|gamma0)$", name):
                p.uniform_(0.2, 1.8)
    ref = RefPathEnsembleViT(**SMALL, **prune)
    load_routec_state(ref, net.state_dict().items(), routec_to_reference)
    return net, ref


def test_reference_unrolls_to_the_plain_vit():
    """With every scale 1 and no pruning, z is the final feature x_L: the path-ensemble identity
    x_L = x_0 + Σ_l (a_l + f_l), checked against a plainly written sequential pre-norm ViT."""
    torch.manual_seed(3)
    ref = RefPathEnsembleViT(**SMALL).double()
    img = torch.randn(2, 3, SMALL["img"], SMALL["img"], dtype=torch.float64)
    with torch.no_grad():
        x = ref.patch_embed(img).flatten(2).transpose(1, 2)
        x = torch.cat([ref.cls_token.expand(2, -1, -1), x], 1) + ref.pos_embed
        for blk in ref.blocks:
            x = x + blk.attn(blk.norm1(x))
            x = x + blk.fc2(F.gelu(blk.fc1(blk.norm2(x))))
        torch.testing.assert_close(ref(img), ref.head(ref.norm(x)[:, 0]))


@pytest.mark.parametrize("prune", [dict(), dict(prune_attn=1), dict(prune_attn=2, prune_ffn=1)],
                         ids=["all_paths", "prune_attn1", "prune_attn2_ffn1"])
def test_eval_matches_reference(prune):
    net, ref = build(**prune)
    net.eval(), ref.eval()
    scales = [n for n, _ in net.named_parameters() if re.search(r"(alpha|beta)$", n)]
    assert len(scales) == 2 * SMALL["depth"] - prune.get("prune_attn", 0) - prune.get("prune_ffn", 0)
    img = torch.randn(3, 3, SMALL["img"], SMALL["img"])
    with torch.no_grad():
        torch.testing.assert_close(net(img), ref(img), atol=1e-5, rtol=1e-4)


def test_train_step_gives_gradients():
    net, ref = build(prune_attn=1)
    net.train(), ref.train()
    img = torch.randn(4, 3, SMALL["img"], SMALL["img"])
    target = torch.tensor([0, 1, 2, 3])
    loss = F.cross_entropy(net(img), target)
    ref_loss = F.cross_entropy(ref(img), target)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-4)
    assert torch.isfinite(loss)
    loss.backward()
    ref_loss.backward()
    assert_every_parameter_trained(net)
    torch.testing.assert_close(net.get_parameter("layers.2.alpha").grad.reshape(()), ref.alpha["2"].grad,
                               atol=1e-5, rtol=1e-4)
