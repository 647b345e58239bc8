"""stdlib:mhr against an independent PyTorch MHR written from the official code (microsoft/mttl:
mttl/models/modifiers/poly.py — PolytroponSelector with sigmoid weights normalised per split;
mttl/models/modifiers/lora.py — SkilledLoRA: lora_a [skills, splits, d_in/splits, r], lora_b
[skills, r, splits, d_out/splits], einsum mixing, y = W x + bmm(bmm(x, A), B) · α/r) around a T5 v1.1
encoder in Hugging Face layout (block.i.layer.0.SelfAttention.{q,k,v,o}, layer.1.DenseReluDense.{wi_0,wi_1,wo},
T5LayerNorm, gelu_new). The reference omits the relative position bias and the decoder, as the spec does
(see its header). No randomness at inference.
"""

from __future__ import annotations

import functools
import math
import re

import torch
from torch import nn

from stdlib_refs import RMSNorm, assert_every_parameter_trained
from stdlib_refs import reference_backend  # noqa: F401  (autouse: ROUTEC_BACKEND=reference)

SMALL = dict(vocab=50, d=16, layers=2, heads=2, d_kv=8, d_ff=24, tasks=3, skills=4, splits=2, rank=2, alpha=2.0)


class PolySelector(nn.Module):
    def __init__(self, tasks, splits, skills):
        super().__init__()
        self.splits, self.skills = splits, skills
        self.module_logits = nn.Parameter(torch.empty(tasks, splits * skills).uniform_(-1e-3, 1e-3))

    def forward(self, task_ids):
        logits = self.module_logits[task_ids].view(-1, self.splits, self.skills)
        probs = torch.sigmoid(logits)
        return probs / (probs.sum(dim=-1, keepdim=True) + 1e-12)


class PolyLoRALinear(nn.Module):
    def __init__(self, d_in, d_out, tasks, skills, splits, rank, alpha):
        super().__init__()
        self.layer = nn.Linear(d_in, d_out, bias=False)
        self.selector = PolySelector(tasks, splits, skills)
        self.lora_a = nn.Parameter(torch.randn(skills, splits, d_in // splits, rank) * 0.3)
        self.lora_b = nn.Parameter(torch.randn(skills, rank, splits, d_out // splits) * 0.3)
        self.scaling = alpha / rank
        self.d_in, self.d_out, self.rank = d_in, d_out, rank

    def forward(self, x, task_ids):
        w = self.selector(task_ids)  # [B, splits, skills]
        a = torch.einsum("bqs,sqdr->bqdr", w, self.lora_a).reshape(x.shape[0], self.d_in, self.rank)
        b = torch.einsum("bqs,srqd->brqd", w, self.lora_b).reshape(x.shape[0], self.rank, self.d_out)
        return self.layer(x) + torch.bmm(torch.bmm(x, a), b) * self.scaling


T5LayerNorm = functools.partial(RMSNorm, eps=1e-6)  # weight · x / √(mean(x²) + 1e-6): no mean, no bias


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class RefSelfAttention(nn.Module):
    def __init__(self, d, heads, d_kv, **lora):
        super().__init__()
        inner = heads * d_kv
        self.heads, self.d_kv = heads, d_kv
        self.q, self.k, self.v = (PolyLoRALinear(d, inner, **lora) for _ in range(3))
        self.o = PolyLoRALinear(inner, d, **lora)

    def forward(self, h, task):
        B, L, _ = h.shape
        split = lambda t: t.view(B, L, self.heads, self.d_kv).transpose(1, 2)
        q, k, v = split(self.q(h, task)), split(self.k(h, task)), split(self.v(h, task))
        att = torch.softmax(q @ k.transpose(3, 2), dim=-1) @ v  # T5: no scaling
        return self.o(att.transpose(1, 2).reshape(B, L, -1), task)


class RefGatedFFN(nn.Module):
    def __init__(self, d, d_ff, **lora):
        super().__init__()
        self.wi_0, self.wi_1 = PolyLoRALinear(d, d_ff, **lora), PolyLoRALinear(d, d_ff, **lora)
        self.wo = PolyLoRALinear(d_ff, d, **lora)

    def forward(self, h, task):
        return self.wo(gelu_new(self.wi_0(h, task)) * self.wi_1(h, task), task)


class RefT5Block(nn.Module):
    def __init__(self, d, heads, d_kv, d_ff, **lora):
        super().__init__()
        self.attn_norm = T5LayerNorm(d)
        self.SelfAttention = RefSelfAttention(d, heads, d_kv, **lora)
        self.ff_norm = T5LayerNorm(d)
        self.DenseReluDense = RefGatedFFN(d, d_ff, **lora)

    def forward(self, x, task):
        x = x + self.SelfAttention(self.attn_norm(x), task)
        return x + self.DenseReluDense(self.ff_norm(x), task)


class RefMHREncoder(nn.Module):
    def __init__(self, vocab, d, layers, heads, d_kv, d_ff, tasks, skills, splits, rank, alpha):
        super().__init__()
        lora = dict(tasks=tasks, skills=skills, splits=splits, rank=rank, alpha=alpha)
        self.shared = nn.Embedding(vocab, d)
        self.block = nn.ModuleList(RefT5Block(d, heads, d_kv, d_ff, **lora) for _ in range(layers))
        self.final_layer_norm = T5LayerNorm(d)

    def forward(self, ids, task):
        x = self.shared(ids)
        for blk in self.block:
            x = blk(x, task)
        return self.final_layer_norm(x)


def routec_to_reference(name: str) -> str:
    """The explicit name map: routec parameter → reference parameter (same shapes, same layouts)."""
    fixed = {"embedding.weight": "shared.weight", "rmsnorm.weight": "final_layer_norm.weight"}
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"layers\.(\d+)\.layer\.(.+)", name)
    assert m, f"unmapped routec parameter {name}"
    blk, rest = f"block.{m[1]}", m[2]
    norms = {"rmsnorm.weight": "attn_norm.weight", "rmsnorm_1.weight": "ff_norm.weight"}
    if rest in norms:
        return f"{blk}.{norms[rest]}"
    m = re.fullmatch(r"(q|k|v|o|wi_0|wi_1|wo)\.(logits|lora_a|lora_b|base\.weight)", rest)
    assert m, f"unmapped routec parameter {name}"
    owner = "SelfAttention" if m[1] in "qkvo" else "DenseReluDense"
    leaf = {"logits": "selector.module_logits", "lora_a": "lora_a", "lora_b": "lora_b",
            "base.weight": "layer.weight"}[m[2]]
    return f"{blk}.{owner}.{m[1]}.{leaf}"


def build():
    from routec.compiler import load

    torch.manual_seed(0)
    net = load("stdlib:mhr", **SMALL)
    with torch.no_grad():  # B starts at zero (the adapters are off at init); give routing and adapters weight
        for name, p in net.named_parameters():
            if name.endswith(("lora_a", "lora_b")):
                p.normal_(0.0, 0.3)
            elif name.endswith("logits"):
                p.normal_(0.0, 2.0)
    ref = RefMHREncoder(**SMALL)
    ref.load_state_dict({routec_to_reference(k): v.clone() for k, v in net.state_dict().items()}, strict=True)
    return net, ref


def test_reference_mixing_matches_a_loop():
    """PolyLoRALinear against the MHR equations written per sample, per head and per skill."""
    torch.manual_seed(1)
    lin = PolyLoRALinear(6, 4, tasks=2, skills=3, splits=2, rank=2, alpha=3.0).double()
    with torch.no_grad():
        lin.selector.module_logits.normal_()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    task = torch.tensor([1, 0])
    with torch.no_grad():
        got = lin(x, task)
        for b in range(2):
            Z = lin.selector.module_logits[task[b]].view(2, 3)
            A = torch.zeros(6, 2, dtype=torch.float64)
            Bm = torch.zeros(2, 4, dtype=torch.float64)
            for q in range(2):
                s = torch.sigmoid(Z[q])
                for j in range(3):
                    w = s[j] / s.sum()
                    A[3 * q:3 * q + 3] += w * lin.lora_a[j, q]
                    Bm[:, 2 * q:2 * q + 2] += w * lin.lora_b[j, :, q]
            want = x[b] @ lin.layer.weight.T + 1.5 * (x[b] @ A @ Bm)
            torch.testing.assert_close(got[b], want)


def test_eval_matches_reference():
    net, ref = build()
    net.eval(), ref.eval()
    ids = torch.randint(0, SMALL["vocab"], (4, 7))
    task = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        got, want = net(ids, task), ref(ids, task)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        # the task routes: another task id gives another output for the same tokens
        other = net(ids, (task + 1) % SMALL["tasks"])
    assert not torch.allclose(got, other, atol=1e-3)


def test_train_step_gives_gradients():
    net, ref = build()
    net.train(), ref.train()
    ids = torch.randint(0, SMALL["vocab"], (3, 6))
    task = torch.tensor([0, 1, 2])  # every task is in the batch, so every row of every Z gets a gradient
    loss = net(ids, task).square().mean()
    ref_loss = ref(ids, task).square().mean()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-4)
    loss.backward()
    ref_loss.backward()
    assert_every_parameter_trained(net)
    ref_params = dict(ref.named_parameters())
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[routec_to_reference(name)].grad, atol=1e-5, rtol=1e-3)
