"""stdlib:dynamax against an independent PyTorch early-exit Mamba LM written from the DYNAMAX description
(arXiv 2504.20922; ARCHITECTURES.md #20): pre-norm Mamba-1 blocks (the mixer written from the Mamba paper /
HF `MambaMixer.slow_forward`, step-by-step selective scan), exit classifiers (linear, FFN or Mamba block) at the
last position of the second-half layers, confidence σ(clf(h_l)) ≥ τ, the token's logits from the shared LM
head on the final RMSNorm. Eval: per sequence, the first layer whose confidence passes τ (else the last layer).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stdlib_refs import MambaMixer, RMSNorm, copy_parameters, mamba_names
from stdlib_refs import reference_backend  # noqa: F401  (autouse: ROUTEC_BACKEND=reference)

SMALL = dict(vocab=23, d=16, depth=4, inner=32, state=4, exit_from=1)
KINDS = ["linear", "ffn", "mamba"]


class RefClassifier(nn.Module):
    def __init__(self, d, inner, state, kind):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.fc = nn.Linear(d, 1)
        elif kind == "ffn":
            self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, 1)
        else:
            self.mamba, self.fc = MambaMixer(d, inner, state), nn.Linear(d, 1)

    def forward(self, h):  # h [B, L, d] → confidence [B]
        if self.kind == "linear":
            s = self.fc(h[:, -1])
        elif self.kind == "ffn":
            s = self.fc2(F.gelu(self.fc1(h[:, -1])))
        else:
            s = self.fc(self.mamba(h)[:, -1])
        return torch.sigmoid(s)[:, 0]


class RefDynamax(nn.Module):
    def __init__(self, vocab, d, depth, inner, state, exit_from, clf):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.norms = nn.ModuleList(RMSNorm(d) for _ in range(depth))
        self.mixers = nn.ModuleList(MambaMixer(d, inner, state) for _ in range(depth))
        self.exit_layers = list(range(exit_from, depth - 1))
        self.clfs = nn.ModuleList(RefClassifier(d, inner, state, clf) for _ in self.exit_layers)
        self.norm_f = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        """→ (logits of every exit then of the last layer [E+1, B, V], confidences [E, B])."""
        x = self.embed(ids)
        logits, conf = [], []
        for l, (norm, mixer) in enumerate(zip(self.norms, self.mixers)):
            x = x + mixer(norm(x))
            if l in self.exit_layers:
                logits.append(self.lm_head(self.norm_f(x)[:, -1]))
                conf.append(self.clfs[self.exit_layers.index(l)](x))
        logits.append(self.lm_head(self.norm_f(x)[:, -1]))
        return torch.stack(logits), torch.stack(conf)


def decode(logits, conf, tau):
    """Per sequence: the first exit whose confidence is ≥ τ, else the last layer (a plain loop)."""
    out, index = [], []
    for b in range(logits.shape[1]):
        e = next((i for i in range(conf.shape[0]) if conf[i, b] >= tau), conf.shape[0])
        out.append(logits[e, b])
        index.append(e)
    return torch.stack(out), torch.tensor(index)


def name_map(depth, exit_from, kind):
    m = {"embedding.weight": "embed.weight", "norm_f.weight": "norm_f.weight", "lm_head.weight": "lm_head.weight"}
    for l in range(depth):
        p = f"layers.{l}." if l < depth - 1 else ""
        m[f"{p}rmsnorm.weight"] = f"norms.{l}.weight"
        m.update(mamba_names(f"{p}mambamixer", f"mixers.{l}"))
    for e, l in enumerate(range(exit_from, depth - 1)):
        p, q = f"layers.{l}.exitclassifier", f"clfs.{e}"
        if kind == "linear":
            m.update({f"{p}.linear.weight": f"{q}.fc.weight", f"{p}.linear.bias": f"{q}.fc.bias"})
        elif kind == "ffn":
            for a, b in (("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")):
                m.update({f"{p}.{a}.weight": f"{q}.{b}.weight", f"{p}.{a}.bias": f"{q}.{b}.bias"})
        else:
            m.update({f"{p}.linear.weight": f"{q}.fc.weight", f"{p}.linear.bias": f"{q}.fc.bias"})
            m.update(mamba_names(f"{p}.mambamixer", f"{q}.mamba"))
    return m


def pair(kind, tau):
    from routec.compiler import load

    net = load("stdlib:dynamax", clf=kind, tau=tau, **SMALL)
    ref = RefDynamax(clf=kind, **SMALL)
    copy_parameters(ref, net, name_map(SMALL["depth"], SMALL["exit_from"], kind))
    return net, ref


def test_reference_rmsnorm_and_decode_by_hand():
    torch.manual_seed(0)
    x = torch.randn(3, 5)
    torch.testing.assert_close(RMSNorm(5)(x), x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5))
    logits = torch.arange(3 * 2 * 4.0).reshape(3, 2, 4)
    conf = torch.tensor([[0.2, 0.95], [0.91, 0.1]])  # 2 exits, 2 sequences
    out, index = decode(logits, conf, 0.9)
    assert index.tolist() == [1, 0]
    torch.testing.assert_close(out, torch.stack([logits[1, 0], logits[0, 1]]))


@pytest.mark.parametrize("kind", KINDS)
def test_eval_exits_match_reference(kind):
    torch.manual_seed(1)
    ids = torch.randint(0, SMALL["vocab"], (6, 5))
    first, ref = pair(kind, 0.5)
    ref.eval()
    with torch.no_grad():
        logits, conf = ref(ids)
    tau = conf.flatten().median().item()  # a threshold that lets some sequences exit and others go on
    from routec.compiler import load

    for t in (tau, 0.0, 1.01):
        net = load("stdlib:dynamax", clf=kind, tau=t, **SMALL)
        net.load_state_dict(first.state_dict())
        net.eval()
        with torch.no_grad():
            got = net(ids)
        want, index = decode(logits, conf, t)
        torch.testing.assert_close(got.exit_index, index)
        torch.testing.assert_close(got.out, want, rtol=1e-5, atol=1e-5)
        if t == 0.0:
            assert torch.all(index == 0)
        if t > 1:
            assert torch.all(index == conf.shape[0])


@pytest.mark.parametrize("kind", KINDS)
def test_train_step_returns_every_exit(kind):
    torch.manual_seed(2)
    net, ref = pair(kind, 0.9)
    net.train()
    ids = torch.randint(0, SMALL["vocab"], (4, 6))
    out = net(ids)
    logits, _ = ref(ids)
    assert len(out.exits) == logits.shape[0]
    for got, want in zip(out.exits, logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    target = torch.randint(0, SMALL["vocab"], (4,))
    loss = sum(F.cross_entropy(e, target) for e in out.exits)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in net.named_parameters():
        if "exitclassifier" in name:
            continue  # the classifiers are trained from their confidences (exit_scores, tested below)
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_train_mode_exposes_classifier_confidences():
    torch.manual_seed(3)
    net, ref = pair("linear", 0.9)
    net.train()
    ids = torch.randint(0, SMALL["vocab"], (4, 6))
    out = net(ids)
    conf = out.exit_scores  # per exit, the score its rule thresholds: the classifier's confidence
    torch.testing.assert_close(torch.stack(list(conf)), ref(ids)[1])
