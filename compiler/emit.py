"""`routec compile SPEC -o out.py`: a standalone Python module that rebuilds a compiled network.

The file holds one `nn.Module` class for the compiled model:

* `__init__` repeats every constructor call the compiler made, with literal arguments, at the module's spec
  path (the `Ctor` records of `routec.codegen.ctor`), so `state_dict` keys are those of `load(...)`;
  containers are `nn.Module`s (`nn.ModuleList`s for `repeat`), `param`s are `nn.Parameter`s.
* `graph` is the fx graph's Python code; `forward` wraps its results in the same NamedTuples as
  `RoutedModule` (train and eval).
* Nested graphs (the branches of a `route … to { … }`, the step of a `scan`) become helper classes whose
  modules are the model's own (shared, as in the compiled model).
* A fused graph's generated kernel modules (`compiler.passes.kernelgen`) are embedded, their names prefixed
  per region, each registered once per process.

It imports torch, triton (for fused kernels) and `routec.codegen` only (DESIGN §1): every function a graph
calls lives there.
"""

from __future__ import annotations

import ast
import keyword
import math
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.fx as fx
from torch import nn

from ..codegen import ops
from ..codegen.ctor import ctor_of

# fx's python code refers to these globals by name; the file defines or imports each one it uses.
_FX_GLOBALS = {
    "inf": "from math import inf",
    "nan": "from math import nan",
    "NoneType": "NoneType = type(None)",
    "device": "from torch import device",
}


class EmitError(Exception):
    """The compiled module holds something the emitter cannot write as source (a bug to report)."""


def emit_module(net: Any, spec_path: Any, params: Optional[dict] = None) -> str:
    """The source of a standalone module rebuilding `net` (a `RoutedModule` compiled from `spec_path`)."""
    return _Emitter(net).module_source(str(spec_path), params or {})


def _identifier(text: str) -> str:
    name = re.sub(r"\W", "_", text)
    return f"_{name}" if not name or name[0].isdigit() or keyword.iskeyword(name) else name


def _indent(text: str, n: int = 4) -> str:
    return "\n".join((" " * n + line) if line.strip() else "" for line in text.splitlines())


class _Emitter:
    def __init__(self, net: Any) -> None:
        self.net = net
        self.name = _identifier(net.spec_name)
        self.imports: set[str] = {"import torch", "from torch import nn"}
        self.codegen: set[str] = set()  # routec.codegen submodules the file uses
        self.paths: dict[int, str] = {}  # id of a module or tensor → its canonical path in the model
        self.lists: set[str] = set()  # container paths written as nn.ModuleList
        self.helpers: list[str] = []
        self.helper_names: dict[int, str] = {}
        self.kernels: dict[str, str] = {}  # fused op name → its embedded generated module

    # ------------------------------------------------------------------ naming

    def expr(self, path: str, base: str = "self", lists: Optional[set[str]] = None) -> str:
        """Python for the module at `path` below `base`: `self.layers[0].mixer`, `getattr(self.p, "x-y")`.
        `lists`: the paths that are `nn.ModuleList`s below `base` (default: the model's)."""
        lists = self.lists if lists is None else lists
        out, prefix = base, ""
        for part in path.split(".") if path else []:
            if prefix in lists:
                out = f"{out}[{part}]"
            elif part.isidentifier() and not keyword.iskeyword(part):
                out = f"{out}.{part}"
            else:
                out = f"getattr({out}, {part!r})"
            prefix = f"{prefix}.{part}" if prefix else part
        return out

    def assign(self, owner: str, name: str, value: str, base: str = "self",
               lists: Optional[set[str]] = None) -> str:
        target = self.expr(owner, base, lists)
        if name.isidentifier() and not keyword.iskeyword(name):
            return f"{target}.{name} = {value}"
        return f"{target}.add_module({name!r}, {value})"

    def ref(self, obj: Any) -> str:
        """An importable name for a class or function, adding its import."""
        name = getattr(obj, "__name__", "")
        if name and getattr(torch.Tensor, name, None) is obj:  # a tensor method, e.g. detach
            return f"torch.Tensor.{name}"
        module, qual = getattr(obj, "__module__", None) or "", getattr(obj, "__qualname__", "")
        if "<" in qual or not module:
            raise EmitError(f"cannot name {obj!r} in the emitted file")
        name = getattr(obj, "__name__", qual)
        if module.startswith("routec.codegen"):
            if getattr(ops, name, None) is obj:
                self.codegen.add("ops")
                return f"ops.{name}"
            sub = module.split(".")[2] if module.count(".") >= 2 else None
            if sub is None:
                raise EmitError(f"cannot name {obj!r} in the emitted file")
            self.codegen.add(sub)
            return f"{sub}.{qual}"
        if module.startswith("torch"):
            if isinstance(obj, type) and issubclass(obj, nn.Module) and getattr(nn, name, None) is obj:
                return f"nn.{name}"
            return _torch_name(obj, module, qual)
        if module in ("math", "operator", "_operator", "builtins"):
            module = "operator" if module == "_operator" else module
            if module != "builtins":
                self.imports.add(f"import {module}")
                return f"{module}.{qual}"
            return qual
        raise EmitError(f"{module}.{qual} is not importable from torch or routec.codegen; the emitted file "
                        f"imports nothing else (move it to routec.codegen)")

    # ------------------------------------------------------------------ values

    def literal(self, value: Any, owner: str, role: str) -> str:
        """Python source for a constructor argument."""
        if value is None or isinstance(value, (bool, int, str)):
            return repr(value)
        if isinstance(value, float):
            if math.isnan(value):
                return 'float("nan")'
            if math.isinf(value):
                return 'float("inf")' if value > 0 else 'float("-inf")'
            return repr(value)
        if isinstance(value, fx.GraphModule):
            return f"{self.helper(value, owner, role)}(self)"
        if isinstance(value, (list, tuple)):
            items = [self.literal(v, owner, f"{role}{i}" if isinstance(v, fx.GraphModule) else role)
                     for i, v in enumerate(value)]
            if isinstance(value, list):
                return f"[{', '.join(items)}]"
            return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{self.literal(k, owner, role)}: {self.literal(v, owner, role)}"
                                   for k, v in value.items()) + "}"
        if isinstance(value, torch.dtype):
            return str(value)
        if isinstance(value, torch.device):
            return f"torch.device({str(value)!r})"
        if isinstance(value, nn.Module) and id(value) in self.paths:
            return self.expr(self.paths[id(value)])
        if isinstance(value, type) or callable(value):
            return self.ref(value)
        raise EmitError(f"cannot write the argument {value!r} of `{owner}` as a literal")

    def tensor_value(self, t: torch.Tensor) -> tuple[str, Optional[str]]:
        """Source for a parameter's initial value, and a comment when only its shape is written.

        A constant is written as such; other values (random or computed initialisations) are not copied into
        the file, which stays the same for the same spec: they come with the compiled model's state_dict."""
        shape = tuple(t.shape)
        dtype = "" if t.dtype == torch.float32 else f", dtype={t.dtype}"
        flat = t.detach().reshape(-1)
        if not t.is_meta and flat.numel() and bool((flat == flat[0]).all()) and t.dtype.is_floating_point:
            return f"torch.full({shape!r}, {self.literal(float(flat[0]), '', '')}{dtype})", None
        return f"torch.zeros({shape!r}{dtype})", "the compiled model's values come with its state_dict"

    # ------------------------------------------------------------------ the module tree

    def walk(self, module: nn.Module, path: str = "") -> Iterator[tuple[str, str, Any]]:
        """(owner path, name, child) for every module and tensor below `module`, parents first."""
        for name, p in module._parameters.items():
            if p is not None:
                yield path, name, p
        for name, b in module._buffers.items():
            if b is not None:
                yield path, name, b
        for name, child in module._modules.items():
            if child is not None:
                yield path, name, child

    def init_lines(self) -> list[str]:
        lines: list[str] = []
        deferred: list[tuple[str, str, nn.Module]] = []
        self._tree(self.net, "", lines, deferred, built=False)
        for owner, name, module in self._order(deferred):
            lines.append(self.assign(owner, name, self.construct(module, f"{owner}.{name}" if owner else name)))
        return lines

    def _tree(self, module: nn.Module, path: str, lines: list[str], deferred: list, built: bool) -> None:
        """Assign canonical paths below `module`; unless `built` (made by a recorded constructor), also
        write what creates each child."""
        for owner, name, child in self.walk(module, path):
            child_path = f"{owner}.{name}" if owner else name
            if isinstance(child, fx.GraphModule):
                continue  # a nested graph: written as a helper class, its modules are the model's
            if id(child) in self.paths:
                if not built:
                    value = self.expr(self.paths[id(child)])
                    if isinstance(child, torch.Tensor) and not isinstance(child, nn.Parameter):
                        lines.append(f"{self.expr(owner)}.register_buffer({name!r}, {value})")
                    else:
                        lines.append(self.assign(owner, name, value))
                continue
            self.paths[id(child)] = child_path
            if built:
                if isinstance(child, nn.Module):
                    self._tree(child, child_path, lines, deferred, built=True)
                continue
            if isinstance(child, nn.Parameter) and ctor_of(child) is not None:  # a spec `param` initialiser
                grad = "" if child.requires_grad else ", requires_grad=False"
                lines.append(self.assign(owner, name, f"nn.Parameter({self.construct(child, child_path)}{grad})"))
            elif isinstance(child, nn.Parameter):
                value, note = self.tensor_value(child)
                grad = "" if child.requires_grad else ", requires_grad=False"
                lines.append(self.assign(owner, name, f"nn.Parameter({value}{grad})")
                             + (f"  # {note}" if note else ""))
            elif isinstance(child, torch.Tensor):
                value, note = self.tensor_value(child)
                lines.append(f"{self.expr(owner)}.register_buffer({name!r}, {value})" + (f"  # {note}" if note else ""))
            elif isinstance(child, nn.Module) and ctor_of(child) is not None:
                if _graph_modules(ctor_of(child)):
                    deferred.append((owner, name, child))
                else:
                    lines.append(self.assign(owner, name, self.construct(child, child_path)))
                self._tree(child, child_path, lines, deferred, built=True)
            elif type(child) is nn.Module:
                keys = list(child._modules)
                if keys and keys == [str(i) for i in range(len(keys))] and not child._parameters \
                        and not child._buffers and all(type(m) is nn.Module for m in child._modules.values()):
                    self.lists.add(child_path)
                    lines.append(self.assign(owner, name, f"nn.ModuleList(nn.Module() for _ in range({len(keys)}))"))
                    for key, item in child._modules.items():
                        assert item is not None
                        self.paths[id(item)] = f"{child_path}.{key}"
                        self._tree(item, f"{child_path}.{key}", lines, deferred, built=False)
                else:
                    lines.append(self.assign(owner, name, "nn.Module()"))
                    self._tree(child, child_path, lines, deferred, built=False)
            else:
                raise EmitError(f"`{child_path}` is a {type(child).__name__} built without a constructor record "
                                f"(build it with routec.codegen.ctor.construct or mark its class @recorded)")

    def _order(self, deferred: list) -> list:
        """Deferred constructors (those taking nested graphs) after the ones their graphs use."""
        ids = {id(m) for _, _, m in deferred}
        done: set[int] = set()
        out = []
        pending = list(deferred)
        while pending:
            for item in pending:
                needs = {id(m) for m in _graph_modules(ctor_of(item[2])) if id(m) in ids} - done
                if not needs:
                    out.append(item)
                    done.add(id(item[2]))
                    pending.remove(item)
                    break
            else:
                raise EmitError("nested graphs use each other in a cycle")
        return out

    def construct(self, module: Any, path: str) -> str:
        ctor = ctor_of(module)
        assert ctor is not None
        role = "step" if len(_graph_modules(ctor)) == 1 else "branch"
        args = [self.literal(a, path, role) for a in ctor.args]
        args += [f"{k}={self.literal(v, path, role)}" for k, v in ctor.kwargs.items()]
        call = f"{self.ref(ctor.cls)}({', '.join(args)})"
        if len(call) <= 80:
            return call
        return f"{self.ref(ctor.cls)}(\n" + "".join(f"    {a},\n" for a in args) + ")"

    # ------------------------------------------------------------------ graphs

    def graph_code(self, gm: fx.GraphModule, method: str) -> tuple[str, list[str]]:
        """The graph as a method named `method` (source, indented for a class body) and its inputs."""
        for node in gm.graph.nodes:
            if node.op == "call_function" and str(getattr(node.target, "namespace", "")) == "routec_fused":
                self.fused_region(str(node.target).split(".")[1])
        code = gm.graph.python_code(root_module="self")
        src = code.src.strip("\n")
        for name, obj in code.globals.items():
            if not re.search(rf"\b{re.escape(name)}\b", src) or name in ("torch",):
                continue
            if name in _FX_GLOBALS:
                self.imports.add(_FX_GLOBALS[name])
                continue
            src = re.sub(rf"\b{re.escape(name)}\b", self.ref(obj), src)
        header = re.match(r"def forward\(self(?:, )?(.*?)\):", src)
        if header is None:
            raise EmitError("unexpected fx code header")
        inputs = [a.split(":")[0].split("=")[0].strip() for a in header.group(1).split(",") if a.strip()]
        src = f"def {method}(" + src[len("def forward("):]
        src = "\n".join(line.rstrip() for line in src.splitlines() if line.strip())
        return _indent(src), inputs

    def helper(self, gm: fx.GraphModule, owner: str, role: str) -> str:
        """A helper class running nested graph `gm` on the model's modules (`root`); returns its name."""
        if id(gm) in self.helper_names:
            return self.helper_names[id(gm)]
        name = _identifier(f"_{self.name}_{owner}_{role}")
        self.helper_names[id(gm)] = name
        lines: list[str] = []
        self._shared_tree(gm, "", lines)
        body, _ = self.graph_code(gm, "forward")
        what = (f"The step of the scan `{owner}`" if role == "step"
                else f"Branch {role[len('branch'):]} of the route `{owner}`, run on the rows that chose it")
        init = "\n".join(["def __init__(self, root: nn.Module):", "    super().__init__()"]
                         + [_indent(line) for line in lines])
        self.helpers.append(
            f"class {name}(nn.Module):\n"
            f'    """{what}.\n\n    Its modules are the model\'s own (`root`), shared.\n    """\n\n'
            f"{_indent(init)}\n\n{body}\n"
        )
        return name

    def _shared_tree(self, module: nn.Module, path: str, lines: list[str]) -> None:
        """The helper's module tree: plain containers, and the model's modules at their paths."""
        for owner, name, child in self.walk(module, path):
            target = self.assign(owner, name, "{}", lists=set())  # the helper's containers are plain
            if id(child) in self.paths:
                lines.append(target.format(self.expr(self.paths[id(child)], "root")))
            elif type(child) is nn.Module:
                lines.append(target.format("nn.Module()"))
                self._shared_tree(child, f"{owner}.{name}" if owner else name, lines)
            else:
                raise EmitError(f"a nested graph holds `{name}` ({type(child).__name__}), which the model lacks")

    def fused_region(self, op: str) -> None:
        """Embed the generated module of the fused region `routec_fused::<op>` (kernels, launchers, custom op).

        Its top-level names get the prefix `_<op>_` so that regions do not collide, its imports join the
        file's, and it is registered only when this process has not registered the op already (the op
        registry is global; the compiler may have loaded the same region)."""
        if op in self.kernels:
            return
        module = sys.modules.get(f"routec_fused_{op[len('r_'):]}")
        path = getattr(module, "__file__", None)
        if module is None or path is None or getattr(module, "OP", None) != f"routec_fused::{op}":
            raise EmitError(f"the generated module of the fused op routec_fused::{op} is not loaded")
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
        body = list(tree.body)
        doc = ""
        first = body[0] if body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                and isinstance(first.value.value, str):
            doc = first.value.value
            body.pop(0)
        defined: set[str] = set()
        kept = []
        for stmt in body:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in stmt.names] if isinstance(stmt, ast.Import) else [stmt.module or ""]
                for name in names:
                    if not (name.split(".")[0] in ("torch", "triton", "math", "typing", "__future__")
                            or name.startswith("routec.codegen")):
                        raise EmitError(f"the fused region {op} imports {name}")
                self.imports.add(ast.unparse(stmt))
                continue
            if isinstance(stmt, (ast.FunctionDef, ast.ClassDef)):
                defined.add(stmt.name)
            elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                defined.update(t.id for t in targets if isinstance(t, ast.Name))
            kept.append(stmt)
        prefix = f"_{op}_"
        for node in ast.walk(ast.Module(body=kept, type_ignores=[])):
            if isinstance(node, ast.arg) and node.arg in defined:
                raise EmitError(f"the fused region {op} uses `{node.arg}` both as a global and an argument")
            if isinstance(node, ast.Name) and node.id in defined:
                node.id = prefix + node.id
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in defined:
                node.name = prefix + node.name
        code = "\n\n".join(ast.unparse(stmt) for stmt in kept)
        comment = "\n".join(f"# {line}".rstrip() for line in doc.strip().splitlines())
        self.kernels[op] = (f"{comment}\nif not hasattr(torch.ops.routec_fused, {op!r}):  # once per process\n"
                            f"{_indent(code)}")

    # ------------------------------------------------------------------ the file

    def module_source(self, spec: str, params: dict) -> str:
        from .cli import version

        net = self.net
        init = self.init_lines()
        graph, inputs = self.graph_code(net.graph_module, "graph")
        eval_type, train_type = net._eval_type, net._train_type
        types = []
        for t in (eval_type, train_type):
            if t is not None:
                self.imports.add("from collections import namedtuple")
                types.append(f"{t.__name__} = namedtuple({t.__name__!r}, {list(t._fields)!r})")
        outs = [f"outs[{i}]" for i in range(len(net.out_names))]
        train = [o for o, n in zip(outs, net.out_names) if n != "exit_index"]
        n_exits = len(net.exit_names)
        train += [f"tuple(exits[:{n_exits}])"] if net.exit_names else []
        train += [f"tuple(exits[{n_exits}:])"] if getattr(net, "n_scores", 0) else []
        evals = list(outs)
        if net.has_aux:
            train.append("aux_loss")
            evals.append("aux_loss")

        def result(t: Any, values: list[str]) -> str:
            return values[0] if t is None else f"{t.__name__}({', '.join(values)})"

        args = ", ".join(inputs)
        unpack = f"outs, exits, aux_loss = self.graph({args})"
        forward = [f"def forward(self, {args}):", f"    {unpack}", "    if self.training:",
                   f"        return {result(train_type, train)}", f"    return {result(eval_type, evals)}"]
        described = "\n".join(
            f"    {n}: [{', '.join(str(d) for d in dims)}]{' ' + dt if dt else ''}" for n, dims, dt in net.inputs)
        setting = ", ".join(f"{k}={v}" for k, v in params.items())
        outputs = "a tensor" if eval_type is None else f"{eval_type.__name__} (eval)"
        if train_type is not None:
            outputs += f", {train_type.__name__} (training)"
        needs = "torch, triton and routec.codegen" if self.kernels else "torch and routec.codegen"
        doc = (
            f'"""`{net.spec_name}` from {Path(spec).name}'
            + (f" ({setting})" if setting else "") + f", written by routec {version()} (`routec compile`).\n\n"
            f"A standalone rebuild of the compiled network: the same modules at the same paths (so the compiled\n"
            f"module's state_dict loads), the same graph, the same outputs. Needs {needs} only.\n\n"
            f"Inputs:\n{described}\n"
            f"Output: {outputs}.\n"
            f'"""'
        )
        self.codegen.add("ops")  # registers the routec:: custom ops the graph may call
        imports = sorted(i for i in self.imports if i.startswith("import "))
        froms = sorted(i for i in self.imports if i.startswith("from "))
        defs = sorted(i for i in self.imports if not i.startswith(("import ", "from ")))
        codegen = f"from routec.codegen import {', '.join(sorted(self.codegen))}  # noqa: F401"
        cls = (
            f"class {self.name}(nn.Module):\n"
            f'    """The compiled `{net.spec_name}`: modules at their spec paths, `graph` from the fx graph."""\n\n'
            + _indent("\n".join(["def __init__(self):", "    super().__init__()"] + [_indent(x) for x in init]))
            + "\n\n" + graph + "\n\n" + _indent("\n".join(forward)) + "\n"
        )
        parts = [doc, "\n".join(imports + froms + ["", codegen]
                                + ([""] + defs if defs else []))]
        if types:
            parts.append("\n".join(types))
        parts += list(self.kernels.values()) + self.helpers + [cls]
        return "\n\n\n".join(p.rstrip("\n") for p in parts) + "\n"


def _flat(args: tuple, kwargs: dict) -> Iterator[Any]:
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, (list, tuple)):
            yield from v
        else:
            yield v


def _graph_modules(ctor: Any) -> list[fx.GraphModule]:
    """The nested graphs among a constructor's arguments (route branches, a scan step)."""
    return [v for v in _flat(ctor.args, ctor.kwargs) if isinstance(v, fx.GraphModule)]


def _torch_name(obj: Any, module: str, qual: str) -> str:
    """`torch.…` spelling of a torch object, checked to resolve to the same object."""
    name = getattr(obj, "__name__", qual)
    for candidate in (f"{module}.{qual}", f"torch.{qual}", f"torch.{name}", f"torch.nn.functional.{name}"):
        value: Any = torch
        try:
            for part in candidate.split(".")[1:]:
                value = getattr(value, part)
        except AttributeError:
            continue
        if value is obj:
            return candidate
    raise EmitError(f"cannot name {module}.{qual} through `torch`")
