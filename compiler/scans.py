"""Lowering of `scan` statements: kernel selection for recognised recurrences, a step loop otherwise.

A scan body is matched against the recurrences routec has fused kernels for:

* linear:  `h = a * h + b` with `a`, `b` free of `h`  →  `ops.linear_scan` over a, b computed for all steps
  at once (per-step expressions of `x.t` are evaluated on the whole sequence `x`);
* leaky-τ: `h = h + (act(L(h) + u) - h) / tau` with `L` a Linear layer and `u` free of `h`  →
  `ops.leaky_rnn_scan` (the recurrent weight stays on chip);
* anything else runs as a `ScanLoop` over a step graph (the reference semantics of every scan).

After the scan, each state name holds the stacked states [B, T, …] and each `emit` its stacked outputs.
"""

from __future__ import annotations

from typing import Any, Optional

import operator

import torch
import torch.fx as fx

from ..codegen import ops, runtime
from ..codegen.functions import expand_steps as _expand
from ..codegen.functions import full_like_last as _full_like_last
from ..codegen.functions import linear_scan_nd
from ..codegen.functions import per_neuron as _per_neuron
from ..dsl import ast
from .elaborate import POISON, Abort, Elaborator, GraphContext, Scope, SeqAxis, join
from .layers import render_shape
from .values import Instance, Tensor

ACTIVATIONS = {"tanh": "tanh", "relu": "relu", "sigmoid": "sigmoid"}


def mentions(e: Any, name: str) -> bool:
    """Whether expression `e` reads the name `name`."""
    return any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(e))


class ScanFrame:
    """How `.t` reads inside the body being elaborated: the whole sequence ("full": the fused lowering
    computes every step at once) or the current step's slice ("step": a placeholder of the step graph)."""

    def __init__(self, mode: str):
        self.mode = mode
        self.seqs: dict[int, tuple[Tensor, Tensor]] = {}  # id(outer node) → (outer sequence, step slice)
        self.exit: Optional[tuple[str, Tensor, Tensor]] = None  # an `exit` in the body: (name, head, rule)

    def step_of(self, el: Elaborator, base: Tensor, span: Any) -> Tensor:
        if len(base.shape) < 2:
            el.error("R167", f"`.t` needs a sequence [B, T, …], got {base.describe()}", span)
        if self.mode == "full":
            return base
        if el.ctx.owns(base.node):
            el.error("R167", "`.t` reads a sequence defined outside the scan body", span)
        key = id(base.node)
        if key not in self.seqs:
            graph = el.ctx.graph
            # step slices go before any captured tensor: ScanLoop passes (states, slices, captured)
            first = next((n for n in graph.nodes if n.op != "placeholder" or n.name.startswith("captured_")), None)
            if first is None:
                ph = graph.placeholder(f"step_{len(self.seqs)}")
            else:
                with graph.inserting_before(first):
                    ph = graph.placeholder(f"step_{len(self.seqs)}")
            self.seqs[key] = (base, Tensor(ph, base.shape[:1] + base.shape[2:], base.dtype))
        return self.seqs[key][1]


def assignment_span(s: ast.Scan, name: str) -> Any:
    """Where the body last assigns the state `name` (the scan statement when it never does)."""
    spans = [n.span for n in ast.walk(s) if isinstance(n, ast.Assign) and any(t.id == name for t in n.targets)]
    return spans[-1] if spans else s.span


def lower_scan(el: Elaborator, s: ast.Scan, scope: Scope) -> None:
    over = el.eval(s.over, scope)
    if over is POISON:
        raise Abort()
    if not isinstance(over, SeqAxis):
        el.error("R161", "`scan … over` takes a sequence axis such as `x.T`", s.over.span)
    init = el.eval(s.init, scope)
    if init is POISON:
        raise Abort()
    inits = list(init) if isinstance(init, tuple) else [init]
    if len(inits) != len(s.states) or not all(isinstance(t, Tensor) for t in inits):
        el.error("R162", f"`scan` declares {len(s.states)} state(s) but `init` gives "
                 f"{len(inits) if isinstance(init, tuple) else el.describe(init)}", s.init.span)
    directions = [s.reverse]
    perm: Optional[Tensor] = None
    if s.order is not None:
        order = s.order.id if isinstance(s.order, ast.Name) else None
        if order in ("flip", "reverse"):
            directions = [not s.reverse]
        elif order == "bidirectional":
            directions = [False, True]
        elif order != "forward":
            value = el.eval(s.order, scope)
            if not isinstance(value, Tensor) or len(value.shape) != 1:
                el.error("R163", "a scan `order` is `forward`, `flip`, `bidirectional`, or a permutation "
                         "tensor [T] of the token positions", s.order.span)
            perm = value
    prefix = join(scope.prefix, s.states[0])
    total: Optional[dict[str, Tensor]] = None
    for reverse in directions:
        results = None
        if perm is None:
            results = try_fused(el, s, scope, over.tensor, inits, reverse, prefix)
        if results is None:
            results = step_loop(el, s, scope, over.tensor, inits, reverse, prefix, perm)
        if total is None:
            total = results
        else:
            total = {k: Tensor(el.call_function(torch.add, (total[k], v)), v.shape) for k, v in results.items()}
    assert total is not None
    for name, value in total.items():
        scope.names[name] = value


def body_scope(scope: Scope, prefix: str) -> Scope:
    sub = scope.child(prefix)
    sub.anon = {}
    sub.names["__emits__"] = {}
    return sub


def try_fused(el: Elaborator, s: ast.Scan, scope: Scope, seq: Tensor, inits: list[Tensor],
              reverse: bool, prefix: str) -> Optional[dict[str, Tensor]]:
    """Lower a recognised single-state recurrence (plus `emit y = h`) to its fused op, or return None."""
    if reads_whole_sequence(s, scope, seq):
        return None  # the step loop gives it the step semantics (usually a state shape error)
    cell = match_cell(s)
    if cell is not None and not reverse:
        return lower_cell(el, s, scope, seq, inits, prefix, *cell)
    if len(s.states) != 1:
        return None
    h = s.states[0]
    updates = [b for b in s.body if isinstance(b, ast.Assign)]
    emits = [b for b in s.body if isinstance(b, ast.Emit)]
    if len(updates) != 1 or len(updates) + len(emits) != len(s.body) or len(updates[0].targets) != 1 \
            or updates[0].targets[0].id != h or s.body.index(updates[0]) != 0:
        return None
    if not all(isinstance(e.value, ast.Name) and e.value.id == h for e in emits):
        return None
    h0 = inits[0]
    expr = updates[0].value
    el.stmt_span, el.stmt_text = updates[0].span, el.source_line(updates[0].span)
    full = seq.shape[:2] + tuple(h0.shape[1:])
    frame = ScanFrame("full")
    el.scan_frames.append(frame)
    try:
        leaky = match_leaky(expr, h)
        linear = match_linear(expr, h)
        if leaky is not None and not reverse:
            node = lower_leaky(el, scope, seq, h0, prefix, *leaky)
        elif linear is not None:
            a_expr, b_expr = linear
            sub = body_scope(scope, prefix)
            a = broadcast_to(el, el.eval(a_expr, sub), full, a_expr)
            b = broadcast_to(el, el.eval(b_expr, sub), full, b_expr)
            scan_fn = ops.linear_scan if len(full) == 3 else linear_scan_nd  # matrix states: flattened
            node = el.call_function(scan_fn, (a, b, h0), {"reverse": reverse})
        else:
            return None
    finally:
        el.scan_frames.pop()
    if node is None:
        return None
    el.stats.append(("scan", h, node))
    last = el.call_function(operator.getitem, (node, (slice(None), 0 if reverse else -1)))
    out = {h: Tensor(last, h0.shape)}
    for e in emits:
        out[e.name] = Tensor(node, full)
    return out


def reads_whole_sequence(s: ast.Scan, scope: Scope, seq: Tensor) -> bool:
    """Whether the body reads a sequence [B, T, …] without `.t`. In a step that is the whole sequence, but the
    fused lowerings evaluate `x.t` as the whole `x`, so they would silently read such an `x` as `x.t`."""
    body = [n for stmt in s.body for n in ast.walk(stmt)]
    stepped = {id(n.value) for n in body if isinstance(n, ast.Attribute) and n.attr == "t"}
    for n in body:
        if isinstance(n, ast.Name) and id(n) not in stepped and n.id not in s.states:
            try:
                v = scope.lookup(n.id)
            except KeyError:
                continue
            if isinstance(v, Tensor) and len(v.shape) >= 2 and tuple(v.shape[:2]) == tuple(seq.shape[:2]):
                return True
    return False


def match_cell(s: ast.Scan):
    """`h = GRUCell(i, n)(u, h)` or `h, c = LSTMCell(i, n)(u, (h, c))` / `(u, h, c)`, then `emit y = h`s,
    with `u` free of the states → (cell name, cell expression, input expression, emits)."""
    if not s.body or not isinstance(s.body[0], ast.Assign):
        return None
    update, emits = s.body[0], s.body[1:]
    targets = tuple(t.id for t in update.targets)
    if targets != tuple(s.states) or not all(isinstance(e, ast.Emit) and isinstance(e.value, ast.Name)
                                             and e.value.id == s.states[0] for e in emits):
        return None
    call = update.value
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Call) and isinstance(call.func.func, ast.Name)):
        return None
    kind = call.func.func.id
    args = list(call.args)
    if len(args) == 2 and isinstance(args[1], ast.TupleExpr):
        args = [args[0], *args[1].items]
    names = [a.id if isinstance(a, ast.Name) else None for a in args[1:]]
    if kind == "GRUCell" and names == list(s.states) and len(s.states) == 1:
        pass
    elif kind == "LSTMCell" and names == list(s.states) and len(s.states) == 2:
        pass
    else:
        return None
    if any(mentions(args[0], st) for st in s.states):
        return None
    return kind, call.func, args[0], emits


def lower_cell(el: Elaborator, s: ast.Scan, scope: Scope, seq: Tensor, inits: list[Tensor], prefix: str,
               kind: str, cell_expr: ast.Expr, u_expr: ast.Expr, emits: list) -> Optional[dict[str, Tensor]]:
    """GRU / LSTM cells over the whole sequence with `gru_scan` / `lstm_scan` (input projection hoisted)."""
    el.stmt_span, el.stmt_text = s.body[0].span, el.source_line(s.body[0].span)
    frame = ScanFrame("full")
    el.scan_frames.append(frame)
    try:
        sub = body_scope(scope, prefix)
        cell = el.eval(cell_expr, sub)
        u = el.eval(u_expr, sub)
    finally:
        el.scan_frames.pop()
    if u is POISON or cell is POISON:
        raise Abort()
    if not (isinstance(cell, Instance) and cell.kind == "layer") or not isinstance(u, Tensor) or len(u.shape) != 3:
        return None
    n_in, n = cell.kwargs["input"], cell.kwargs["hidden"]
    if isinstance(u.shape[-1], int) and u.shape[-1] != n_in:
        el.error("R121", f"`{kind}({n_in}, {n})` expects inputs of width {n_in}, got {render_shape(u.shape)}",
                 u_expr.span)
    graph = el.root_graph()
    w_ih, w_hh, b_ih, b_hh = (el._tag(graph.get_attr(f"{cell.path}.{p}"))
                              for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    if not el.ctx.owns(w_ih):
        w_ih, w_hh, b_ih, b_hh = (el._capture(x, el.ctx) for x in (w_ih, w_hh, b_ih, b_hh))
    proj = el.call_function(torch.nn.functional.linear, (u, w_ih, b_ih))
    full = seq.shape[:2] + (n,)
    if kind == "GRUCell":
        node = el.call_function(ops.gru_scan, (proj, w_hh, b_hh, inits[0]))
        seqs = {s.states[0]: node}
    else:
        node = el.call_function(ops.lstm_scan, (proj, w_hh, b_hh, inits[0], inits[1]))
        seqs = {name: el.getitem(node, i) for i, name in enumerate(s.states)}
    el.stats.append(("scan", s.states[0], node))
    out = {name: Tensor(el.call_function(operator.getitem, (v, (slice(None), -1))), (seq.shape[0], n))
           for name, v in seqs.items()}
    for e in emits:
        out[e.name] = Tensor(seqs[s.states[0]], full)
    return out


def broadcast_to(el: Elaborator, v: Any, shape: tuple, e: ast.Expr) -> Tensor:
    if v is POISON:
        raise Abort()
    if not isinstance(v, (Tensor, int, float)):
        el.error("R164", f"a linear recurrence coefficient must be a tensor or number, got {el.describe(v)}",
                 e.span)
    sizes = [el.runtime_dim(d) for d in shape]
    return Tensor(el.call_function(_expand, (v, sizes)), shape)


def match_linear(e: ast.Expr, h: str) -> Optional[tuple[ast.Expr, ast.Expr]]:
    """`a * h + b`, `h * a + b`, `b + a * h`, `b + h * a` with a, b free of h."""
    if not (isinstance(e, ast.BinOp) and e.op == "+"):
        return None
    for prod, other in ((e.left, e.right), (e.right, e.left)):
        if isinstance(prod, ast.BinOp) and prod.op == "*" and not mentions(other, h):
            for coef, state in ((prod.left, prod.right), (prod.right, prod.left)):
                if isinstance(state, ast.Name) and state.id == h and not mentions(coef, h):
                    return coef, other
    return None


def match_leaky(e: ast.Expr, h: str):
    """`h + (act(L(h) + u) - h) / tau` → (act name, L expression, u expression, tau expression)."""
    if not (isinstance(e, ast.BinOp) and e.op == "+" and isinstance(e.left, ast.Name) and e.left.id == h):
        return None
    div = e.right
    if not (isinstance(div, ast.BinOp) and div.op == "/" and not mentions(div.right, h)):
        return None
    diff = div.left
    if not (isinstance(diff, ast.BinOp) and diff.op == "-" and isinstance(diff.right, ast.Name)
            and diff.right.id == h):
        return None
    act_call = diff.left
    if isinstance(act_call, ast.Call) and isinstance(act_call.func, ast.Name) and act_call.func.id in ACTIVATIONS \
            and len(act_call.args) == 1 and not act_call.kwargs:
        act, inner = act_call.func.id, act_call.args[0]
    elif isinstance(act_call, ast.Pipe) and isinstance(act_call.right, ast.Name) and act_call.right.id in ACTIVATIONS:
        act, inner = act_call.right.id, act_call.left
    else:
        return None
    if not (isinstance(inner, ast.BinOp) and inner.op == "+"):
        return None
    for rec, u in ((inner.left, inner.right), (inner.right, inner.left)):
        layer = recurrent_layer(rec, h)
        if layer is not None and not mentions(u, h):
            return act, layer, u, div.right, rec is inner.left
    return None


def recurrent_layer(e: ast.Expr, h: str) -> Optional[ast.Expr]:
    """`Linear(n, n)(h)`, `h -> Linear(n, n)` or `w(h)` → the layer expression."""
    if isinstance(e, ast.Call) and len(e.args) == 1 and isinstance(e.args[0], ast.Name) and e.args[0].id == h \
            and not mentions(e.func, h):
        return e.func
    if isinstance(e, ast.Pipe) and isinstance(e.left, ast.Name) and e.left.id == h and not mentions(e.right, h):
        return e.right
    return None


def lower_leaky(el: Elaborator, scope: Scope, seq: Tensor, h0: Tensor, prefix: str, act: str,
                layer_expr: ast.Expr, u_expr: ast.Expr, tau_expr: ast.Expr, layer_first: bool) -> Optional[fx.Node]:
    sub = body_scope(scope, prefix)
    # evaluate in source order so that module names match the step-loop lowering
    layer = el.eval(layer_expr, sub) if layer_first else None
    u = el.eval(u_expr, sub)
    if layer is None:
        layer = el.eval(layer_expr, sub)
    if not (isinstance(layer, Instance) and layer.kind == "layer" and layer.name == "Linear"):
        return None
    n = h0.shape[-1]
    if layer.kwargs["in_features"] != n or layer.kwargs["out_features"] != n:
        el.error("R165", f"the recurrent layer must map the state to itself: Linear({n}, {n}), got "
                 f"Linear({layer.kwargs['in_features']}, {layer.kwargs['out_features']})", layer_expr.span)
    if u is POISON:
        raise Abort()
    full = seq.shape[:2] + (n,)
    u_t = broadcast_to(el, u, full, u_expr)
    weight = el._tag(el.root_graph().get_attr(f"{layer.path}.weight"))
    if layer.kwargs["bias"]:
        bias = el._tag(el.root_graph().get_attr(f"{layer.path}.bias"))
        u_t = Tensor(el.call_function(torch.add, (u_t, bias)), full)
    tau = el.eval(tau_expr, sub)
    if tau is POISON:
        raise Abort()
    if isinstance(tau, (int, float)):
        tau = Tensor(el.call_function(_full_like_last, (u_t, float(tau))), (n,))
    if not isinstance(tau, Tensor):
        el.error("R165", f"`tau` must be a number or a tensor [{n}], got {el.describe(tau)}", tau_expr.span)
    tau_n = Tensor(el.call_function(_per_neuron, (tau, n)), (n,))
    return el.call_function(ops.leaky_rnn_scan, (u_t, weight, tau_n, h0), {"activation": act})


def step_loop(el: Elaborator, s: ast.Scan, scope: Scope, seq: Tensor, inits: list[Tensor], reverse: bool,
              prefix: str, perm: Optional[Tensor]) -> dict[str, Tensor]:
    """Elaborate the body as a step graph and run it with `runtime.ScanLoop`."""
    ctx = GraphContext(fx.Graph(), parent=el.ctx)
    outer = el.ctx
    frame = ScanFrame("step")
    el.ctx = ctx
    el.scan_frames.append(frame)
    try:
        states = [Tensor(ctx.graph.placeholder(f"state_{name}"), t.shape) for name, t in zip(s.states, inits)]
        frame.step_of(el, seq, s.over.span)  # the scanned sequence fixes the length even if unread
        sub = body_scope(scope, prefix)
        for name, st in zip(s.states, states):
            sub.names[name] = st
        saved = el.stmt_span, el.stmt_text
        before = len(el.diags.errors)
        outs = el.run_body(s.body, sub)
        el.stmt_span, el.stmt_text = saved
        if outs:
            stray = next(n for n in ast.walk(s) if isinstance(n, ast.Out))
            el.diags.error("R160", "`out` inside a `scan` body: per-step outputs are `emit name = …`, and the "
                           "scan's results are used after it", stray.span)
        if len(el.diags.errors) > before:
            raise Abort()
        new_states = []
        for name, st in zip(s.states, states):
            value = sub.names.get(name)
            if not isinstance(value, Tensor):
                el.error("R166", f"scan state `{name}` must stay a tensor, got {el.describe(value)}",
                         assignment_span(s, name))
            if len(value.shape) != len(st.shape) or any(
                    isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(value.shape, st.shape)):
                el.error("R166", f"scan state `{name}` is {render_shape(st.shape)} but the body assigns "
                         f"{render_shape(value.shape)}", assignment_span(s, name),
                         help="`x.t` is the current step of a sequence `x`; `x` alone is the whole sequence"
                         if len(value.shape) == len(st.shape) + 1 else None)
            new_states.append(value)
        emits = sub.names["__emits__"]
        extra = (frame.exit[1].node, frame.exit[2].node) if frame.exit is not None else ()
        ctx.graph.output(tuple(v.node for v in new_states) + tuple(v.node for v in emits.values()) + extra)
    finally:
        el.ctx = outer
        el.scan_frames.pop()
    step = fx.GraphModule(el.root, ctx.graph)
    path = join(scope.prefix, f"{s.states[0]}_scan" + ("_reverse" if reverse else ""))
    seqs = [outer_seq for outer_seq, _ in frame.seqs.values()]
    if perm is not None:
        seqs = [Tensor(el.call_function(torch.index_select, (t, 1, perm)), t.shape) for t in seqs]
    captured = [outer_node for outer_node, _ in ctx.captures.values()]
    batch = seq.shape[0]
    batched = tuple(el.node_batch(n, batch) for n in captured)
    if el.lookup_module(path) is None:
        el.register(path, runtime.ScanLoop(step, len(s.states), len(seqs), len(emits), reverse=reverse,
                                           exit=frame.exit is not None, batched=batched))
    node = el.call_module(path, tuple(inits) + tuple(seqs) + tuple(captured))
    length = seq.shape[1]
    out: dict[str, Tensor] = {}
    for i, (name, st) in enumerate(zip(s.states, inits)):
        out[name] = Tensor(el.getitem(node, i), st.shape)
    for j, (name, v) in enumerate(emits.items()):
        stacked = el.getitem(node, len(s.states) + j)
        if perm is not None:
            inverse = el.call_function(torch.argsort, (perm,))
            stacked = el.call_function(torch.index_select, (stacked, 1, inverse))
        out[name] = Tensor(stacked, v.shape[:1] + (length,) + v.shape[1:])
    if frame.exit is not None:
        name, head, _ = frame.exit
        base = len(s.states) + len(emits)
        selected, index, every = (el.getitem(node, base + i) for i in range(3))
        el.time_exits.append((name, Tensor(selected, head.shape), index,
                              Tensor(every, head.shape[:1] + (length,) + head.shape[1:])))
        out[name] = Tensor(selected, head.shape)
    el.stats.append(("scan", s.states[0], node))
    return out
