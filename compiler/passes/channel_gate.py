"""Per-sample channel gates skip the gated-off filters in eval (FTWT, `stdlib/ftwt.route`).

A gated conv layer elaborates to

    y = relu(bn(conv(x)));  out = y * mask          mask: [B, C, 1, 1], 0/1 (`(cmp) * 1.0` or a bool cast)

which computes every filter and then multiplies the off ones by 0. This pass replaces the four nodes with one
call of a `GatedConvBlock` (codegen/gated_conv.py) taking (x, mask): in training (or while the BN is in training
mode) it runs the same dense ops, so BN's batch statistics, the loss and the gradients are unchanged; in eval it
calls `gated_conv_bn_relu` with keep = mask ≠ 0, whose kernel compacts each sample's kept channels and computes
only those (BN folded into a per-channel affine map; the result equals the dense one to fp32 rounding).

Matched only when
  * the conv is an `nn.Conv2d` with a 3×3 or 1×1 kernel, stride 1, 'same' zero padding (1 or 0), dilation 1,
    groups 1; the BN an `nn.BatchNorm2d` with C = the conv's out_channels; relu is `F.relu` / `torch.relu`;
  * conv, BN and relu each have exactly one user (the next of the chain, then the `mul`);
  * the other factor of the `mul` is provably 0/1: `cmp * 1.0` / `1.0 * cmp` or `cmp.float()` / `.to(dtype)`
    of a comparison (`>`, `<`, `>=`, `<=`, `==`, `!=`), with a known shape [B, C, 1, 1] (or [1, C, 1, 1]).
The block holds references to the graph's conv and BN (not submodules), so parameter and buffer names do not
change. `ROUTEC_CHANNEL_GATE=0` turns the pass off. `gate_module(net)` runs it on a `RoutedModule` in place
(`compile_source` does); `gate_graph(gm)` on a GraphModule. Both return how many layers were rewritten.
"""

from __future__ import annotations

import operator
import os
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ...codegen.ctor import construct
from ...codegen.gated_conv import GatedConvBlock
from .batch_calls import node_shape

_COMPARISONS = {operator.gt, operator.lt, operator.ge, operator.le, operator.eq, operator.ne,
                torch.gt, torch.lt, torch.ge, torch.le, torch.eq, torch.ne}
_MULS = {operator.mul, torch.mul}
_RELUS = {F.relu, torch.relu}


def enabled() -> bool:
    return os.environ.get("ROUTEC_CHANNEL_GATE", "1").strip() != "0"


def _module(gm: fx.GraphModule, node: Any, cls: type) -> Optional[nn.Module]:
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return None
    mod = gm.get_submodule(str(node.target))
    return mod if type(mod) is cls else None


def _is_comparison(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in _COMPARISONS


def _zero_one(node: Any) -> bool:
    """`node` is provably a 0/1 float tensor: a comparison times 1.0, or a comparison cast to a float dtype."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target in _MULS and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        return (_is_comparison(a) and isinstance(b, (int, float)) and float(b) == 1.0) or \
            (_is_comparison(b) and isinstance(a, (int, float)) and float(a) == 1.0)
    if node.op == "call_method" and node.target in ("float", "to") and _is_comparison(node.args[0]):
        if node.target == "float":
            return len(node.args) == 1 and not node.kwargs
        dtype = node.args[1] if len(node.args) == 2 else node.kwargs.get("dtype")
        return isinstance(dtype, torch.dtype) and dtype.is_floating_point
    return False


def _single_user(node: fx.Node, user: fx.Node) -> bool:
    return list(node.users) == [user]


def _conv_ok(conv: nn.Module) -> bool:
    assert isinstance(conv, nn.Conv2d)
    ks = tuple(conv.kernel_size)
    if ks not in ((3, 3), (1, 1)):
        return False
    pad = ks[0] // 2
    padding_ok = conv.padding == "same" or tuple(conv.padding) == (pad, pad)
    return (padding_ok and tuple(conv.stride) == (1, 1) and tuple(conv.dilation) == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def _match(gm: fx.GraphModule, mul: fx.Node) -> Optional[tuple]:
    """(x, mask, conv node, bn node, relu node, conv, bn) when `mul` is a gated conv layer, else None."""
    if mul.op != "call_function" or mul.target not in _MULS or len(mul.args) != 2 or mul.kwargs:
        return None
    pairs: list[tuple[Any, Any]] = [(mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])]
    for relu, mask in pairs:
        if not (isinstance(relu, fx.Node) and relu.op == "call_function" and relu.target in _RELUS
                and len(relu.args) == 1 and not relu.kwargs and _single_user(relu, mul)):
            continue
        if relu is mask or not _zero_one(mask):
            continue
        bn_node: Any = relu.args[0]
        bn = _module(gm, bn_node, nn.BatchNorm2d)
        if bn is None or not _single_user(bn_node, relu) or len(bn_node.args) != 1 or bn_node.kwargs:
            continue
        conv_node: Any = bn_node.args[0]
        conv = _module(gm, conv_node, nn.Conv2d)
        if conv is None or not _single_user(conv_node, bn_node) or len(conv_node.args) != 1 or conv_node.kwargs:
            continue
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        if not _conv_ok(conv) or bn.num_features != conv.out_channels:
            continue
        shape = node_shape(mask)
        if shape is None or len(shape) != 4 or tuple(shape[1:]) != (conv.out_channels, 1, 1):
            continue
        x_shape = node_shape(conv_node.args[0])
        if x_shape is None or len(x_shape) != 4 or (shape[0] != 1 and shape[0] != x_shape[0]):
            continue
        return conv_node.args[0], mask, conv_node, bn_node, relu, conv, bn
    return None


def gate_graph(gm: fx.GraphModule) -> int:
    """Rewrite every gated conv layer of `gm` in place; returns how many."""
    if not enabled():
        return 0
    done = 0
    for mul in list(gm.graph.nodes):
        found = _match(gm, mul)
        if found is None:
            continue
        x, mask, conv_node, bn_node, relu, conv, bn = found
        owner, _, _ = str(conv_node.target).rpartition(".")
        name, i = "channel_gate", 0
        while hasattr(gm.get_submodule(owner) if owner else gm, name):
            i += 1
            name = f"channel_gate_{i}"
        target = f"{owner}.{name}" if owner else name
        gm.add_submodule(target, construct(GatedConvBlock, conv, bn))
        with gm.graph.inserting_before(mul):
            block = gm.graph.call_module(target, (x, mask))
        block.meta = dict(mul.meta)
        mul.replace_all_uses_with(block)
        for node in (mul, relu, bn_node, conv_node):
            gm.graph.erase_node(node)
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def gate_module(net: Any) -> int:
    """Run the pass on a `RoutedModule` (its `graph_module`), in place."""
    return gate_graph(net.graph_module)
