"""The elementwise fusion pass: maximal regions of pointwise fx nodes become one generated Triton kernel.

Needs: a linted fx graph as `compiler.build.finish` leaves it (`RoutedModule.graph_module`).
Guarantees: every region of at least `min_ops` connected elementwise nodes (the `kernelgen.RULES` targets
and `x ** c` for the exponents in `kernelgen.POWERS`, with tensor or numeric operands and no kwargs; and
`leaky_relu` / `clamp` calls whose keywords are numbers, `kernelgen.keyword_rule`) is
replaced by one call to its generated custom op `routec_fused::r_<hash>` (plus a `getitem` per output when
the region has several); the graph stays acyclic and topologically ordered and passes `graph.lint()`; the
module computes the same values (the op falls back to the region's PyTorch reference for inputs its kernel
does not take). Regions grow along producer → consumer edges only, and a node joins a region only when no
path leaves the region and comes back (which would make the fused call depend on itself).

`fuse_module(net)` runs it on a `RoutedModule` in place; `should_fuse(None)` is the automatic choice.
"""

from __future__ import annotations

import heapq
import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.fx as fx

from ...codegen import backend
from ..meta import ROUTE_SPAN, ROUTE_STMT
from .kernelgen import POWERS, RULES, Operand, Region, Rule, Step, keyword_rule, load, op_of

FUSED_KERNELS = "routec_fused_kernels"  # GraphModule.meta key: the generated files, in graph order
MIN_OPS = 2  # a lone elementwise op is one launch already
MAX_INPUTS = 32  # bounds a kernel's parameter list (the backward takes 3 pointers and 18 sizes per input)


def should_fuse(fuse: Optional[bool]) -> bool:
    """`fuse=None` means: fuse when kernels will run as Triton — ROUTEC_BACKEND=triton, or a CUDA device is
    present and the backend is not forced to `reference` (the fused op runs its PyTorch reference on CPU
    tensors, so a model later kept on the CPU computes the same)."""
    if fuse is not None:
        return fuse
    forced = backend.requested()
    if forced is not None:
        return forced == "triton"
    return torch.cuda.is_available()


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def rule_of(node: fx.Node) -> Optional[Rule]:
    """The rule for `node` when it is a fusable elementwise op, else None."""
    if node.op != "call_function":
        return None
    if node.kwargs:
        return _keyword_rule(node)
    if node.target is operator.pow:
        exponent = node.args[1] if len(node.args) == 2 else None
        if isinstance(node.args[0], fx.Node) and isinstance(exponent, (int, float)) and _number(exponent):
            return POWERS.get(float(exponent))
        return None
    try:
        rule = RULES.get(node.target)
    except TypeError:  # unhashable target
        return None
    if rule is None or len(node.args) != len(rule.grads):
        return None
    if not all(isinstance(a, fx.Node) or _number(a) for a in node.args):
        return None
    if not any(isinstance(a, fx.Node) for a in node.args):
        return None
    if any(isinstance(a, fx.Node) and _not_a_tensor(a) for a in node.args):
        return None
    return rule


def _keyword_rule(node: fx.Node) -> Optional[Rule]:
    """`leaky_relu(x, slope=…)`, `clamp(x, min=…, max=…)`: one tensor, numeric constants as keywords."""
    found = keyword_rule(node.target, dict(node.kwargs))
    if found is None or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
        return None
    if _not_a_tensor(node.args[0]) or not all(_number(c) for c in found[1]):
        return None
    return found[0]


def _args(node: fx.Node) -> tuple[Any, ...]:
    """The operands of a fusable node: its arguments, then the constants a keyword rule takes."""
    if node.kwargs:
        found = keyword_rule(node.target, dict(node.kwargs))
        assert found is not None
        return (*node.args, *found[1])
    return tuple(node.args)


def _not_a_tensor(node: fx.Node) -> bool:
    """Nodes known to produce Python numbers (the symbolic sizes the elaborator reads off inputs)."""
    from ...codegen.runtime import batch_dim

    return node.op == "call_function" and node.target is batch_dim


def count_elementwise(graph: fx.Graph) -> int:
    """How many fusable elementwise nodes `graph` has (the pass's before/after measure)."""
    return sum(1 for n in graph.nodes if rule_of(n) is not None)


@dataclass
class _Group:
    nodes: list[fx.Node] = field(default_factory=list)


def find_regions(graph: fx.Graph, min_ops: int = MIN_OPS) -> list[list[fx.Node]]:
    """Maximal connected regions of fusable nodes (in graph order), each at least `min_ops` long.

    Greedy in topological order: a fusable node joins the regions of its fusable producers when the union
    stays convex — no input from outside the union has an ancestor inside it — and reads at most
    MAX_INPUTS outside values.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    group_of: dict[fx.Node, _Group] = {}
    for node in graph.nodes:
        if rule_of(node) is None:
            continue
        group = _Group([node])
        for inp in node.all_input_nodes:
            other = group_of.get(inp)
            if other is None or other is group:
                continue
            members = set(group.nodes) | set(other.nodes)
            if _acceptable(members, order):
                group.nodes = sorted(members, key=order.__getitem__)
                for n in other.nodes:
                    group_of[n] = group
        group_of[node] = group
    seen: list[_Group] = []
    for g in group_of.values():
        if not any(g is s for s in seen):
            seen.append(g)
    return [g.nodes for g in seen if len(g.nodes) >= min_ops]


def _acceptable(members: set[fx.Node], order: dict[fx.Node, int]) -> bool:
    """Convex (no outside input depends on a member) and with at most MAX_INPUTS outside inputs.

    A path from a member to an outside input only visits nodes after the earliest member, so the search
    backwards from the outside inputs stops there.
    """
    outside = {inp for n in members for inp in n.all_input_nodes if inp not in members}
    if len(outside) > MAX_INPUTS:
        return False
    lowest = min(order[m] for m in members)
    stack = [n for n in outside if order[n] > lowest]
    seen: set[fx.Node] = set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for inp in n.all_input_nodes:
            if inp in members:
                return False
            if order[inp] > lowest and inp not in seen:
                stack.append(inp)
    return True


def describe(nodes: list[fx.Node]) -> tuple[Region, list[fx.Node], list[fx.Node]]:
    """The kernelgen `Region` of `nodes` with its inputs (outside nodes, first use first) and outputs."""
    inside = {n: j for j, n in enumerate(nodes)}
    inputs: list[fx.Node] = []
    steps: list[Step] = []
    for n in nodes:
        rule = rule_of(n)
        assert rule is not None
        operands: list[Operand] = []
        for a in _args(n):
            if isinstance(a, fx.Node) and a in inside:
                operands.append(("v", inside[a]))
            elif isinstance(a, fx.Node):
                if a not in inputs:
                    inputs.append(a)
                operands.append(("x", inputs.index(a)))
            else:
                assert isinstance(a, (int, float))  # rule_of admits only nodes and numbers
                operands.append(("c", a))
        if n.target is operator.pow:
            operands = operands[:1]
        steps.append(Step(rule, tuple(operands)))
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    origin: list[str] = []
    for n in nodes:
        stmt = n.meta.get(ROUTE_STMT)
        span = n.meta.get(ROUTE_SPAN)
        if stmt:
            where = f"{Path(span.file).name}:{span.line}: " if span is not None else ""
            text = f"{where}{str(stmt).strip()}"
            if text not in origin:
                origin.append(text)
    region = Region(len(inputs), tuple(steps), tuple(inside[o] for o in outputs), tuple(origin))
    return region, inputs, outputs


def fuse_graph(gm: fx.GraphModule, min_ops: int = MIN_OPS) -> list[Path]:
    """Replace every region of `gm` by its generated op, in place; returns the generated files."""
    graph = gm.graph
    files: list[Path] = []
    for nodes in find_regions(graph, min_ops):
        region, inputs, outputs = describe(nodes)
        module, path = load(region)
        files.append(path)
        last = nodes[-1]
        with graph.inserting_after(last):
            call = graph.call_function(op_of(module), tuple(inputs))
        call.meta.update({k: v for k, v in last.meta.items() if k in (ROUTE_SPAN, ROUTE_STMT, "stack_trace")})
        results = [call]
        if len(outputs) > 1:
            results = []
            prev = call
            for k in range(len(outputs)):
                with graph.inserting_after(prev):
                    prev = graph.call_function(operator.getitem, (call, k))
                results.append(prev)
        for out, new in zip(outputs, results):
            out.replace_all_uses_with(new)
        for n in reversed(nodes):
            graph.erase_node(n)
    _topological_order(graph)
    graph.lint()
    gm.recompile()
    gm.meta[FUSED_KERNELS] = gm.meta.get(FUSED_KERNELS, []) + files
    return files


def _topological_order(graph: fx.Graph) -> None:
    """Reorder `graph` so every node follows its inputs, otherwise keeping the original order.

    A fused call sits where the region's last node was; a user of an earlier region output may come before
    that point. Kahn's algorithm, always taking the ready node that came first, moves such users after the
    call and leaves everything else (random ops included) in its original relative order.
    """
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    waiting = {n: len(set(n.all_input_nodes)) for n in nodes}
    ready = [order[n] for n in nodes if waiting[n] == 0]
    heapq.heapify(ready)
    result: list[fx.Node] = []
    while ready:
        n = nodes[heapq.heappop(ready)]
        result.append(n)
        for user in n.users:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, order[user])
    assert len(result) == len(nodes), "fusion made the graph cyclic"
    if result == nodes:
        return
    anchor = result[0]
    for n in result[1:]:
        anchor.append(n)
        anchor = n


def fuse_module(net: Any, min_ops: int = MIN_OPS) -> list[Path]:
    """Run the pass on a `RoutedModule` (its `graph_module`), in place."""
    return fuse_graph(net.graph_module, min_ops)


def verify(gm: fx.GraphModule) -> None:
    """The check run after the pass: the graph is well formed (`lint`) and its code regenerates."""
    gm.graph.lint()
    gm.recompile()
