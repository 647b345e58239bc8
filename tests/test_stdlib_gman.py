"""stdlib:gman against an independent PyTorch GMAN written from the official TensorFlow code
(zhengchuanpan/GMAN: PeMS/model.py, PeMS/tf_utils.py). Each official FC (a 1×1 conv; BatchNorm with eps 1e-3
and the activation only when an activation is given) is a `FC` module here; heads are split as the official
`tf.concat(tf.split(x, K, axis=-1), axis=0)` does (heads stacked on the batch axis), so the head layout is
checked independently of the spec's reshape. The temporal attention of the ST-Att blocks is unmasked, as in
the official GMAN() call. No randomness at inference.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from stdlib_refs import assert_every_parameter_trained, randomise_running_stats
from stdlib_refs import reference_backend  # noqa: F401  (autouse: ROUTEC_BACKEND=reference)

SIZES = dict(P=4, Q=3, T=6, L=1, K=2, d=4)
NODES = 5


class FC(nn.Module):
    """tf_utils.conv2d with a 1×1 kernel on a channel-last map; BN and activation only if `act`."""

    def __init__(self, cin, cout, act=True, bias=True):
        super().__init__()
        self.lin = nn.Linear(cin, cout, bias=bias)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3) if act else None

    def forward(self, x):
        x = self.lin(x)
        if self.bn is not None:
            x = F.relu(self.bn(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        return x


class FC2(nn.Module):
    def __init__(self, cin, cmid, cout):
        super().__init__()
        self.fc1, self.fc2 = FC(cin, cmid), FC(cmid, cout, act=False)

    def forward(self, x):
        return self.fc2(self.fc1(x))


def heads_to_batch(x, K):  # [B, …, K·d] → [K·B, …, d]
    return torch.cat(torch.split(x, x.shape[-1] // K, dim=-1), dim=0)


def batch_to_heads(x, K):  # [K·B, …, d] → [B, …, K·d]
    return torch.cat(torch.split(x, x.shape[0] // K, dim=0), dim=-1)


class RefSpatialAttention(nn.Module):
    def __init__(self, K, d):
        super().__init__()
        D = K * d
        self.K, self.d = K, d
        self.query, self.key, self.value = FC(2 * D, D), FC(2 * D, D), FC(2 * D, D)
        self.out = FC2(D, D, D)

    def forward(self, X, STE):
        X = torch.cat((X, STE), dim=-1)
        q, k, v = (heads_to_batch(f(X), self.K) for f in (self.query, self.key, self.value))
        attention = torch.softmax(q @ k.transpose(-1, -2) / self.d ** 0.5, dim=-1)  # [K·B, S, N, N]
        return self.out(batch_to_heads(attention @ v, self.K))


class RefTemporalAttention(RefSpatialAttention):
    def forward(self, X, STE):
        X = torch.cat((X, STE), dim=-1)
        q, k, v = (heads_to_batch(f(X), self.K) for f in (self.query, self.key, self.value))
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
        attention = torch.softmax(q @ k / self.d ** 0.5, dim=-1)  # [K·B, N, S, S]
        return self.out(batch_to_heads((attention @ v).permute(0, 2, 1, 3), self.K))


class RefGatedFusion(nn.Module):
    def __init__(self, D):
        super().__init__()
        self.xs, self.xt = FC(D, D, act=False, bias=False), FC(D, D, act=False)
        self.out = FC2(D, D, D)

    def forward(self, HS, HT):
        z = torch.sigmoid(self.xs(HS) + self.xt(HT))
        return self.out(z * HS + (1 - z) * HT)


class RefSTAttBlock(nn.Module):
    def __init__(self, K, d):
        super().__init__()
        self.spatial, self.temporal = RefSpatialAttention(K, d), RefTemporalAttention(K, d)
        self.fusion = RefGatedFusion(K * d)

    def forward(self, X, STE):
        return X + self.fusion(self.spatial(X, STE), self.temporal(X, STE))


class RefTransformAttention(nn.Module):
    def __init__(self, K, d):
        super().__init__()
        D = K * d
        self.K, self.d = K, d
        self.query, self.key, self.value = FC(D, D), FC(D, D), FC(D, D)
        self.out = FC2(D, D, D)

    def forward(self, X, STE_P, STE_Q):
        q = heads_to_batch(self.query(STE_Q), self.K).permute(0, 2, 1, 3)
        k = heads_to_batch(self.key(STE_P), self.K).permute(0, 2, 3, 1)
        v = heads_to_batch(self.value(X), self.K).permute(0, 2, 1, 3)
        attention = torch.softmax(q @ k / self.d ** 0.5, dim=-1)  # [K·B, N, Q, P]
        return self.out(batch_to_heads((attention @ v).permute(0, 2, 1, 3), self.K))


class RefGMAN(nn.Module):
    def __init__(self, P, Q, T, L, K, d):
        super().__init__()
        D = K * d
        self.P, self.T = P, T
        self.fc_in = FC2(1, D, D)
        self.se_fc, self.te_fc = FC2(D, D, D), FC2(7 + T, D, D)
        self.encoder = nn.ModuleList(RefSTAttBlock(K, d) for _ in range(L))
        self.transform = RefTransformAttention(K, d)
        self.decoder = nn.ModuleList(RefSTAttBlock(K, d) for _ in range(L))
        self.fc_out = FC2(D, D, 1)

    def forward(self, X, TE, SE):
        SE = self.se_fc(SE[None, None])
        TE = torch.cat((F.one_hot(TE[..., 0], 7), F.one_hot(TE[..., 1], self.T)), dim=-1).float()
        STE = SE + self.te_fc(TE.unsqueeze(2))
        STE_P, STE_Q = STE[:, :self.P], STE[:, self.P:]
        X = self.fc_in(X.unsqueeze(-1))
        for blk in self.encoder:
            X = blk(X, STE_P)
        X = self.transform(X, STE_P, STE_Q)
        for blk in self.decoder:
            X = blk(X, STE_Q)
        return self.fc_out(X).squeeze(3)


def test_reference_spatial_attention_matches_a_loop():
    """The batch-stacked heads of the reference against attention written per sample, step and head."""
    torch.manual_seed(1)
    att = RefSpatialAttention(2, 3).double().eval()
    X, STE = torch.randn(2, 3, 4, 6, dtype=torch.float64), torch.randn(2, 3, 4, 6, dtype=torch.float64)
    with torch.no_grad():
        got = att(X, STE)
        H = torch.cat((X, STE), -1)
        q, k, v = att.query(H), att.key(H), att.value(H)
        heads = torch.zeros(2, 3, 4, 6, dtype=torch.float64)
        for b in range(2):
            for s in range(3):
                for h in range(2):
                    sl = slice(3 * h, 3 * h + 3)
                    w = torch.softmax(q[b, s, :, sl] @ k[b, s, :, sl].T / 3 ** 0.5, -1)
                    heads[b, s, :, sl] = w @ v[b, s, :, sl]
        torch.testing.assert_close(got, att.out(heads))


def routec_to_reference(name: str) -> str:
    """The explicit name map (parameters and BatchNorm buffers): the spec's FC blocks are `lin` + `bn`
    (FCReLU) and `fc1` + `fc2` (FC2), as here, so most names carry over; these are the renamings."""
    m = re.fullmatch(r"(\w+?)\.(.+)", name)
    assert m, name
    head, rest = m[1], m[2]
    rest = re.sub(r"\bproj\b", "out", rest)
    rest = re.sub(r"fc2\.(weight|bias)$", r"fc2.lin.\1", rest)
    if head in ("se_fc", "te_fc", "fc_in", "fc_out", "transform"):
        return f"{head}.{rest}"
    m = re.fullmatch(r"(\d+)\.(enc|dec)\.(.+)", rest)
    assert head in ("layers", "layers_1") and m, f"unmapped routec parameter {name}"
    blk = f"{'encoder' if m[2] == 'enc' else 'decoder'}.{m[1]}"
    inner = m[3]
    inner = re.sub(r"^xs\.", "fusion.xs.lin.", inner)
    inner = re.sub(r"^xt\.", "fusion.xt.lin.", inner)
    inner = re.sub(r"^fuse\.", "fusion.out.", inner)
    return f"{blk}.{inner}"


def build():
    from routec.compiler import load

    torch.manual_seed(0)
    net = load("stdlib:gman", **SIZES)
    randomise_running_stats(net, mean_std=0.3, var_range=(0.5, 2.0))
    with torch.no_grad():  # non-trivial BatchNorm affine parameters
        for name, p in net.named_parameters():
            if "batchnorm2d" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    ref = RefGMAN(**SIZES)
    ref.load_state_dict({routec_to_reference(k): v.clone() for k, v in net.state_dict().items()}, strict=True)
    return net, ref


def inputs(batch=3):
    P, Q, T, D = SIZES["P"], SIZES["Q"], SIZES["T"], SIZES["K"] * SIZES["d"]
    x = torch.randn(batch, P, NODES)
    te = torch.stack([torch.randint(0, 7, (batch, P + Q)), torch.randint(0, T, (batch, P + Q))], -1)
    return x, te, torch.randn(NODES, D)


def test_eval_matches_reference():
    net, ref = build()
    net.eval(), ref.eval()
    x, te, se = inputs()
    with torch.no_grad():
        got = net(x, te, se)
        torch.testing.assert_close(got, ref(x, te, se), atol=1e-5, rtol=1e-4)
    assert got.shape == (3, SIZES["Q"], NODES)


def test_train_step_gives_gradients():
    net, ref = build()
    net.train(), ref.train()
    x, te, se = inputs(4)
    label = torch.randn(4, SIZES["Q"], NODES)
    loss = (net(x, te, se) - label).abs().mean()  # the official MAE loss (no missing values here)
    ref_loss = (ref(x, te, se) - label).abs().mean()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-4)
    assert torch.isfinite(loss)
    loss.backward()
    assert_every_parameter_trained(net)
