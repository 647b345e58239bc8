"""stdlib:dynamic_confidence_snn against an independent PyTorch simulation written from the official demo
(chenlicodebank/Dynamic-Confidence-in-Spiking-Neural-Networks, main.py `mode_index == 2`, all_models.py
`SNNActivation` and `forward2`).

The reference simulates the converted ResNet-18 the way the demo does: time-major, the whole network once
per step, every IF layer keeping its membrane `mem` (initialised to θ/2) and last spike, `mem = mem - spike + x`,
`spike = θ · [mem >= θ]`; the fc output accumulates as O_t += fc_t / 30; a sample stops at the first step with
max softmax(O_t) > 0.6 (its output is O_t at that step), else runs all steps. BatchNorm is folded into the
convolutions (conv with bias), as in the spec. The pooled feature is the global mean (the demo's
avg_pool2d(4) on its final 4 × 4 map).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stdlib_refs import copy_parameters
from stdlib_refs import reference_backend  # noqa: F401  (autouse: ROUTEC_BACKEND=reference)

SMALL = dict(width=4, classes=3, size=8, steps=6)


class RefIF(nn.Module):
    """The demo's SNNActivation with soft reset; state is reset by `start()` before each input."""

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.ones(1))

    def start(self):
        self.mem, self.spike = None, None

    def forward(self, x):
        if self.mem is None:
            self.mem = torch.zeros_like(x) + self.theta / 2
            self.spike = torch.zeros_like(x)
        self.mem = self.mem - self.spike + x
        self.spike = (self.mem >= self.theta).float() * self.theta
        return self.spike


class RefBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1)
        self.if1 = RefIF()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1)
        self.downsample = nn.Conv2d(cin, planes, 1, stride=stride) if stride != 1 or cin != planes else None
        self.if2 = RefIF()

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        return self.if2(self.conv2(self.if1(self.conv1(x))) + residual)


class RefSNN(nn.Module):
    def __init__(self, width: int, classes: int, size: int, steps: int):
        super().__init__()
        self.steps = steps
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.if1 = RefIF()
        cfg = [(width, width, 1), (width, width, 1), (width, 2 * width, 2), (2 * width, 2 * width, 1),
               (2 * width, 4 * width, 2), (4 * width, 4 * width, 1), (4 * width, 8 * width, 2),
               (8 * width, 8 * width, 1)]
        self.blocks = nn.ModuleList(RefBlock(*c) for c in cfg)
        self.fc = nn.Linear(8 * width, classes)

    def forward(self, img, temperature=30.0, threshold=0.6):
        """→ (per-step accumulated outputs [T, B, C], selected output [B, C], exit step [B])."""
        for m in self.modules():
            if isinstance(m, RefIF):
                m.start()
        outputs = []
        acc = None
        for _ in range(self.steps):
            x = self.if1(self.conv1(img))
            for block in self.blocks:
                x = block(x)
            fc = self.fc(x.mean((2, 3)))
            acc = fc / temperature if acc is None else acc + fc / temperature
            outputs.append(acc)
        outputs = torch.stack(outputs)  # [T, B, C]
        confident = torch.softmax(outputs, -1).max(-1).values > threshold  # [T, B]
        step = torch.full((img.shape[0],), self.steps - 1, dtype=torch.long)
        for b in range(img.shape[0]):
            hits = confident[:, b].nonzero()
            if len(hits):
                step[b] = hits[0, 0]
        return outputs, outputs[step, torch.arange(img.shape[0])], step


def test_reference_if_neuron_matches_a_scalar_loop():
    """A constant input current c with threshold θ: the IF neuron's spike count after t steps is
    floor((θ/2 + t·c) / θ) for 0 ≤ c ≤ θ (soft reset keeps the remainder)."""
    neuron = RefIF()
    with torch.no_grad():
        neuron.theta.fill_(0.7)
    currents = torch.tensor([0.0, 0.05, 0.3, 0.69])
    neuron.start()
    total = torch.zeros(4)
    for t in range(1, 30):
        total = total + neuron(currents) / 0.7
        want = torch.floor((0.35 + t * currents) / 0.7 + 1e-6)
        torch.testing.assert_close(total, want)


def name_map() -> dict:
    names = {
        "conv2d.weight": "conv1.weight",
        "conv2d.bias": "conv1.bias",
        "ifneuron.theta": "if1.theta",
        "linear.weight": "fc.weight",
        "linear.bias": "fc.bias",
    }
    for i in range(8):
        block = "spikingbasicblock" if i == 0 else f"spikingbasicblock_{i}"
        names.update({
            f"{block}.timeconv.conv2d.weight": f"blocks.{i}.conv1.weight",
            f"{block}.timeconv.conv2d.bias": f"blocks.{i}.conv1.bias",
            f"{block}.ifneuron.theta": f"blocks.{i}.if1.theta",
            f"{block}.timeconv_1.conv2d.weight": f"blocks.{i}.conv2.weight",
            f"{block}.timeconv_1.conv2d.bias": f"blocks.{i}.conv2.bias",
            f"{block}.ifneuron_1.theta": f"blocks.{i}.if2.theta",
        })
        if i in (2, 4, 6):
            names[f"{block}.timeconv_2.conv2d.weight"] = f"blocks.{i}.downsample.weight"
            names[f"{block}.timeconv_2.conv2d.bias"] = f"blocks.{i}.downsample.bias"
    return names


def pair(temperature: float, threshold: float, seed: int):
    """Both networks with the same weights; per-layer thresholds spread around 1 so layers differ."""
    from routec.compiler import load

    torch.manual_seed(seed)
    net = load("stdlib:dynamic_confidence_snn", temperature=temperature, threshold=threshold, **SMALL)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("theta"):
                p.uniform_(0.5, 1.0)
            elif "conv2d.weight" in name:
                p.mul_(3.0)  # enough input current that every layer spikes
    ref = RefSNN(**SMALL)
    copy_parameters(ref, net, name_map())
    return net, ref



# the demo's temperature and threshold (nobody is confident enough to halt), and a setting where some samples
# halt early and others run every step
CONFIGS = [pytest.param(30.0, 0.6, 0, id="demo"), pytest.param(2.0, 0.6, 1, id="early")]


@pytest.mark.parametrize("temperature, threshold, seed", CONFIGS)
def test_model_matches_reference_in_eval(temperature, threshold, seed):
    net, ref = pair(temperature, threshold, seed)
    net.eval(), ref.eval()
    spikes = {}
    for name, m in ref.named_modules():
        if isinstance(m, RefIF):
            m.register_forward_hook(lambda mod, args, out, name=name: spikes.setdefault(name, []).append(out > 0))
    img = torch.randn(5, 3, SMALL["size"], SMALL["size"])
    with torch.no_grad():
        got = net(img)
        _, want, step = ref(img, temperature, threshold)
    torch.testing.assert_close(got.exit_index, step)
    torch.testing.assert_close(got.out, want, rtol=1e-5, atol=1e-6)
    # not vacuous: every IF layer spikes, so the outputs depend on the spiking network
    assert len(spikes) == 17
    for name, s in spikes.items():
        rate = torch.stack(s).float().mean()
        assert 0.05 < rate < 0.95, (name, rate)
    if temperature == 2.0:
        assert step.min() < SMALL["steps"] - 1, "some sample halts early"
        assert step.max() == SMALL["steps"] - 1, "some sample runs every step"
    else:
        assert torch.all(step == SMALL["steps"] - 1)


def test_model_train_step():
    """Training mode returns every step's accumulated output. The spike has no surrogate gradient (the SNN is
    converted, not trained), so only the classifier and the last IF layer's θ (which scales the spikes the
    classifier reads) get gradients."""
    net, ref = pair(2.0, 0.5, 2)
    net.train(), ref.train()
    img = torch.randn(3, 3, SMALL["size"], SMALL["size"])
    labels = torch.tensor([0, 2, 1])
    (per_step,) = net(img).exits  # the exit inside the scan: every step's output, [B, T, C]
    outputs, _, _ = ref(img, 2.0, 0.5)
    assert per_step.shape == (3, SMALL["steps"], SMALL["classes"])
    torch.testing.assert_close(per_step, outputs.transpose(0, 1), rtol=1e-5, atol=1e-6)
    loss = F.cross_entropy(per_step.flatten(0, 1), labels.repeat_interleave(SMALL["steps"]))
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert grads["linear.weight"] is not None and grads["linear.weight"].abs().sum() > 0
    last = grads["spikingbasicblock_7.ifneuron_1.theta"]
    assert last is not None and torch.isfinite(last).all() and last.abs().sum() > 0
    assert all(g is None for n, g in grads.items() if n != "spikingbasicblock_7.ifneuron_1.theta"
               and not n.startswith("linear."))
