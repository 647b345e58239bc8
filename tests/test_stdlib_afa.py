"""stdlib:afa against an independent PyTorch AFA written from the paper (Wang et al., ICLR 2025): three
separate denoisers (the reduced SD-style U-Net described in the spec header, diffusers names: ResBlock
norm1/conv1/time_emb_proj/norm2/conv2/conv_shortcut), run block by block on the shared aggregated feature,
with one SABW aggregator per block (per-location softmax over the models). The SABW internals are the
spec's [recon]; the ensembling itself — every block of every model reads F̄_{b−1}, skips carry aggregated
features, F̄_b = Σ_n softmax_n(A_b^n) ⊙ F_b^n — is the paper's.

The whole model is compared (it uses GroupNorm, `arange`, `sin` and `cos`); the aggregator (SABW) is
also compiled alone and verified, and the reference is checked on its own.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from stdlib_refs import assert_every_parameter_trained, timestep_embedding
from stdlib_refs import reference_backend  # noqa: F401  (autouse: ROUTEC_BACKEND=reference)


SMALL = dict(size=8, ch=8, groups=2, heads=2, ctx_dim=12, sabw=8, freq=8)
MODELS = 3
STAGES = ("conv_in", "down", "mid", "up1", "up0", "conv_out")


class Attn(nn.Module):
    """Multi-head cross-attention with separate q/k/v/o projections."""

    def __init__(self, d, heads, kv_dim):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = nn.Linear(d, d), nn.Linear(kv_dim, d), nn.Linear(kv_dim, d), nn.Linear(d, d)

    def forward(self, x, ctx):
        B, Lq, d = x.shape
        dh = d // self.heads
        q = self.q(x).view(B, Lq, self.heads, dh).transpose(1, 2)
        k = self.k(ctx).view(B, -1, self.heads, dh).transpose(1, 2)
        v = self.v(ctx).view(B, -1, self.heads, dh).transpose(1, 2)
        w = torch.softmax(q @ k.transpose(-1, -2) / dh ** 0.5, dim=-1)
        return self.o((w @ v).transpose(1, 2).reshape(B, Lq, d))


class ResBlock(nn.Module):
    def __init__(self, cin, cout, tdim, groups):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(tdim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Denoiser(nn.Module):
    """One model of the ensemble; `block(name, …)` runs one of its blocks on a given (shared) input."""

    def __init__(self, ch, groups, heads, ctx_dim, freq):
        super().__init__()
        tdim, c2 = 4 * ch, 2 * ch
        self.time_mlp = nn.Sequential(nn.Linear(freq, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.conv_in = nn.Conv2d(4, ch, 3, padding=1)
        self.down_res, self.downsample = ResBlock(ch, ch, tdim, groups), nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.mid_res1, self.mid_res2 = ResBlock(ch, c2, tdim, groups), ResBlock(c2, c2, tdim, groups)
        self.mid_norm, self.mid_attn = nn.LayerNorm(c2), Attn(c2, heads, ctx_dim)
        self.up1_res, self.up1_conv = ResBlock(c2 + ch, ch, tdim, groups), nn.Conv2d(ch, ch, 3, padding=1)
        self.up0_res = ResBlock(2 * ch, ch, tdim, groups)
        self.out_norm, self.conv_out = nn.GroupNorm(groups, ch), nn.Conv2d(ch, 4, 3, padding=1)

    def block(self, name, x, temb, prompt, skip=None):
        if name == "conv_in":
            return self.conv_in(x)
        if name == "down":
            return self.downsample(self.down_res(x, temb))
        if name == "mid":
            h = self.mid_res1(x, temb)
            B, C, H, W = h.shape
            tok = h.flatten(2).transpose(1, 2)
            tok = tok + self.mid_attn(self.mid_norm(tok), prompt)
            return self.mid_res2(tok.transpose(1, 2).reshape(B, C, H, W), temb)
        if name == "up1":
            h = self.up1_res(torch.cat([x, skip], 1), temb)
            return self.up1_conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        if name == "up0":
            return self.up0_res(torch.cat([x, skip], 1), temb)
        return self.conv_out(F.silu(self.out_norm(x)))


class SABW(nn.Module):
    def __init__(self, c, hid, tdim, heads, ctx_dim):
        super().__init__()
        self.conv = nn.Conv2d(MODELS * c, hid, 3, padding=1)
        self.time_proj = nn.Linear(tdim, hid)
        self.norm, self.attn = nn.LayerNorm(hid), Attn(hid, heads, ctx_dim)
        self.logits = nn.Linear(hid, MODELS)
        self.last_weights = None

    def forward(self, feats, temb, prompt):  # feats: N tensors [B, c, H, W]
        B, c, H, W = feats[0].shape
        s = F.silu(self.conv(torch.cat(feats, 1)) + self.time_proj(F.silu(temb))[:, :, None, None])
        tok = s.flatten(2).transpose(1, 2)
        tok = tok + self.attn(self.norm(tok), prompt)
        w = torch.softmax(self.logits(tok), dim=-1).transpose(1, 2).reshape(B, MODELS, H, W)
        self.last_weights = w
        return sum(w[:, n:n + 1] * feats[n] for n in range(MODELS))


class RefAFA(nn.Module):
    def __init__(self, size, ch, groups, heads, ctx_dim, sabw, freq):
        super().__init__()
        tdim = 4 * ch
        self.freq = freq
        self.models = nn.ModuleList(Denoiser(ch, groups, heads, ctx_dim, freq) for _ in range(MODELS))
        self.time_agg = nn.Sequential(nn.Linear(freq, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        widths = {"conv_in": ch, "down": ch, "mid": 2 * ch, "up1": ch, "up0": ch, "conv_out": 4}
        self.sabw = nn.ModuleDict({s: SABW(widths[s], sabw, tdim, heads, ctx_dim) for s in STAGES})

    def forward(self, latent, t, prompt):
        s = timestep_embedding(t, self.freq).to(latent.dtype)
        tembs = [m.time_mlp(s) for m in self.models]
        tagg = self.time_agg(s)
        x, agg = latent, {}
        skips = {"up1": "down", "up0": "conv_in"}
        for stage in STAGES:
            skip = agg.get(skips.get(stage))
            feats = [m.block(stage, x, tembs[n], prompt, skip) for n, m in enumerate(self.models)]
            x = agg[stage] = self.sabw[stage](feats, tagg, prompt)
        return x


def test_sabw_weights_are_a_per_location_softmax():
    """Weights ≥ 0 sum to one over the models at every location; the output is Σ_n w_n F_n there."""
    torch.manual_seed(1)
    agg = SABW(3, 6, 8, 2, 5).double()
    feats = [torch.randn(2, 3, 4, 4, dtype=torch.float64) for _ in range(MODELS)]
    temb, prompt = torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    with torch.no_grad():
        out = agg(feats, temb, prompt)
        w = agg.last_weights
        torch.testing.assert_close(w.sum(1), torch.ones(2, 4, 4, dtype=torch.float64))
        assert (w > 0).all() and not torch.allclose(w[:, 0], w[:, 1])
        for b in range(2):
            for i in range(4):
                for j in range(4):
                    want = sum(w[b, n, i, j] * feats[n][b, :, i, j] for n in range(MODELS))
                    torch.testing.assert_close(out[b, :, i, j], want)


def test_identical_models_reduce_to_one_denoiser():
    """An ensemble of N copies of one model is that model, whatever the aggregator says: a check of the
    block-by-block wiring (shared inputs, aggregated skips) against the single U-Net run plainly."""
    torch.manual_seed(2)
    ref = RefAFA(**SMALL).double()
    for m in ref.models[1:]:
        m.load_state_dict(ref.models[0].state_dict())
    latent = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t, prompt = torch.tensor([5, 900]), torch.randn(2, 3, SMALL["ctx_dim"], dtype=torch.float64)
    with torch.no_grad():
        m = ref.models[0]
        temb = m.time_mlp(timestep_embedding(t, SMALL["freq"]).double())
        h0 = m.block("conv_in", latent, temb, prompt)
        h1 = m.block("down", h0, temb, prompt)
        h2 = m.block("mid", h1, temb, prompt)
        h3 = m.block("up1", h2, temb, prompt, skip=h1)
        h4 = m.block("up0", h3, temb, prompt, skip=h0)
        want = m.block("conv_out", h4, temb, prompt)
        torch.testing.assert_close(ref(latent, t, prompt), want)


def test_spec_aggregator_matches_reference():
    """The spec's SABW block compiles on its own today: same per-location weights and aggregate."""
    from routec.compiler import load

    torch.manual_seed(5)
    c, hid, tdim, heads, ctx_dim, size = 3, 6, 8, 2, 5, 4
    net = load("stdlib:afa", model="SABW", c=c, hid=hid, tdim=tdim, heads=heads, ctx_dim=ctx_dim, size=size)
    ref = SABW(c, hid, tdim, heads, ctx_dim)
    ref.load_state_dict({routec_to_reference(f"agg_in.{k}").removeprefix("sabw.conv_in."): v.clone()
                         for k, v in net.state_dict().items()}, strict=True)
    feats = [torch.randn(2, c, size, size) for _ in range(MODELS)]
    temb, prompt = torch.randn(2, tdim), torch.randn(2, 3, ctx_dim)
    with torch.no_grad():
        torch.testing.assert_close(net(torch.cat(feats, 1), temb, prompt), ref(feats, temb, prompt),
                                   atol=1e-5, rtol=1e-4)


RES = {"groupnorm": "norm1", "conv2d": "conv1", "linear": "time_emb_proj", "groupnorm_1": "norm2",
       "conv2d_1": "conv2", "conv2d_2": "conv_shortcut"}
ATTN = r"crossattention\.([qkvo])\.(weight|bias)"


def routec_to_reference(name: str) -> str:
    """The explicit name map: routec parameter → reference parameter."""
    m = re.fullmatch(r"time(\d|_agg)\.(linear|linear_1)\.(weight|bias)", name)
    if m:
        owner = "time_agg" if m[1] == "_agg" else f"models.{m[1]}.time_mlp"
        return f"{owner}.{0 if m[2] == 'linear' else 2}.{m[3]}"
    m = re.fullmatch(r"agg_(in|down|mid|up1|up0|out)\.(.+)", name)
    if m:
        stage = {"in": "conv_in", "out": "conv_out"}.get(m[1], m[1])
        rest = m[2]
        a = re.fullmatch(ATTN, rest)
        if a:
            return f"sabw.{stage}.attn.{a[1]}.{a[2]}"
        leaf, kind = rest.rsplit(".", 1)
        part = {"conv2d": "conv", "linear": "time_proj", "layernorm": "norm", "linear_1": "logits"}[leaf]
        return f"sabw.{stage}.{part}.{kind}"
    m = re.fullmatch(r"(conv_in|down|mid|up1|up0|conv_out)\.m(\d)\.\w+\.(.+)", name)
    assert m, f"unmapped routec parameter {name}"
    stage, model, rest = m[1], f"models.{m[2]}", m[3]
    leaf, kind = rest.rsplit(".", 1)
    r = re.fullmatch(r"(resblock(?:_1)?)\.(\w+)", leaf)
    if r:
        res = {"down": "down_res", "up1": "up1_res", "up0": "up0_res"}.get(stage)
        if stage == "mid":
            res = "mid_res1" if r[1] == "resblock" else "mid_res2"
        return f"{model}.{res}.{RES[r[2]]}.{kind}"
    a = re.fullmatch(ATTN, rest)
    if a:
        return f"{model}.mid_attn.{a[1]}.{a[2]}"
    plain = {("conv_in", "conv2d"): "conv_in", ("down", "conv2d"): "downsample", ("mid", "layernorm"): "mid_norm",
             ("up1", "conv2d"): "up1_conv", ("conv_out", "groupnorm"): "out_norm", ("conv_out", "conv2d"): "conv_out"}
    return f"{model}.{plain[(stage, leaf)]}.{kind}"


def build():
    from routec.compiler import load

    torch.manual_seed(0)
    net = load("stdlib:afa", **SMALL)
    ref = RefAFA(**SMALL)
    ref.load_state_dict({routec_to_reference(k): v.clone() for k, v in net.state_dict().items()}, strict=True)
    return net, ref


def inputs():
    return torch.randn(3, 4, 8, 8), torch.tensor([0, 250, 999]), torch.randn(3, 5, SMALL["ctx_dim"])


def test_eval_matches_reference():
    net, ref = build()
    net.eval(), ref.eval()
    latent, t, prompt = inputs()
    with torch.no_grad():
        torch.testing.assert_close(net(latent, t, prompt), ref(latent, t, prompt), atol=1e-5, rtol=1e-4)


def test_train_step_only_needs_sabw_gradients():
    net, ref = build()
    net.train(), ref.train()
    latent, t, prompt = inputs()
    noise = torch.randn_like(latent)
    loss = (net(latent, t, prompt) - noise).square().mean()
    torch.testing.assert_close(loss, (ref(latent, t, prompt) - noise).square().mean(), atol=1e-5, rtol=1e-4)
    loss.backward()
    # every part is differentiable; AFA trains only SABW + its time MLP
    assert_every_parameter_trained(net, nonzero=False)
    assert all(p.grad.abs().sum() > 0 for n, p in net.named_parameters() if n.startswith(("agg_", "time_agg")))
