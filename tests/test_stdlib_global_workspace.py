"""stdlib:global_workspace against an independent PyTorch Global Workspace model (Chateau-Laurent & VanRullen,
2025), written from the paper's description (ARCHITECTURES.md #9): an LSTM controller over reasoning steps, a
softmax gate over the Input / Increment / Output modules, each reading the workspace through its decoder and
writing back through its encoder, w_t = Σ_i g_i e_i(M_i(d_i(w_{t-1}))); the answer is d_out(w_T).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stdlib_refs import assert_every_parameter_trained, copy_parameters
from stdlib_refs import reference_backend  # noqa: F401  (autouse: ROUTEC_BACKEND=reference)

SMALL = dict(digits=10, classes=19, dw=8, n=12, n_in=1, hidden=16)


class RefGW(nn.Module):
    def __init__(self, digits, classes, dw, n, n_in, hidden):
        super().__init__()
        self.dw, self.n = dw, n
        self.controller = nn.LSTMCell(dw + n_in, n)
        self.gate = nn.Linear(n, 3)
        self.enc_in = nn.Linear(digits, dw)
        self.dec_inc, self.enc_inc = nn.Linear(dw, classes), nn.Linear(classes, dw)
        self.inc1, self.inc2 = nn.Linear(classes, hidden), nn.Linear(hidden, classes)  # the +1 operator
        self.dec_out, self.enc_out = nn.Linear(dw, classes), nn.Linear(classes, dw)

    def modules_write(self, a, w):  # the three candidate workspaces [B, 3, dw]
        inp = self.enc_in(a)
        inc = self.enc_inc(self.inc2(F.gelu(self.inc1(self.dec_inc(w)))))
        out = self.enc_out(self.dec_out(w))
        return torch.stack([inp, inc, out], 1)

    def forward(self, a, x):  # a [B, digits], x [B, T, n_in]
        bsz = a.shape[0]
        w = a.new_zeros(bsz, self.dw)
        h, c = a.new_zeros(bsz, self.n), a.new_zeros(bsz, self.n)
        logits = []
        for t in range(x.shape[1]):
            h, c = self.controller(torch.cat([w, x[:, t]], -1), (h, c))
            s = self.gate(h)
            g = s.softmax(-1)
            w = (g[:, :, None] * self.modules_write(a, w)).sum(1)
            logits.append(s)
        return self.dec_out(w), torch.stack(logits, 1)


NAMES = {
    "read_out": "dec_out",
    "w.lstmcell": "controller",
    "w.linear": "gate",
    "w.p.input.linear": "enc_in",
    "w.p.increment.linear": "dec_inc",
    "w.p.increment.mlp.fc1": "inc1",
    "w.p.increment.mlp.fc2": "inc2",
    "w.p.increment.linear_1": "enc_inc",
    "w.p.output.linear": "enc_out",
}


def full_names(net):
    out = {}
    for name, _ in net.named_parameters():
        prefix, leaf = name.rsplit(".", 1)
        out[name] = f"{NAMES[prefix]}.{leaf}"
    return out


def pair():
    from routec.compiler import load

    net = load("stdlib:global_workspace", **SMALL)
    ref = RefGW(**SMALL)
    copy_parameters(ref, net, full_names(net))
    return net, ref


def addends(bsz, gen=None):
    a = torch.randint(0, 10, (bsz,), generator=gen)
    return F.one_hot(a, 10).float()


@pytest.mark.parametrize("T", [1, 6])
def test_model_matches_reference_in_eval(T):
    torch.manual_seed(0)
    net, ref = pair()
    net.eval(), ref.eval()
    a, x = addends(4), torch.randn(4, T, 1)
    with torch.no_grad():
        got = net(a, x)
        answer, choices = ref(a, x)
    torch.testing.assert_close(got.answer, answer, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.choices, choices, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.choices.argmax(-1), choices.argmax(-1)), "module selected at each step"


def test_a_pinned_gate_runs_one_module_per_step():
    """Pin the gate to one module (zero weights, a bias of -1e4 on the others): one step from w_0 = 0 must
    give d_out of that module's write, and repeated Input steps leave e_in(a), composed by hand."""
    torch.manual_seed(1)
    net, ref = pair()
    net.eval()
    with torch.no_grad():
        gate_w = net.get_parameter("w.linear.weight")
        gate_b = net.get_parameter("w.linear.bias")
        gate_w.zero_()
        a = addends(3)
        x = torch.zeros(3, 1, 1)
        for module in range(3):
            gate_b.copy_(torch.tensor([-1e4, -1e4, -1e4]))
            gate_b[module] = 0.0
            got = net(a, x).answer
            w0 = torch.zeros(3, SMALL["dw"])
            want = ref.dec_out(ref.modules_write(a, w0)[:, module])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # a two-step chain: Input at every step leaves e_in(a); the answer decodes it
        gate_b.copy_(torch.tensor([0.0, -1e4, -1e4]))
        got = net(a, torch.zeros(3, 2, 1)).answer
        torch.testing.assert_close(got, ref.dec_out(ref.enc_in(a)), rtol=1e-5, atol=1e-6)
        # Increment twice from w_0 = 0: e_inc(M(d_inc(e_inc(M(d_inc(0))))))
        gate_b.copy_(torch.tensor([-1e4, 0.0, -1e4]))
        got = net(a, torch.zeros(3, 2, 1)).answer
        step = lambda w: ref.enc_inc(ref.inc2(F.gelu(ref.inc1(ref.dec_inc(w)))))
        torch.testing.assert_close(got, ref.dec_out(step(step(torch.zeros(3, SMALL["dw"])))), rtol=1e-5, atol=1e-6)


def test_model_train_step():
    torch.manual_seed(2)
    net, ref = pair()
    net.train()
    a, x = addends(5), torch.randn(5, 4, 1)
    target = torch.randint(0, SMALL["classes"], (5,))
    out = net(a, x)
    answer, _ = ref(a, x)
    torch.testing.assert_close(out.answer, answer, rtol=1e-5, atol=1e-6)
    loss = F.cross_entropy(out.answer, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert_every_parameter_trained(net)
