"""The `routec` command line: check, fmt, list, graph, compile, run.

Every error a user can cause is printed as a diagnostic (`file:line:col: error[CODE]: …`) and exits 1;
a Python traceback is a bug. Exit codes: 0 success, 1 errors in the input, 2 bad command-line usage.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence

from .. import stdlib
from ..dsl import RouteError, format_source, parse, read_source


def version() -> str:
    try:
        return metadata.version("routec")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def spec_path(spec: str) -> Path:
    if spec.startswith("stdlib:"):
        return stdlib.path(spec[len("stdlib:"):])
    return Path(spec)


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"routec: --param takes NAME=VALUE, got {item!r}")
        params[key.strip()] = value
    return params


def cmd_check(args: argparse.Namespace) -> int:
    """Parse and elaborate every file; report all of them (one file's errors do not hide the next)."""
    failed = 0
    params: dict[str, Any] = parse_params(args.param)
    for spec in args.files:
        try:
            path = spec_path(spec)
            text = read_source(path)
            notes = check_one(text, path, params, args.syntax_only)
        except RouteError as err:
            sys.stderr.write(err.render() + "\n")
            failed += len(err.diagnostics)
            continue
        print(f"{path}: ok" + (f" ({notes})" if notes else ""))
    if failed:
        sys.stderr.write(f"{failed} error{'s' if failed != 1 else ''}\n")
    return 1 if failed else 0


def check_one(text: str, path: Path, params: dict[str, Any], syntax_only: bool) -> str:
    """Elaborate the file's last model, or, in a file of blocks, each block whose parameters all have
    defaults (or are given with --param); say which blocks could not be elaborated."""
    module = parse(text, str(path))
    if syntax_only:
        return "syntax only"
    from . import compile_source

    # parameters are created on the meta device: a check allocates no weights, paper sizes included
    if any(d.kind == "model" for d in module.definitions):
        compile_source(text, str(path), device="meta", **params)
        return ""
    skipped = []
    for d in module.definitions:
        missing = [p.name for p in d.params if p.default is None and p.name not in params]
        if missing:
            skipped.append(f"{d.name} needs {', '.join(missing)}")
            continue
        compile_source(text, str(path), model=d.name, device="meta", **{k: v for k, v in params.items()
                                                          if k in {p.name for p in d.params}})
    return ("not elaborated: " + "; ".join(skipped)) if skipped else ""


def cmd_fmt(args: argparse.Namespace) -> int:
    changed = False
    for spec in args.files:
        path = spec_path(spec)
        text = read_source(path)
        out = format_source(text, str(path))
        if args.check:
            if out != text:
                print(f"{path}: would reformat")
                changed = True
        elif args.write:
            if out != text:
                path.write_text(out, encoding="utf-8")
                print(f"{path}: reformatted")
        else:
            sys.stdout.write(out)
    return 1 if changed else 0


def cmd_list(args: argparse.Namespace) -> int:
    names = stdlib.available()
    if not names:
        print("no stdlib specs installed")
        return 0
    width = max(len(n) for n in names)
    for name in names:
        path = stdlib.path(name)
        try:
            doc = parse(read_source(path), str(path)).doc or ""
        except RouteError:
            doc = "(does not parse: run `routec check stdlib:" + name + "`)"
        title = doc.strip().splitlines()[0] if doc.strip() else ""
        print(f"{name:<{width}}  {title}")
    return 0


def build(args: argparse.Namespace, fuse: Optional[bool] = None, graph_passes: bool = True):
    from . import load

    return load(spec_path(args.spec), model=args.model, fuse=fuse, graph_passes=graph_passes,
                **parse_params(args.param))


class RunError(Exception):
    """A failure of `routec run` that is the input's, reported as one message."""


def check_memory(args: argparse.Namespace) -> None:
    """Refuse to build a model whose parameters cannot fit (it is built on the meta device first)."""
    import torch

    from . import load

    meta = load(spec_path(args.spec), model=args.model, fuse=False, device="meta", **parse_params(args.param))
    need = sum(p.numel() * p.element_size() for p in meta.parameters())
    if args.device.startswith("cuda") and torch.cuda.is_available():
        free = torch.cuda.mem_get_info()[0]
    elif hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    else:
        return
    if need > 0.7 * free:
        raise RunError(f"{meta.spec_name} has {sum(p.numel() for p in meta.parameters()):,} parameters "
                       f"({need / 2**30:.1f} GiB), more than {args.device} has free ({free / 2**30:.1f} GiB); "
                       "pass smaller sizes with --param (see the spec's header for test sizes)")


def runtime_failure(net: Any, xs: list, err: Exception) -> str:
    """Which `.route` statement a run-time error came from: re-run the graph node by node."""
    import torch.fx as fx

    from .meta import ROUTE_SPAN

    failing: dict[str, Any] = {}

    class Finder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            try:
                return super().run_node(n)
            except Exception:
                failing.setdefault("span", n.meta.get(ROUTE_SPAN))
                raise

    try:
        Finder(net.graph_module).run(*xs)
    except Exception:  # the same failure, now located
        pass
    span = failing.get("span")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    message = f"the model failed at run time: {first}"
    if span is None:
        return f"routec: error[R900]: {message}"
    from ..dsl.diagnostics import Diagnostic, render_diagnostic

    return render_diagnostic(Diagnostic(code="R900", message=message, span=span), net.sources)


def random_inputs(module: Any, batch: int, length: int, device: str) -> list:
    import torch

    xs = []
    # one size per symbol across all inputs: the first input's leading symbol is the batch, others `length`
    first = module.inputs[0][1][0] if module.inputs and module.inputs[0][1] else None
    size_of = {first: batch} if isinstance(first, str) else {}
    for name, dims, dtype in module.inputs:
        sizes = []
        for d in dims:
            sizes.append(d if isinstance(d, int) else size_of.setdefault(d, length))
        if dtype in ("long", "int"):
            xs.append(torch.randint(0, 2, sizes, device=device))
        else:
            xs.append(torch.randn(sizes, device=device))
    return xs


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    check_memory(args)
    net = build(args, fuse=args.fuse).to(args.device)
    compile_s = time.perf_counter() - t0
    xs = random_inputs(net, args.batch, args.length, args.device)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"{net.spec_name}: {n_params:,} parameters, built in {compile_s * 1000:.0f} ms")
    for (name, dims, dtype), x in zip(net.inputs, xs):
        print(f"  in  {name}: {list(x.shape)} {dtype or 'float'}")
    net.eval()
    try:
        with torch.no_grad():
            net(*xs)
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        raise RunError(runtime_failure(net, xs, err)) from err
    with torch.no_grad():
        out = net(*xs)
        start = time.perf_counter()
        for _ in range(args.repeats):
            out = net(*xs)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        per = (time.perf_counter() - start) / max(args.repeats, 1)
    fields = out._asdict() if hasattr(out, "_asdict") else {"out": out}
    for name, value in fields.items():
        shape = list(value.shape) if hasattr(value, "shape") else value
        print(f"  out {name}: {shape}")
    if "exit_index" in fields:
        idx = fields["exit_index"]
        counts = torch.bincount(idx.cpu(), minlength=len(net.exit_names))
        rates = ", ".join(f"{n}={c / idx.numel():.0%}" for n, c in zip(net.exit_names, counts.tolist()))
        print(f"  exit rates: {rates}")
    for line in routing_statistics(net, xs):
        print("  " + line)
    print(f"  eval forward: {per * 1000:.2f} ms (batch {args.batch}, {args.device})")
    if args.stats:
        print_launches(args, xs)
    if args.train:
        net.train()
        opt = torch.optim.Adam(net.parameters(), lr=args.lr)
        first = None
        targets: list = []
        for step in range(args.steps):
            out = net(*xs)
            main = out[0] if isinstance(out, tuple) else out
            predictions = [main] + list(getattr(out, "exits", ()))
            if not targets:  # fixed random targets, one per output
                targets = [torch.randn_like(p) for p in predictions]
            loss = torch.stack([torch.nn.functional.mse_loss(p, t) for p, t in zip(predictions, targets)]).sum()
            if hasattr(out, "aux_loss"):
                loss = loss + 0.01 * out.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            first = loss.item() if first is None else first
            print(f"  train step {step + 1}: loss {loss.item():.4f}")
        print(f"  loss {first:.4f} → {loss.item():.4f}")
    return 0


def print_launches(args: argparse.Namespace, xs: list) -> None:
    """`run --stats`: kernel launches of one eval forward as elaborated, after the exact graph passes
    (batch_calls, multiroute) and after the elementwise fusion pass too (same weights)."""
    import torch

    from ..codegen.pointwise import fusable_inputs
    from .passes import count_elementwise, count_launches
    from .passes.batch_calls import MERGED as BATCHED
    from .passes.fusion import FUSED_KERNELS
    from .passes.multiroute import MERGED as MULTIROUTE
    from .passes.multiroute import count_calls as count_route_calls

    counts = []
    for graph_passes, fuse in ((False, False), (True, False), (True, True)):
        torch.manual_seed(args.seed)
        net = build(args, fuse=fuse, graph_passes=graph_passes).to(args.device).eval()
        torch.manual_seed(args.seed)
        counts.append((count_launches(net, xs), count_elementwise(net.graph),
                       len(net.graph_module.meta.get(FUSED_KERNELS, []))))
    (raw, _, _), (merged, before, _), (fused, after, regions) = counts
    print(f"  launches per forward: {raw} as elaborated, {merged} after the graph passes, {fused} fused "
          f"({regions} fused region{'s' if regions != 1 else ''}, elementwise nodes {before} → {after}; counted "
          f"with torch.profiler, see routec.compiler.passes.launches)")
    batched = net.graph_module.meta.get(BATCHED, [])
    if batched:
        print(f"  shared-module calls batched: {', '.join(f'{c} calls of {name}' for name, c in batched)} → one "
              f"call each (see routec.compiler.passes.batch_calls)")
    routes = net.graph_module.meta.get(MULTIROUTE, [])
    if routes:
        now = count_route_calls(net.graph)
        print(f"  multi-route scans: {sum(c for c, _ in routes) - len(routes) + now} calls → {now} launch"
              f"{'es' if now != 1 else ''} (merged: {', '.join(f'{c} calls of {r} routes' for c, r in routes)}; "
              f"see routec.compiler.passes.multiroute)")
    floats = [x for x in xs if x.is_floating_point()]
    if not fusable_inputs(*(floats or [torch.zeros(1, device=args.device)])):
        print("  (fused regions ran their PyTorch reference here: use --device cuda, or set ROUTEC_BACKEND=triton "
              "with TRITON_INTERPRET=1, to run the generated kernels)")


def routing_statistics(net: Any, xs: list) -> list[str]:
    """What the gates decided on these inputs: expert (or branch) load for choosing gates, mean weight
    per choice for soft gates and path gates; scans are listed by name. Runs the graph once more with an
    fx Interpreter that keeps the routing nodes' values."""
    import torch
    import torch.fx as fx

    from ..codegen.runtime import BranchRoute

    wanted = {node_name: (kind, name) for kind, name, node_name in net.routing}
    seen: dict[str, Any] = {}
    dropped: list[str] = []  # capacity-bounded branch routes: rows over a branch's capacity

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            if n.name in wanted:
                seen[n.name] = value
            if n.op == "call_module":
                module = self.fetch_attr(str(n.target))
                if isinstance(module, BranchRoute) and module.capacity_factor > 0:
                    dropped.append(capacity_drops(str(n.target), module, self.env[n.args[2]]))  # type: ignore[index]
            return value

    with torch.no_grad():
        Recorder(net.graph_module).run(*xs)
    lines = []
    for node_name, (kind, name) in wanted.items():
        value = seen.get(node_name)
        if kind == "scan" or not isinstance(value, torch.Tensor):
            lines.append(f"{kind} {name}")
        elif not value.is_floating_point():  # chosen indices: load per choice
            counts = torch.bincount(value.flatten().cpu())
            share = counts.float() / max(value.numel(), 1)
            lines.append(f"{kind} {name} load: " + " ".join(f"{p:.0%}" for p in share.tolist()))
        else:  # weights per choice
            mean = value.detach().float().reshape(-1, value.shape[-1]).mean(0)
            lines.append(f"{kind} {name} mean weights: " + " ".join(f"{w:.2f}" for w in mean.tolist()))
    return lines + dropped


def capacity_drops(name: str, route: Any, indices: Any) -> str:
    """`route <name> capacity C: dropped …`: the rows each branch of a capacity-bounded route did not run
    (chosen beyond the branch's capacity; they contribute 0)."""
    import torch

    idx = indices.reshape(-1, indices.shape[-1])  # [N, k]
    rows = idx.shape[0]
    cap = route.capacity(rows, idx.shape[-1])
    chosen = torch.stack([(idx == p).any(-1).sum() for p in range(len(route.branches))])  # [P]
    over = (chosen - cap).clamp(min=0).tolist()
    return (f"route {name} capacity {cap} rows/branch: dropped {sum(over)} of {rows} rows ("
            + " ".join(str(o) for o in over) + " per branch)")


def cmd_compile(args: argparse.Namespace) -> int:
    """`-o out.py` alone writes the standalone module (stage `emit`); `--dump-after STAGE` prints a stage
    (to `-o` if given); with neither, the generated forward code is printed."""
    from .pipeline import dump

    stage = args.dump_after or ("emit" if args.output else "code")
    # `fuse` always runs the pass; the standalone module (`emit`, which carries the generated kernels) fuses
    # when the kernels will run as Triton (as `load` does); the other stages show the unfused graph.
    net = build(args, fuse={"fuse": True, "emit": None}.get(stage, False))
    text = dump(net, stage, spec_path(args.spec), parse_params(args.param))
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    from .graph import render

    net = build(args)
    return render(net, args.output)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="routec", description="A compiler for routed neural networks.")
    p.add_argument("--version", action="version", version=f"routec {version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("check", help="parse and check specs (exit 1 on errors)")
    c.add_argument("files", nargs="+", metavar="FILE", help="a .route file or stdlib:<name>")
    c.add_argument("--syntax-only", action="store_true", help="only parse, do not elaborate models")
    c.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a model parameter")
    c.set_defaults(func=cmd_check)

    f = sub.add_parser("fmt", help="print specs in canonical form")
    f.add_argument("files", nargs="+", metavar="FILE")
    g = f.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="rewrite the files in place")
    g.add_argument("--check", action="store_true", help="exit 1 if a file is not formatted")
    f.set_defaults(func=cmd_fmt)

    ls = sub.add_parser("list", help="list the stdlib specs with their papers")
    ls.set_defaults(func=cmd_list)

    def spec_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("spec", metavar="SPEC", help="a .route file or stdlib:<name>")
        q.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a model parameter")
        q.add_argument("--model", default=None, help="the model or block to build (default: the last model)")

    r = sub.add_parser("run", help="build a spec, run it on random inputs, print shapes, routing and timing")
    spec_args(r)
    r.add_argument("--batch", type=int, default=4)
    r.add_argument("--length", type=int, default=16, help="size of the other symbolic dimensions")
    r.add_argument("--device", default="cpu", help="cpu or cuda")
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--train", action="store_true", help="also run a few optimizer steps on random targets")
    r.add_argument("--steps", type=int, default=5)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                   help="run the elementwise fusion pass (default: when kernels run as Triton)")
    r.add_argument("--stats", action="store_true",
                   help="also print kernel launches per forward without and with fusion")
    r.set_defaults(func=cmd_run)

    co = sub.add_parser("compile", help="write a standalone Python module (-o out.py), or print a stage")
    spec_args(co)
    co.add_argument("-o", "--output", help="write the standalone module (or the --dump-after stage) to this file")
    co.add_argument("--dump-after", metavar="STAGE", help="print the result of a stage (see `routec compile "
                    "--dump-after list`)")
    co.set_defaults(func=cmd_compile)

    gr = sub.add_parser("graph", help="draw the routed graph (DOT; SVG/PNG through Graphviz `dot`)")
    spec_args(gr)
    gr.add_argument("-o", "--output", required=True, help="g.dot, g.svg or g.png")
    gr.set_defaults(func=cmd_graph)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not getattr(args, "command", None):
        p.print_help()
        return 2
    try:
        return args.func(args)
    except RouteError as err:
        sys.stderr.write(err.render() + "\n")
        n = len(err.diagnostics)
        sys.stderr.write(f"{n} error{'s' if n != 1 else ''}\n")
        return 1
    except KeyError as err:  # unknown stdlib name
        sys.stderr.write(f"routec: {err.args[0]}\n")
        return 1
    except OSError as err:
        sys.stderr.write(f"routec: {err}\n")
        return 1
    except RunError as err:
        sys.stderr.write(f"{err}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a bug in routec, not in the input: one line, no traceback (ROUTEC_DEBUG=1 shows it)
        if os.environ.get("ROUTEC_DEBUG") == "1":
            raise
        sys.stderr.write(f"routec: internal error ({type(err).__name__}: {err}); rerun with ROUTEC_DEBUG=1 for "
                         "the traceback and please report it\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
