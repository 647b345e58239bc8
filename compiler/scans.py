"""Lowering of `scan` statements: kernel selection for recognised recurrences, a step loop otherwise.

A scan body is matched against the recurrences routec has fused kernels for:

* linear:  `h = a * h + b` with `a`, `b` free of `h`  →  `ops.linear_scan` over a, b computed for all steps
  at once (per-step expressions of `x.t` are evaluated on the whole sequence `x`);
* leaky-τ: `h = h + (act(R + u) - h) / tau` (pre form) or `h = act((1 - 1/tau) * h + (R + u) / tau)`
  (post form) with `R` = `L(h)` (`L` a Linear(n, n)) or `h @ M` (`M` an [n, n] expression free of `h`,
  evaluated once: the recurrent weight is `M^T`) and `u` (one or more terms, any order) free of `h`, act in
  tanh, relu, sigmoid, identity, leaky_relu(·, number)  →  `ops.leaky_rnn_scan` (the recurrent weight on chip);
* selective (Mamba S6): `h = exp(unsqueeze(dt, -1) * A) * h + unsqueeze(dt * u, -1) * unsqueeze(Bm, 1)` with
  `emit y = sum(h * unsqueeze(Cm, 1), -1)` (`+ D * u`), zero init  →  `ops.selective_scan` (one call for all
  such emits), or `ops.multi_route_selective_scan` with `order <permutation>`;
* integrate-and-fire: `u = beta * v + x.t; s = theta * (u >= theta); v = u - s` (or `u * (1 - s)`), `emit … = s`
  →  `lif.threshold_scan` on `ops.lif_scan` with no surrogate gradient (the comparison's own derivative);
* `h = a * h + b` with `order <permutation>` and zero init  →  `ops.multi_route_linear_scan` (R = 1);
* anything else runs as a `ScanLoop` over a step graph (the reference semantics of every scan).

Matching works on the body with its locals inlined (`flatten_body`): every state update and emit becomes one
expression of the previous step's states, so `dt_t = delta.t; …; h = …dt_t…` matches like `h = …delta.t…`.
A body that does not match exactly runs as a step loop. ROUTEC_SCAN_FUSION=0 forces the step loop for every
scan (tests compare both lowerings of the same spec).

After the scan, each state name holds the stacked states [B, T, …] and each `emit` its stacked outputs.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import operator
import os

import torch
import torch.fx as fx

from ..codegen import lif, ops, runtime
from ..codegen.functions import expand_steps as _expand
from ..codegen.functions import full_like_last as _full_like_last
from ..codegen.functions import linear_scan_nd
from ..codegen.functions import per_neuron as _per_neuron
from ..dsl import ast
from .elaborate import POISON, Abort, Elaborator, GraphContext, Scope, SeqAxis, join
from .layers import render_shape
from .values import Instance, Tensor



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
    fusion = os.environ.get("ROUTEC_SCAN_FUSION", "1") != "0"
    total: Optional[dict[str, Tensor]] = None
    for reverse in directions:
        results = None
        if fusion:
            results = try_fused(el, s, scope, over.tensor, inits, reverse, prefix, perm)
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
              reverse: bool, prefix: str, perm: Optional[Tensor] = None) -> Optional[dict[str, Tensor]]:
    """Lower a recognised single-state recurrence to its fused op, or return None (then: a step loop)."""
    if reads_whole_sequence(s, scope, seq):
        return None  # the step loop gives it the step semantics (usually a state shape error)
    cell = match_cell(s) if perm is None else None
    if cell is not None and not reverse:
        return lower_cell(el, s, scope, seq, inits, prefix, *cell)
    if len(s.states) != 1:
        return None
    h = s.states[0]
    flat = flatten_body(s)
    if flat is None or h not in flat.updates:
        return None
    update, expr = flat.updates[h]
    el.stmt_span, el.stmt_text = update.span, el.source_line(update.span)
    selective = match_selective(expr, flat.emits, h)
    if selective is not None:
        return lower_selective(el, s, scope, seq, inits[0], reverse, prefix, perm, selective)
    spiking = match_spiking(expr, flat.emits, h)
    if spiking is not None:
        if perm is not None or reverse:
            return None
        return lower_spiking(el, scope, seq, h, inits[0], prefix, spiking)
    if not all(same(e, expr) for _, e in flat.emits):  # only `emit y = h` (the new state) below
        return None
    emits = [e for e, _ in flat.emits]
    h0 = inits[0]
    if perm is not None:
        return lower_routed_linear(el, scope, seq, h0, reverse, prefix, perm, expr, h, emits)
    full = seq.shape[:2] + tuple(h0.shape[1:])
    leaky = match_leaky(expr, h)
    linear = match_linear(expr, h)
    if flat.inlined:  # inlined locals: only per-step expressions known to compute every step at once
        if leaky is not None and not leaky_step_safe(leaky, scope, s.states):
            leaky = None
        if linear is not None and not all(step_safe(e, scope, s.states) for e in linear):
            linear = None
    if leaky is not None and (leaky.form == "post" or leaky.matrix) and not flat.inlined \
            and not leaky_step_safe(leaky, scope, s.states):  # the forms added with the post form: checked always
        leaky = None
    frame = ScanFrame("full")
    el.scan_frames.append(frame)
    try:
        if leaky is not None and not reverse:
            node = lower_leaky(el, scope, seq, h0, prefix, leaky)
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


# ---------------------------------------------------------------- body flattening


class FlatBody(NamedTuple):
    """A scan body with its locals inlined: each state's new value and each emit as one expression in which
    state names are the previous step's states (an emit after an update reads the update's expression)."""

    updates: dict[str, tuple[ast.Assign, ast.Expr]]
    emits: list[tuple[ast.Emit, ast.Expr]]
    inlined: bool  # whether the body had locals


# calls that give a different value each time they run: a local using them is never inlined (it could be
# evaluated twice)
RANDOM_FUNCTIONS = {"dropout", "rand", "randn", "rand_like", "randn_like", "bernoulli", "multinomial", "random"}
INLINE_NODES = (ast.Name, ast.Int, ast.Float, ast.Bool, ast.Str, ast.Attribute, ast.BinOp, ast.UnaryOp, ast.Call,
                ast.Keyword, ast.Index, ast.Slice, ast.EllipsisIndex, ast.ListExpr, ast.TupleExpr, ast.Pipe)


def inlinable(e: ast.Expr) -> bool:
    """Whether `e` may be evaluated in another place or twice: no layer construction (a module named after
    its place), no randomness, only plain functions (`exp`, `unsqueeze`, …) and instances bound to names."""
    for n in ast.walk(e):
        if not isinstance(n, INLINE_NODES):
            return False
        if isinstance(n, ast.Name) and n.id in RANDOM_FUNCTIONS:
            return False
        if isinstance(n, ast.Call) and not (isinstance(n.func, ast.Name) and n.func.id[:1].islower()):
            return False
        if isinstance(n, ast.Pipe) and isinstance(n.right, ast.Name) and not n.right.id[:1].islower():
            return False  # `x -> LayerNorm`: a layer built here
    return True


def substitute(e: Any, env: dict[str, ast.Expr]) -> Any:
    """`e` with every name bound in `env` replaced by its expression; None where a bound name is the base of
    an attribute (`local.t` is an error in the step loop and must stay one)."""
    if isinstance(e, ast.Name):
        return env.get(e.id, e)
    if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id in env:
        return None
    if isinstance(e, tuple):
        items = [substitute(x, env) for x in e]
        return None if any(x is None for x in items) else tuple(items)
    if not isinstance(e, ast.Node):
        return e
    changes = {}
    for field in type(e).model_fields:
        value = getattr(e, field)
        if isinstance(value, (ast.Node, tuple)):
            new = substitute(value, env)
            if new is None:
                return None
            if new is not value:
                changes[field] = new
    return e.model_copy(update=changes) if changes else e


def flatten_body(s: ast.Scan) -> Optional[FlatBody]:
    """Inline the body's locals (names assigned once that are not states, with an `inlinable` value) into
    the state updates and emits; None when the body has anything else (an exit, a tuple assignment, a name
    assigned twice, …)."""
    counts: dict[str, int] = {}
    for stmt in s.body:
        if isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                counts[target.id] = counts.get(target.id, 0) + 1
    env: dict[str, ast.Expr] = {}
    updates: dict[str, tuple[ast.Assign, ast.Expr]] = {}
    emits: list[tuple[ast.Emit, ast.Expr]] = []
    for stmt in s.body:
        if isinstance(stmt, ast.Comment):
            continue
        if isinstance(stmt, ast.Emit):
            value = substitute(stmt.value, env)
            if value is None:
                return None
            emits.append((stmt, value))
            continue
        if not isinstance(stmt, ast.Assign) or len(stmt.targets) != 1:
            return None
        name = stmt.targets[0].id
        value = substitute(stmt.value, env)
        if counts[name] != 1 or value is None:
            return None
        if name in s.states:
            updates[name] = (stmt, value)
        elif not inlinable(stmt.value):
            return None
        env[name] = value
    return FlatBody(updates, emits, any(name not in s.states for name in env))


def same(a: Any, b: Any) -> bool:
    """Equal expressions up to source positions."""
    return ast.strip_spans(a) == ast.strip_spans(b)


def int_value(e: Any) -> Optional[int]:
    if isinstance(e, ast.Int):
        return e.value
    if isinstance(e, ast.UnaryOp) and e.op == "-" and isinstance(e.operand, ast.Int):
        return -e.operand.value
    return None


def number_value(e: Any) -> Optional[float]:
    if isinstance(e, (ast.Int, ast.Float)):
        return float(e.value)
    if isinstance(e, ast.UnaryOp) and e.op == "-" and isinstance(e.operand, (ast.Int, ast.Float)):
        return -float(e.operand.value)
    return None


def call_args(e: Any, fname: str, nargs: int) -> Optional[tuple]:
    """The positional arguments of `fname(a, b…)` or `a -> fname(b…)` (no keywords), else None."""
    if isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and e.func.id == fname and not e.kwargs \
            and len(e.args) == nargs:
        return tuple(e.args)
    if isinstance(e, ast.Pipe):
        right = e.right
        if isinstance(right, ast.Name) and right.id == fname and nargs == 1:
            return (e.left,)
        if isinstance(right, ast.Call) and isinstance(right.func, ast.Name) and right.func.id == fname \
                and not right.kwargs and len(right.args) == nargs - 1:
            return (e.left, *right.args)
    return None


def unsqueezed(e: Any, dims: tuple[int, ...]) -> Optional[ast.Expr]:
    """`x` of `unsqueeze(x, k)` with k in `dims`."""
    args = call_args(e, "unsqueeze", 2)
    return args[0] if args is not None and int_value(args[1]) in dims else None


def factors(e: Any) -> tuple:
    """Both orders of the operands of a product `p * q`; () for anything else."""
    if isinstance(e, ast.BinOp) and e.op == "*":
        return ((e.left, e.right), (e.right, e.left))
    return ()


# elementwise functions: on the whole sequence they compute every step's value at once
ELEMENTWISE = {"exp", "log", "softplus", "sigmoid", "tanh", "relu", "silu", "gelu", "abs", "sqrt", "neg",
               "sin", "cos", "identity", "detach"}


def step_safe(e: ast.Expr, scope: Scope, states: tuple) -> bool:
    """Whether a per-step expression gives every step at once when `x.t` reads the whole sequence `x`:
    `.t` reads, numbers and tensors of rank <= 1 (they broadcast alike against [B, …] and [B, T, …])
    combined by arithmetic and elementwise functions only."""
    stepped = {id(n.value) for n in ast.walk(e) if isinstance(n, ast.Attribute) and n.attr == "t"}
    called = {id(n.func) for n in ast.walk(e) if isinstance(n, ast.Call)}
    called |= {id(n.right) for n in ast.walk(e) if isinstance(n, ast.Pipe)}
    for n in ast.walk(e):
        if isinstance(n, ast.Pipe):  # `x.t -> softplus`
            if not (isinstance(n.right, ast.Name) and n.right.id in ELEMENTWISE):
                return False
        elif isinstance(n, ast.Attribute):
            if n.attr != "t" or not isinstance(n.value, ast.Name):
                return False
        elif isinstance(n, ast.Call):
            if not (isinstance(n.func, ast.Name) and n.func.id in ELEMENTWISE and len(n.args) == 1 and not n.kwargs):
                return False
        elif isinstance(n, ast.Name):
            if id(n) in stepped or id(n) in called:
                continue
            if n.id in states:
                return False
            try:
                v = scope.lookup(n.id)
            except KeyError:
                return False
            if not (isinstance(v, (int, float)) and not isinstance(v, bool)
                    or isinstance(v, Tensor) and len(v.shape) <= 1):
                return False
        elif not isinstance(n, (ast.BinOp, ast.UnaryOp, ast.Int, ast.Float)):
            return False
        if isinstance(n, ast.BinOp) and n.op not in ("+", "-", "*", "/"):
            return False
    return True


def dims_match(a: Any, b: Any) -> bool:
    return a == b if isinstance(a, int) == isinstance(b, int) else False


def fits(v: Any, full: tuple) -> bool:
    """Whether `broadcast_to(v, full)` gives every step the value the step expression has: a number, a
    per-step [B, …] value (rank one less), a whole-sequence value, or a tensor broadcasting on trailing axes."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return True
    if not isinstance(v, Tensor) or len(v.shape) > len(full):
        return False
    target = full[:1] + full[2:] if len(v.shape) == len(full) - 1 else full[len(full) - len(v.shape):]
    return all(d == 1 or dims_match(d, t) for d, t in zip(v.shape, target))


def stepped_as(v: Any, full: tuple) -> bool:
    """Whether `v` is a whole sequence `full` [B, T, …] or a per-step value [B, …] of that shape: the S6 body
    unsqueezes its step values at fixed axes, which broadcasting a smaller tensor would move."""
    if not isinstance(v, Tensor):
        return False
    target = full if len(v.shape) == len(full) else full[:1] + full[2:]
    return len(v.shape) == len(target) and all(dims_match(d, t) for d, t in zip(v.shape, target))


def evaluate(el: Elaborator, exprs: list, scope: Scope, prefix: str) -> list:
    """Evaluate expressions of the body with `x.t` reading whole sequences (ScanFrame "full")."""
    frame = ScanFrame("full")
    el.scan_frames.append(frame)
    try:
        sub = body_scope(scope, prefix)
        values = [None if e is None else el.eval(e, sub) for e in exprs]
    finally:
        el.scan_frames.pop()
    if any(v is POISON for v in values):
        raise Abort()
    return values


def route_rows(el: Elaborator, perm: Tensor, reverse: bool) -> fx.Node:
    """The order `perm` [T] as the routes [1, T] of the multi-route ops (walked backwards for `reverse`)."""
    node = el.node_of(perm)
    if reverse:
        node = el.call_function(torch.flip, (node, (0,)))
    return el.call_function(torch.unsqueeze, (node, 0))


# ---------------------------------------------------------------- selective scan (Mamba S6)


class Selective(NamedTuple):
    dt: ast.Expr
    A: ast.Expr
    u: ast.Expr
    Bm: ast.Expr
    outputs: list  # (emit, Cm expression, D expression or None)


def match_selective(expr: ast.Expr, emits: list, h: str) -> Optional[Selective]:
    """`h = exp(unsqueeze(dt, -1) * A) * h + unsqueeze(dt * u, -1) * unsqueeze(Bm, 1)` (products and the sum
    in either order) and emits `sum(h * unsqueeze(Cm, 1), -1)` with an optional `+ D * u`."""
    linear = match_linear(expr, h)
    if linear is None or not emits:
        return None
    coef, other = linear
    arg = call_args(coef, "exp", 1)
    if arg is None:
        return None
    dt = A = None
    for p, q in factors(arg[0]):
        dt = unsqueezed(p, (-1, 2))
        if dt is not None:
            A = q
            break
    if dt is None or A is None:
        return None
    u = bm = None
    for p, q in factors(other):
        prod, b = unsqueezed(p, (-1, 2)), unsqueezed(q, (1, -2))
        if prod is None or b is None:
            continue
        u = next((y for x, y in factors(prod) if same(x, dt)), None)
        if u is not None:
            bm = b
            break
    if u is None or bm is None:
        return None
    outputs = []
    for emit, e in emits:
        match = match_selective_output(e, expr, u)
        if match is None:
            return None
        outputs.append((emit, *match))
    leaves = [dt, A, u, bm] + [c for _, c, _ in outputs] + [d for _, _, d in outputs if d is not None]
    if any(mentions(x, h) for x in leaves):
        return None
    return Selective(dt, A, u, bm, outputs)


def match_selective_output(e: ast.Expr, state: ast.Expr, u: ast.Expr) -> Optional[tuple]:
    """`sum(state * unsqueeze(Cm, 1), -1)` (+ `D * u`) → (Cm, D or None)."""
    parts: list[tuple[Any, Any]] = [(e, None)]
    if isinstance(e, ast.BinOp) and e.op == "+":
        parts = [(e.left, e.right), (e.right, e.left)]
    for reduce, skip in parts:
        D = None
        if skip is not None:
            D = next((x for x, y in factors(skip) if same(y, u)), None)
            if D is None:
                continue
        args = call_args(reduce, "sum", 2)
        if args is None or int_value(args[1]) not in (-1, 2):
            continue
        for x, y in factors(args[0]):
            c = unsqueezed(y, (1, -2))
            if c is not None and same(x, state):
                return c, D
    return None


def lower_selective(el: Elaborator, s: ast.Scan, scope: Scope, seq: Tensor, h0: Tensor, reverse: bool,
                    prefix: str, perm: Optional[Tensor], m: Selective) -> Optional[dict[str, Tensor]]:
    """One `selective_scan` (or multi-route selective scan with R = 1 for `order perm`) per distinct
    (Cm, D) of the emits; the final state, when used, from a linear scan of the discretised inputs."""
    if h0.node.target is not runtime.zeros_batch or len(h0.shape) != 3:
        return None  # the selective scan starts from zeros
    stepped = [m.dt, m.u, m.Bm] + [c for _, c, _ in m.outputs]
    if not all(step_safe(e, scope, s.states) for e in stepped):
        return None
    fixed = [m.A] + [d for _, _, d in m.outputs if d is not None]
    if not all(inlinable(e) and not any(isinstance(n, ast.Attribute) and n.attr == "t" for n in ast.walk(e))
               for e in fixed):
        return None
    A, dt, u, bm = evaluate(el, [m.A, m.dt, m.u, m.Bm], scope, prefix)
    bsz, length = seq.shape[:2]
    d, n = h0.shape[1], h0.shape[2]
    full_d, full_n = (bsz, length, d), (bsz, length, n)
    if not (isinstance(A, Tensor) and len(A.shape) == 2 and dims_match(A.shape[0], d)
            and dims_match(A.shape[1], n)):
        return None
    if not (stepped_as(dt, full_d) and stepped_as(u, full_d) and stepped_as(bm, full_n)):
        return None
    dt_f = broadcast_to(el, dt, full_d, m.dt)
    u_f = broadcast_to(el, u, full_d, m.u)
    bm_f = broadcast_to(el, bm, full_n, m.Bm)
    routes = None if perm is None else route_rows(el, perm, reverse)
    calls: dict[Any, fx.Node] = {}
    out: dict[str, Tensor] = {}
    for emit, c_expr, d_expr in m.outputs:
        key = (ast.strip_spans(c_expr), None if d_expr is None else ast.strip_spans(d_expr))
        if key not in calls:
            cm, skip = evaluate(el, [c_expr, d_expr], scope, prefix)
            if not stepped_as(cm, full_n):
                return None
            cm_f = broadcast_to(el, cm, full_n, c_expr)
            if skip is None:
                D = None
            elif isinstance(skip, (int, float)) and not isinstance(skip, bool):
                D = Tensor(el.call_function(_full_like_last, (u_f, float(skip))), (d,))
            elif isinstance(skip, Tensor) and len(skip.shape) == 1 and dims_match(skip.shape[0], d):
                D = skip
            elif isinstance(skip, Tensor) and len(skip.shape) <= 1 and all(x == 1 for x in skip.shape):
                D = Tensor(el.call_function(_per_neuron, (skip, el.runtime_dim(d))), (d,))
            else:
                return None
            if routes is None:
                node = el.call_function(ops.selective_scan, (u_f, dt_f, A, bm_f, cm_f, D), {"reverse": reverse})
            else:
                node = el.call_function(ops.multi_route_selective_scan, (u_f, dt_f, A, bm_f, cm_f, D, None, None),
                                        {"routes": routes, "weights": None})
            el.stats.append(("scan", s.states[0], node))
            calls[key] = node
        out[emit.name] = Tensor(calls[key], full_d)
    # the final state: removed as dead code unless the spec reads it after the scan
    decay = el.call_function(torch.exp, (el.call_function(operator.mul, (
        el.call_function(torch.unsqueeze, (dt_f, -1)), A)),))
    drive = el.call_function(operator.mul, (
        el.call_function(torch.unsqueeze, (el.call_function(operator.mul, (dt_f, u_f)), -1)),
        el.call_function(torch.unsqueeze, (bm_f, 2))))
    if perm is not None:
        decay, drive = (el.call_function(torch.index_select, (x, 1, perm)) for x in (decay, drive))
    states = el.call_function(linear_scan_nd, (decay, drive, h0), {"reverse": reverse})
    last = el.call_function(operator.getitem, (states, (slice(None), 0 if reverse else -1)))
    out[s.states[0]] = Tensor(last, h0.shape)
    return out


# ---------------------------------------------------------------- integrate-and-fire


class Spiking(NamedTuple):
    beta: Optional[ast.Expr]
    x: ast.Expr
    theta: ast.Expr
    reset: str
    spike: ast.Expr  # the spike expression the emits repeat
    height: Optional[ast.Expr]  # s = height * (u >= theta); None: s is the comparison (bool)
    outputs: list  # (emit, "spikes" | "state")


def match_spiking(expr: ast.Expr, emits: list, v: str) -> Optional[Spiking]:
    """`u = beta * v + x` (or `v + x`), `s = [k *] (u >= theta)`, `v = u - s` (k = theta) / `u - s * theta`
    (s the comparison) / `u * (1 - s)` (k = 1), emits of `s` or of the new `v`; everything but `v` in the
    update free of `v`. The comparison is `>=` only (what lif_scan computes)."""
    if not isinstance(expr, ast.BinOp):
        return None
    candidates: list[tuple[ast.Expr, ast.Expr, str]] = []  # (u, reset term, reset kind)
    if expr.op == "-":
        candidates.append((expr.left, expr.right, "subtract"))
    elif expr.op == "*":
        for p, q in factors(expr):
            if isinstance(q, ast.BinOp) and q.op == "-" and number_value(q.left) == 1.0:
                candidates.append((p, q.right, "zero"))
    for u, term, reset in candidates:
        integrate = match_integrate(u, v)
        if integrate is None:
            continue
        beta, x = integrate
        for spike, scale in spike_options(term, reset):
            parts = spike_parts(spike, u, v)
            if parts is None:
                continue
            theta, height = parts
            if reset == "zero" and number_value(height) != 1.0:
                continue  # `1 - s` with s the bool comparison fails in the step loop; other heights: not a reset
            if reset == "subtract" and not reset_amount_is(theta, height, scale):
                continue
            outputs = []
            for emit, e in emits:
                if same(e, spike):
                    outputs.append((emit, "spikes"))
                elif same(e, expr):
                    outputs.append((emit, "state"))
                else:
                    break
            else:
                return Spiking(beta, x, theta, reset, spike, height, outputs)
    return None


def match_integrate(e: ast.Expr, v: str) -> Optional[tuple[Optional[ast.Expr], ast.Expr]]:
    """`beta * v + x` forms (match_linear) or `v + x` / `x + v` → (beta or None, x)."""
    if not (isinstance(e, ast.BinOp) and e.op == "+"):
        return None
    for a, b in ((e.left, e.right), (e.right, e.left)):
        if isinstance(a, ast.Name) and a.id == v and not mentions(b, v):
            return None, b
    return match_linear(e, v)


def spike_options(term: ast.Expr, reset: str) -> list[tuple[ast.Expr, Optional[ast.Expr]]]:
    """The spike expression a reset term may contain: itself, or `s` of `s * m` / `m * s` (→ (s, m))."""
    options: list[tuple[ast.Expr, Optional[ast.Expr]]] = [(term, None)]
    if reset == "subtract":
        options += [(p, q) for p, q in factors(term)]
    return options


def spike_parts(e: ast.Expr, u: ast.Expr, v: str) -> Optional[tuple[ast.Expr, Optional[ast.Expr]]]:
    """`(u >= theta)` → (theta, None); `k * (u >= theta)` / `(u >= theta) * k` → (theta, k)."""
    theta = comparison(e, u)
    if theta is not None:
        return (theta, None) if not mentions(theta, v) else None
    for k, c in factors(e):
        theta = comparison(c, u)
        if theta is not None and not mentions(theta, v) and not mentions(k, v):
            return theta, k
    return None


def comparison(e: ast.Expr, u: ast.Expr) -> Optional[ast.Expr]:
    """theta of `u >= theta` or `theta <= u`."""
    if isinstance(e, ast.BinOp) and e.op == ">=" and same(e.left, u):
        return e.right
    if isinstance(e, ast.BinOp) and e.op == "<=" and same(e.right, u):
        return e.left
    return None


def reset_amount_is(theta: ast.Expr, height: Optional[ast.Expr], scale: Optional[ast.Expr]) -> bool:
    """Whether a subtract reset removes exactly theta per spike: height * scale == theta (None counts 1)."""
    present = [x for x in (height, scale) if x is not None and number_value(x) != 1.0]
    if len(present) == 0:
        return number_value(theta) == 1.0
    if len(present) == 1:
        target = present[0]
        return same(target, theta) or (number_value(target) is not None and number_value(target) == number_value(theta))
    return False


def lower_spiking(el: Elaborator, scope: Scope, seq: Tensor, v: str, v0: Tensor, prefix: str,
                  m: Spiking) -> Optional[dict[str, Tensor]]:
    """`lif.threshold_scan` over the whole sequence: channels flattened, a tensor threshold by scaling,
    no surrogate gradient (the step loop's comparison has none)."""
    if not step_safe(m.x, scope, ()):
        return None
    fixed = [e for e in (m.beta, m.theta, m.height) if e is not None]
    if not all(inlinable(e) and not any(isinstance(n, ast.Attribute) and n.attr == "t" for n in ast.walk(e))
               for e in fixed):
        return None
    x, theta, beta, height = evaluate(el, [m.x, m.theta, m.beta, m.height], scope, prefix)
    channels = tuple(v0.shape[1:])
    full = tuple(seq.shape[:2]) + channels

    def per_channel(value: Any) -> bool:  # a number or a tensor broadcasting against one step's channels
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        return isinstance(value, Tensor) and len(value.shape) <= len(channels) and all(
            a == 1 or dims_match(a, b) for a, b in zip(value.shape, channels[len(channels) - len(value.shape):]))

    if not (fits(x, full) and per_channel(theta) and (beta is None or per_channel(beta))
            and (height is None or per_channel(height))):
        return None
    x_f = broadcast_to(el, x, full, m.x)
    theta_arg = float(theta) if isinstance(theta, (int, float)) else theta
    beta_arg = 1.0 if beta is None else float(beta) if isinstance(beta, (int, float)) else beta
    node = el.call_function(lif.threshold_scan, (x_f, v0, theta_arg, beta_arg), {"reset": m.reset})
    spikes01, states = el.getitem(node, 0), el.getitem(node, 1)
    # the comparison (bool), times the height as the body computes it (same dtype promotion as the step loop)
    spikes = el.call_function(torch.ne, (spikes01, 0))
    if m.height is not None:
        spikes = el.call_function(operator.mul, (height, spikes))
    el.stats.append(("scan", v, node))
    last = el.call_function(operator.getitem, (states, (slice(None), -1)))
    out = {v: Tensor(last, v0.shape)}
    for emit, kind in m.outputs:
        out[emit.name] = Tensor(spikes if kind == "spikes" else states, full)
    return out


# ---------------------------------------------------------------- linear recurrence in a permuted order


def lower_routed_linear(el: Elaborator, scope: Scope, seq: Tensor, h0: Tensor, reverse: bool, prefix: str,
                        perm: Tensor, expr: ast.Expr, h: str, emits: list) -> Optional[dict[str, Tensor]]:
    """`h = a * h + b` with `order perm`: `multi_route_linear_scan` with the one route perm (R = 1): the
    gathers and scatters happen in the kernel's loads and stores."""
    linear = match_linear(expr, h)
    if linear is None or len(h0.shape) != 2 or h0.node.target is not runtime.zeros_batch:
        return None
    if not all(step_safe(e, scope, (h,)) for e in linear):
        return None
    full = tuple(seq.shape[:2]) + (h0.shape[1],)
    a_expr, b_expr = linear
    a, b = evaluate(el, [a_expr, b_expr], scope, prefix)
    a_f = broadcast_to(el, a, full, a_expr)
    b_f = broadcast_to(el, b, full, b_expr)
    node = el.call_function(ops.multi_route_linear_scan, (a_f, b_f, route_rows(el, perm, reverse)),
                            {"weights": None})
    el.stats.append(("scan", h, node))
    position = el.call_function(operator.getitem, (perm, slice(0, 1) if reverse else slice(-1, None)))
    last = el.call_function(torch.index_select, (node, 1, position))  # [B, 1, n] at the last position visited
    last = el.call_function(operator.getitem, (last, (slice(None), 0)))
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


class Leaky(NamedTuple):
    """A matched leaky-τ update (`match_leaky`)."""

    form: str  # "pre": h + (act(R + u) - h) / tau; "post": act((1 - 1/tau) * h + (R + u) / tau)
    act: str  # an activation of rnn.ACTIVATIONS
    slope: Optional[ast.Expr]  # leaky_relu's negative slope (None: its default 0.01)
    rec: ast.Expr  # the recurrent term R: a Linear layer expression L of `L(h)`, or the matrix M of `h @ M`
    matrix: bool  # R = h @ M (the recurrent weight is M^T), else R = L(h)
    u: ast.Expr  # the other terms of the sum, free of h (bias, input projection)
    tau: ast.Expr
    rec_first: bool  # R comes before u in the source (evaluation order: module names as in the step loop)


LEAKY_ACTIVATIONS = ("tanh", "relu", "sigmoid", "identity", "leaky_relu")


def activation_call(e: Any) -> Optional[tuple[str, Optional[ast.Expr], ast.Expr]]:
    """`act(x)`, `x -> act`, `leaky_relu(x, s)`, `leaky_relu(x, slope=s)`, `x -> leaky_relu(s)` → (act, slope, x)."""
    if isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and e.func.id in LEAKY_ACTIVATIONS:
        name, args, kwargs = e.func.id, e.args, e.kwargs
    elif isinstance(e, ast.Pipe) and isinstance(e.right, ast.Name) and e.right.id in LEAKY_ACTIVATIONS:
        name, args, kwargs = e.right.id, (e.left,), ()
    elif isinstance(e, ast.Pipe) and isinstance(e.right, ast.Call) and isinstance(e.right.func, ast.Name) \
            and e.right.func.id == "leaky_relu":
        name, args, kwargs = "leaky_relu", (e.left, *e.right.args), e.right.kwargs
    else:
        return None
    slopes = [k.value for k in kwargs if k.name == "slope"]
    if len(slopes) != len(kwargs) or len(args) + len(slopes) > (2 if name == "leaky_relu" else 1) or not args:
        return None
    slope = args[1] if len(args) == 2 else slopes[0] if slopes else None
    return name, slope, args[0]


def plus_terms(e: Any) -> list:
    """The terms of a sum `a + b + …` (any grouping)."""
    if isinstance(e, ast.BinOp) and e.op == "+":
        return plus_terms(e.left) + plus_terms(e.right)
    return [e]


def recurrent_term(e: ast.Expr, h: str) -> Optional[tuple[ast.Expr, bool]]:
    """`L(h)` / `h -> L` → (L, False); `h @ M` with M free of h → (M, True)."""
    layer = recurrent_layer(e, h)
    if layer is not None:
        return layer, False
    if isinstance(e, ast.BinOp) and e.op == "@" and isinstance(e.left, ast.Name) and e.left.id == h \
            and not mentions(e.right, h):
        return e.right, True
    return None


def split_recurrent(e: ast.Expr, h: str) -> Optional[tuple[ast.Expr, bool, ast.Expr, bool]]:
    """A sum with exactly one recurrent term (`recurrent_term`) and at least one other term, all free of h →
    (rec, matrix, the other terms summed in source order, rec_first)."""
    terms = plus_terms(e)
    found = [(i, r) for i, r in enumerate(recurrent_term(t, h) for t in terms) if r is not None]
    if len(found) != 1 or len(terms) < 2:
        return None
    i, (rec, matrix) = found[0]
    rest = terms[:i] + terms[i + 1:]
    if any(mentions(t, h) for t in rest):
        return None
    u = rest[0]
    for t in rest[1:]:
        u = ast.BinOp(op="+", left=u, right=t, span=u.span)
    return rec, matrix, u, i == 0


def is_one(e: Any) -> bool:
    return number_value(e) == 1.0


def match_leaky(e: ast.Expr, h: str) -> Optional[Leaky]:
    """The leaky-τ update in either form (R: `L(h)` or `h @ M`; u: one or more terms free of h, any order):
    pre   `h + (act(R + u) - h) / tau`
    post  `act((1 - 1 / tau) * h + (R + u) / tau)` (the same tau expression twice)."""
    if isinstance(e, ast.BinOp) and e.op == "+" and isinstance(e.left, ast.Name) and e.left.id == h:
        div = e.right
        if not (isinstance(div, ast.BinOp) and div.op == "/" and not mentions(div.right, h)):
            return None
        diff = div.left
        if not (isinstance(diff, ast.BinOp) and diff.op == "-" and isinstance(diff.right, ast.Name)
                and diff.right.id == h):
            return None
        act = activation_call(diff.left)
        if act is None:
            return None
        split = split_recurrent(act[2], h)
        if split is None:
            return None
        rec, matrix, u, rec_first = split
        return Leaky("pre", act[0], act[1], rec, matrix, u, div.right, rec_first)
    act = activation_call(e)
    if act is None or not (isinstance(act[2], ast.BinOp) and act[2].op == "+"):
        return None
    q = act[2]
    for leak, div in ((q.left, q.right), (q.right, q.left)):
        if not (isinstance(div, ast.BinOp) and div.op == "/" and not mentions(div.right, h)):
            continue
        tau = div.right
        for c1, state in factors(leak):
            if not (isinstance(state, ast.Name) and state.id == h):
                continue
            if not (isinstance(c1, ast.BinOp) and c1.op == "-" and is_one(c1.left)
                    and isinstance(c1.right, ast.BinOp) and c1.right.op == "/" and is_one(c1.right.left)
                    and same(c1.right.right, tau)):
                continue
            split = split_recurrent(div.left, h)
            if split is not None:
                rec, matrix, u, rec_first = split
                return Leaky("post", act[0], act[1], rec, matrix, u, tau, rec_first)
    return None


def without_linear_calls(e: Any, scope: Scope) -> Any:
    """`e` with each application of a Linear layer (`w(x)`, `x -> w` with `w` a Linear instance, or
    `Linear(a, b)(x)`) replaced by its argument: a Linear acts on the last axis, so it computes every step
    at once exactly when its argument does (`step_safe` then judges the rest)."""
    def is_linear(f: Any) -> bool:
        if isinstance(f, ast.Call) and isinstance(f.func, ast.Name) and f.func.id == "Linear":
            return True
        if isinstance(f, ast.Name):
            try:
                v = scope.lookup(f.id)
            except KeyError:
                return False
            return isinstance(v, Instance) and v.kind == "layer" and v.name == "Linear"
        return False

    if isinstance(e, ast.Call) and len(e.args) == 1 and not e.kwargs and is_linear(e.func):
        return without_linear_calls(e.args[0], scope)
    if isinstance(e, ast.Pipe) and is_linear(e.right):
        return without_linear_calls(e.left, scope)
    if isinstance(e, tuple):
        return tuple(without_linear_calls(x, scope) for x in e)
    if not isinstance(e, ast.Node):
        return e
    changes = {}
    for field in type(e).model_fields:
        value = getattr(e, field)
        if isinstance(value, (ast.Node, tuple)):
            new = without_linear_calls(value, scope)
            if new is not value:
                changes[field] = new
    return e.model_copy(update=changes) if changes else e


def leaky_step_safe(leaky: Leaky, scope: Scope, states: tuple) -> bool:
    """Whether u and tau compute every step at once on whole sequences (Linear layers allowed in u) and the
    matrix M reads no step (it is evaluated once, outside the loop)."""
    if leaky.matrix and any(isinstance(n, ast.Attribute) and n.attr == "t" for n in ast.walk(leaky.rec)):
        return False
    if leaky.matrix and (any(mentions(leaky.rec, st) for st in states) or not inlinable(leaky.rec)):
        return False
    return step_safe(without_linear_calls(leaky.u, scope), scope, states) and step_safe(leaky.tau, scope, states)


def recurrent_layer(e: ast.Expr, h: str) -> Optional[ast.Expr]:
    """`Linear(n, n)(h)`, `h -> Linear(n, n)` or `w(h)` → the layer expression."""
    if isinstance(e, ast.Call) and len(e.args) == 1 and isinstance(e.args[0], ast.Name) and e.args[0].id == h \
            and not mentions(e.func, h):
        return e.func
    if isinstance(e, ast.Pipe) and isinstance(e.left, ast.Name) and e.left.id == h and not mentions(e.right, h):
        return e.right
    return None


def lower_leaky(el: Elaborator, scope: Scope, seq: Tensor, h0: Tensor, prefix: str,
                leaky: Leaky) -> Optional[fx.Node]:
    """`ops.leaky_rnn_scan(u + bias, w_rec, tau, h0, activation=…, form=…)`; None (a step loop) when the
    recurrent term is not a Linear(n, n) / an [n, n] matrix or the slope is not a number."""
    sub = body_scope(scope, prefix)
    slope = 0.01
    if leaky.slope is not None:
        value = number_value(leaky.slope)
        if value is None and isinstance(leaky.slope, ast.Name):
            try:
                found = sub.lookup(leaky.slope.id)
            except KeyError:
                return None
            value = float(found) if isinstance(found, (int, float)) and not isinstance(found, bool) else None
        if value is None:
            return None
        slope = value
    n = h0.shape[-1]
    # evaluate in source order so that module names match the step-loop lowering
    rec = el.eval(leaky.rec, sub) if leaky.rec_first else None
    u = el.eval(leaky.u, sub)
    if rec is None:
        rec = el.eval(leaky.rec, sub)
    if rec is POISON or u is POISON:
        raise Abort()
    if leaky.matrix:
        if not (isinstance(rec, Tensor) and len(rec.shape) == 2 and all(dims_match(d, n) for d in rec.shape)):
            return None
    elif not (isinstance(rec, Instance) and rec.kind == "layer" and rec.name == "Linear"):
        return None
    elif rec.kwargs["in_features"] != n or rec.kwargs["out_features"] != n:
        el.error("R165", f"the recurrent layer must map the state to itself: Linear({n}, {n}), got "
                 f"Linear({rec.kwargs['in_features']}, {rec.kwargs['out_features']})", leaky.rec.span)
    full = seq.shape[:2] + (n,)
    u_t = broadcast_to(el, u, full, leaky.u)
    if leaky.matrix:
        weight = el.call_function(torch.transpose, (rec, 0, 1))  # h @ M = h @ w_rec.T
    else:
        assert isinstance(rec, Instance)
        weight = el._tag(el.root_graph().get_attr(f"{rec.path}.weight"))
        if rec.kwargs["bias"]:
            bias = el._tag(el.root_graph().get_attr(f"{rec.path}.bias"))
            u_t = Tensor(el.call_function(torch.add, (u_t, bias)), full)
    tau = el.eval(leaky.tau, sub)
    if tau is POISON:
        raise Abort()
    if isinstance(tau, (int, float)):
        tau = Tensor(el.call_function(_full_like_last, (u_t, float(tau))), (n,))
    if not isinstance(tau, Tensor):
        el.error("R165", f"`tau` must be a number or a tensor [{n}], got {el.describe(tau)}", leaky.tau.span)
    tau_n = Tensor(el.call_function(_per_neuron, (tau, n)), (n,))
    kwargs: dict[str, Any] = {"activation": leaky.act}
    if leaky.form != "pre":
        kwargs["form"] = leaky.form
    if leaky.act == "leaky_relu":
        kwargs["slope"] = slope
    return el.call_function(ops.leaky_rnn_scan, (u_t, weight, tau_n, h0), kwargs)


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
