"""stdlib:dsf against an independent PyTorch implementation of the Dynamical Systems Framework mixers
(Sieber et al., NeurIPS 2024), written from the paper's equations as explicit step-by-step recurrences:

* linear attention  S_t = S_{t-1} + φ(k_t) v_tᵀ,  z_t = z_{t-1} + φ(k_t),  y_t = S_tᵀ φ(q_t) / z_tᵀ φ(q_t), φ = elu + 1;
* S6                h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t,  y_t = C_t h_t + D u_t;
* RG-LRU            a_t = σ(Λ)^{c r_t},  h_t = a_t h_{t-1} + √(1 − a_t²) (i_t x_t);
* softmax attention (causal, masked scores), the framework's normalised limit.

The reference layers are checked against closed forms (the parallel masked form of linear attention, the
unrolled sum of S6), the compiled mixers are checked to lower to one `linear_scan` each (the DSF form), and
the full language model is compared with the reference per mixer in eval and in a training step.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stdlib_refs import assert_every_parameter_trained, copy_parameters, next_token_loss
from stdlib_refs import reference_backend  # noqa: F401  (autouse: ROUTEC_BACKEND=reference)

SMALL = dict(vocab=11, d=16, depth=2, heads=2, n=4, mlp=4)
MIXERS = ["linattn", "s6", "rglru", "softmax"]


def phi(x):
    return F.elu(x) + 1.0


class RefLinearAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):  # [B, T, d]
        bsz, T, d = x.shape
        H, dk = self.heads, d // self.heads
        q, k, v = (w(x).view(bsz, T, H, dk) for w in (self.wq, self.wk, self.wv))
        S = x.new_zeros(bsz, H, dk, dk)
        z = x.new_zeros(bsz, H, dk)
        ys = []
        for t in range(T):
            S = S + torch.einsum("bhi,bhj->bhij", phi(k[:, t]), v[:, t])
            z = z + phi(k[:, t])
            num = torch.einsum("bhij,bhi->bhj", S, phi(q[:, t]))
            den = torch.einsum("bhi,bhi->bh", z, phi(q[:, t]))
            ys.append(num / den[..., None])
        return self.wo(torch.stack(ys, 1).reshape(bsz, T, d))


class RefS6(nn.Module):
    def __init__(self, d, n):
        super().__init__()
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d, 1))
        self.D = nn.Parameter(torch.ones(d))
        self.dt_proj = nn.Linear(d, d)
        self.B_proj = nn.Linear(d, n, bias=False)
        self.C_proj = nn.Linear(d, n, bias=False)

    def forward(self, u):  # [B, T, d]
        bsz, T, d = u.shape
        A = -torch.exp(self.A_log)  # [d, n]
        h = u.new_zeros(bsz, d, A.shape[1])
        ys = []
        for t in range(T):
            dt = F.softplus(self.dt_proj(u[:, t]))  # [B, d]
            Bt, Ct = self.B_proj(u[:, t]), self.C_proj(u[:, t])  # [B, n]
            h = torch.exp(dt[..., None] * A) * h + dt[..., None] * Bt[:, None, :] * u[:, t, :, None]
            ys.append((h * Ct[:, None, :]).sum(-1) + self.D * u[:, t])
        return torch.stack(ys, 1)


class RefRGLRU(nn.Module):
    def __init__(self, d, c=8.0):
        super().__init__()
        self.c = c
        self.Lambda = nn.Parameter(torch.zeros(d))
        self.gate_a = nn.Linear(d, d)
        self.gate_x = nn.Linear(d, d)

    def forward(self, x):  # [B, T, d]
        h = x.new_zeros(x.shape[0], x.shape[2])
        ys = []
        for t in range(x.shape[1]):
            r = torch.sigmoid(self.gate_a(x[:, t]))
            i = torch.sigmoid(self.gate_x(x[:, t]))
            a = torch.sigmoid(self.Lambda) ** (self.c * r)
            h = a * h + torch.sqrt(1 - a ** 2) * (i * x[:, t])
            ys.append(h)
        return torch.stack(ys, 1)


class RefSoftmaxAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        bsz, T, d = x.shape
        H, dk = self.heads, d // self.heads
        q, k, v = (w(x).view(bsz, T, H, dk).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        scores = q @ k.transpose(-1, -2) / dk ** 0.5
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(bsz, T, d)
        return self.wo(y)


class RefLM(nn.Module):
    def __init__(self, vocab, d, depth, heads, n, mlp, mixer):
        super().__init__()
        make = {"linattn": lambda: RefLinearAttention(d, heads), "s6": lambda: RefS6(d, n),
                "rglru": lambda: RefRGLRU(d), "softmax": lambda: RefSoftmaxAttention(d, heads)}[mixer]
        self.embed = nn.Embedding(vocab, d)
        self.ln1 = nn.ModuleList(nn.LayerNorm(d) for _ in range(depth))
        self.mix = nn.ModuleList(make() for _ in range(depth))
        self.ln2 = nn.ModuleList(nn.LayerNorm(d) for _ in range(depth))
        self.fc1 = nn.ModuleList(nn.Linear(d, mlp * d) for _ in range(depth))
        self.fc2 = nn.ModuleList(nn.Linear(mlp * d, d) for _ in range(depth))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for l in range(len(self.mix)):
            x = x + self.mix[l](self.ln1[l](x))
            x = x + self.fc2[l](F.gelu(self.fc1[l](self.ln2[l](x))))
        return self.head(self.ln_f(x))


def name_map(mixer, depth):
    m = {"embedding.weight": "embed.weight", "layernorm.weight": "ln_f.weight", "layernorm.bias": "ln_f.bias",
         "linear.weight": "head.weight", "linear.bias": "head.bias"}
    inner = {
        "linattn": {"linearattention.linear": "wq", "linearattention.linear_1": "wk",
                    "linearattention.linear_2": "wv", "linearattention.linear_3": "wo"},
        "softmax": {"selfattention.q": "wq", "selfattention.k": "wk", "selfattention.v": "wv",
                    "selfattention.o": "wo"},
        "s6": {"s6.linear": "dt_proj", "s6.linear_1": "B_proj", "s6.linear_2": "C_proj"},
        "rglru": {"rglru.linear": "gate_a", "rglru.linear_1": "gate_x"},
    }[mixer]
    for l in range(depth):
        p = f"layers.{l}."
        for a, b in (("layernorm", "ln1"), ("layernorm_1", "ln2"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")):
            m[f"{p}{a}.weight"], m[f"{p}{a}.bias"] = f"{b}.{l}.weight", f"{b}.{l}.bias"
        for ours, theirs in inner.items():
            m[f"{p}mixer.{ours}.weight"] = f"mix.{l}.{theirs}.weight"
            if not ours.startswith("s6.linear_"):
                m[f"{p}mixer.{ours}.bias"] = f"mix.{l}.{theirs}.bias"
        if mixer == "s6":
            m[f"{p}mixer.s6.a_log"], m[f"{p}mixer.s6.skip"] = f"mix.{l}.A_log", f"mix.{l}.D"
        if mixer == "rglru":
            m[f"{p}mixer.rglru.lam"] = f"mix.{l}.Lambda"
    return m


def pair(mixer, small=SMALL):
    from routec.compiler import load

    net = load("stdlib:dsf", mixer=mixer, **small)
    ref = RefLM(mixer=mixer, **small)
    copy_parameters(ref, net, name_map(mixer, small["depth"]))
    return net, ref


def test_reference_linear_attention_equals_its_parallel_form():
    torch.manual_seed(0)
    la = RefLinearAttention(8, 2).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = (w(x).view(2, 6, 2, 4).transpose(1, 2) for w in (la.wq, la.wk, la.wv))
        scores = (phi(q) @ phi(k).transpose(-1, -2)).tril()  # [B, H, T, T], causal
        y = (scores @ v) / scores.sum(-1, keepdim=True)
        torch.testing.assert_close(la(x), la.wo(y.transpose(1, 2).reshape(2, 6, 8)))


def test_reference_s6_equals_its_unrolled_sum():
    """h_T = Σ_s (Π_{r>s} exp(Δ_r A)) Δ_s B_s u_s, computed without a recurrence."""
    torch.manual_seed(1)
    s6 = RefS6(3, 2).double()
    u = torch.randn(1, 4, 3, dtype=torch.float64)
    with torch.no_grad():
        A = -torch.exp(s6.A_log)
        dt = F.softplus(s6.dt_proj(u))[0]  # [T, d]
        Bm, Cm = s6.B_proj(u)[0], s6.C_proj(u)[0]  # [T, n]
        T = 4
        h = torch.zeros(3, 2, dtype=torch.float64)
        for s in range(T):
            decay = torch.exp(dt[s + 1:].sum(0)[:, None] * A)  # Π_{r>s} exp(Δ_r A) = exp(Σ Δ_r A)
            h += decay * dt[s][:, None] * Bm[s][None, :] * u[0, s][:, None]
        want = (h * Cm[T - 1][None, :]).sum(-1) + s6.D * u[0, T - 1]
        torch.testing.assert_close(s6(u)[0, T - 1], want)


def test_recurrent_mixers_lower_to_fused_scans():
    """Each scan is one fused op (no step loop): linear attention's two matrix/vector recurrences and the
    RG-LRU a linear scan each, S6 with its read-out one selective scan."""
    from routec.codegen import runtime
    from routec.compiler import load

    for mixer, kind, scans in (("linattn", "linear_scan", 2), ("s6", "selective_scan", 1), ("rglru", "linear_scan", 1)):
        net = load("stdlib:dsf", mixer=mixer, **SMALL)
        targets = [getattr(n.target, "__name__", str(n.target)) for n in net.graph.nodes]
        fused = [t for t in targets if "scan" in t]
        assert len(fused) == scans * SMALL["depth"] and all(kind in t for t in fused), (mixer, targets)
        assert not any(isinstance(m, runtime.ScanLoop) for m in net.modules())


@pytest.mark.parametrize("mixer", MIXERS)
def test_model_matches_reference_in_eval(mixer):
    torch.manual_seed(2)
    net, ref = pair(mixer)
    net.eval(), ref.eval()
    for T in (1, 7):
        ids = torch.randint(0, SMALL["vocab"], (3, T))
        with torch.no_grad():
            torch.testing.assert_close(net(ids), ref(ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mixer", MIXERS)
def test_model_train_step(mixer):
    torch.manual_seed(3)
    net, ref = pair(mixer)
    net.train()
    ids = torch.randint(0, SMALL["vocab"], (2, 6))
    logits = net(ids)
    torch.testing.assert_close(logits, ref(ids), rtol=1e-4, atol=1e-5)
    loss = next_token_loss(logits, ids)
    loss.backward()
    assert torch.isfinite(loss)
    assert_every_parameter_trained(net)
