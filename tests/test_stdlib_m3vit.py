"""stdlib:m3vit against an independent PyTorch M³ViT written from the official code
(VITA-Group/M3ViT: models/vision_transformer_moe.py, models/custom_moe_layer.py,
models/gate_funs/noisy_gate_vmoe.py, README run: multi_gate=True, noise std 0).

The reference keeps the official structure: a timm-style ViT (fused qkv projection, class token, learned
positions, LayerNorm eps 1e-6), MoE in the odd-indexed blocks, one NoisyGate_VMoE per task (a bias-free
[d, E] matrix; p = softmax(x W); top-k of p kept as weights without renormalisation) and E separate expert
MLPs fc1 → GELU → fc2. The forward takes one task id per batch, as the official `forward(x, task_id=…)`; the
routec module takes a task id per sample, so mixed-task batches are compared sample group by sample group.
There is no randomness at inference (noise std 0).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from stdlib_refs import (TimmAttention, TimmMlp, assert_every_parameter_trained, assert_same_topk, canonical_state,
                         capture, expert_linears, load_routec_state, tensor_out)
from stdlib_refs import reference_backend  # noqa: F401  (autouse: ROUTEC_BACKEND=reference)

SMALL = dict(img=32, patch=16, d=32, depth=4, heads=2, mlp_ratio=2, experts=6, k=2, moe_mlp_ratio=1)
TASKS = ("semseg", "parts", "saliency", "normals", "edges")  # the spec's keyed gate order


class RefVMoEGate(nn.Module):
    """NoisyGate_VMoE with no noise: indices and probabilities of the top-k experts of softmax(x W)."""

    def __init__(self, dim, experts, k):
        super().__init__()
        self.k = k
        self.w_gate = nn.Parameter(torch.randn(dim, experts) * 0.1)

    def forward(self, x):  # [T, d]
        probs = torch.softmax(x @ self.w_gate, dim=1)
        gates, idx = probs.topk(self.k, dim=1)
        return idx, gates


class RefTaskMoE(nn.Module):
    """FMoETransformerMLP with multi_gate: gate[task] picks experts, y = Σ_j p_j · expert_j(x)."""

    def __init__(self, dim, hidden, experts, k, tasks):
        super().__init__()
        self.experts = nn.ModuleList(TimmMlp(dim, hidden) for _ in range(experts))
        self.gate = nn.ModuleList(RefVMoEGate(dim, experts, k) for _ in range(tasks))
        self.last_indices = None

    def forward(self, x, task_id):
        flat = x.reshape(-1, x.shape[-1])
        self.last_input = flat
        idx, score = self.gate[task_id](flat)
        self.last_indices = idx
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, score[rows, slot, None] * expert(flat[rows]))
        return out.reshape(x.shape)


class RefBlock(nn.Module):
    def __init__(self, dim, heads, hidden, moe=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TimmAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.moe = moe is not None
        self.mlp = moe if moe is not None else TimmMlp(dim, hidden)

    def forward(self, x, task_id):
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        return x + (self.mlp(h, task_id) if self.moe else self.mlp(h))


class RefM3ViT(nn.Module):
    def __init__(self, img, patch, d, depth, heads, mlp_ratio, experts, k, moe_mlp_ratio, tasks=len(TASKS)):
        super().__init__()
        n = (img // patch) ** 2
        self.patch_embed = nn.Conv2d(3, d, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, d))
        self.blocks = nn.ModuleList(
            RefBlock(d, heads, d * mlp_ratio, RefTaskMoE(d, d * moe_mlp_ratio, experts, k, tasks) if i % 2 else None)
            for i in range(depth)
        )

    def forward(self, img, task_id: int):
        x = self.patch_embed(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x, task_id)
        return x


def routec_to_reference(name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """The explicit name map: one routec parameter → the reference parameter(s) it becomes."""
    if name == "cls":
        return {"cls_token": value.reshape(1, 1, -1)}
    if name == "posembed.weight":
        return {"pos_embed": value[None]}
    m = re.fullmatch(r"patchembed\.proj\.(weight|bias)", name)
    if m:
        return {f"patch_embed.{m[1]}": value}
    m = re.fullmatch(r"layers\.(\d+)\.(blk|moe)\.(.+)", name)
    assert m, f"unmapped routec parameter {name}"
    i, rest = m[1], m[3]
    blk = f"blocks.{i}"
    simple = {
        "layernorm.weight": "norm1.weight", "layernorm.bias": "norm1.bias",
        "layernorm_1.weight": "norm2.weight", "layernorm_1.bias": "norm2.bias",
        "selfattention.o.weight": "attn.proj.weight", "selfattention.o.bias": "attn.proj.bias",
        "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
        "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
    }
    if rest in simple:
        return {f"{blk}.{simple[rest]}": value}
    m = re.fullmatch(r"selfattention\.([qkv])\.(weight|bias)", rest)
    if m:  # the fused qkv rows are [q; k; v]; the caller concatenates the three parts
        return {f"{blk}.attn.qkv.{m[2]}#{'qkv'.index(m[1])}": value}
    m = re.fullmatch(r"(\w+)\.linear\.weight", rest)
    if m and m[1] in TASKS:  # task τ's gate Linear(d, E) weight [E, d] → w_gate [d, E]
        return {f"{blk}.mlp.gate.{TASKS.index(m[1])}.w_gate": value.T}
    m = re.fullmatch(r"experts\.(w1|b1|w2|b2)", rest)
    if m:
        return expert_linears(f"{blk}.mlp.experts", m[1], value)
    raise AssertionError(f"unmapped routec parameter {name}")


def test_reference_moe_matches_a_per_token_loop():
    """The reference MoE layer against the paper's formula evaluated token by token."""
    torch.manual_seed(1)
    moe = RefTaskMoE(8, 8, experts=5, k=3, tasks=2).double()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    with torch.no_grad():
        got = moe(x, 1)
        W = moe.gate[1].w_gate
        for b in range(2):
            for t in range(7):
                p = torch.softmax(x[b, t] @ W, dim=0)
                top = sorted(range(5), key=lambda e: -float(p[e]))[:3]
                want = sum(p[e] * moe.experts[e](x[b, t]) for e in top)
                torch.testing.assert_close(got[b, t], want)


def build(**params):
    from routec.compiler import load

    torch.manual_seed(0)
    net = load("stdlib:m3vit", **params)
    with torch.no_grad():  # sharper gates than the 0.02 init, so that the tasks' top-k choices differ clearly
        for name, p in net.named_parameters():
            if any(f"{task}.linear" in name for task in TASKS):
                p.mul_(50.0)
    ref = RefM3ViT(**params)
    load_routec_state(ref, canonical_state(net).items(), routec_to_reference)
    return net, ref


def test_eval_matches_reference_one_task_per_batch():
    net, ref = build(**SMALL)
    net.eval(), ref.eval()
    gates = {i: capture(net, f"layers.{i}.moe.g.gate") for i in (1, 3)}  # the top-k gates' (weights, indices, aux)
    img = torch.randn(3, 3, SMALL["img"], SMALL["img"])
    for task in range(len(TASKS)):
        with torch.no_grad():
            got = tensor_out(net(img, torch.full((3,), task, dtype=torch.long)))
            want = ref(img, task)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        for i, seen in gates.items():  # the routing decisions: the same experts, with the same weights
            weights, indices, _ = seen[-1]
            ref_moe = ref.blocks[i].mlp
            ref_idx, ref_w = ref_moe.gate[task](ref_moe.last_input)
            assert_same_topk(weights, indices, ref_w, ref_idx, SMALL["k"])
    # the tasks really take different pathways through the experts
    chosen = []
    with torch.no_grad():
        for task in range(len(TASKS)):
            ref(img, task)
            chosen.append(ref.blocks[1].mlp.last_indices.clone())
    assert not all(torch.equal(chosen[0], c) for c in chosen[1:])


def test_eval_matches_reference_mixed_tasks():
    net, ref = build(**SMALL)
    net.eval(), ref.eval()
    img = torch.randn(5, 3, SMALL["img"], SMALL["img"])
    task = torch.tensor([2, 0, 1, 0, 2])
    with torch.no_grad():
        got = tensor_out(net(img, task))
        for t in range(len(TASKS)):
            rows = (task == t).nonzero().squeeze(1)
            torch.testing.assert_close(got[rows], ref(img[rows], t), atol=1e-5, rtol=1e-4)


def test_train_step_gives_gradients():
    net, _ = build(**SMALL)
    net.train()
    img = torch.randn(5, 3, SMALL["img"], SMALL["img"])
    out = net(img, torch.tensor([0, 1, 2, 3, 4]))
    loss = tensor_out(out).square().mean()
    aux = getattr(out, "aux_loss", None)
    if aux is not None:
        loss = loss + 0.01 * aux
    assert torch.isfinite(loss)
    loss.backward()
    assert_every_parameter_trained(net)
