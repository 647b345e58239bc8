"""stdlib:rsmamba against an independent PyTorch RSMamba written from the official code
(KyanChen/RSMamba, mmpretrain/rsmamba/models/models.py, path_type='forward_reverse_shuffle_gate').

The reference below re-implements the paper's forward pass with plain modules: an mmcv-style patch embedding
(conv kernel 16, stride 8, no bias, "corner" padding), a learned position table, per layer ONE Hugging Face
style Mamba mixer shared by the forward / reversed / randomly shuffled token orders, a single pre-norm shared
by every layer, a per-sample softmax gate over the token-mean of the three path outputs, then LN1, token mean,
LN2 and a linear classifier. The selective scan is a plain loop over time here (not routec's op).

The random shuffle is drawn fresh at every forward, also in eval (the paper's stochastic inference). Both
models draw it with `torch.randperm` on the global generator; the test records the permutations routec draws
(by wrapping `torch.randperm`) and hands exactly those to the reference, so the comparison is exact.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from stdlib_refs import MambaMixer, assert_every_parameter_trained, copy_parameters, mamba_names, record_randperm
from stdlib_refs import reference_backend  # noqa: F401  (autouse: ROUTEC_BACKEND=reference)

SMALL = dict(d=16, depth=2, classes=5, img=32, inner=32)


class RefRSMambaLayer(nn.Module):
    """One layer: the shared mixer on [x̂, flip(x̂), x̂[:, π]] (x̂ pre-normed), softmax gate, residual."""

    def __init__(self, d: int, inner: int):
        super().__init__()
        self.mixer = MambaMixer(d, inner)
        self.gate = nn.Linear(3 * d, 3, bias=False)

    def forward(self, x, normed, perm):  # [B, L, d] twice, perm [L]
        B = x.shape[0]
        stacked = torch.cat([normed, normed.flip(1), normed[:, perm]], dim=0)  # [3B, L, d]
        fwd, rev, shuf = self.mixer(stacked).split(B, dim=0)
        rev = rev.flip(1)
        shuf = shuf[:, torch.argsort(perm)]
        g = torch.softmax(self.gate(torch.cat([fwd.mean(1), rev.mean(1), shuf.mean(1)], dim=-1)), dim=-1)
        self.last_gate = g  # [B, 3]: the per-sample routing decision
        g = g[:, :, None, None]  # [B, 3, 1, 1]
        return x + g[:, 0] * fwd + g[:, 1] * rev + g[:, 2] * shuf


class RefRSMamba(nn.Module):
    """RSMamba backbone + LinearClsHead, path_type forward_reverse_shuffle_gate, cls_position none."""

    def __init__(self, d: int, depth: int, classes: int, img: int, inner: int, patch: int = 16, stride: int = 8):
        super().__init__()
        self.patch, self.stride = patch, stride
        self.patch_embed = nn.Conv2d(3, d, patch, stride=stride, bias=False)
        grid = math.ceil(img / stride)  # mmcv AdaptivePadding("corner") keeps ceil(H / stride) patches
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid, d) * 0.02)
        self.pre_norm = nn.LayerNorm(d, eps=1e-6)  # one norm for every layer
        self.layers = nn.ModuleList(RefRSMambaLayer(d, inner) for _ in range(depth))
        self.ln1 = nn.LayerNorm(d, eps=1e-6)
        self.ln2 = nn.LayerNorm(d, eps=1e-6)
        self.fc = nn.Linear(d, classes)

    def corner_pad(self, img):
        """mmcv AdaptivePadding(padding="corner"): zeros on the bottom and right only."""
        H, W = img.shape[-2:]
        pad_h = max((math.ceil(H / self.stride) - 1) * self.stride + self.patch - H, 0)
        pad_w = max((math.ceil(W / self.stride) - 1) * self.stride + self.patch - W, 0)
        return F.pad(img, [0, pad_w, 0, pad_h])

    def forward(self, img, perms):
        x = self.patch_embed(self.corner_pad(img)).flatten(2).transpose(1, 2)  # [B, L, d]
        x = x + self.pos_embed
        for layer, perm in zip(self.layers, perms):
            x = layer(x, self.pre_norm(x), perm)
        x = self.ln1(x)
        return self.fc(self.ln2(x.mean(1)))


def test_reference_mamba_matches_a_scalar_loop():
    """The reference mixer's vectorised recurrence against a per-channel, per-state scalar loop."""
    torch.manual_seed(0)
    m = MambaMixer(4, 6, state=3).double()
    x = torch.randn(1, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        out = m(x)
        gate_in, z = m.in_proj(x).transpose(1, 2).chunk(2, dim=1)
        u = F.silu(m.conv1d(gate_in)[..., :5])[0]  # [inner, L]
        dt, Bm, Cm = torch.split(m.x_proj(u.T), [m.dt_rank, 3, 3], dim=-1)
        dt = F.softplus(m.dt_proj(dt))  # [L, inner]
        A = -torch.exp(m.A_log)
        y = torch.zeros(6, 5, dtype=torch.float64)
        for c in range(6):
            for n in range(3):
                h = 0.0
                for t in range(5):
                    h = math.exp(A[c, n] * dt[t, c]) * h + dt[t, c] * Bm[t, n] * u[c, t]
                    y[c, t] += h * Cm[t, n]
        y = (y + u * m.D[:, None]) * F.silu(z[0])
        torch.testing.assert_close(out[0], m.out_proj(y.T))


LAYER_MAP = {**mamba_names("mixer", "mixer"), "p.combine.linear.weight": "gate.weight"}


def model_map(depth: int) -> dict:
    names = {
        "conv2d.weight": "patch_embed.weight",
        "posembed.weight": "pos_embed",
        "pre_norm.weight": "pre_norm.weight",
        "pre_norm.bias": "pre_norm.bias",
        "layernorm.weight": "ln1.weight",
        "layernorm.bias": "ln1.bias",
        "layernorm_1.weight": "ln2.weight",
        "layernorm_1.bias": "ln2.bias",
        "linear.weight": "fc.weight",
        "linear.bias": "fc.bias",
    }
    for i in range(depth):
        names.update({f"layers.{i}.rsmambalayer.{k}": f"layers.{i}.{v}" for k, v in LAYER_MAP.items()})
    return names


def record_gates(net: nn.Module, combine_paths: list[str]) -> list:
    """Capture the path weights routec's gated combines receive (its routing decisions), in call order."""
    seen = []
    for path in combine_paths:
        net.get_submodule(path).register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["weights"].detach().clone()), with_kwargs=True)
    return seen


def layer_pair(d=16, inner=32):
    from routec.compiler import load

    net = load("stdlib:rsmamba", model="RSMambaLayer", d=d, inner=inner)
    ref = RefRSMambaLayer(d, inner)
    copy_parameters(ref, net, LAYER_MAP, reshape=True)
    return net, ref


def test_layer_matches_reference_in_eval(monkeypatch):
    """Shared mixer over forward / reverse / shuffled orders + per-sample softmax gate, with the same π."""
    torch.manual_seed(0)
    net, ref = layer_pair()
    net.eval(), ref.eval()
    x, h = torch.randn(3, 11, 16), torch.randn(3, 11, 16)
    drawn = record_randperm(monkeypatch)
    gates = record_gates(net, ["p.combine_op"])
    with torch.no_grad():
        first = net(x, h)
        second = net(x, h)
    assert len(drawn) == 2, "one shuffle per forward, shared by the batch"
    assert not torch.equal(drawn[0], drawn[1])
    with torch.no_grad():
        torch.testing.assert_close(first, ref(x, h, drawn[0]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gates[0], ref.last_gate, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(second, ref(x, h, drawn[1]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gates[1], ref.last_gate, rtol=1e-4, atol=1e-6)
    assert gates[0].shape == (3, 3), "one softmax over the three paths per sample"
    # the paper's inference is stochastic: a new shuffle gives a different output
    assert not torch.allclose(first, second)


def test_layer_train_step(monkeypatch):
    """Train mode: same output as the reference, and a finite gradient for every parameter."""
    torch.manual_seed(1)
    net, ref = layer_pair()
    net.train(), ref.train()
    x, h = torch.randn(2, 7, 16), torch.randn(2, 7, 16, requires_grad=True)
    drawn = record_randperm(monkeypatch)
    out = net(x, h)
    torch.testing.assert_close(out, ref(x, h, drawn[0]), rtol=1e-4, atol=1e-5)
    loss = out.square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert_every_parameter_trained(net)
    assert h.grad is not None and torch.isfinite(h.grad).all()


def full_pair(small=SMALL):
    from routec.compiler import load

    net = load("stdlib:rsmamba", d=small["d"], depth=small["depth"], inner=small["inner"],
               classes=small["classes"], size=small["img"])
    ref = RefRSMamba(**small)
    copy_parameters(ref, net, model_map(small["depth"]), reshape=True)
    return net, ref


def test_model_matches_reference_in_eval(monkeypatch):
    torch.manual_seed(2)
    net, ref = full_pair()
    net.eval(), ref.eval()
    img = torch.randn(2, 3, SMALL["img"], SMALL["img"])
    drawn = record_randperm(monkeypatch)
    gates = record_gates(net, [f"layers.{i}.rsmambalayer.p.combine_op" for i in range(SMALL["depth"])])
    with torch.no_grad():
        got = net(img)
    assert len(drawn) == SMALL["depth"], "one shuffle per layer"
    with torch.no_grad():
        torch.testing.assert_close(got, ref(img, drawn), rtol=1e-4, atol=1e-5)
    for layer, gate in zip(ref.layers, gates):
        torch.testing.assert_close(gate, layer.last_gate, rtol=1e-4, atol=1e-6)


def test_model_train_step(monkeypatch):
    torch.manual_seed(3)
    net, ref = full_pair()
    net.train()
    img = torch.randn(2, 3, SMALL["img"], SMALL["img"])
    labels = torch.tensor([0, 3])
    drawn = record_randperm(monkeypatch)
    logits = net(img)
    torch.testing.assert_close(logits, ref(img, drawn), rtol=1e-4, atol=1e-5)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert_every_parameter_trained(net)
