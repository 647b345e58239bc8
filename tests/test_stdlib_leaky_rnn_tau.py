"""stdlib:leaky_rnn_tau against an independent PyTorch RNN written from the official code
(LevinaLab/rnn_timescale_public, src/models/RNN_Stack.py with one layer and train_tau=True).

The reference keeps the official structure: time-major input [T, B, 1], an input Linear, a recurrent Linear
whose diagonal is zeroed in place before every forward, trainable per-neuron τ clamped at 1, the update
r = LeakyReLU((1 - 1/τ) r + (W_rec r + b + W_in u_t) / τ), and a list of linear readout heads on the final state.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stdlib_refs import assert_every_parameter_trained
from stdlib_refs import reference_backend  # noqa: F401  (autouse: ROUTEC_BACKEND=reference)

SMALL = dict(n_in=1, n=12, heads=3, classes=2)


class RefLeakyRNN(nn.Module):
    def __init__(self, n_in: int, n: int, heads: int, classes: int):
        super().__init__()
        self.input_layer = nn.Linear(n_in, n)
        self.w_hh = nn.Linear(n, n)
        self.taus = nn.Parameter(1 + torch.rand(n))
        self.fc = nn.ModuleList(nn.Linear(n, classes) for _ in range(heads))
        self.afunc = nn.LeakyReLU()

    def forward(self, data, h0):  # data [T, B, n_in] (time-major, as the official code), h0 [B, n]
        with torch.no_grad():
            self.w_hh.weight.fill_diagonal_(0.0)  # no self-connections, as in the official forward
        x = self.input_layer(data)
        h = h0
        tau = torch.clamp(self.taus, min=1.0)
        for t in range(data.shape[0]):
            h = (1 - 1 / tau) * h + (self.w_hh(h) + x[t]) / tau
            h = self.afunc(h)
        return torch.stack([fc(h) for fc in self.fc], dim=1)  # [B, heads, classes]


def test_reference_with_unit_tau_is_a_plain_leaky_relu_rnn():
    """τ = 1 removes the leak: r_t = LeakyReLU(W r_{t-1} + b + W_in u_t), checked step by step by hand."""
    torch.manual_seed(0)
    ref = RefLeakyRNN(1, 5, 1, 2).double()
    with torch.no_grad():
        ref.taus.fill_(0.5)  # clamped to 1
    data = torch.randint(0, 2, (4, 3, 1)).double()
    h0 = 0.1 * torch.rand(3, 5, dtype=torch.float64)
    with torch.no_grad():
        got = ref(data, h0)
        W = ref.w_hh.weight.clone()
        h = h0
        for t in range(4):
            pre = h @ W.T + ref.w_hh.bias + data[t] @ ref.input_layer.weight.T + ref.input_layer.bias
            h = torch.where(pre > 0, pre, 0.01 * pre)
        torch.testing.assert_close(got[:, 0], ref.fc[0](h))
        assert torch.all(W.diagonal() == 0)


def name_map(heads: int, classes: int) -> dict:
    """{routec parameter: [(reference parameter, rows of the routec tensor)]}: the stacked readout
    Linear(n, heads * classes) holds head k in rows k * classes … (k + 1) * classes - 1."""
    everything = slice(None)
    names = {
        "leakytaurnn.tau": [("taus", everything)],
        "leakytaurnn.w_rec": [("w_hh.weight", everything)],
        "leakytaurnn.b_rec": [("w_hh.bias", everything)],
        "leakytaurnn.w_in.weight": [("input_layer.weight", everything)],
        "leakytaurnn.w_in.bias": [("input_layer.bias", everything)],
        "linear.weight": [(f"fc.{k}.weight", slice(k * classes, (k + 1) * classes)) for k in range(heads)],
        "linear.bias": [(f"fc.{k}.bias", slice(k * classes, (k + 1) * classes)) for k in range(heads)],
    }
    return names


def copy_into(ref: nn.Module, net: nn.Module, names: dict) -> None:
    src, dst = dict(net.named_parameters()), dict(ref.named_parameters())
    targets = [ours for parts in names.values() for ours, _ in parts]
    assert sorted(src) == sorted(names), f"unmapped routec parameters: {sorted(set(src) ^ set(names))}"
    assert sorted(dst) == sorted(targets), f"unmapped reference parameters: {sorted(set(dst) ^ set(targets))}"
    with torch.no_grad():
        for theirs, parts in names.items():
            for ours, rows in parts:
                dst[ours].copy_(src[theirs][rows])


def pair(small=SMALL):
    from routec.compiler import load

    net = load("stdlib:leaky_rnn_tau", **small)
    ref = RefLeakyRNN(**small)
    copy_into(ref, net, name_map(small["heads"], small["classes"]))
    return net, ref


def logits_of(out):
    """The model's one named output `logits` (a NamedTuple field)."""
    return out.logits


@pytest.mark.parametrize("T", [1, 13])
def test_model_matches_reference_in_eval(T):
    torch.manual_seed(1)
    net, ref = pair()
    net.eval(), ref.eval()
    x = torch.randint(0, 2, (4, T, 1)).float()  # binary input streams
    h0 = 0.1 * torch.rand(4, SMALL["n"])  # the official default initial state
    with torch.no_grad():
        got = logits_of(net(x, h0))
        torch.testing.assert_close(got, ref(x.transpose(0, 1), h0), rtol=1e-5, atol=1e-6)


def test_model_train_step():
    """The multi-head curriculum's loss (sum of per-head cross-entropies); τ, W_rec, W_in and every head learn."""
    torch.manual_seed(2)
    net, ref = pair()
    net.train()
    x = torch.randint(0, 2, (5, 9, 1)).float()
    h0 = 0.1 * torch.rand(5, SMALL["n"])
    labels = torch.randint(0, 2, (5, SMALL["heads"]))
    logits = logits_of(net(x, h0))
    torch.testing.assert_close(logits, ref(x.transpose(0, 1), h0), rtol=1e-5, atol=1e-6)
    loss = sum(F.cross_entropy(logits[:, k], labels[:, k]) for k in range(SMALL["heads"]))
    loss.backward()
    assert torch.isfinite(loss)
    assert_every_parameter_trained(net)
    w = net.get_parameter("leakytaurnn.w_rec")
    assert torch.all(w.grad.diagonal() == 0), "self-connections carry no gradient"
