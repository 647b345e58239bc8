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
