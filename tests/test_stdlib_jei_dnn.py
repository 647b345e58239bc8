"""stdlib:jei_dnn against an independent PyTorch JEI-DNN written from the official code
(networkslab/dynn: src/models/t2t_vit.py — `_forward_features`, `surrogate_forward` in
GateSelectionMode.DETERMINISTIC; src/models/custom_modules/learnable_uncertainty_gate.py; src/uncertainty_metrics.py).

The reference follows the official structure: a class token and the fixed sinusoid position table, timm-style
blocks (fused qkv), ONE final LayerNorm shared by every intermediate head (`self.norm(x)[:, 0]`), one
Linear(d, C) inference module after every block but the last, and per head a LearnableUncGate — the four
detached uncertainty metrics [p_max, entropy, margin, entropy of p² / Σ p²] (scipy-style entropies in nats,
here computed with plain torch ops) into Linear(4, 1). Inference walks the heads in order: a sample exits at the
first head whose sigmoid(gate) ≥ 0.5, else takes the final head; `sample_exit_level_map` holds its exit index.
The T2T stem is replaced by a ViT patch embedding in the spec (see its header); the reference does the same.
No randomness at inference.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from stdlib_refs import TimmAttention, load_routec_state, sinusoid_table
from stdlib_refs import reference_backend  # noqa: F401  (autouse: ROUTEC_BACKEND=reference)

SMALL = dict(img=32, d=32, depth=4, heads=2, classes=5)  # 4 patches + cls, 3 intermediate exits


class RefBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TimmAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def uncertainty_metrics(logits: torch.Tensor) -> torch.Tensor:
    """compute_detached_uncertainty_metrics: [p_max, entropy, margin, entropy_pow] per row, detached."""
    probs = F.softmax(logits.detach(), dim=1)
    top2 = probs.topk(2).values
    entropy = -(probs * probs.log()).sum(1)
    pow_probs = probs**2 / (probs**2).sum(dim=1, keepdim=True)
    entropy_pow = -(pow_probs * pow_probs.log()).sum(1)
    return torch.stack([top2[:, 0], entropy, top2[:, 0] - top2[:, 1], entropy_pow], dim=1)


class RefLearnableUncGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, logits):
        return self.linear(uncertainty_metrics(logits))


class RefJEIDNN(nn.Module):
    def __init__(self, img, d, depth, heads, classes, patch=16, mlp_ratio=3):
        super().__init__()
        n = (img // patch) ** 2
        self.patch_embed = nn.Conv2d(3, d, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("pos_embed", sinusoid_table(n + 1, d))
        self.blocks = nn.ModuleList(RefBlock(d, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        self.intermediate_heads = nn.ModuleList(nn.Linear(d, classes) for _ in range(depth - 1))
        self.gates = nn.ModuleList(RefLearnableUncGate() for _ in range(depth - 1))

    def forward_all(self, img):
        """(final logits, intermediate logits, gate probabilities) — every head evaluated."""
        x = self.patch_embed(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        inter = []
        for blk_idx, blk in enumerate(self.blocks):
            x = blk(x)
            if blk_idx < len(self.intermediate_heads):
                inter.append(x)
        logits = [head(self.norm(z)[:, 0]) for head, z in zip(self.intermediate_heads, inter)]
        probs = [torch.sigmoid(gate(lg)) for gate, lg in zip(self.gates, logits)]
        return self.head(self.norm(x)[:, 0]), logits, probs

    def forward(self, img):
        """surrogate_forward, deterministic gates: (gated_y_logits, sample_exit_level_map)."""
        final, logits, probs = self.forward_all(img)
        gated = torch.zeros_like(final)
        level = torch.zeros(img.shape[0], dtype=torch.long)
        past = torch.zeros(img.shape[0], 1, dtype=torch.bool)
        for lvl, (lg, p) in enumerate(zip(logits, probs)):
            current = torch.logical_and(p >= 0.5, torch.logical_not(past))
            level[current.flatten().nonzero()] = lvl
            past = torch.logical_or(current, past)
            gated = gated + current * lg
        final_exit = torch.logical_not(past)
        level[final_exit.flatten().nonzero()] = len(logits)
        return gated + final_exit * final, level


def routec_to_reference(name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """The explicit name map: one routec tensor → the reference tensor(s) it becomes."""
    top = {
        "cls": "cls_token", "norm.weight": "norm.weight", "norm.bias": "norm.bias",
        "fc.weight": "head.weight", "fc.bias": "head.bias",
        "patchembed.proj.weight": "patch_embed.weight", "patchembed.proj.bias": "patch_embed.bias",
    }
    if name in top:
        return {top[name]: value}
    m = re.fullmatch(r"(?:layers\.(\d+)\.blk|(last))\.(.+)", name)
    if m:
        i = int(m[1]) if m[1] is not None else SMALL["depth"] - 1
        blk, rest = f"blocks.{i}", m[3]
        simple = {
            "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
            "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
            "attn.o.weight": "attn.proj.weight", "attn.o.bias": "attn.proj.bias",
            "mlp.fc1.weight": "fc1.weight", "mlp.fc1.bias": "fc1.bias",
            "mlp.fc2.weight": "fc2.weight", "mlp.fc2.bias": "fc2.bias",
        }
        if rest in simple:
            return {f"{blk}.{simple[rest]}": value}
        m = re.fullmatch(r"attn\.([qkv])\.(weight|bias)", rest)
        assert m, f"unmapped routec parameter {name}"
        return {f"{blk}.attn.qkv.{m[2]}#{'qkv'.index(m[1])}": value}
    m = re.fullmatch(r"layers\.(\d+)\.head\.linear\.(weight|bias)", name)
    if m:
        return {f"intermediate_heads.{m[1]}.{m[2]}": value}
    m = re.fullmatch(r"layers\.(\d+)\.uncertaintygate\.linear\.(weight|bias)", name)
    if m:
        return {f"gates.{m[1]}.linear.{m[2]}": value}
    raise AssertionError(f"unmapped routec parameter {name}")


def copy_into_reference(net: nn.Module, ref: nn.Module) -> None:
    load_routec_state(ref, net.state_dict().items(), routec_to_reference, keep=["pos_embed"])


def build(img_batch: torch.Tensor):
    """A routec JEI-DNN and its reference, with the gate biases shifted so that each gate splits `img_batch`
    in half at sigmoid = 0.5 (midway between two samples): samples leave at every exit, some reach the end."""
    from routec.compiler import load

    torch.manual_seed(0)
    net = load("stdlib:jei_dnn", **SMALL)
    ref = RefJEIDNN(**SMALL)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("uncertaintygate.linear.weight"):
                p.mul_(40.0)
        copy_into_reference(net, ref)
        _, logits, _ = ref.forward_all(img_batch)
        for lvl, (gate, lg) in enumerate(zip(ref.gates, logits)):
            pre = gate(lg).flatten().sort().values  # the gate's pre-sigmoid values
            middle = (pre[len(pre) // 2 - 1] + pre[len(pre) // 2]) / 2  # no sample sits on the threshold
            dict(net.named_parameters())[f"layers.{lvl}.uncertaintygate.linear.bias"].sub_(middle)
        copy_into_reference(net, ref)
    return net, ref


def test_reference_uncertainty_metrics_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64)
    p = [math.exp(v) for v in (2.0, 0.0, -1.0)]
    p = [v / sum(p) for v in p]
    q = [v * v / sum(w * w for w in p) for v in p]
    want = [max(p), -sum(v * math.log(v) for v in p), p[0] - p[1], -sum(v * math.log(v) for v in q)]
    torch.testing.assert_close(uncertainty_metrics(logits)[0], torch.tensor(want, dtype=torch.float64))


def test_eval_exits_and_outputs_match_reference():
    torch.manual_seed(1)
    img = torch.randn(16, 3, SMALL["img"], SMALL["img"])
    net, ref = build(img)
    net.eval(), ref.eval()
    with torch.no_grad():
        got = net(img)
        want, level = ref(img)
    assert set(level.tolist()) == {0, 1, 2, 3}, level  # every exit and the final head are taken
    torch.testing.assert_close(got.exit_index, level)
    torch.testing.assert_close(got.out, want, atol=1e-5, rtol=1e-4)


def test_train_mode_returns_every_head():
    torch.manual_seed(1)
    img = torch.randn(4, 3, SMALL["img"], SMALL["img"])
    net, ref = build(img)
    net.train(), ref.train()
    out = net(img)
    final, logits, _ = ref.forward_all(img)
    assert len(out.exits) == len(logits) + 1
    for got, want in zip(out.exits, logits + [final]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.out, final, atol=1e-5, rtol=1e-4)
    loss = sum(F.cross_entropy(e, torch.tensor([0, 1, 2, 3])) for e in out.exits)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in net.named_parameters():
        if "uncertaintygate" in name:
            continue  # the gates are trained by their own loss on `exit_scores` (next test)
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_train_mode_gate_scores_train_the_gates():
    """`exit_scores` are the gates' exit probabilities g_l = σ(w·u + b) (the reference's), and a gate loss
    on them (BCE against exit targets, as the official GATE phase) trains every gate's Linear(4, 1)."""
    torch.manual_seed(1)
    img = torch.randn(4, 3, SMALL["img"], SMALL["img"])
    net, ref = build(img)
    net.train(), ref.train()
    out = net(img)
    _, _, probs = ref.forward_all(img)
    assert len(out.exit_scores) == len(probs)
    for got, want in zip(out.exit_scores, probs):
        torch.testing.assert_close(got, want.squeeze(1), atol=1e-5, rtol=1e-4)
    target = torch.tensor([1.0, 0.0, 1.0, 0.0])
    loss = sum(F.binary_cross_entropy(g, target) for g in out.exit_scores)
    loss.backward()
    for name, p in net.named_parameters():
        if "uncertaintygate" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        elif p.grad is not None:  # the features are detached: the gate loss stops at the gates
            assert p.grad.abs().sum() == 0, name
