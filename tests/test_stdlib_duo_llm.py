"""stdlib:duo_llm against an independent PyTorch Duo-LLM written from the paper's description (Alizadeh et al.,
2024; no official code): a GPT-2 decoder (HF GPT-2 layout: token and position tables, pre-norm blocks with a
fused causal c_attn, final ln_f) whose FFN slot in every layer offers skip / small FFN / big FFN,
chosen per token by r_l = argmax(W_l h_l) over the residual stream entering the slot; the LM head is tied to the
token embedding.

The reference evaluates all three options for every token and picks each token's option with the router's
argmax (dense compute + selection), an independent route to the same function as routec's gather / run /
scatter-back of the routed rows. No randomness at inference.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from stdlib_refs import assert_every_parameter_trained, capture, load_routec_state, next_token_loss, tensor_out
from stdlib_refs import reference_backend  # noqa: F401  (autouse: ROUTEC_BACKEND=reference)

SMALL = dict(vocab=50, context=16, d=32, layers=2, heads=2, small=16, big=128)


class RefFFN(nn.Module):
    """One FFN option: x + c_proj(gelu(c_fc(ln(x))))."""

    def __init__(self, d, hidden):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, hidden)
        self.c_proj = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.c_proj(F.gelu(self.c_fc(self.ln(x))))


class RefDuoBlock(nn.Module):
    def __init__(self, d, heads, small, big):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.router = nn.Linear(d, 3, bias=False)
        self.small = RefFFN(d, small)
        self.big = RefFFN(d, big)
        self.last_route = None

    def attn(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.reshape(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / (C // self.heads) ** 0.5
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        route = self.router(x).argmax(-1)  # [B, T]: 0 skip, 1 small, 2 big
        self.last_route = route
        options = torch.stack([x, self.small(x), self.big(x)], dim=-2)  # [B, T, 3, d]
        return options.gather(-2, route[..., None, None].expand(*route.shape, 1, x.shape[-1])).squeeze(-2)


class RefDuoLLM(nn.Module):
    def __init__(self, vocab, context, d, layers, heads, small, big):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(context, d)
        self.h = nn.ModuleList(RefDuoBlock(d, heads, small, big) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        for block in self.h:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)  # GPT-2's LM head is tied to the token embedding


def routec_to_reference(name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """The explicit name map: one routec tensor → the reference tensor(s) it becomes."""
    top = {name: name for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    if name in top:
        return {top[name]: value}
    m = re.fullmatch(r"layers\.(\d+)\.layer\.(.+)", name)
    assert m, f"unmapped routec parameter {name}"
    blk, rest = f"h.{m[1]}", m[2]
    if re.fullmatch(r"route_r\.branches\.\d+\..+", rest):
        return {}  # the route's own handle on the branch modules; the spec-named entries carry the tensors
    simple = {
        "layernorm.weight": "ln_1.weight", "layernorm.bias": "ln_1.bias",
        "selfattention.o.weight": "c_proj.weight", "selfattention.o.bias": "c_proj.bias",
        "r.linear.weight": "router.weight",
    }
    if rest in simple:
        return {f"{blk}.{simple[rest]}": value}
    m = re.fullmatch(r"selfattention\.([qkv])\.(weight|bias)", rest)
    if m:
        return {f"{blk}.c_attn.{m[2]}#{'qkv'.index(m[1])}": value}
    m = re.fullmatch(r"(small|big)\.ffn\.(layernorm|mlp\.fc1|mlp\.fc2)\.(weight|bias)", rest)
    if m:
        sub = {"layernorm": "ln", "mlp.fc1": "c_fc", "mlp.fc2": "c_proj"}[m[2]]
        return {f"{blk}.{m[1]}.{sub}.{m[3]}": value}
    raise AssertionError(f"unmapped routec parameter {name}")


def build():
    from routec.compiler import load

    torch.manual_seed(0)
    net = load("stdlib:duo_llm", **SMALL)
    ref = RefDuoLLM(**SMALL)
    load_routec_state(ref, net.state_dict().items(), routec_to_reference)
    return net, ref


def test_reference_layer_matches_a_per_token_loop():
    """The reference FFN slot against the three-way choice made token by token."""
    torch.manual_seed(3)
    blk = RefDuoBlock(8, 2, 4, 16).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        got = blk(x)
        h = x + blk.attn(blk.ln_1(x))
        for b in range(2):
            for t in range(5):
                r = int(torch.argmax(h[b, t] @ blk.router.weight.T))
                want = [h[b, t], blk.small(h[b, t]), blk.big(h[b, t])][r]
                torch.testing.assert_close(got[b, t], want)


def test_eval_matches_reference():
    net, ref = build()
    net.eval(), ref.eval()
    ids = torch.randint(0, SMALL["vocab"], (3, 13))
    seen = {i: capture(net, f"layers.{i}.layer.r.gate") for i in range(SMALL["layers"])}  # one-hot [B, T, 3]
    with torch.no_grad():
        got = tensor_out(net(ids))
        want = ref(ids)
    for i, block in enumerate(ref.h):  # every option is taken somewhere in every layer, as routec routes it
        assert set(block.last_route.flatten().tolist()) == {0, 1, 2}, block.last_route
        torch.testing.assert_close(seen[i][-1].argmax(-1), block.last_route)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_train_step_gives_gradients():
    net, ref = build()
    net.train(), ref.train()
    ids = torch.randint(0, SMALL["vocab"], (3, 13))
    logits = tensor_out(net(ids))
    torch.testing.assert_close(logits, ref(ids), atol=1e-5, rtol=1e-4)  # hard routes in training too
    loss = next_token_loss(logits, ids)
    assert torch.isfinite(loss)
    loss.backward()
    assert_every_parameter_trained(net)
