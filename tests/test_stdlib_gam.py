"""stdlib:gam against an independent PyTorch GAM written from the official code (rishiraj/gam, gam_model.py).

The reference is the official block structure with plain modules: LN1 → (causal depthwise conv ‖ softmax
retrieval from a learned memory bank) fused by sigmoid gates from one Linear(d, 2d), residual, then a
pre-norm GELU FFN with dropout; token + learned position embeddings, final LayerNorm and a head tied to the
token embedding. The causal conv is written as the official one (pad k - 1 on both sides, keep the first L
outputs), not as routec's left-padded CausalConv1d.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stdlib_refs import assert_every_parameter_trained, copy_parameters, next_token_loss
from stdlib_refs import reference_backend  # noqa: F401  (autouse: ROUTEC_BACKEND=reference)

SMALL = dict(vocab=50, context=16, d=16, depth=2, slots=8, kernel=3, dropout=0.1)


class RefGAMBlock(nn.Module):
    def __init__(self, d: int, slots: int, kernel: int, dropout: float):
        super().__init__()
        self.causal_conv = nn.Conv1d(d, d, kernel, padding=kernel - 1, groups=d)
        self.memory_bank = nn.Parameter(torch.empty(slots, d))
        nn.init.xavier_uniform_(self.memory_bank)
        self.gate = nn.Linear(d, 2 * d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))
        self.ln1 = nn.LayerNorm(d)
        self.ln2 = nn.LayerNorm(d)

    def forward(self, x):  # [B, T, d]
        residual = x
        x = self.ln1(x)
        local = self.causal_conv(x.transpose(1, 2))[:, :, : x.shape[1]].transpose(1, 2)
        weights = torch.softmax(x @ self.memory_bank.T, dim=-1)  # [B, T, M]
        glob = weights @ self.memory_bank  # [B, T, d]
        local_g, global_g = self.gate(x).chunk(2, dim=-1)
        x = residual + torch.sigmoid(local_g) * local + torch.sigmoid(global_g) * glob
        return x + self.ffn(self.ln2(x))


class RefGAM(nn.Module):
    def __init__(self, vocab: int, context: int, d: int, depth: int, slots: int, kernel: int, dropout: float):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, d)
        self.pos_embedding = nn.Embedding(context, d)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(RefGAMBlock(d, slots, kernel, dropout) for _ in range(depth))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx):  # [B, T] long
        T = idx.shape[1]
        x = self.dropout(self.token_embedding(idx) + self.pos_embedding(torch.arange(T))[None])
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.token_embedding.weight)  # tied head


def test_reference_memory_read_matches_a_loop():
    """The memory path of the reference against a per-token, per-slot loop."""
    torch.manual_seed(0)
    block = RefGAMBlock(4, 3, 3, 0.0).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        got = torch.softmax(x @ block.memory_bank.T, -1) @ block.memory_bank
        for b in range(2):
            for t in range(5):
                scores = [float(x[b, t] @ block.memory_bank[m]) for m in range(3)]
                top = max(scores)
                w = [torch.exp(torch.tensor(s - top, dtype=torch.float64)) for s in scores]
                want = sum(wi * block.memory_bank[m] for m, wi in enumerate(w)) / sum(w)
                torch.testing.assert_close(got[b, t], want)


BLOCK_MAP = {
    "memory": "memory_bank",
    "layernorm.weight": "ln1.weight",
    "layernorm.bias": "ln1.bias",
    "linear.weight": "gate.weight",
    "linear.bias": "gate.bias",
    "ctx.local.causalconv1d.weight": "causal_conv.weight",
    "ctx.local.causalconv1d.bias": "causal_conv.bias",
    "layernorm_1.weight": "ln2.weight",
    "layernorm_1.bias": "ln2.bias",
    "mlp.fc1.weight": "ffn.0.weight",
    "mlp.fc1.bias": "ffn.0.bias",
    "mlp.fc2.weight": "ffn.2.weight",
    "mlp.fc2.bias": "ffn.2.bias",
}


def model_map(depth: int) -> dict:
    names = {
        "tok.weight": "token_embedding.weight",
        "posembed.weight": "pos_embedding.weight",
        "layernorm.weight": "ln_f.weight",
        "layernorm.bias": "ln_f.bias",
    }
    for i in range(depth):
        names.update({f"layers.{i}.gamblock.{k}": f"blocks.{i}.{v}" for k, v in BLOCK_MAP.items()})
    return names


def block_pair(d=16, slots=8, kernel=3, dropout=0.1):
    from routec.compiler import load

    net = load("stdlib:gam", model="GAMBlock", d=d, slots=slots, kernel=kernel, dropout=dropout)
    ref = RefGAMBlock(d, slots, kernel, dropout)
    copy_parameters(ref, net, BLOCK_MAP)
    return net, ref


@pytest.mark.parametrize("T", [1, 9])
def test_block_matches_reference_in_eval(T):
    torch.manual_seed(0)
    net, ref = block_pair()
    net.eval(), ref.eval()
    x = torch.randn(3, T, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=1e-5, atol=1e-5)


def test_block_is_causal():
    """Only the conv path mixes tokens, and only from the past: changing token t+1… leaves outputs ≤ t."""
    torch.manual_seed(1)
    net, _ = block_pair()
    net.eval()
    x = torch.randn(2, 8, 16)
    y = x.clone()
    y[:, 5:] = torch.randn(2, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x)[:, :5], net(y)[:, :5])


def test_block_train_step():
    """Train mode (dropout off so both sides are deterministic): same output, gradients for every parameter;
    then a step with the paper's dropout 0.1 stays finite."""
    torch.manual_seed(2)
    net, ref = block_pair(dropout=0.0)
    net.train(), ref.train()
    x = torch.randn(2, 6, 16)
    out = net(x)
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)
    loss = out.square().mean()
    loss.backward()
    assert_every_parameter_trained(net)
    net, _ = block_pair(dropout=0.1)
    net.train()
    loss = net(x).square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert_every_parameter_trained(net, nonzero=False)


def model_pair(dropout=SMALL["dropout"]):
    from routec.compiler import load

    small = dict(SMALL, dropout=dropout)
    net = load("stdlib:gam", **small)
    ref = RefGAM(**small)
    copy_parameters(ref, net, model_map(small["depth"]))
    return net, ref


def test_model_matches_reference_in_eval():
    torch.manual_seed(3)
    net, ref = model_pair()
    net.eval(), ref.eval()
    ids = torch.randint(0, SMALL["vocab"], (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(net(ids), ref(ids), rtol=1e-5, atol=1e-5)


def test_model_train_step():
    """One language-model step with the tied head (dropout off so both sides are deterministic): the
    embedding gets gradient from the input lookup and from the head."""
    torch.manual_seed(4)
    net, ref = model_pair(dropout=0.0)
    net.train()
    ids = torch.randint(0, SMALL["vocab"], (2, 11))
    logits = net(ids)
    torch.testing.assert_close(logits, ref(ids), rtol=1e-5, atol=1e-5)
    loss = next_token_loss(logits, ids)
    loss.backward()
    assert torch.isfinite(loss)
    assert_every_parameter_trained(net)
