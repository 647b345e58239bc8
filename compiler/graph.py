"""`routec graph`: the routed graph as Graphviz DOT, with gates, routes, paths, exits and scans drawn as
what they are (shapes and colours), layers as plain boxes, and repeated layers grouped in clusters."""

from __future__ import annotations

import operator
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch.fx as fx

from ..codegen import lif, ops, runtime
from ..codegen.functions import linear_scan_nd
from .meta import ROUTE_STMT

STYLES = {
    "gate": 'shape=diamond, style=filled, fillcolor="#ffd27f"',
    "route": 'shape=box3d, style=filled, fillcolor="#f4a582"',
    "paths": 'shape=trapezium, style=filled, fillcolor="#92c5de"',
    "exit": 'shape=octagon, style=filled, fillcolor="#d6604d", fontcolor=white',
    "scan": 'shape=doubleoctagon, style=filled, fillcolor="#b8e186"',
    "input": 'shape=invhouse, style=filled, fillcolor="#e0e0e0"',
    "output": 'shape=house, style=filled, fillcolor="#e0e0e0"',
    "layer": 'shape=box, style="rounded"',
    "op": 'shape=plaintext',
}
MODULE_KINDS = {
    runtime.TopKGate: "gate", runtime.SoftGate: "gate", runtime.HardGate: "gate",
    runtime.Experts: "route", runtime.BranchRoute: "route", runtime.PathCombine: "paths", runtime.EnsemblePaths: "paths",
    runtime.ExitPoint: "exit", runtime.ExitFinal: "exit", runtime.ExitScore: "exit", runtime.ScanLoop: "scan",
}
SCAN_OPS = {ops.linear_scan, ops.leaky_rnn_scan, ops.selective_scan, ops.lif_scan, ops.gru_scan, ops.lstm_scan,
            ops.multi_route_linear_scan, ops.multi_route_selective_scan, lif.threshold_scan, linear_scan_nd}
# fused ops that stand for a construct: an exit head with its rule, a path combine in the last path's GEMM
FUNCTION_KINDS = {ops.linear_exit: "exit", ops.linear_combine: "paths"}
HIDDEN = {operator.getitem, runtime.batch_dim}


def classify(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.op == "call_module":
        assert isinstance(node.target, str)  # a call_module target is the module's path
        return MODULE_KINDS.get(type(gm.get_submodule(node.target)), "layer")
    if node.op == "call_function" and node.target in SCAN_OPS:
        return "scan"
    if node.op == "call_function" and node.target in FUNCTION_KINDS:
        return FUNCTION_KINDS[node.target]
    return "op"


def label(gm: fx.GraphModule, node: fx.Node, kind: str) -> str:
    if node.op == "call_module":
        assert isinstance(node.target, str)
        module = gm.get_submodule(node.target)
        name = type(module).__name__
        return f"{node.target}\\n{name}"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.name


def to_dot(net: Any) -> str:
    gm = net.graph_module
    shown: dict[fx.Node, str] = {}
    lines = [f'digraph "{net.spec_name}" {{', "  rankdir=TB;", '  node [fontname="Helvetica", fontsize=10];']
    clusters: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (node.op == "call_function" and node.target in HIDDEN):
            continue
        kind = classify(gm, node)
        ident = f"n{len(shown)}"
        shown[node] = ident
        tip = str(node.meta.get(ROUTE_STMT, "")).replace('"', "'")
        text = label(gm, node, kind).replace('"', "'")
        entry = f'  {ident} [label="{text}", tooltip="{tip}", {STYLES[kind]}];'
        target = str(node.target) if node.op == "call_module" else ""
        parts = target.split(".")
        if len(parts) > 2 and parts[0].startswith("layers"):
            clusters.setdefault(".".join(parts[:2]), []).append(entry)
        else:
            lines.append(entry)
    for i, (name, entries) in enumerate(clusters.items()):
        lines.append(f'  subgraph cluster_{i} {{ label="{name}"; style=dashed;')
        lines += ["  " + e for e in entries]
        lines.append("  }")

    def sources(n: fx.Node) -> list[fx.Node]:
        if n in shown:
            return [n]
        return [s for inp in n.all_input_nodes for s in sources(inp)]

    for node, ident in shown.items():
        seen = set()
        for inp in node.all_input_nodes:
            for src in sources(inp):
                if src in shown and src is not node and src not in seen:
                    seen.add(src)
                    lines.append(f"  {shown[src]} -> {ident};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(net: Any, output: str) -> int:
    path = Path(output)
    dot = to_dot(net)
    fmt = path.suffix.lstrip(".").lower()
    if fmt in ("dot", "gv"):
        path.write_text(dot, encoding="utf-8")
        print(f"wrote {path}")
        return 0
    if fmt not in ("svg", "png", "pdf"):
        sys.stderr.write(f"routec: cannot draw to {path.name}: use .dot, .svg, .png or .pdf\n")
        return 1
    exe = shutil.which("dot")
    if exe is None:
        fallback = path.with_suffix(".dot")
        fallback.write_text(dot, encoding="utf-8")
        sys.stderr.write(f"routec: Graphviz `dot` is not installed, so {path.name} cannot be drawn; wrote "
                         f"{fallback} instead (install graphviz, or render it with `dot -T{fmt}`)\n")
        return 1
    done = subprocess.run([exe, f"-T{fmt}", "-o", str(path)], input=dot, text=True, capture_output=True)
    if done.returncode != 0:
        sys.stderr.write(f"routec: dot failed: {done.stderr.strip()}\n")
        return 1
    print(f"wrote {path}")
    return 0
