"""From source files to a `RoutedModule`: loading `use`d files, choosing the model, binding parameters.

The stage functions here are the ones `compiler/pipeline.py` lists.
"""

from __future__ import annotations

import difflib
import keyword
import operator
import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.fx as fx

from .. import stdlib
from ..dsl import ast, parse, read_source
from ..dsl.diagnostics import Diagnostics, RouteError, Span
from .elaborate import POISON, Abort, Elaborator, Scope
from .layers import render_shape
from .module import RoutedModule
from .values import Callee, Dim, Tensor


def load_files(filename: str, text: str) -> tuple[dict[str, ast.Module], dict[str, str]]:
    """Parse `filename` and, transitively, every file it `use`s; cycles are errors (R100)."""
    modules: dict[str, ast.Module] = {}
    sources: dict[str, str] = {filename: text}
    diags = Diagnostics(sources)
    stack: list[str] = []

    def visit(name: str, source: str, used_at: Optional[Span]) -> None:
        on_stack = [os.path.normpath(p) for p in stack]  # `lib/../a.route` is `a.route`
        if os.path.normpath(name) in on_stack:
            chain = " → ".join(Path(p).name for p in stack[on_stack.index(os.path.normpath(name)):] + [name])
            assert used_at is not None
            diags.error("R100", f"`use` cycle: {chain}", used_at)
            return
        if name in modules:
            return
        sources[name] = source
        module = parse(source, name)
        modules[name] = module
        stack.append(name)
        for use in module.uses:
            target = resolve_use(use, name, diags)
            if target is None:
                continue
            try:
                text = read_source(target)
            except RouteError as err:
                diags.extend(err.diagnostics)
                continue
            try:
                visit(target, text, use.span)
            except RouteError as err:
                sources.update(err.sources)
                diags.extend(err.diagnostics)
        stack.pop()

    visit(filename, text, None)
    diags.sources.update(sources)
    if diags.errors:
        raise RouteError(diags.items, sources)
    return modules, sources


def resolve_use(use: ast.Use, importer: str, diags: Diagnostics) -> Optional[str]:
    if use.path is not None:
        candidate = Path(os.path.normpath(Path(importer).parent / use.path))
        if not candidate.is_file():
            diags.error("R100", f"`use` cannot find the file \"{use.path}\" (no file {candidate}; a path is "
                        "relative to the file that uses it)", use.span)
            return None
        return str(candidate)
    assert use.module is not None
    parts = use.module.split(".")
    if parts[0] == "stdlib" and len(parts) == 2:
        try:
            return str(stdlib.path(parts[1]))
        except KeyError:
            close = difflib.get_close_matches(parts[1], stdlib.available(), n=1)
            diags.error("R100", f"no stdlib spec named `{parts[1]}`", use.span,
                        help=f"did you mean `stdlib.{close[0]}`?" if close else None)
            return None
    candidate = Path(importer).parent / (Path(*parts).with_suffix(".route"))
    if candidate.is_file():
        return str(candidate)
    diags.error("R100", f"`use {use.module}`: no such spec (`stdlib.<name>` or a file next to this one)", use.span)
    return None


def file_scopes(el: Elaborator, modules: dict[str, ast.Module]) -> None:
    """The names each file sees: its own definitions and what it `use`s."""
    for name, module in modules.items():
        scope = Scope(prefix="")
        for d in module.definitions:
            scope.names[d.name] = Callee("block", d.name, d, origin=name)
        el.file_scopes[name] = scope
    for name, module in modules.items():
        scope = el.file_scopes[name]
        for use in module.uses:
            target = resolve_use(use, name, Diagnostics())
            if target is None or target not in modules:
                continue
            exported = {d.name: d for d in modules[target].definitions}
            if use.names is None:
                for dname, d in exported.items():
                    scope.names.setdefault(dname, Callee("block", dname, d, origin=target))
                continue
            for un in use.names:
                if un.name not in exported:
                    close = difflib.get_close_matches(un.name, list(exported), n=1)
                    el.diags.error("R100", f"`{Path(target).name}` defines no `{un.name}`", un.span,
                                   help=f"did you mean `{close[0]}`?" if close else None)
                    continue
                scope.names[un.alias or un.name] = Callee("block", un.name, exported[un.name], origin=target)


def choose_model(module: ast.Module, name: Optional[str], diags: Diagnostics) -> Optional[ast.Definition]:
    models = [d for d in module.definitions if d.kind == "model"]
    if name is not None:
        for d in module.definitions:
            if d.name == name:
                return d
        names = [d.name for d in module.definitions]
        close = difflib.get_close_matches(name, names, n=1)
        span = module.span
        diags.error("R108", f"no block or model named `{name}` in {Path(module.filename).name}", span,
                    help=f"did you mean `{close[0]}`?" if close else None)
        return None
    if not models:
        diags.error("R108", f"{Path(module.filename).name} defines no `model`", module.span,
                    help="add `model Name(…) { … }`, or pick a block with `model=`")
        return None
    return models[-1]


def elaborate(filename: str, text: str, params: dict[str, Any], model: Optional[str] = None) -> RoutedModule:
    modules, sources = load_files(filename, text)
    diags = Diagnostics(sources)
    el = Elaborator(modules, sources, diags)
    file_scopes(el, modules)
    main = modules[filename]
    d = choose_model(main, model, diags)
    if d is None or diags.errors:
        raise RouteError(diags.items, sources)
    scope = bind_model_params(el, d, params)
    if scope is not None:
        build_graph(el, d, scope)
    if diags.errors:
        raise RouteError(unique(diags.items), sources)
    return finish(el, d)


def unique(items: list) -> list:
    """The diagnostics without repeats (a `repeat` elaborates its body, and its mistakes, once per iteration)."""
    seen: set[str] = set()
    out = []
    for diag in items:
        key = diag.model_dump_json()
        if key not in seen:
            seen.add(key)
            out.append(diag)
    return out


def bind_model_params(el: Elaborator, d: ast.Definition, params: dict[str, Any]) -> Optional[Scope]:
    names = [p.name for p in d.params]
    for key in params:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            el.diags.error("R109", f"`{d.name}` has no parameter `{key}` (parameters: {', '.join(names) or 'none'})",
                           d.span, help=f"did you mean `{close[0]}`?" if close else None)
    if el.diags.errors:
        return None
    scope = Scope(prefix="", parent=el.file_scopes[d.span.file])
    for p in d.params:
        try:
            if p.name in params:
                value = coerce_param(el, d, p, params[p.name])
            elif p.default is not None:
                value = el.static(p.default, scope, f"the default of `{p.name}`")
            else:
                el.error("R109", f"model `{d.name}` needs a value for parameter `{p.name}`", p.span)
            scope.names[p.name] = el.check_param_type(d, p, value, p.span)
        except Abort:  # report every bad parameter; defaults that read this one stay quiet
            scope.names[p.name] = POISON
    return None if el.diags.errors else scope


def coerce_param(el: Elaborator, d: ast.Definition, p: ast.Param, value: Any) -> Any:
    """Command-line values arrive as strings: read them by the parameter's type; numpy and 0-d torch
    scalars (a sweep's `np.int64(64)`) count as the Python number they hold."""
    if not isinstance(value, (str, bool, int, float, list, tuple)) and callable(getattr(value, "item", None)):
        try:
            value = value.item()
        except (ValueError, RuntimeError, TypeError):  # not a scalar: reported by the type check
            pass
    if not isinstance(value, str) or p.type == "str":
        return value
    text = value.strip()
    try:
        if p.type == "int":
            return int(text)
        if p.type == "float":
            return float(text)
        if p.type == "bool":
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError(text)
        if p.type == "shape":
            return [int(x) for x in text.strip("[]()").split(",") if x.strip()]
    except ValueError:
        el.error("R113", f"parameter `{p.name}` of `{d.name}` must be {p.type}, got \"{value}\"", p.span)
    return value


def build_graph(el: Elaborator, d: ast.Definition, scope: Scope) -> None:
    graph = el.ctx.graph
    inputs: list[tuple[str, tuple, Optional[str]]] = []
    for stmt in d.body:
        if not isinstance(stmt, ast.InDecl):
            continue
        el.stmt_span, el.stmt_text = stmt.span, el.source_line(stmt.span)
        if any(name == stmt.name for name, _, _ in inputs):
            el.diags.error("R119", f"`in {stmt.name}` is declared twice", stmt.span)
            continue
        try:
            dims = tuple(el.dim_text(el.eval_dim(x, scope)) for x in stmt.shape)
        except Abort:
            scope.names[stmt.name] = POISON  # reported once: its uses stay quiet
            continue
        if stmt.dtype is not None and stmt.dtype not in ("float", "long", "int", "bool"):
            el.diags.error("R118", f"unknown input dtype `{stmt.dtype}` (float, long, bool)", stmt.span)
            scope.names[stmt.name] = POISON
            continue
        # the generated forward takes the inputs as arguments: a Python keyword gets a trailing `_`
        node = el._tag(graph.placeholder(f"{stmt.name}_" if keyword.iskeyword(stmt.name) else stmt.name))
        for axis, dim in enumerate(dims):
            if isinstance(dim, str) and dim not in el.ctx.dim_sources:
                el.ctx.dim_sources[dim] = (node, axis)
                scope.names.setdefault(dim, Dim(dim))
        scope.names[stmt.name] = Tensor(node, dims, "long" if stmt.dtype in ("long", "int") else "float")
        inputs.append((stmt.name, dims, stmt.dtype))
    if not inputs:
        if not any(isinstance(stmt, ast.InDecl) for stmt in d.body):  # (a bad `in` is reported already)
            el.diags.error("R119", f"`{d.name}` declares no `in` input", d.span)
        return
    el.inputs = inputs
    outs = el.run_body(d.body, scope)
    el.model_outs = outs
    el.model_scope = scope


def finish(el: Elaborator, d: ast.Definition) -> RoutedModule:
    graph = el.ctx.graph
    outs = [(n, v) for n, v in el.model_outs if v is not POISON]
    st = el.exit_state
    names: list[str] = []
    nodes: list[Any] = []
    exits: list[fx.Node] = []
    exit_names: list[str] = []
    if st is not None and st.heads:
        exits = [h.node for h in st.heads]
        exit_names = list(st.names)
        if outs:  # the model's `out` is the last exit: samples no exit took leave there
            final = outs[0][1]
            check_final_exit(el, d, final, st.classes)
            outs = outs[1:]
            position = len(st.heads)
            exits.append(final.node)
            exit_names.append("final")
            # in training `final` is the full batch; in eval it was computed on the survivors
            final_rows = final
        else:  # the last exit is the fallback: its survivors take its output
            position = len(st.heads) - 1
            final_rows = st.last_survivors
        el.register("exit_final", _final(position))
        node = el.call_module("exit_final", (final_rows, st.out, st.index, st.alive))
        names += ["out", "exit_index"]
        nodes += [el.getitem(node, 0), el.getitem(node, 1)]
    if el.time_exits:  # exit over a scan's time steps: the selected output and its step lead
        exit_name, selected, index, every = el.time_exits[0]
        names += ["out", "exit_index"]
        nodes += [selected.node, index]
        exits = [every.node]
        exit_names = [exit_name]
    if not outs and not nodes:
        el.diags.error("R117", f"`{d.name}` has no `out`", d.span)
        raise RouteError(el.diags.items, el.sources)
    for i, (name, value) in enumerate(outs):
        if isinstance(value, tuple):
            for j, v in enumerate(value):
                names.append(f"{name or 'out'}_{j}")
                nodes.append(v.node)
        else:
            names.append(name or ("out" if "out" not in names else f"out_{i}"))
            nodes.append(value.node)
    check_out_names(el, d, names, bool(exits), bool(el.aux_losses))
    aux = None
    if el.aux_losses:
        aux = el.aux_losses[0]
        for extra in el.aux_losses[1:]:
            aux = graph.call_function(operator.add, (aux, extra))
    scores = list(st.scores) if st is not None and any(x is not None for x in st.scores) else []
    graph.output((tuple(nodes), tuple(exits) + tuple(scores), aux))
    el.prune_exit_live()  # exits stop packing batch tensors nothing reads after them
    gm = fx.GraphModule(el.root, graph, class_name=d.name)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    for path, module in el.root.named_modules():
        if path and _missing(gm, path):
            _attach(gm, path, module)
        elif path and _stand_in(gm, path, module):
            owner, _, leaf = path.rpartition(".")
            gm.get_submodule(owner).add_module(leaf, module)
    for path, param in el.root.named_parameters():
        if _missing_param(gm, path):
            _attach_param(gm, path, param)
    gm.graph.lint()
    stats = [(kind, name, node.name) for kind, name, node in el.stats]  # node names: for `routec run`
    return RoutedModule(gm, d.name, names, exit_names, aux is not None, el.inputs, stats, el.sources,
                        n_scores=len(scores))


def check_final_exit(el: Elaborator, d: ast.Definition, final: Any, classes: Any) -> None:
    """With exits, the first `out` is the last exit: [B, C] logits with the exits' number of classes."""
    span = next((s.value.span for s in ast.walk(d) if isinstance(s, ast.Out)), d.span)
    if not isinstance(final, Tensor) or len(final.shape) != 2:
        got = render_shape(final.shape) if isinstance(final, Tensor) else el.describe(final)
        el.diags.error("R150", f"`{d.name}` has exits, so its `out` is the last exit: it must be [B, C] logits like "
                       f"the exits, got {got}", span)
    elif isinstance(classes, int) and isinstance(final.shape[1], int) and final.shape[1] != classes:
        el.diags.error("R153", f"all exits must produce the same number of classes: the exits give {classes}, "
                       f"the final `out` {final.shape[1]}", span)
    if el.diags.errors:
        raise RouteError(unique(el.diags.items), el.sources)


def check_out_names(el: Elaborator, d: ast.Definition, names: list[str], has_exits: bool, has_aux: bool) -> None:
    """Named outs become NamedTuple fields: unique, not a field routec adds, not a keyword or `_name`."""
    seen: set[str] = set()
    for name in names:
        span = next((s.span for s in reversed(list(ast.walk(d))) if isinstance(s, ast.Out) and s.name == name), d.span)
        if name in seen:
            el.diags.error("R117", f"the output `{name}` is declared twice", span)
        elif (name == "exits" and has_exits) or (name == "aux_loss" and has_aux):
            el.diags.error("R117", f"`out {name}` clashes with the `{name}` output routec adds to `{d.name}`", span,
                           help="rename the output")
        elif keyword.iskeyword(name) or name.startswith("_"):
            el.diags.error("R117", f"`{name}` cannot name an output (outputs are NamedTuple fields: no Python "
                           "keyword, no leading `_`)", span)
        seen.add(name)
    if el.diags.errors:
        raise RouteError(unique(el.diags.items), el.sources)


def _final(position: int):
    from ..codegen.runtime import ExitFinal

    return ExitFinal(position)


def _stand_in(gm: torch.nn.Module, path: str, module: torch.nn.Module) -> bool:
    """fx copied only some parameters of `module` (a `get_attr` of a layer's weight, as fused scans do) into
    a plain container at its path: the layer itself belongs there (same parameters, its own type)."""
    return type(gm.get_submodule(path)) is torch.nn.Module and type(module) is not torch.nn.Module


def _missing(gm: torch.nn.Module, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return False
    except AttributeError:
        return True


def _attach(gm: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent = gm
    parts = path.split(".")
    for part in parts[:-1]:
        if not hasattr(parent, part):
            parent.add_module(part, torch.nn.Module())
        parent = getattr(parent, part)
    if not hasattr(parent, parts[-1]):
        parent.add_module(parts[-1], module)


def _missing_param(gm: torch.nn.Module, path: str) -> bool:
    try:
        gm.get_parameter(path)
        return False
    except AttributeError:
        return True


def _attach_param(gm: torch.nn.Module, path: str, param: torch.nn.Parameter) -> None:
    owner_path, _, leaf = path.rpartition(".")
    if owner_path and _missing(gm, owner_path):
        _attach(gm, owner_path, torch.nn.Module())
    owner = gm.get_submodule(owner_path) if owner_path else gm
    owner.register_parameter(leaf, param)
