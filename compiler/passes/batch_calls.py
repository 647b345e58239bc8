"""Batching calls of one shared module: independent calls of the same module instance become one call on the
inputs stacked along the batch.

A spec that runs ONE layer instance on several views of the same data — RSMamba's mixer on the forward,
reversed and shuffled token orders (`stdlib/rsmamba.route`, `examples/selective.route`) — elaborates to
several `call_module` nodes with the same target, each launching every kernel of the layer on B samples.
When the layer is per-sample (its output row i depends only on input row i), the calls can run as one:

    y1 = mixer(a); y2 = mixer(b); y3 = mixer(c)          # 3 launches per kernel, B rows each
    →  y = mixer(cat([a, b, c], 0)); y1, y2, y3 = split(y, [a.shape[0], b.shape[0], c.shape[0]])

which is what the official RSMamba code does by hand (one launch per kernel on 3B rows).

Needs: a linted fx graph as `compiler.build.finish` leaves it, with the elaborator's symbolic shapes in
`node.meta[ROUTE_SHAPE]` (`compiler.meta`; concrete shapes from `meta["val"]`, `meta["example_value"]` or
`meta["tensor_meta"]` are used when a node has no symbolic one).
Guarantees: a group of calls is merged only when
  * they call the same module object, with positional `fx.Node` arguments only (no kwargs), as many in each;
  * no call reaches another through its inputs (checked on the graph as it is when the group is merged);
  * argument k of every call has a known shape, all of one rank, equal except in dim 0, no "?" among the
    rest; within a call all arguments have the same dim 0 (the batch);
  * the module is per-sample at that rank (`per_sample`): a whitelisted layer class (`LEAVES`), or a
    whitelisted composite (`BLOCKS`) whose submodules are all per-sample; nothing random or
    mode-dependent — BatchNorm (batch statistics in training), Dropout with p > 0 and attention dropout are
    refused, so the merged graph is exact in training and eval alike;
  * a module returning a tuple (`LSTMCell`) is only merged when every user takes an element by int index;
  * no user of a call that must move after the merged call may draw random numbers (`_moves_random`).
The merged call is placed right after the last of the group's inputs; the graph is then re-sorted
topologically keeping the original order wherever it is valid: only users of the calls that came before
that point move, none of them random, so random ops keep their order and the same seed draws the same
shuffles. Its outputs are `torch.split` along dim 0 with each call's batch
read at run time (`runtime.batch_dim`), so calls of different batch sizes merge too. When argument k of
the group is exactly the pieces of an earlier merge, in order, the earlier merged tensor is used without a
`cat` (a block called twice merges layer after layer without re-stacking).
The module computes the same values as before, up to the rounding of GEMMs on a larger batch.

`batch_module(net)` runs it on a `RoutedModule` in place (`compile_source` does, for every compile);
`batch_graph(gm)` on a GraphModule; `find_groups(gm)` lists what would be merged.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from ...codegen import layers as L
from ...codegen.mamba import MambaMixer
from ...codegen.runtime import batch_dim
from ..meta import ROUTE_SHAPE, ROUTE_SPAN, ROUTE_STMT
from .fusion import _topological_order

SPLIT_META = "routec_batch_split"  # meta key on the split nodes this pass makes: the number of pieces

Shape = tuple

# Layers whose output row i depends only on input row i, by exact class (a subclass may override forward),
# with the smallest input rank at which dim 0 is the batch (below it an unbatched input's dim 0 is
# something else: features of a Linear, channels of a Conv1d, tokens of an attention).
LEAVES: dict[type, int] = {
    nn.Linear: 2, nn.Bilinear: 2, nn.Identity: 1, nn.Embedding: 1,
    nn.GELU: 1, nn.SiLU: 1, nn.ReLU: 1, nn.Tanh: 1, nn.Sigmoid: 1, nn.Softplus: 1, nn.Mish: 1,
    nn.LeakyReLU: 1, nn.ELU: 1, nn.Hardswish: 1, nn.Hardsigmoid: 1,
    nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5, L.Conv1d: 3, L.CausalConv1d: 3,
    nn.GroupNorm: 2, nn.MaxPool2d: 4, nn.AvgPool2d: 4, nn.AdaptiveAvgPool2d: 4,
    nn.GRUCell: 2, nn.LSTMCell: 2, L.LSTMCell: 2,
    nn.Dropout: 1,  # only with p == 0 (`_attributes_ok`)
}
# Composites whose forward applies its submodules row by row (plus per-row tensor ops): per-sample when
# every submodule is (`BLOCKS` or `LEAVES`, any rank: the composite shapes what they see), at this rank.
BLOCKS: dict[type, int] = {
    MambaMixer: 3, L.MLP: 2, L.SelfAttention: 3, L.CrossAttention: 3, L.TransformerBlock: 3,
    L.PatchEmbed: 4, L.PosEmbed: 3,
}
# Never merged, with the reason (for messages and docs): they mix rows or draw random numbers.
REFUSED: dict[type, str] = {
    nn.BatchNorm1d: "batch statistics in training", nn.BatchNorm2d: "batch statistics in training",
    nn.BatchNorm3d: "batch statistics in training",
}
# Classes returning a tuple of per-row outputs: how many.
TUPLE_OUTPUTS: dict[type, int] = {nn.LSTMCell: 2, L.LSTMCell: 2}


def _norm_rank(m: nn.Module) -> Optional[int]:
    if type(m) in (nn.LayerNorm, nn.RMSNorm):
        shape = m.normalized_shape
        return (len(shape) if isinstance(shape, (tuple, list)) else 1) + 1
    return None


def _attributes_ok(m: nn.Module) -> bool:
    """Per-instance conditions: no dropout that would draw random numbers (in training)."""
    if type(m) is nn.Dropout:
        return m.p == 0
    if type(m) is L.SelfAttention:
        return not m.dropout
    return True


def per_sample(module: nn.Module, rank: Optional[int] = None) -> bool:
    """Whether `module(x)` has output row i depending only on input row i (dim 0), for inputs of `rank`
    (None: any rank its parent gives it — used for the submodules of a composite)."""
    kind = type(module)
    if kind in REFUSED or not _attributes_ok(module):
        return False
    low = _norm_rank(module)
    if low is None:
        low = LEAVES.get(kind)
    if low is not None:
        return rank is None or rank >= low
    low = BLOCKS.get(kind)
    if low is None or (rank is not None and rank < low):
        return False
    return all(per_sample(child) for child in module.children())


def node_shape(node: Any) -> Optional[Shape]:
    """The shape recorded for `node`: the elaborator's symbolic one, else a traced example's."""
    if not isinstance(node, fx.Node):
        return None
    shape = node.meta.get(ROUTE_SHAPE)
    if isinstance(shape, tuple):
        return shape
    for key in ("val", "example_value"):
        value = node.meta.get(key)
        if isinstance(value, torch.Tensor):
            return tuple(int(s) if isinstance(s, int) else str(s) for s in value.shape)
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return tuple(int(s) for s in meta.shape)
    return None


def _known(dim: Any) -> bool:
    return isinstance(dim, int) or (isinstance(dim, str) and dim != "?")


def _signature(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple]:
    """What calls must share to merge: (the arguments' shapes without dim 0), or None if `node` cannot."""
    if node.op != "call_module" or node.kwargs or not node.args:
        return None
    if not all(isinstance(a, fx.Node) for a in node.args):
        return None
    shapes = [node_shape(a) for a in node.args]
    if any(s is None or len(s) == 0 for s in shapes):
        return None
    rest = tuple(tuple(s[1:]) for s in shapes if s is not None)
    batches = {s[0] for s in shapes if s is not None}
    if len(batches) != 1 or not all(_known(d) for d in batches) or not all(_known(d) for r in rest for d in r):
        return None
    assert isinstance(node.target, str)
    module = gm.get_submodule(node.target)
    if not all(per_sample(module, len(s)) for s in shapes if s is not None):
        return None
    outputs = TUPLE_OUTPUTS.get(type(module))
    if outputs is not None and not all(
            u.op == "call_function" and u.target is operator.getitem and len(u.args) == 2
            and isinstance(u.args[1], int) and 0 <= u.args[1] < outputs for u in node.users):
        return None
    return rest


def _upstream_calls(graph: fx.Graph, calls: list[fx.Node]) -> dict[fx.Node, int]:
    """For each of `calls`, a bit set (bit i: `calls[i]`) of the calls among them it reaches through its
    inputs — one pass over the graph in topological order."""
    bit = {c: 1 << i for i, c in enumerate(calls)}
    above: dict[fx.Node, int] = {}
    for node in graph.nodes:
        mask = 0
        for inp in node.all_input_nodes:
            mask |= above.get(inp, 0) | bit.get(inp, 0)
        if mask:
            above[node] = mask
    return {c: above.get(c, 0) for c in calls}


def _groups_of(calls: list[tuple[fx.Node, tuple]], above: dict[fx.Node, int],
               bit: dict[fx.Node, int]) -> list[list[fx.Node]]:
    """Greedy partition of one module's calls (graph order, with their signatures) into mutually independent
    groups of one signature; only groups of two calls or more. Members come earlier in graph order than a
    joining call, so they cannot reach it; the call must not reach them."""
    groups: list[tuple[tuple, int, list[fx.Node]]] = []
    for call, sig in calls:
        for k, (key, mask, members) in enumerate(groups):
            if key == sig and not above[call] & mask:
                members.append(call)
                groups[k] = (key, mask | bit[call], members)
                break
        else:
            groups.append((sig, bit[call], [call]))
    return [members for _, _, members in groups if len(members) > 1]


def find_groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """The groups `batch_graph` would merge first (each: calls of one module object, in graph order)."""
    by: dict[int, list[tuple[fx.Node, tuple]]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            sig = _signature(gm, node)
            if sig is not None:
                assert isinstance(node.target, str)
                by.setdefault(id(gm.get_submodule(node.target)), []).append((node, sig))
    shared = [calls for calls in by.values() if len(calls) > 1]
    candidates = [c for calls in shared for c, _ in calls]
    above = _upstream_calls(gm.graph, candidates)
    bit = {c: 1 << i for i, c in enumerate(candidates)}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return [g for calls in shared for g in _groups_of(calls, above, bit) if not _moves_random(gm, g, order)]


# Words in the names of functions that draw random numbers (token_shuffle, randperm, dropout, gumbel, …).
RANDOM_WORDS = ("rand", "shuffle", "dropout", "bernoulli", "multinomial", "normal", "gumbel", "noise", "sample",
                "uniform", "poisson", "param_init")


def _draws_nothing(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Conservatively: `node` draws no random numbers (a per-sample layer, or a function or method whose
    name says nothing random); other modules (gates, path combines, scan loops, …) may."""
    if node.op == "call_module":
        assert isinstance(node.target, str)
        return per_sample(gm.get_submodule(node.target))
    if node.op in ("call_function", "call_method"):
        name = str(getattr(node.target, "__name__", node.target)).lower()
        return not any(word in name for word in RANDOM_WORDS)
    return True


def _moves_random(gm: fx.GraphModule, group: list[fx.Node], order: dict[fx.Node, int]) -> bool:
    """Whether merging `group` would move a random op past others: the merged call goes after the group's
    latest input, so the users of a call that come before that point move after it; if one of them may draw
    random numbers, the draws would come in another order (same seed, different numbers)."""
    anchor = max(order[a] for call in group for a in call.all_input_nodes)
    stack = [c for c in group if order[c] < anchor]
    moved: set[fx.Node] = set()
    while stack:
        for user in stack.pop().users:
            if order[user] < anchor and user not in moved:
                moved.add(user)
                stack.append(user)
    return not all(_draws_nothing(gm, n) for n in moved)


def _stacked(graph: fx.Graph, parts: list[fx.Node]) -> Optional[fx.Node]:
    """The tensor `parts` were split from, when they are exactly all pieces of one earlier split, in order."""
    first = parts[0]
    if not (first.op == "call_function" and first.target is operator.getitem):
        return None
    split = first.args[0]
    if not isinstance(split, fx.Node) or split.meta.get(SPLIT_META) != len(parts):
        return None
    for i, p in enumerate(parts):
        if not (p.op == "call_function" and p.target is operator.getitem and p.args == (split, i)):
            return None
    source = split.args[0]
    return source if isinstance(source, fx.Node) else None


def _merge(gm: fx.GraphModule, group: list[fx.Node]) -> list[fx.Node]:
    """Replace `group` by one call; returns the nodes made (some may end up unused, see `batch_graph`)."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    first = group[0]
    assert isinstance(first.target, str)
    module = gm.get_submodule(first.target)
    inputs = {a for call in group for a in call.all_input_nodes}
    anchor = max(inputs, key=order.__getitem__)
    keep = {k: v for k, v in first.meta.items() if k in (ROUTE_SPAN, ROUTE_STMT, "stack_trace")}

    made: list[fx.Node] = []

    def make(op: str, target: Any, args: tuple, kwargs: Optional[dict] = None) -> fx.Node:
        """A new node after the last one made (the first right after `anchor`)."""
        with graph.inserting_after(made[-1] if made else anchor):
            node = graph.create_node(op, target, args, kwargs or {})
        node.meta.update(keep)
        made.append(node)
        return node

    args = []
    for k in range(len(first.args)):
        parts = [call.args[k] for call in group]
        assert all(isinstance(p, fx.Node) for p in parts)
        whole = _stacked(graph, parts)  # type: ignore[arg-type]
        if whole is None:
            whole = make("call_function", torch.cat, (parts,), {"dim": 0})
        args.append(whole)
    merged = make("call_module", first.target, tuple(args))
    sizes = [make("call_function", batch_dim, (call.args[0], 0)) for call in group]
    outputs = TUPLE_OUTPUTS.get(type(module))
    wholes = [merged] if outputs is None else [
        make("call_function", operator.getitem, (merged, j)) for j in range(outputs)]
    for j, whole in enumerate(wholes):
        split = make("call_function", torch.split, (whole, sizes), {"dim": 0})
        split.meta[SPLIT_META] = len(group)
        for i, call in enumerate(group):
            piece = make("call_function", operator.getitem, (split, i))
            if outputs is None:
                piece.meta.update(call.meta)
                call.replace_all_uses_with(piece)
                continue
            for user in [u for u in call.users if u.args[1] == j]:
                piece.meta.update(user.meta)
                user.replace_all_uses_with(piece)
                graph.erase_node(user)
    for call in group:
        graph.erase_node(call)
    _topological_order(graph)
    return made


MERGED = "routec_batch_calls"  # GraphModule.meta key: (module path, calls) of every merged group, in merge order


def batch_graph(gm: fx.GraphModule) -> int:
    """Merge every mergeable group of `gm`, in place; returns how many calls were removed."""
    removed = 0
    made: list[fx.Node] = []
    while True:
        groups = find_groups(gm)
        if not groups:
            break
        made += _merge(gm, groups[0])  # one at a time: a merge adds dependencies the next check must see
        removed += len(groups[0]) - 1
        gm.meta[MERGED] = gm.meta.get(MERGED, []) + [(str(groups[0][0].target), len(groups[0]))]
    for node in reversed(made):  # splits whose pieces a later merge took whole, and their sizes
        if not node.users and node.op == "call_function":
            gm.graph.erase_node(node)
    if removed:
        gm.graph.lint()
        gm.recompile()
    return removed


def batch_module(net: Any) -> int:
    """Run the pass on a `RoutedModule` (its `graph_module`), in place."""
    return batch_graph(net.graph_module)


def count_calls(gm: fx.GraphModule, target: str) -> int:
    """How many `call_module` nodes of `gm` call `target` (the pass's before/after measure)."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target)
