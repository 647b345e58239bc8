"""gated_conv_bn_relu (codegen/gated_conv.py): the channel-compacting Triton kernel vs the reference under
TRITON_INTERPRET=1 (all / none / some channels kept, NaN-poisoned outputs, 3×3 and 1×1), the reference vs a
plain per-element loop, gradients, fake shapes, torch.compile; and the compiler's channel-gate pass
(compiler/passes/channel_gate.py) on stdlib:ftwt: eval fused == ROUTEC_CHANNEL_GATE=0 on both backends,
training unchanged."""

import pytest
import torch
import torch.nn.functional as F

from routec.codegen import gated_conv as gc
from routec.codegen import ops


def _inputs(b=3, cin=3, cout=17, h=5, w=5, ks=3, bias=True, keep="mixed", seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cin, h, w, generator=g, dtype=dtype)
    weight = torch.randn(cout, cin, ks, ks, generator=g, dtype=dtype)
    bias_t = torch.randn(cout, generator=g, dtype=dtype) if bias else None
    scale = torch.rand(cout, generator=g, dtype=dtype) + 0.5
    shift = torch.randn(cout, generator=g, dtype=dtype)
    if keep == "all":
        k = torch.ones(b, cout, dtype=torch.bool)
    elif keep == "none":
        k = torch.zeros(b, cout, dtype=torch.bool)
    else:
        k = torch.rand(b, cout, generator=g) > 0.5
        k[0, :] = True  # one sample keeps all, one (if any) keeps only the last channel
        if b > 1:
            k[1, :] = False
            k[1, -1] = True
    return x, weight, bias_t, scale, shift, k


@pytest.mark.parametrize("keep", ["all", "none", "mixed"])
@pytest.mark.parametrize("ks,bias", [(3, True), (1, False)])
def test_kernel_matches_reference(triton_backend, keep, ks, bias):
    args = _inputs(ks=ks, bias=bias, keep=keep)
    want = gc.gated_conv_bn_relu_reference(*args)
    out = torch.full((3, 17, 5, 5), float("nan"))
    got = gc.gated_conv_forward(*args, out=out, block_p=16, block_c=16, block_k=16)  # several blocks
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got_op = ops.gated_conv_bn_relu(*args)  # default blocks, ROUTEC_POISON=1 output
    torch.testing.assert_close(got_op, want, atol=1e-5, rtol=1e-5)
    off = ~args[-1]
    assert (got.permute(0, 1, 2, 3)[off] == 0).all()


def test_kernel_batch_one_odd_map(triton_backend):
    args = _inputs(b=1, cin=2, cout=5, h=3, w=7, seed=3)
    torch.testing.assert_close(ops.gated_conv_bn_relu(*args), gc.gated_conv_bn_relu_reference(*args),
                               atol=1e-5, rtol=1e-5)


def test_reference_matches_a_loop():
    x, weight, bias, scale, shift, keep = _inputs(b=2, cin=2, cout=3, h=4, w=3, dtype=torch.float64, seed=1)
    got = gc.gated_conv_bn_relu_reference(x, weight, bias, scale, shift, keep)
    B, Cin, H, W = x.shape
    for b in range(B):
        for c in range(3):
            for i in range(H):
                for j in range(W):
                    s = float(bias[c])
                    for ci in range(Cin):
                        for di in range(3):
                            for dj in range(3):
                                ii, jj = i + di - 1, j + dj - 1
                                if 0 <= ii < H and 0 <= jj < W:
                                    s += float(x[b, ci, ii, jj]) * float(weight[c, ci, di, dj])
                    v = max(s * float(scale[c]) + float(shift[c]), 0.0) if keep[b, c] else 0.0
                    assert abs(float(got[b, c, i, j]) - v) < 1e-9


def test_gradcheck_reference_backend(reference_backend):
    x, weight, bias, scale, shift, keep = _inputs(b=2, cin=2, cout=3, h=3, w=3, dtype=torch.float64)
    ins = [t.requires_grad_() for t in (x, weight, bias, scale, shift)]
    torch.autograd.gradcheck(lambda a, w, bb, s, h: ops.gated_conv_bn_relu(a, w, bb, s, h, keep), ins)


def test_gradients_triton_forward(triton_backend):
    x, weight, bias, scale, shift, keep = _inputs()
    ins = [t.requires_grad_() for t in (x, weight, bias, scale, shift)]
    g = torch.randn(3, 17, 5, 5)
    got = torch.autograd.grad((ops.gated_conv_bn_relu(*ins, keep) * g).sum(), ins)
    want = torch.autograd.grad((gc.gated_conv_bn_relu_reference(*ins, keep) * g).sum(), ins)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_fake_shapes_and_errors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        args = _inputs(b=4, cin=3, cout=6, h=7, w=2)
        y = ops.gated_conv_bn_relu(*args)
        assert tuple(y.shape) == (4, 6, 7, 2) and y.dtype == torch.float32
    x, weight, bias, scale, shift, keep = _inputs()
    with pytest.raises(ValueError, match="keep"):
        ops.gated_conv_bn_relu(x, weight, bias, scale, shift, keep.float())
    with pytest.raises(ValueError, match="weight"):
        ops.gated_conv_bn_relu(x, torch.randn(17, 3, 5, 5), bias, scale, shift, keep)


def test_torch_compile_fullgraph(reference_backend):
    args = _inputs()
    fn = torch.compile(lambda *a: ops.gated_conv_bn_relu(*a) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(*args), 2 * gc.gated_conv_bn_relu_reference(*args))


def test_block_matches_dense_in_eval_and_train(reference_backend):
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.3), bn.running_var.uniform_(0.5, 1.5)
        bn.weight.normal_(1, 0.2), bn.bias.normal_(0, 0.2)
    block = gc.GatedConvBlock(conv, bn)
    assert list(dict(block.named_parameters())) == []  # no second registration
    x = torch.randn(4, 3, 5, 5)
    mask = (torch.randn(4, 6, 1, 1) > 0) * 1.0
    for mode in (False, True):
        block.train(mode), bn.train(mode)
        torch.testing.assert_close(block(x, mask), F.relu(bn(conv(x))) * mask)


@pytest.mark.slow
def test_kernel_compiles_for_sm90(compile_for_sm90):
    ints = {"Cin": "i32", "Cout": "i32", "H": "i32", "W": "i32", "perm_ptr": "*i64", "count_ptr": "*i64"}
    specs = [("_gated_conv_kernel", dict(KS=3, HAS_BIAS=True, PRECISION="ieee", BLOCK_P=64, BLOCK_C=32,
                                         BLOCK_K=32), ints),
             ("_gated_conv_kernel", dict(KS=1, HAS_BIAS=False, PRECISION=None, BLOCK_P=64, BLOCK_C=32,
                                         BLOCK_K=16),
              dict(ints, x_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16"))]
    compile_for_sm90("routec.codegen.gated_conv", specs)


# ------------------------------------------------------------------ the channel-gate pass on stdlib:ftwt

from routec.compiler import load  # noqa: E402
from routec.compiler.passes import channel_gate  # noqa: E402

SMALL = dict(cfg=[8, 0, 8, 16, 0, 16, 0], n_layers=7, img=8, classes=4)


def _ftwt_pair(monkeypatch, **kw):
    """(fused, dense): stdlib:ftwt with the pass and with ROUTEC_CHANNEL_GATE=0, holding the same state."""
    torch.manual_seed(0)
    fused = load("stdlib:ftwt", **SMALL, **kw)
    monkeypatch.setenv("ROUTEC_CHANNEL_GATE", "0")
    dense = load("stdlib:ftwt", **SMALL, **kw)
    monkeypatch.delenv("ROUTEC_CHANNEL_GATE")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in fused.state_dict().items():
            if name.endswith("running_mean"):
                t.copy_(0.2 * torch.randn(t.shape, generator=g))
            elif name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith(("bn.weight", "bn.bias", "predictor.bias")):
                t.copy_(torch.randn(t.shape, generator=g) * (1.0 if "predictor" in name else 0.3)
                        + (1.0 if name.endswith("bn.weight") else 0.0))
    dense.load_state_dict(fused.state_dict(), strict=True)  # the same names: the pass renamed nothing
    return fused, dense


def _blocks(net):
    return [n for n in net.graph_module.graph.nodes if n.op == "call_module"
            and isinstance(net.graph_module.get_submodule(str(n.target)), gc.GatedConvBlock)]


def test_pass_rewrites_the_gated_layers(reference_backend, monkeypatch):
    fused, dense = _ftwt_pair(monkeypatch)
    assert [str(n.target) for n in _blocks(fused)] == ["layers.2.channel_gate", "layers.3.channel_gate",
                                                       "layers.5.channel_gate"]
    assert _blocks(dense) == []
    convs = [str(n.target) for n in fused.graph_module.graph.nodes if str(n.target).endswith(".conv")]
    assert convs == ["layers.0.conv"]  # the first conv has no gate
    assert list(fused.state_dict()) == list(dense.state_dict())
    assert channel_gate.gate_module(fused) == 0  # nothing left to match


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_pass_eval_equals_dense(backend, monkeypatch):
    monkeypatch.setenv("ROUTEC_BACKEND", backend)
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("ROUTEC_POISON", "1")
    fused, dense = _ftwt_pair(monkeypatch, fuse=False)
    fused.eval(), dense.eval()
    launches = []
    kernel = gc.gated_conv_forward
    monkeypatch.setattr(gc, "gated_conv_forward", lambda *a, **k: launches.append(1) or kernel(*a, **k))
    img = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = fused(img), dense(img)
    assert len(launches) == (3 if backend == "triton" else 0)  # the three gated layers ran the kernel
    keep = a.mask_logits > 0
    assert 0.1 < keep.float().mean() < 0.9  # some filters on, some off
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.mask_logits, b.mask_logits, atol=1e-5, rtol=1e-5)


def test_pass_training_unchanged(reference_backend, monkeypatch):
    fused, dense = _ftwt_pair(monkeypatch)
    fused.train(), dense.train()
    img = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 3])
    grads = []
    for net in (fused, dense):
        out = net(img)
        loss = F.cross_entropy(out.logits, labels) + out.mask_logits.pow(2).mean()
        grads.append((loss.detach(), torch.autograd.grad(loss, list(net.parameters()))))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    for ga, gb in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)
    for (na, ta), (nb, tb) in zip(fused.state_dict().items(), dense.state_dict().items()):
        assert na == nb
        torch.testing.assert_close(ta, tb, rtol=0, atol=0)  # BN running statistics updated alike


def test_pass_off_switch_and_emitted_module(reference_backend, monkeypatch, tmp_path):
    import importlib.util

    from routec.compiler.emit import emit_module

    fused, _ = _ftwt_pair(monkeypatch)
    source = emit_module(fused, "stdlib:ftwt")
    assert "gated_conv.GatedConvBlock(self.layers[2].conv, self.layers[2].bn)" in source
    path = tmp_path / "ftwt_routec.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("emitted_ftwt_gate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rebuilt = getattr(module, fused.spec_name)()
    rebuilt.load_state_dict(fused.state_dict())
    fused.eval(), rebuilt.eval()
    img = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(img).logits, fused(img).logits, rtol=0, atol=0)


def test_pass_leaves_unproven_masks_alone(reference_backend):
    from routec.compiler import compile_source

    spec = """
model G(c: int = 4) {
    in x: [B, 3, 6, 6]
    in m: [B, c, 1, 1]
    conv = Conv2d(3, c, 3, padding=1)
    bn = BatchNorm2d(c)
    out y = (x -> conv -> bn -> relu) * m
}
"""
    net = compile_source(spec)
    assert _blocks(net) == []  # m is not provably 0/1: the dense ops stay
