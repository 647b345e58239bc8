"""stdlib:dyn_perceiver against an independent PyTorch Dynamic Perceiver written from the official code
(LeapLabTHU/Dynamic_Perceiver: models/dyn_perceiver_resnet.py — DynPerceiver.forward with with_x2z, with_z2x,
with_dwc, with_last_CA and with_isc all on; models/perceiver_core/modules.py; models/cnn_core/resnet.py;
adaptive_inference.py for the exit rule).

The reference keeps the official module names (cnn_stem, cnn_body_stage1…4, dwc{i}_x2z, cross_att{i}_x2z,
cross_att{i}_z2x, self_att{i}, token_mixer, token_expander, early_classifier3, isc3, classifier_att,
classifier_cnn, last_cross_att_z2x, isc4, classifier_merge) and computes all four exits as the official forward
does; in eval each sample then takes the first exit k whose max softmax probability reaches T_k, else the last
(Tester.dynamic_eval_with_threshold). No randomness at inference (dropout is off in eval).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from stdlib_refs import assert_every_parameter_trained
from stdlib_refs import reference_backend  # noqa: F401  (autouse: ROUTEC_BACKEND=reference)

SMALL = dict(img=32, base=4, blocks=[1, 2, 1, 1], latents=16, sa_layers=[1, 1, 2, 1], pool=2, classes=5)


class RefBottleneck(nn.Module):
    def __init__(self, cin, width, stride, down):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, 4 * width, 1, stride=stride, bias=False), nn.BatchNorm2d(4 * width))
            if down else None
        )

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return F.relu(self.bn3(self.conv3(h)) + shortcut)


def res_layer(cin, width, blocks, stride):
    rest = (RefBottleneck(4 * width, width, 1, False) for _ in range(blocks - 1))
    return nn.Sequential(RefBottleneck(cin, width, stride, True), *rest)


class RefMultiHeadAttention(nn.Module):
    def __init__(self, heads, cq, ckv, qk=None, v=None, rpb=0):
        super().__init__()
        qk = qk or cq
        v = v or qk
        self.heads = heads
        self.dp_scale = (qk // heads) ** -0.5
        self.q_proj = nn.Linear(cq, qk, bias=False)
        self.k_proj = nn.Linear(ckv, qk, bias=False)
        self.v_proj = nn.Linear(ckv, v, bias=False)
        self.o_proj = nn.Linear(v, cq)
        self.relative_position_bias = nn.Parameter(torch.zeros(1, rpb, qk)) if rpb else None

    def forward(self, x_q, x_kv):
        q, k, v = self.q_proj(x_q), self.k_proj(x_kv), self.v_proj(x_kv)
        if self.relative_position_bias is not None:
            k = k + self.relative_position_bias
        b = x_q.shape[0]
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))  # [b, h, n, c]
        attn = torch.einsum("bhic,bhjc->bhij", q, k) * self.dp_scale
        o = torch.einsum("bhij,bhjc->bhic", attn.softmax(-1), v)
        return self.o_proj(o.transpose(1, 2).reshape(b, o.shape[2], -1))


class RefPerceiverMLP(nn.Module):
    def __init__(self, c, widening):
        super().__init__()
        self.layernorm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, widening * c)
        self.fc2 = nn.Linear(widening * c, c)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.layernorm(x))))


class RefCrossAttn(nn.Module):
    def __init__(self, cq, ckv, qk=None, v=None, rpb=0):
        super().__init__()
        self.q_norm = nn.LayerNorm(cq)
        self.kv_norm = nn.LayerNorm(ckv)
        self.attention = RefMultiHeadAttention(1, cq, ckv, qk, v, rpb)

    def forward(self, x_q, x_kv):
        return self.attention(self.q_norm(x_q), self.kv_norm(x_kv))


class RefCrossAttentionLayer(nn.Module):
    def __init__(self, cq, ckv, qk=None, v=None, rpb=0):
        super().__init__()
        self.cross_attn = RefCrossAttn(cq, ckv, qk, v, rpb)
        self.mlp = RefPerceiverMLP(cq, 1)

    def forward(self, x_q, x_kv):
        out = x_q + self.cross_attn(x_q, x_kv)
        return out + self.mlp(out)


class RefSelfAttn(nn.Module):
    def __init__(self, heads, c):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.attention = RefMultiHeadAttention(heads, c, c)

    def forward(self, x):
        x = self.norm(x)
        return self.attention(x, x)


class RefSelfAttentionLayer(nn.Module):
    def __init__(self, heads, c, widening):
        super().__init__()
        self.self_attn = RefSelfAttn(heads, c)
        self.mlp = RefPerceiverMLP(c, widening)

    def forward(self, x):
        out = x + self.self_attn(x)
        return out + self.mlp(out)


class RefDynPerceiver(nn.Module):
    def __init__(self, img, base, blocks, latents, sa_layers, pool, classes, heads=(1, 2, 4, 8), widening=4):
        super().__init__()
        z_ch = [base, 4 * base, 8 * base, 16 * base]
        c_out = 32 * base
        self.latent = nn.Parameter(torch.randn(latents, base) * 0.02)
        self.cnn_stem = nn.Sequential(
            nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(base), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        self.cnn_body_stage1 = res_layer(base, base, blocks[0], 1)
        self.cnn_body_stage2 = res_layer(4 * base, 2 * base, blocks[1], 2)
        self.cnn_body_stage3 = res_layer(8 * base, 4 * base, blocks[2], 2)
        self.cnn_body_stage4 = res_layer(16 * base, 8 * base, blocks[3], 2)
        self.ca_pooling = nn.AdaptiveAvgPool2d((pool, pool))
        for i, c in enumerate(z_ch, start=1):
            setattr(self, f"dwc{i}_x2z", nn.Conv2d(c, c, 7, groups=c, padding=3))
            setattr(self, f"cross_att{i}_x2z", RefCrossAttentionLayer(c, c, rpb=pool * pool))
            layers = (RefSelfAttentionLayer(heads[i - 1], c, widening) for _ in range(sa_layers[i - 1]))
            setattr(self, f"self_att{i}", nn.ModuleList(layers))
            if i > 1:
                setattr(self, f"cross_att{i}_z2x", RefCrossAttentionLayer(c, c, c // 8, c // 8))
        self.last_cross_att_z2x = RefCrossAttentionLayer(c_out, z_ch[3], c_out // 8, c_out // 8)
        self.early_classifier3 = nn.Linear(z_ch[2], classes)
        self.isc3 = nn.Sequential(nn.Linear(classes, z_ch[3]), nn.BatchNorm1d(z_ch[3]), nn.ReLU())
        self.classifier_att = nn.Linear(2 * z_ch[3], classes)
        self.isc4 = nn.Sequential(nn.Linear(classes, z_ch[3]), nn.BatchNorm1d(z_ch[3]), nn.ReLU())
        merged = c_out + 2 * z_ch[3]
        self.classifier_merge = nn.Sequential(nn.BatchNorm1d(merged), nn.Linear(merged, classes))
        self.classifier_cnn = nn.Linear(c_out, classes)
        n = [latents, latents // 2, latents // 4, latents // 8]
        self.token_expander = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(z_ch[i]), nn.Linear(z_ch[i], z_ch[i + 1])) for i in range(3)
        )
        self.token_mixer = nn.ModuleList(nn.Sequential(nn.LayerNorm(n[i]), nn.Linear(n[i], n[i + 1])) for i in range(3))

    def x2z(self, i, x, z):
        kv = self.ca_pooling(getattr(self, f"dwc{i}_x2z")(x) + x).flatten(2).transpose(1, 2)
        z = getattr(self, f"cross_att{i}_x2z")(z, kv)
        for layer in getattr(self, f"self_att{i}"):
            z = layer(z)
        return z

    def between(self, i, x, z):
        """token mixer + expander on the latents, then z2x into the feature map (stages i → i + 1)."""
        z = self.token_mixer[i - 1](z.transpose(1, 2)).transpose(1, 2)
        z = self.token_expander[i - 1](z)
        b, c, h, w = x.shape
        x = getattr(self, f"cross_att{i + 1}_z2x")(x.flatten(2).transpose(1, 2), z).transpose(1, 2).reshape(b, c, h, w)
        return x, z

    def forward(self, img):
        z = self.latent.expand(img.shape[0], -1, -1)
        x = self.cnn_stem(img)
        z = self.x2z(1, x, z)
        x = self.cnn_body_stage1(x)
        x, z = self.between(1, x, z)
        z = self.x2z(2, x, z)
        x = self.cnn_body_stage2(x)
        x, z = self.between(2, x, z)
        z = self.x2z(3, x, z)
        y_early3 = self.early_classifier3(z.mean(1))
        x = self.cnn_body_stage3(x)
        x, z = self.between(3, x, z)
        z = self.x2z(4, x, z)
        z_mean = z.mean(1)
        y_att = self.classifier_att(torch.cat([z_mean, self.isc3(y_early3)], dim=1))
        x = self.cnn_body_stage4(x)
        x_mean = x.mean((2, 3))
        x_mean = F.dropout(x_mean, p=0.2, training=self.training)
        y_cnn = self.classifier_cnn(x_mean)
        b, c, h, w = x.shape
        x = self.last_cross_att_z2x(x.flatten(2).transpose(1, 2), z)
        x_mean = x.mean(1)
        y_merge = self.classifier_merge(torch.cat([x_mean, z_mean, self.isc4(y_att)], dim=1))
        return y_early3, y_att, y_cnn, y_merge


def select_exits(outputs, thresholds):
    """adaptive_inference: the first exit whose max softmax ≥ T_k, else the last one."""
    n = outputs[0].shape[0]
    index = torch.full((n,), len(outputs) - 1, dtype=torch.long)
    for k in reversed(range(len(outputs) - 1)):
        conf = outputs[k].softmax(1).max(1).values
        index = torch.where(conf >= thresholds[k], torch.full_like(index, k), index)
    chosen = torch.stack(outputs)[index, torch.arange(n)]
    return chosen, index


def routec_to_reference(name: str) -> str:
    """The explicit name map: one routec tensor name → its reference tensor name."""
    rules = [
        (r"latent", r"latent"),
        (r"conv1\.(.+)", r"cnn_stem.0.\1"),
        (r"bn1\.(.+)", r"cnn_stem.1.\1"),
        (r"stage(\d)\.first\.downsample_conv\.(.+)", r"cnn_body_stage\1.0.downsample.0.\2"),
        (r"stage(\d)\.first\.downsample_bn\.(.+)", r"cnn_body_stage\1.0.downsample.1.\2"),
        (r"stage(\d)\.first\.(.+)", r"cnn_body_stage\1.0.\2"),
        (r"x2z(\d)\.dwc\.(.+)", r"dwc\1_x2z.\2"),
        (r"(x2z|z2x)(\d)\.cross\.(q_norm|kv_norm|attention)\.(.+)", r"cross_att\2_\1.cross_attn.\3.\4"),
        (r"(x2z|z2x)(\d)\.cross\.mlp_norm\.(.+)", r"cross_att\2_\1.mlp.layernorm.\3"),
        (r"(x2z|z2x)(\d)\.cross\.mlp\.(fc\d)\.(.+)", r"cross_att\2_\1.mlp.\3.\4"),
        (r"last_cross\.(q_norm|kv_norm|attention)\.(.+)", r"last_cross_att_z2x.cross_attn.\1.\2"),
        (r"last_cross\.mlp_norm\.(.+)", r"last_cross_att_z2x.mlp.layernorm.\1"),
        (r"last_cross\.mlp\.(fc\d)\.(.+)", r"last_cross_att_z2x.mlp.\1.\2"),
        (r"layers(?:_\d+)?\.(\d+)\.sa(\d)\.(norm|attention)\.(.+)", r"self_att\2.\1.self_attn.\3.\4"),
        (r"layers(?:_\d+)?\.(\d+)\.sa(\d)\.mlp_norm\.(.+)", r"self_att\2.\1.mlp.layernorm.\3"),
        (r"layers(?:_\d+)?\.(\d+)\.sa(\d)\.mlp\.(fc\d)\.(.+)", r"self_att\2.\1.mlp.\3.\4"),
        (r"(early_classifier3|classifier_att|classifier_cnn)\.(.+)", r"\1.\2"),
        (r"(isc\d)\.fc\.(.+)", r"\1.0.\2"),
        (r"(isc\d)\.bn\.(.+)", r"\1.1.\2"),
        (r"merge_norm\.(.+)", r"classifier_merge.0.\1"),
        (r"classifier_merge\.(.+)", r"classifier_merge.1.\1"),
    ]
    m = re.fullmatch(r"stage(\d)\.layers\.(\d+)\.blk\.(.+)", name)
    if m:
        return f"cnn_body_stage{m[1]}.{int(m[2]) + 1}.{m[3]}"
    m = re.fullmatch(r"resize(\d)\.(mixer_norm|mixer|expander_norm|expander)\.(.+)", name)
    if m:
        seq = "token_mixer" if m[2].startswith("mixer") else "token_expander"
        return f"{seq}.{int(m[1]) - 1}.{1 if m[2] in ('mixer', 'expander') else 0}.{m[3]}"
    for pattern, target in rules:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, target, name)
    raise AssertionError(f"unmapped routec tensor {name}")


def copy_into_reference(net: nn.Module, ref: nn.Module) -> None:
    state = {routec_to_reference(k): v.detach().clone() for k, v in net.state_dict().items()}
    ref.load_state_dict(state, strict=True)


def randomise_norm_statistics(net: nn.Module) -> None:
    """Give every BatchNorm non-trivial running statistics and affine weights, so eval mode exercises them."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)


def build(**params):
    from routec.compiler import load

    torch.manual_seed(0)
    return load("stdlib:dyn_perceiver", **{**SMALL, **params})


def test_reference_attention_matches_the_formula():
    """The reference multi-head attention against softmax(q kᵀ / √d) v written per head."""
    torch.manual_seed(4)
    att = RefMultiHeadAttention(2, 8, 6, qk=4, v=6, rpb=3).double()
    with torch.no_grad():
        att.relative_position_bias.normal_()
    xq, xkv = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)
    with torch.no_grad():
        got = att(xq, xkv)
        q, k, v = att.q_proj(xq), att.k_proj(xkv) + att.relative_position_bias, att.v_proj(xkv)
        heads = []
        for h in range(2):
            qh, kh, vh = q[..., 2 * h:2 * h + 2], k[..., 2 * h:2 * h + 2], v[..., 3 * h:3 * h + 3]
            heads.append(torch.softmax(qh @ kh.transpose(1, 2) / 2 ** 0.5, -1) @ vh)
        torch.testing.assert_close(got, att.o_proj(torch.cat(heads, -1)))


def test_eval_exits_and_outputs_match_reference():
    net = build()
    randomise_norm_statistics(net)
    ref = RefDynPerceiver(**SMALL)
    copy_into_reference(net, ref)
    net.eval(), ref.eval()
    torch.manual_seed(1)
    img = torch.randn(12, 3, SMALL["img"], SMALL["img"])
    with torch.no_grad():
        outs = ref(img)
    # thresholds that split the batch (midway between two samples' confidences): every exit is taken
    t, alive = [], torch.ones(img.shape[0], dtype=torch.bool)
    for k, share in ((0, 3), (1, 2), (2, 2)):
        conf = outs[k].softmax(1).max(1).values
        live = conf[alive].sort(descending=True).values
        m = len(live) // share
        t.append(float(live[m - 1] + live[m]) / 2)
        alive &= conf < t[-1]
    want, index = select_exits(outs, t)
    assert set(index.tolist()) == {0, 1, 2, 3}, index
    tuned = build(t1=t[0], t2=t[1], t3=t[2])
    tuned.load_state_dict(net.state_dict())
    tuned.eval()
    with torch.no_grad():
        got = tuned(img)
    torch.testing.assert_close(got.exit_index, index)
    torch.testing.assert_close(got.out, want, atol=1e-4, rtol=1e-4)


def test_train_step_matches_reference_and_gives_gradients():
    net = build()
    ref = RefDynPerceiver(**SMALL)
    copy_into_reference(net, ref)
    net.train(), ref.train()
    img = torch.randn(4, 3, SMALL["img"], SMALL["img"])
    torch.manual_seed(2)
    out = net(img)
    torch.manual_seed(2)
    want = ref(img)
    for k in (0, 1, 3):  # y3 alone has dropout (random in training); the others compare exactly
        torch.testing.assert_close(out.exits[k], want[k], atol=1e-4, rtol=1e-4)
    target = torch.tensor([0, 1, 2, 3])
    loss = sum(F.cross_entropy(e, target) for e in out.exits)
    assert torch.isfinite(loss)
    loss.backward()
    assert_every_parameter_trained(net)
