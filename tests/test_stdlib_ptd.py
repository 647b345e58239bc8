"""stdlib:ptd against an independent PyTorch Persistent-Transient Duality network (Tran et al., ICCV 2023),
written from the description in ARCHITECTURES.md #2 (and the spec header's reconstruction): persistent GRUs over
humans and objects with typed mean messages, an egocentric cross-attention context per human, a hard Transient
Switch per human, and a child GRU that runs only while the switch is on — started from the parent state on a
rising edge, discarded on a falling edge. The reference keeps the child's life cycle as explicit Python
control flow per human (if on: run / start, else: drop), not as masks or routes.

In eval the switch is an argmax (deterministic); in training it is a straight-through Gumbel sample, so the
training step checks gradients, not values.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stdlib_refs import assert_every_parameter_trained, copy_parameters
from stdlib_refs import reference_backend  # noqa: F401  (autouse: ROUTEC_BACKEND=reference)

SMALL = dict(dp=6, db=4, n=8, heads=1)


class RefPTD(nn.Module):
    def __init__(self, dp, db, n, heads):
        super().__init__()
        self.n, self.heads = n, heads
        self.emb_h, self.emb_o = nn.Linear(dp, n), nn.Linear(db, n)
        self.msg_hh, self.msg_oh, self.msg_ho, self.msg_oo = (nn.Linear(n, n) for _ in range(4))
        self.gru_h, self.gru_o = nn.GRUCell(2 * n, n), nn.GRUCell(n, n)
        self.attn_q, self.attn_k, self.attn_v, self.attn_o = (nn.Linear(n, n) for _ in range(4))
        self.switch = nn.Linear(2 * n, 2)
        self.gru_t = nn.GRUCell(n, n)
        self.dec = nn.Linear(2 * n, dp)

    def context(self, ph, eo):  # egocentric context: each human's state attends over the objects
        bsz, H, n = ph.shape
        dh = n // self.heads
        q = self.attn_q(ph).view(bsz, H, self.heads, dh).transpose(1, 2)
        k = self.attn_k(eo).view(bsz, -1, self.heads, dh).transpose(1, 2)
        v = self.attn_v(eo).view(bsz, -1, self.heads, dh).transpose(1, 2)
        a = (q @ k.transpose(-1, -2) / dh ** 0.5).softmax(-1)
        return self.attn_o((a @ v).transpose(1, 2).reshape(bsz, H, n))

    def forward(self, humans, objects):  # [B, T, H, dp], [B, T, O, db]
        bsz, T, H, _ = humans.shape
        O, n = objects.shape[2], self.n
        ph, po = humans.new_zeros(bsz, H, n), humans.new_zeros(bsz, O, n)
        tr = humans.new_zeros(bsz, H, n)
        active = [[False] * H for _ in range(bsz)]  # is a transient session running for (sample, human)?
        poses, switches = [], []
        for t in range(T):
            eh, eo = self.emb_h(humans[:, t]), self.emb_o(objects[:, t])
            mean_h, mean_o = ph.mean(1, keepdim=True), po.mean(1, keepdim=True)
            xh = torch.cat([eh + self.msg_hh(mean_h) + self.msg_oh(mean_o), tr], -1)
            xo = eo + self.msg_ho(mean_h) + self.msg_oo(mean_o)
            ph = self.gru_h(xh.reshape(-1, 2 * n), ph.reshape(-1, n)).view(bsz, H, n)
            po = self.gru_o(xo.reshape(-1, n), po.reshape(-1, n)).view(bsz, O, n)
            ctx = self.context(ph, eo)
            logits = self.switch(torch.cat([ph, ctx], -1))  # [B, H, 2]: (off, on)
            rows = []
            for b in range(bsz):
                row = []
                for i in range(H):
                    if logits[b, i, 1] > logits[b, i, 0]:  # switch on
                        start = tr[b, i] if active[b][i] else ph[b, i]  # rising edge: start from the parent
                        row.append(self.gru_t(ctx[b, i][None], start[None])[0])
                        active[b][i] = True
                    else:  # switch off: the session ends, its state is discarded
                        row.append(ph.new_zeros(n))
                        active[b][i] = False
                rows.append(torch.stack(row))
            tr = torch.stack(rows)
            poses.append(humans[:, t] + self.dec(torch.cat([ph, tr], -1)))
            switches.append(torch.tensor([[float(a) for a in r] for r in active]))
        return torch.stack(poses, 1), torch.stack(switches, 1)[..., None]


NAMES = {
    "emb_h": "emb_h", "emb_o": "emb_o",
    "ph.linear": "msg_hh", "ph.linear_1": "msg_oh", "ph.linear_2": "msg_ho", "ph.linear_3": "msg_oo",
    "ph.grucell": "gru_h", "ph.grucell_1": "gru_o",
    "ph.crossattention.q": "attn_q", "ph.crossattention.k": "attn_k", "ph.crossattention.v": "attn_v",
    "ph.crossattention.o": "attn_o",
    "ph.s.linear": "switch", "ph.on.transientstep.grucell": "gru_t", "ph.linear_4": "dec",
}


def pair():
    from routec.compiler import load

    net = load("stdlib:ptd", **SMALL)
    ref = RefPTD(**SMALL)
    mapped = {}
    for name, _ in net.named_parameters():
        prefix, leaf = name.rsplit(".", 1)
        mapped[name] = f"{NAMES[prefix]}.{leaf}"
    copy_parameters(ref, net, mapped)
    return net, ref


def scene(bsz=3, T=6, H=2, O=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(bsz, T, H, SMALL["dp"], generator=g), torch.randn(bsz, T, O, SMALL["db"], generator=g)


@pytest.mark.parametrize("T", [1, 7])
def test_eval_matches_reference(T):
    torch.manual_seed(0)
    net, ref = pair()
    with torch.no_grad():  # a sharper, unbiased switch that turns sessions on and off along the sequence
        w = torch.randn(2, 2 * SMALL["n"], generator=torch.Generator().manual_seed(7))
        seen = []
        hook = ref.switch.register_forward_hook(lambda m, i, out: seen.append(out[..., 1] - out[..., 0]))
        ref.switch.weight.copy_(w)
        ref.switch.bias.zero_()
        ref(*scene(T=7))
        hook.remove()
        middle = torch.cat([d.flatten() for d in seen]).median()  # centre the on/off margin
        for layer_w, layer_b in ((net.get_parameter("ph.s.linear.weight"), net.get_parameter("ph.s.linear.bias")),
                                 (ref.switch.weight, ref.switch.bias)):
            layer_w.copy_(w)
            layer_b.copy_(torch.stack([middle / 2, -middle / 2]))
    net.eval(), ref.eval()
    humans, objects = scene(T=T)
    with torch.no_grad():
        got = net(humans, objects)
        poses, switches = ref(humans, objects)
    torch.testing.assert_close(got.switches, switches)
    torch.testing.assert_close(got.poses, poses, rtol=1e-5, atol=1e-5)
    if T > 1:
        assert 0 < switches.mean() < 1, "the scene should exercise both on and off humans"


def test_pinned_switch_starts_from_the_parent_and_drops_when_off():
    """Pin the switch (zero weights, ±1e4 bias): always on, T_1 = GRU_T(c_1, P_1), T_2 = GRU_T(c_2, T_1);
    always off, T = 0 and the pose is x_t + dec([P ‖ 0]); composed by hand from the reference's layers."""
    torch.manual_seed(1)
    net, ref = pair()
    net.eval()
    humans, objects = scene(bsz=2, T=2, seed=1)
    w, b = net.get_parameter("ph.s.linear.weight"), net.get_parameter("ph.s.linear.bias")
    with torch.no_grad():
        w.zero_()
        ref.switch.weight.zero_()
        for on in (True, False):
            bias = torch.tensor([-1e4, 1e4]) if on else torch.tensor([1e4, -1e4])
            b.copy_(bias)
            ref.switch.bias.copy_(bias)
            got = net(humans, objects)
            assert torch.all(got.switches == float(on))
            # by hand, frame by frame
            n = SMALL["n"]
            ph, po, tr = torch.zeros(2, 2, n), torch.zeros(2, 3, n), torch.zeros(2, 2, n)
            for t in range(2):
                eh, eo = ref.emb_h(humans[:, t]), ref.emb_o(objects[:, t])
                mh, mo = ph.mean(1, keepdim=True), po.mean(1, keepdim=True)
                xh = torch.cat([eh + ref.msg_hh(mh) + ref.msg_oh(mo), tr], -1)
                ph = ref.gru_h(xh.reshape(-1, 2 * n), ph.reshape(-1, n)).view(2, 2, n)
                po = ref.gru_o((eo + ref.msg_ho(mh) + ref.msg_oo(mo)).reshape(-1, n), po.reshape(-1, n)).view(2, 3, n)
                ctx = ref.context(ph, eo)
                if on:
                    start = ph if t == 0 else tr
                    tr = ref.gru_t(ctx.reshape(-1, n), start.reshape(-1, n)).view(2, 2, n)
                else:
                    tr = torch.zeros(2, 2, n)
                torch.testing.assert_close(got.poses[:, t], humans[:, t] + ref.dec(torch.cat([ph, tr], -1)),
                                           rtol=1e-5, atol=1e-5)


def test_train_step():
    torch.manual_seed(2)
    net, _ = pair()
    net.train()
    humans, objects = scene(bsz=4, T=5, seed=2)
    out = net(humans, objects)
    assert torch.all((out.switches - 0.0).abs().lt(1e-6) | (out.switches - 1.0).abs().lt(1e-6))
    loss = F.mse_loss(out.poses[:, :-1], humans[:, 1:])  # one-step-ahead forecast
    loss.backward()
    assert torch.isfinite(loss)
    assert_every_parameter_trained(net)
