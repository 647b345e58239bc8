"""stdlib:ftwt against an independent PyTorch FTWT VGG written from the paper (Elkerdawy et al., CVPR 2022):
a CIFAR VGG-BN (`features` as in torchvision: conv, BN, ReLU, max pool) with one mask predictor per conv layer
after the first — GlobalMaxPool of the layer's input, a 1×1 conv, σ, keep filter c iff σ > 0.5 — and the
decoupled training: the task loss sees the hard mask, the predictors learn from a BCE on their logits.
The self-supervised targets (top-k filters by heatmap mass) are computed here too, from the dense
activations, to drive the BCE as the paper does. No randomness at inference.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from stdlib_refs import assert_every_parameter_trained, randomise_running_stats
from stdlib_refs import reference_backend  # noqa: F401  (autouse: ROUTEC_BACKEND=reference)

SMALL = dict(cfg=[8, 0, 8, 16, 0, 16, 0], n_layers=7, img=8, classes=4)


class RefFTWTVGG(nn.Module):
    def __init__(self, cfg, classes):
        super().__init__()
        self.cfg = cfg
        self.convs, self.bns, self.predictors = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        cin, first = 3, True
        for i, c in enumerate(cfg):
            if c == 0:
                continue
            self.convs[str(i)] = nn.Conv2d(cin, c, 3, padding=1)
            self.bns[str(i)] = nn.BatchNorm2d(c)
            if not first:
                self.predictors[str(i)] = nn.Conv2d(cin, c, 1)
            cin, first = c, False
        self.classifier = nn.Linear(cin, classes)

    def forward(self, x, keep_dense=False):
        """Returns logits, the gated layers' mask logits and masks; with keep_dense also each gated layer's
        dense (unmasked) activation, from which the self-supervised targets are made."""
        mask_logits, masks, dense = [], [], []
        for i, c in enumerate(self.cfg):
            if c == 0:
                x = F.max_pool2d(x, 2)
                continue
            y = F.relu(self.bns[str(i)](self.convs[str(i)](x)))
            if str(i) in self.predictors:
                logit = self.predictors[str(i)](F.adaptive_max_pool2d(x, 1)).flatten(1)  # [B, C_l]
                keep = (torch.sigmoid(logit) > 0.5).float()
                mask_logits.append(logit)
                masks.append(keep)
                dense.append(y)
                y = y * keep[:, :, None, None]
            x = y
        out = self.classifier(x.flatten(1))
        return (out, torch.cat(mask_logits, 1), masks, dense) if keep_dense else (out, torch.cat(mask_logits, 1), masks)


def mass_targets(act: torch.Tensor, r: float) -> torch.Tensor:
    """FTWT's self-supervised target for one layer [B, C, H, W]: per sample the top-k filters by ℓ1 heatmap
    mass, k the smallest count whose cumulative mass reaches r · total."""
    mass = act.abs().flatten(2).sum(-1)  # [B, C]
    order = mass.sort(1, descending=True)
    cum = order.values.cumsum(1)
    k = (cum < r * mass.sum(1, keepdim=True)).sum(1) + 1  # smallest k with cum[k-1] ≥ r·total
    target = torch.zeros_like(mass)
    for b in range(mass.shape[0]):
        target[b, order.indices[b, : int(k[b])]] = 1
    return target


def test_mass_targets_match_a_loop():
    torch.manual_seed(5)
    act = torch.relu(torch.randn(3, 6, 4, 4))
    got = mass_targets(act, 0.7)
    for b in range(3):
        mass = [float(act[b, c].abs().sum()) for c in range(6)]
        ranked = sorted(range(6), key=lambda c: -mass[c])
        total, acc, chosen = sum(mass), 0.0, []
        for c in ranked:
            chosen.append(c)
            acc += mass[c]
            if acc >= 0.7 * total:
                break
        assert sorted(torch.nonzero(got[b]).flatten().tolist()) == sorted(chosen)


def routec_to_reference(name: str) -> str:
    """The explicit name map: layers.<i>.{conv,bn,predictor} → {convs,bns,predictors}.<i> (buffers too)."""
    if name.startswith("classifier."):
        return name
    m = re.fullmatch(r"layers\.(\d+)\.(conv|bn|predictor)\.(.+)", name)
    assert m, f"unmapped routec parameter {name}"
    owner = {"conv": "convs", "bn": "bns", "predictor": "predictors"}[m[2]]
    return f"{owner}.{m[1]}.{m[3]}"


def build():
    from routec.compiler import load

    torch.manual_seed(0)
    net = load("stdlib:ftwt", **SMALL)
    randomise_running_stats(net, mean_std=0.2, var_range=(0.5, 1.5))
    with torch.no_grad():  # predictor biases that switch filters on and off
        for name, p in net.named_parameters():
            if name.endswith("predictor.bias"):
                p.normal_(0.0, 1.0)
    ref = RefFTWTVGG(SMALL["cfg"], SMALL["classes"])
    ref.load_state_dict({routec_to_reference(k): v.clone() for k, v in net.state_dict().items()}, strict=True)
    return net, ref


def test_eval_matches_reference_with_channel_decisions():
    net, ref = build()
    net.eval(), ref.eval()
    img = torch.randn(6, 3, SMALL["img"], SMALL["img"])
    with torch.no_grad():
        got = net(img)
        logits, mask_logits, masks = ref(img)
    torch.testing.assert_close(got.logits, logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.mask_logits, mask_logits, atol=1e-5, rtol=1e-4)
    # the routing decisions: routec's kept filters are the reference's (σ(logit) > 0.5 ⇔ logit > 0)
    keep = torch.cat(masks, 1)
    torch.testing.assert_close((got.mask_logits > 0).float(), keep)
    assert 0.1 < keep.mean() < 0.9, "the gates should switch some filters off and keep others"
    assert not all(torch.equal(keep[0], keep[b]) for b in range(1, 6)), "the channel gate is per sample"


def test_train_step_decoupled_losses():
    net, ref = build()
    net.train(), ref.train()
    img = torch.randn(4, 3, SMALL["img"], SMALL["img"])
    labels = torch.tensor([0, 1, 2, 3])
    out = net(img)
    logits, mask_logits, _, dense = ref(img, keep_dense=True)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.mask_logits, mask_logits, atol=1e-5, rtol=1e-4)
    targets = torch.cat([mass_targets(a.detach(), 0.9) for a in dense], 1)
    task = F.cross_entropy(out.logits, labels)
    # the hard mask passes no gradient: the task loss leaves the predictors untouched
    grads = torch.autograd.grad(task, [p for n, p in net.named_parameters() if "predictor" in n], allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads)
    loss = task + F.binary_cross_entropy_with_logits(out.mask_logits, targets)
    assert torch.isfinite(loss)
    loss.backward()
    assert_every_parameter_trained(net)
