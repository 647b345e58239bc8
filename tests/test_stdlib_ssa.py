"""stdlib:ssa against an independent PyTorch ViT with Stochastically Subsampled self-Attention (Hussain et al.,
KDD 2023), written from the paper's description: SSA is expressed here as a boolean *attention mask* in the
original token order — query i may attend key j iff π puts them in the same one of the k contiguous groups —
instead of routec's permute → fold groups into the batch → attention → unpermute, so the two realisations are
independent.

Randomness: both models draw π with `torch.randperm`; the test wraps `torch.randperm` to record every
permutation routec draws, and the reference replays them in order (one per layer and per pass).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stdlib_refs import assert_every_parameter_trained, copy_parameters, record_randperm
from stdlib_refs import reference_backend  # noqa: F401  (autouse: ROUTEC_BACKEND=reference)

SMALL = dict(size=8, patch=2, d=16, depth=2, heads=2, mlp=4, classes=5, k=4)
TOKENS = (SMALL["size"] // SMALL["patch"]) ** 2


def group_mask(perm: torch.Tensor, k: int) -> torch.Tensor:
    """[N, N] bool: tokens i and j share a group when their positions in π fall in the same block of N/k."""
    n = perm.numel()
    where = torch.empty_like(perm)
    where[perm] = torch.arange(n)  # where[i] = position of token i in the permuted sequence
    group = where // (n // k)
    return group[:, None] == group[None, :]


class RefAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, mask=None):  # x [B, N, d], mask [N, N] bool (True = may attend)
        bsz, n, d = x.shape
        dh = d // self.heads
        q, k, v = (p(x).view(bsz, n, self.heads, dh).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) / dh ** 0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(bsz, n, d))


class RefSSAViT(nn.Module):
    def __init__(self, size, patch, d, depth, heads, mlp, classes, k):
        super().__init__()
        self.k = k
        n = (size // patch) ** 2
        self.patch_embed = nn.Conv2d(3, d, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(n, d))
        self.norm1 = nn.ModuleList(nn.LayerNorm(d, eps=1e-6) for _ in range(depth))
        self.attn = nn.ModuleList(RefAttention(d, heads) for _ in range(depth))
        self.norm2 = nn.ModuleList(nn.LayerNorm(d, eps=1e-6) for _ in range(depth))
        self.fc1 = nn.ModuleList(nn.Linear(d, mlp * d) for _ in range(depth))
        self.fc2 = nn.ModuleList(nn.Linear(mlp * d, d) for _ in range(depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, classes)

    def forward(self, img, perms=None):  # perms: one π per layer (SSA) or None (dense attention)
        x = self.patch_embed(img).flatten(2).transpose(1, 2) + self.pos
        for l in range(len(self.attn)):
            mask = None if perms is None else group_mask(perms[l], self.k)
            x = x + self.attn[l](self.norm1[l](x), mask)
            x = x + self.fc2[l](F.gelu(self.fc1[l](self.norm2[l](x))))
        return self.head(self.norm(x).mean(1))


def name_map(depth):
    m = {"net.patchembed.proj.weight": "patch_embed.weight", "net.patchembed.proj.bias": "patch_embed.bias",
         "net.posembed.weight": "pos", "net.layernorm.weight": "norm.weight", "net.layernorm.bias": "norm.bias",
         "net.linear.weight": "head.weight", "net.linear.bias": "head.bias"}
    for l in range(depth):
        p = f"net.layers.{l}."
        for a, b in (("layernorm", "norm1"), ("layernorm_1", "norm2"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")):
            for w in ("weight", "bias"):
                m[f"{p}{a}.{w}"] = f"{b}.{l}.{w}"
        for proj in "qkvo":
            for w in ("weight", "bias"):
                m[f"{p}ssaattention.attn.{proj}.{w}"] = f"attn.{l}.{proj}.{w}"
    return m


@pytest.fixture
def drawn(monkeypatch):
    """Every permutation routec draws (torch.randperm wrapped)."""
    return record_randperm(monkeypatch)


def pair(**over):
    from routec.compiler import load

    params = {**SMALL, **over}
    net = load("stdlib:ssa", **params)
    ref = RefSSAViT(**{k: v for k, v in params.items() if k not in ("ssa", "ensemble")})
    copy_parameters(ref, net, name_map(params["depth"]))
    return net, ref


def test_group_mask_is_a_block_diagonal_pattern_in_permuted_order():
    """Each query sees exactly N/k keys, itself included, and in π order the mask is block-diagonal."""
    torch.manual_seed(0)
    perm = torch.randperm(12)
    m = group_mask(perm, 3)
    assert torch.all(m.sum(1) == 4) and torch.all(m.diagonal())
    permuted = m[perm][:, perm]
    blocks = torch.block_diag(*[torch.ones(4, 4, dtype=torch.bool)] * 3)
    assert torch.equal(permuted, blocks)


def test_reference_masked_attention_equals_attention_per_group():
    """Masked attention in original order == dense attention run separately on each group's tokens."""
    torch.manual_seed(1)
    attn = RefAttention(8, 2).double()
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    perm = torch.randperm(12)
    got = attn(x, group_mask(perm, 3))
    for g in range(3):
        idx = perm[g * 4:(g + 1) * 4]
        torch.testing.assert_close(got[:, idx], attn(x[:, idx]))


def test_ssa_eval_matches_reference_with_the_same_pathways(drawn):
    torch.manual_seed(2)
    net, ref = pair()
    net.eval(), ref.eval()
    img = torch.randn(3, 3, SMALL["size"], SMALL["size"])
    with torch.no_grad():
        got = net(img)
        assert len(drawn) == SMALL["depth"], "one π per layer and forward"
        assert all(p.numel() == TOKENS for p in drawn)
        torch.testing.assert_close(got, ref(img, drawn), rtol=1e-5, atol=1e-5)
        # a fresh forward draws fresh pathways: a different sub-model
        again = net(img)
        torch.testing.assert_close(again, ref(img, drawn[SMALL["depth"]:]), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, again)


def test_dense_model_matches_reference_without_sampling(drawn):
    torch.manual_seed(3)
    net, ref = pair(ssa=False)
    net.eval(), ref.eval()
    img = torch.randn(2, 3, SMALL["size"], SMALL["size"])
    with torch.no_grad():
        torch.testing.assert_close(net(img), ref(img), rtol=1e-5, atol=1e-5)
    assert drawn == []


def test_ssa_and_dense_models_share_parameter_names():
    from routec.compiler import load

    sparse = load("stdlib:ssa", **SMALL)
    dense = load("stdlib:ssa", ssa=False, **SMALL)
    dense.load_state_dict(sparse.state_dict())  # dense fine-tuning starts from the SSA-trained weights


def test_ssa_train_step(drawn):
    torch.manual_seed(4)
    net, ref = pair()
    net.train()
    img = torch.randn(4, 3, SMALL["size"], SMALL["size"])
    labels = torch.randint(0, SMALL["classes"], (4,))
    logits = net(img)
    torch.testing.assert_close(logits, ref(img, drawn), rtol=1e-5, atol=1e-5)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert_every_parameter_trained(net)


def test_sub_model_ensemble_averages_independent_pathway_samples(drawn):
    torch.manual_seed(5)
    net, ref = pair(ensemble=3)
    net.eval(), ref.eval()
    img = torch.randn(2, 3, SMALL["size"], SMALL["size"])
    with torch.no_grad():
        got = net(img)
        assert len(drawn) == 3 * SMALL["depth"], f"3 passes × {SMALL['depth']} layers, drew {len(drawn)}"
        depth = SMALL["depth"]
        want = torch.stack([ref(img, drawn[e * depth:(e + 1) * depth]) for e in range(3)]).mean(0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
