"""Merging multi-route scans: independent `multi_route_selective_scan` (or `multi_route_linear_scan`) calls of
equal sizes become ONE launch that scans every route and returns every route's output.

MHS-VM (`stdlib/mhs_vm.route`) scans each head's input along 4 routes, each with its own S6 parameters,
and the compiler lowers each `scan … order route_table(…)` to its own single-route call (R = 1). The
routes are independent, so they can run as one launch with the route as a grid axis (`combine="none"`):

    y1 = multi_route_selective_scan(u, dt1, A1, B1, C1, D1, None, None, routes=unsqueeze(p1, 0))
    …
    y4 = multi_route_selective_scan(u, dt4, A4, B4, C4, D4, None, None, routes=unsqueeze(p4, 0))
    →  ys = multi_route_selective_scan(u, stack([dt1, …, dt4]), stack([A1, …, A4]), stack([B1, …]),
                                       stack([C1, …]), stack([D1, …, D4]), None, None,
                                       cat([unsqueeze(p1, 0), …], 0), combine="none")     # [4, Bt, L, D]
       y1, …, y4 = ys[0], …, ys[3]

Inputs the calls share (the very same node, e.g. the head input u) stay shared; the others are stacked
per route ([R, Bt, L, D], [R, D, N], …; D and delta_bias as [R, D], which the op takes). Calls with
`combine="none"` (R routes each, a result [R, Bt, L, D]) merge too, and give back their slice.

Needs: a linted fx graph as `compiler.build.finish` leaves it, with the elaborator's symbolic shapes in
`node.meta[ROUTE_SHAPE]` (or traced ones, read by `batch_calls.node_shape`) on every tensor input.
Guarantees: a group of calls is merged only when
  * they call one of the two ops (the public function or `torch.ops.routec.…`) with `weights=None`;
    a `combine="sum"` call has one route (its routes node is `unsqueeze(x, 0)`, `x[None]`, or has a
    known shape [1, L]): a sum over several routes would change the summation order if split apart;
  * every tensor input has a known shape and the call's sizes Bt, L, D (and N) are known and agree
    across its inputs; the calls share Bt, L, D, N, the optional-argument pattern (which of D, z,
    delta_bias are given), `delta_softplus`, and the dtypes where traced shapes record them (the
    elaborator's shapes carry none: all floating tensors of a compiled spec have the model's dtype);
  * no call reaches another through its inputs, checked on the graph as it is when the group is merged
    (groups are merged one at a time, so a merge's new dependencies are seen by the next check).
The merged call sits right after the latest of the group's inputs; the graph is then re-sorted
topologically keeping the original order wherever it is valid. Each route computes exactly what its own
call computed (the same arithmetic on the same values: a single-route `combine="sum"` result is the
route's output), so the pass is exact on the reference path and in the kernels; only gradients of
shared inputs are summed in another order.

`merge_routes(net)` runs it on a `RoutedModule` in place (`compile_source` does, for every compile);
`merge_graph(gm)` on a GraphModule; `find_groups(gm)` lists what would be merged first.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from ...codegen import multiscan as ms
from ...codegen.functions import expand_steps
from ..meta import ROUTE_SHAPE, ROUTE_SPAN, ROUTE_STMT
from .batch_calls import node_shape
from .fusion import _topological_order

MERGED = "routec_multiroute"  # GraphModule.meta key: (calls, routes) of every merged launch, in merge order


@dataclass(frozen=True)
class OpSpec:
    """One multi-route op: the public function merged calls use, its tensor inputs with the rank of their
    shared form (one more when per route), and the flags every call of a group must share."""

    name: str
    fn: Callable[..., Any]
    inputs: tuple[tuple[str, int], ...]
    flags: tuple[str, ...]


SELECTIVE = OpSpec("selective", ms.multi_route_selective_scan,
                   (("u", 3), ("delta", 3), ("A", 2), ("B", 3), ("C", 3), ("D", 1), ("z", 3), ("delta_bias", 1)),
                   ("delta_softplus",))
LINEAR = OpSpec("linear", ms.multi_route_linear_scan, (("a", 3), ("b", 3)), ())


def _targets() -> dict[Any, OpSpec]:
    table: dict[Any, OpSpec] = {}
    for spec in (SELECTIVE, LINEAR):
        packet = getattr(torch.ops.routec, f"multi_route_{spec.name}_scan")
        table.update({spec.fn: spec, packet: spec, packet.default: spec})
    return table


TARGETS = _targets()


@dataclass
class Call:
    """A mergeable call: its node, op, tensor inputs by name, routes node and count R, whether it returns
    every route (`combine="none"`), which inputs are per route, and what a group must share (`key`)."""

    node: fx.Node
    spec: OpSpec
    tensors: dict[str, Optional[fx.Node]]
    routes: fx.Node
    count: int
    split: bool
    per_route: dict[str, bool]
    flags: dict[str, Any]
    sizes: tuple  # (Bt, L, D), and N for the selective scan
    key: tuple


def _known(dim: Any) -> bool:
    return isinstance(dim, int) or (isinstance(dim, str) and dim != "?")


def _route_count(routes: fx.Node) -> Optional[int]:
    """R of a routes node [R, L]: from its shape, or 1 for `unsqueeze(x, 0)` / `x[None]` (the op takes
    [R, L] only, so x is one route [L])."""
    shape = node_shape(routes)
    if shape is not None and len(shape) == 2 and isinstance(shape[0], int):
        return shape[0]
    if routes.op == "call_function" and routes.target is torch.unsqueeze and routes.args[1:] == (0,):
        return 1
    if routes.op == "call_method" and routes.target == "unsqueeze" and routes.args[1:] == (0,):
        return 1
    if routes.op == "call_function" and routes.target is operator.getitem and routes.args[1] in (None, (None,)):
        return 1
    return None


def _source(node: fx.Node) -> fx.Node:
    """`node`, or the tensor it only re-views: the scan lowering wraps every coefficient in
    `expand_steps(x, sizes)`, which is x itself when x already has the recorded shape of the result."""
    while node.op == "call_function" and node.target is expand_steps and isinstance(node.args[0], fx.Node):
        inner = node.args[0]
        shape = node_shape(node)
        if shape is None or node_shape(inner) != shape:
            break
        node = inner
    return node


def _dtype(node: fx.Node) -> Optional[torch.dtype]:
    for key in ("val", "example_value"):
        value = node.meta.get(key)
        if isinstance(value, torch.Tensor):
            return value.dtype
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "dtype", None)


def call_of(node: fx.Node) -> Optional[Call]:
    """The node as a mergeable `Call`, or None (see the module docstring for the conditions)."""
    if node.op != "call_function":
        return None
    spec = TARGETS.get(node.target)
    if spec is None or not callable(node.target):
        return None
    bound = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if bound is None:
        return None
    kw = bound.kwargs
    split = kw["split"] if "split" in kw else kw.get("combine") == "none"
    routes = kw["routes"]
    if kw["weights"] is not None or not isinstance(routes, fx.Node) or not isinstance(split, bool):
        return None
    if not split and kw.get("combine", "sum") != "sum":
        return None
    count = _route_count(routes)
    if count is None or (not split and count != 1):
        return None
    tensors: dict[str, Optional[fx.Node]] = {}
    shapes: dict[str, tuple] = {}
    per_route: dict[str, bool] = {}
    for name, rank in spec.inputs:
        x = kw[name]
        if x is None:
            tensors[name] = None
            continue
        if isinstance(x, fx.Node):
            x = _source(x)
        shape = node_shape(x) if isinstance(x, fx.Node) else None
        if shape is None or len(shape) not in (rank, rank + 1) or not all(_known(d) for d in shape):
            return None
        if len(shape) == rank + 1 and shape[0] != count:
            return None
        tensors[name], shapes[name], per_route[name] = x, shape[-rank:], len(shape) == rank + 1
    first = spec.inputs[0][0]
    if first not in shapes:
        return None
    sizes: tuple = tuple(shapes[first])  # (Bt, L, D)
    if spec is SELECTIVE:
        if "A" not in shapes:
            return None
        bt, length, d = sizes
        n = shapes["A"][-1]
        want = {"u": (bt, length, d), "delta": (bt, length, d), "z": (bt, length, d), "A": (d, n),
                "B": (bt, length, n), "C": (bt, length, n), "D": (d,), "delta_bias": (d,)}
        sizes = (bt, length, d, n)
    else:
        want = {"a": sizes, "b": sizes}
    if any(tuple(shapes[k]) != want[k] for k in shapes):
        return None
    flags = {f: kw[f] for f in spec.flags}
    pattern = tuple(tensors[name] is not None for name, _ in spec.inputs)
    dtypes = tuple(None if x is None else _dtype(x) for x in tensors.values())
    key = (spec.name, sizes, pattern, tuple(flags.values()), dtypes)
    return Call(node, spec, tensors, routes, count, split, per_route, flags, sizes, key)


def _ancestors(graph: fx.Graph, calls: list[Call]) -> dict[fx.Node, int]:
    """For each call's node, a bit set of the calls upstream of it (bit i: calls[i])."""
    bit = {c.node: 1 << i for i, c in enumerate(calls)}
    reach: dict[fx.Node, int] = {}
    for n in graph.nodes:
        mask = 0
        for inp in n.all_input_nodes:
            mask |= reach.get(inp, 0) | bit.get(inp, 0)
        reach[n] = mask
    return {c.node: reach[c.node] for c in calls}


def find_groups(gm: fx.GraphModule) -> list[list[Call]]:
    """Greedy partition of the graph's mergeable calls (graph order) into mutually independent groups of
    one key; only groups of two calls or more."""
    calls = [c for c in (call_of(n) for n in gm.graph.nodes) if c is not None]
    upstream = _ancestors(gm.graph, calls)
    bits = {c.node: 1 << i for i, c in enumerate(calls)}
    groups: list[tuple[Call, int, list[Call]]] = []  # (first call, members' bits, members)
    for c in calls:
        for i, (head, mask, members) in enumerate(groups):
            if head.key == c.key and not upstream[c.node] & mask:  # members come earlier: none is downstream
                members.append(c)
                groups[i] = (head, mask | bits[c.node], members)
                break
        else:
            groups.append((c, bits[c.node], [c]))
    return [members for _, _, members in groups if len(members) > 1]


def _merge(gm: fx.GraphModule, group: list[Call]) -> None:
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    spec = group[0].spec
    inputs = {a for c in group for a in c.node.all_input_nodes}
    anchor = max(inputs, key=order.__getitem__)
    keep = {k: v for k, v in group[0].node.meta.items() if k in (ROUTE_SPAN, ROUTE_STMT, "stack_trace")}
    total = sum(c.count for c in group)
    sizes = group[0].sizes
    made: list[fx.Node] = []

    def make(target: Any, args: tuple, kwargs: Optional[dict] = None, shape: Optional[tuple] = None,
             op: str = "call_function") -> fx.Node:
        with graph.inserting_after(made[-1] if made else anchor):
            node = graph.create_node(op, target, args, kwargs or {})
        node.meta.update(keep)
        if shape is not None:
            node.meta[ROUTE_SHAPE] = shape
        made.append(node)
        return node

    def base_shape(name: str) -> tuple:
        bt, length, d = sizes[:3]
        n = sizes[3] if len(sizes) > 3 else None
        return {"A": (d, n), "B": (bt, length, n), "C": (bt, length, n), "D": (d,), "delta_bias": (d,)}.get(
            name, (bt, length, d))

    args: dict[str, Optional[fx.Node]] = {}
    for name, rank in spec.inputs:
        parts = [c.tensors[name] for c in group]
        first = parts[0]
        if first is None:
            args[name] = None
            continue
        shape = (total, *base_shape(name))
        if all(p is first for p in parts) and not any(c.per_route[name] for c in group):
            args[name] = first  # shared by every route
        elif all(c.count == 1 and not c.per_route[name] for c in group):
            args[name] = make(torch.stack, (parts,), {"dim": 0}, shape)
        else:
            pieces = []
            for c, p in zip(group, parts):
                if not c.per_route[name]:  # shared by the call's routes: one copy per route
                    p = make(torch.unsqueeze, (p, 0))
                    if c.count > 1:
                        p = make("expand", (p, c.count, *([-1] * rank)), op="call_method")
                pieces.append(p)
            args[name] = make(torch.cat, (pieces,), {"dim": 0}, shape)
    routes = make(torch.cat, ([c.routes for c in group],), {"dim": 0}, (total, sizes[1]))
    positional = tuple(args[name] for name, _ in spec.inputs) + (routes,)
    merged = make(spec.fn, positional, {**group[0].flags, "combine": "none"}, (total, *sizes[:3]))
    offset = 0
    for c in group:
        index = slice(offset, offset + c.count) if c.split else offset
        piece = make(operator.getitem, (merged, index))
        piece.meta.update(c.node.meta)
        c.node.replace_all_uses_with(piece)
        offset += c.count
    views = [a for c in group for a in c.node.all_input_nodes if a.target is expand_steps]
    for c in group:
        graph.erase_node(c.node)
    for view in dict.fromkeys(views):  # the wrappers `_source` looked through, now unused
        if not view.users:
            graph.erase_node(view)
    gm.meta[MERGED] = gm.meta.get(MERGED, []) + [(len(group), total)]
    _topological_order(graph)


def merge_graph(gm: fx.GraphModule) -> int:
    """Merge every mergeable group of `gm`, in place; returns how many calls were removed."""
    removed = 0
    while True:
        groups = find_groups(gm)
        if not groups:
            break
        _merge(gm, groups[0])  # one at a time: a merge adds dependencies the next check must see
        removed += len(groups[0]) - 1
    if removed:
        gm.graph.lint()
        gm.recompile()
    return removed


def merge_routes(net: Any) -> int:
    """Run the pass on a `RoutedModule` (its `graph_module`), in place."""
    return merge_graph(net.graph_module)


def count_calls(graph: fx.Graph) -> int:
    """How many multi-route scan calls `graph` makes (each is one launch; the pass's before/after measure)."""
    return sum(1 for n in graph.nodes if n.op == "call_function" and n.target in TARGETS)
