"""Triton source for a fused elementwise region: the rule table, the renderer, and the on-disk kernel cache.

A region is a straight-line program over its inputs `x0 … xk`: steps `v0, v1, …`, each one rule applied to
inputs, earlier steps or constants, and a list of steps that leave the region (its outputs). `render` writes
one Python module per region holding

* `reference(x0, …)`: the region in PyTorch — the fake (meta) implementation, the fallback for inputs the
  kernel does not take (non-float, float64, mixed dtypes, rank > MAX_RANK), and the backward's recompute;
* `fused_fwd`: a `@triton.jit` kernel, one program per BLOCK elements of the broadcast iteration space,
  operands addressed by strides (0 along broadcast dimensions), fp32 arithmetic after every load;
* `fused_bwd`: the reverse-mode derivative of the same program: it recomputes the steps from the inputs,
  then propagates the output gradients back to one gradient per input over the iteration space (the
  launcher sums them over each input's broadcast dimensions);
* the launchers and the `torch.library` custom op `routec_fused::r_<hash>` with fake and autograd.

The module is written to `$ROUTEC_CACHE` (default `~/.cache/routec/kernels`) as `fused_<hash>.py`, where the
hash is that of the source, and imported with importlib, so Triton sees a real file (DESIGN §7).
"""

from __future__ import annotations

import hashlib
import importlib.util
import operator
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from ...codegen import functions
from ...codegen.pointwise import MAX_RANK


@dataclass(frozen=True)
class Rule:
    """One elementwise op: its PyTorch spelling, its Triton spelling over fp32 values, and the derivative
    of the result with respect to each operand, times the incoming gradient `{g}` (`{y}` is the result)."""

    name: str
    torch: str
    triton: str
    grads: tuple[str, ...]


_ADD = Rule("add", "{0} + {1}", "{0} + {1}", ("{g}", "{g}"))
_SUB = Rule("sub", "{0} - {1}", "{0} - {1}", ("{g}", "-{g}"))
_MUL = Rule("mul", "{0} * {1}", "{0} * {1}", ("{g} * {1}", "{g} * {0}"))
_DIV = Rule("div", "{0} / {1}", "{0} / {1}", ("{g} / {1}", "-{g} * {y} / {1}"))
_NEG = Rule("neg", "-{0}", "-{0}", ("-{g}",))
_RELU = Rule("relu", "torch.relu({0})", "tl.maximum({0}, 0.0)", ("tl.where({0} > 0.0, {g}, 0.0)",))
_GELU = Rule(
    "gelu", "F.gelu({0})", "0.5 * {0} * (1.0 + tl.math.erf({0} * 0.7071067811865476))",
    ("{g} * (0.5 * (1.0 + tl.math.erf({0} * 0.7071067811865476))"
     " + {0} * 0.3989422804014327 * tl.exp(-0.5 * {0} * {0}))",),
)
_SILU = Rule("silu", "F.silu({0})", "{0} / (1.0 + tl.exp(-{0}))",
             ("{g} * (1.0 + {0} * (1.0 - 1.0 / (1.0 + tl.exp(-{0})))) / (1.0 + tl.exp(-{0}))",))
_SIGMOID = Rule("sigmoid", "torch.sigmoid({0})", "1.0 / (1.0 + tl.exp(-{0}))", ("{g} * {y} * (1.0 - {y})",))
_TANH = Rule("tanh", "torch.tanh({0})", "_tanh({0})", ("{g} * (1.0 - {y} * {y})",))
_EXP = Rule("exp", "torch.exp({0})", "tl.exp({0})", ("{g} * {y}",))
_LOG = Rule("log", "torch.log({0})", "tl.log({0})", ("{g} / {0}",))
_ABS = Rule("abs", "torch.abs({0})", "tl.abs({0})", ("tl.where({0} > 0.0, {g}, tl.where({0} < 0.0, -{g}, 0.0))",))
_SOFTPLUS = Rule("softplus", "F.softplus({0})", "tl.maximum({0}, 0.0) + tl.log(1.0 + tl.exp(-tl.abs({0})))",
                 ("{g} / (1.0 + tl.exp(-{0}))",))

# fx call_function targets the elaborator (and the scan lowering) emits for elementwise work.
RULES: dict[Any, Rule] = {
    operator.add: _ADD, torch.add: _ADD,
    operator.sub: _SUB, torch.sub: _SUB,
    operator.mul: _MUL, torch.mul: _MUL,
    operator.truediv: _DIV, torch.div: _DIV,
    operator.neg: _NEG, torch.neg: _NEG,
    F.relu: _RELU, torch.relu: _RELU,
    F.gelu: _GELU,
    F.silu: _SILU,
    torch.sigmoid: _SIGMOID,
    torch.tanh: _TANH,
    torch.exp: _EXP,
    torch.log: _LOG,
    torch.abs: _ABS,
    F.softplus: _SOFTPLUS,
}

# Functions whose constants come as keywords (`leaky_relu(x, slope=0.2)`, `clamp(x, min=-1.0, max=None)`): the
# constants become the operands after the tensor, {1} and {2}. Comparisons keep NaN (a NaN input stays NaN).
_LEAKY_RELU = Rule("leaky_relu", "F.leaky_relu({0}, {1})", "tl.where({0} > 0.0, {0}, {0} * {1})",
                   ("tl.where({0} > 0.0, {g}, {g} * {1})", "0.0"))
_CLAMP = Rule("clamp", "torch.clamp({0}, {1}, {2})", "tl.where({0} < {1}, {1}, tl.where({0} > {2}, {2}, {0}))",
              ("tl.where(({0} >= {1}) & ({0} <= {2}), {g}, 0.0)", "0.0", "0.0"))
_CLAMP_MIN = Rule("clamp_min", "torch.clamp({0}, min={1})", "tl.where({0} < {1}, {1}, {0})",
                  ("tl.where({0} >= {1}, {g}, 0.0)", "0.0"))
_CLAMP_MAX = Rule("clamp_max", "torch.clamp({0}, max={1})", "tl.where({0} > {1}, {1}, {0})",
                  ("tl.where({0} <= {1}, {g}, 0.0)", "0.0"))
KEYWORD_RULES = (_LEAKY_RELU, _CLAMP, _CLAMP_MIN, _CLAMP_MAX)


def keyword_rule(target: Any, kwargs: dict[str, Any]) -> Optional[tuple[Rule, tuple[Any, ...]]]:
    """The rule of a call that passes its constants as keywords, with those constants in operand order, or
    None (the caller checks that they are numbers)."""
    if target is functions.leaky_relu and set(kwargs) <= {"slope"}:
        return _LEAKY_RELU, (kwargs.get("slope", 0.01),)
    if target is functions.clamp and set(kwargs) <= {"min", "max"}:
        low, high = kwargs.get("min"), kwargs.get("max")
        if low is not None and high is not None:
            return _CLAMP, (low, high)
        if low is not None:
            return _CLAMP_MIN, (low,)
        if high is not None:
            return _CLAMP_MAX, (high,)
    return None


# `x ** c` for the constant exponents that have an exact elementwise spelling.
POWERS: dict[float, Rule] = {
    2.0: Rule("square", "{0} ** 2", "{0} * {0}", ("2.0 * {g} * {0}",)),
    3.0: Rule("cube", "{0} ** 3", "{0} * {0} * {0}", ("3.0 * {g} * {0} * {0}",)),
    0.5: Rule("sqrt", "torch.sqrt({0})", "tl.sqrt({0})", ("0.5 * {g} / {y}",)),
    -1.0: Rule("reciprocal", "torch.reciprocal({0})", "1.0 / {0}", ("-{g} * {y} * {y}",)),
}

HELPERS = {
    "_tanh": '''@triton.jit
def _tanh(x):
    """tanh through exp (no libdevice): sign(x) * (1 - e^-2|x|) / (1 + e^-2|x|), which never overflows."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0.0, -t, t)
''',
}

# An operand: ("x", i) an input, ("v", j) an earlier step, ("c", value) a constant.
Operand = tuple[str, Union[int, float]]


@dataclass(frozen=True)
class Step:
    rule: Rule
    operands: tuple[Operand, ...]


@dataclass(frozen=True)
class Region:
    n_inputs: int
    steps: tuple[Step, ...]
    outputs: tuple[int, ...]  # indices of the steps that leave the region
    origin: tuple[str, ...] = ()  # the `.route` statements the steps came from, for the docstring


def cache_dir() -> Path:
    """Where generated kernels are written: `$ROUTEC_CACHE`, else `~/.cache/routec/kernels`."""
    root = os.environ.get("ROUTEC_CACHE", "").strip()
    return Path(root).expanduser() if root else Path.home() / ".cache" / "routec" / "kernels"


def _torch_operand(op: Operand) -> str:
    kind, value = op
    if kind == "c":
        return f"({value!r})" if value < 0 else repr(value)
    return f"{kind}{value}"


def _triton_operand(op: Operand) -> str:
    kind, value = op
    if kind == "c":
        return f"({float(value)!r})" if value < 0 else repr(float(value))
    return f"{kind}{value}"


def _fill(template: str, operands: list[str], **named: str) -> str:
    return template.format(*operands, **named)


def _deps(region: Region) -> list[set[int]]:
    """For each step, the inputs it depends on (an output's shape is the broadcast of theirs)."""
    deps: list[set[int]] = []
    for step in region.steps:
        d: set[int] = set()
        for kind, value in step.operands:
            if kind == "x":
                d.add(int(value))
            elif kind == "v":
                d |= deps[int(value)]
        deps.append(d)
    return deps


def render(region: Region, op_name: str) -> str:
    """The Python source of the module for `region`, registering the custom op `op_name`."""
    xs = [f"x{i}" for i in range(region.n_inputs)]
    outs = [f"o{k}" for k in range(len(region.outputs))]
    operands = xs + outs
    deps = _deps(region)
    many = len(region.outputs) > 1
    ret_type = f"tuple[{', '.join(['Tensor'] * len(outs))}]" if many else "Tensor"
    sig = ", ".join(f"{x}: Tensor" for x in xs)
    args = ", ".join(xs)
    lines: list[str] = []
    w = lines.append

    listing = "\n".join(
        f"    v{j} = {_fill(s.rule.torch, [_torch_operand(o) for o in s.operands])}" for j, s in enumerate(region.steps)
    )
    origin = "".join(f"\n    {line}" for line in region.origin)
    w(f'"""A fused elementwise region, generated by routec\'s fusion pass (routec.compiler.passes.fusion).\n')
    w(f"Custom op `{op_name}`: inputs {', '.join(xs)}; outputs "
      f"{', '.join(f'v{j}' for j in region.outputs)} of\n\n{listing}\n")
    if origin:
        w(f"From the spec:{origin}\n")
    w('"""\n')
    w("import math\n\nimport torch\nimport torch.nn.functional as F\nimport triton\nimport triton.language as tl"
      "\nfrom torch import Tensor\n\nfrom routec.codegen.backend import reference_vjp"
      "\nfrom routec.codegen.pointwise import block_size, fusable_inputs, iteration_layout, out_buffer\n")
    w(f'OP = "{op_name}"\n\n')

    w(f"def reference({sig}) -> tuple[Tensor, ...]:")
    w('    """The region in PyTorch: fake implementation, fallback, and the recompute of the backward."""')
    for j, s in enumerate(region.steps):
        w(f"    v{j} = {_fill(s.rule.torch, [_torch_operand(o) for o in s.operands])}")
    w(f"    return ({''.join(f'v{j}, ' for j in region.outputs).rstrip()})\n\n")

    used = {name for s in region.steps for name in HELPERS if name in s.rule.triton}
    for name in sorted(used):
        w(HELPERS[name] + "\n")

    def index_math(names: list[str]) -> None:
        """Offsets of every operand in `names` for the flat indices `offs` (sizes n0 innermost)."""
        w("    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)")
        w("    mask = offs < N")
        w("    rest = offs")
        for d in range(MAX_RANK):
            pad = "    " if d == 0 else "        "
            if d > 0:
                w(f"    if RANK >= {d + 1}:")
            # the outermost dimension takes what is left: no division there (64-bit divisions are slow)
            w(f"{pad}if RANK == {d + 1}:")
            w(f"{pad}    i{d} = rest")
            w(f"{pad}else:")
            w(f"{pad}    i{d} = rest % n{d}")
            w(f"{pad}    rest = rest // n{d}")
            for name in names:
                w(f"{pad}{name}_off {'=' if d == 0 else '+='} i{d} * {name}_s{d}")

    def kernel_params(ptrs: list[str], strided: list[str]) -> None:
        w("    " + ", ".join(f"{p}_ptr" for p in ptrs) + ",")
        w("    N,  # elements in the iteration space")
        w(f"    {', '.join(f'n{d}' for d in range(MAX_RANK))},  # its sizes, innermost first (1 beyond RANK)")
        for name in strided:
            w(f"    {', '.join(f'{name}_s{d}' for d in range(MAX_RANK))},  # strides of {name} (0 = broadcast)")
        w("    RANK: tl.constexpr,")
        w("    BLOCK: tl.constexpr,")
        w("):")

    def forward_steps() -> None:
        for j, s in enumerate(region.steps):
            w(f"    v{j} = {_fill(s.rule.triton, [_triton_operand(o) for o in s.operands])}")

    w("@triton.jit")
    w("def fused_fwd(")
    kernel_params(operands, operands)
    w('    """Every output of the region at BLOCK flat positions of the broadcast iteration space: one program')
    w('    per block, indices unravelled over RANK dims, operands read and written through their strides."""')
    index_math(operands)
    for x in xs:
        w(f"    {x} = tl.load({x}_ptr + {x}_off, mask=mask, other=1.0).to(tl.float32)")
    forward_steps()
    for k, j in enumerate(region.outputs):
        w(f"    tl.store(o{k}_ptr + o{k}_off, v{j}.to(o{k}_ptr.dtype.element_ty), mask=mask)")
    w("\n")

    gs = [f"g{k}" for k in range(len(outs))]
    dxs = [f"d{x}" for x in xs]
    w("@triton.jit")
    w("def fused_bwd(")
    kernel_params(xs + gs + dxs, xs + gs + dxs)
    w('    """Gradients of the region: recompute the steps, then push each output gradient back through them')
    w('    (reverse order); d<xi> gets the gradient of input i at every position of the iteration space."""')
    index_math(xs + gs + dxs)
    for x in xs:
        w(f"    {x} = tl.load({x}_ptr + {x}_off, mask=mask, other=1.0).to(tl.float32)")
    forward_steps()
    grad_of: dict[str, str] = {}
    for k, j in enumerate(region.outputs):
        w(f"    gv{j} = tl.load(g{k}_ptr + g{k}_off, mask=mask, other=0.0).to(tl.float32)")
        grad_of[f"v{j}"] = f"gv{j}"
    for j in reversed(range(len(region.steps))):
        s = region.steps[j]
        if f"v{j}" not in grad_of:
            continue
        names = [_triton_operand(o) for o in s.operands]
        for pos, op in enumerate(s.operands):
            if op[0] == "c":
                continue
            target = _triton_operand(op)
            term = _fill(s.rule.grads[pos], names, g=grad_of[f"v{j}"], y=f"v{j}")
            acc = f"gv{op[1]}" if op[0] == "v" else f"gx{op[1]}"
            if target in grad_of:
                w(f"    {acc} = {acc} + {term}")
            else:
                w(f"    {acc} = {term}")
                grad_of[target] = acc
    for i, x in enumerate(xs):
        value = grad_of.get(x, "tl.zeros([BLOCK], dtype=tl.float32)")
        w(f"    tl.store(d{x}_ptr + d{x}_off, {value}.to(d{x}_ptr.dtype.element_ty), mask=mask)")
    w("\n")

    w(f"def launch_fwd({sig}):")
    w('    """The outputs through `fused_fwd`, or None when the layout is deeper than the kernel unrolls."""')
    w(f"    shape = torch.broadcast_shapes({', '.join(f'{x}.shape' for x in xs)})")
    for k, j in enumerate(region.outputs):
        dep = ", ".join(f"x{i}.shape" for i in sorted(deps[j]))
        w(f"    o{k} = out_buffer(torch.broadcast_shapes({dep}), x0.dtype, x0.device)")
    w(f"    layout = iteration_layout(shape, ({', '.join(operands)},))")
    w("    if layout is None:")
    w("        return None")
    w("    rank, sizes, strides = layout")
    w("    n = math.prod(shape)")
    w("    if n > 0:")
    w("        block = block_size(n)")
    w('        with torch.profiler.record_function("triton::fused_fwd"):  # one launch, for `routec run --stats`')
    w(f"            fused_fwd[(triton.cdiv(n, block),)]({', '.join(operands)}, n, *sizes, "
      f"{', '.join(f'*strides[{i}]' for i in range(len(operands)))}, RANK=rank, BLOCK=block)")
    w(f"    return {'(' + ', '.join(outs) + ')' if many else outs[0]}\n\n")

    w("def bwd_layout(inputs, grads):")
    w('    """The iteration layout for `fused_bwd`, or None where the kernel does not apply: inputs it does not')
    w('    take, a missing output gradient, or an output smaller than the iteration space (its gradient would')
    w('    be counted once per broadcast copy). Then the backward recomputes the reference under autograd."""')
    w("    if not fusable_inputs(*inputs) or len({x.dtype for x in inputs}) != 1:")
    w("        return None")
    w("    shape = torch.broadcast_shapes(*(x.shape for x in inputs))")
    w("    if any(g is None or g.shape != shape or g.dtype != inputs[0].dtype for g in grads):")
    w("        return None")
    w("    gradients = torch.empty(shape, device=\"meta\")  # stands for the contiguous d<xi> buffers")
    w("    return iteration_layout(shape, (*inputs, *grads, *(gradients for _ in inputs)))\n\n")
    w(f"def launch_bwd({sig}, grads):")
    w('    """Input gradients through `fused_bwd` (the caller checked `bwd_layout`)."""')
    w(f"    shape = torch.broadcast_shapes({', '.join(f'{x}.shape' for x in xs)})")
    for x in xs:
        w(f"    d{x} = out_buffer(shape, torch.float32, {x}.device)")
    w(f"    rank, sizes, strides = iteration_layout(shape, ({', '.join(xs)}, *grads, {', '.join(dxs)}))")
    w("    n = math.prod(shape)")
    w("    if n > 0:")
    w("        block = block_size(n)")
    w('        with torch.profiler.record_function("triton::fused_bwd"):')
    w(f"            fused_bwd[(triton.cdiv(n, block),)]({', '.join(xs)}, *grads, {', '.join(dxs)}, n, *sizes, "
      f"{', '.join(f'*strides[{i}]' for i in range(len(xs) + len(gs) + len(dxs)))}, RANK=rank, BLOCK=block)")
    w(f"    return tuple(d.sum_to_size(x.shape).to(x.dtype) for d, x in zip(({', '.join(dxs)},), ({args},)))\n\n")

    w(f'@torch.library.custom_op(OP, mutates_args=())')
    w(f"def fused({sig}) -> {ret_type}:")
    w('    """The generated kernel when the inputs suit it (see `fusable_inputs`), else the PyTorch reference."""')
    w(f"    if fusable_inputs({args}) and len({{x.dtype for x in ({args},)}}) == 1:")
    w(f"        outs = launch_fwd({args})")
    w("        if outs is not None:")
    w("            return outs")
    w("    with torch.no_grad():")
    w(f"        outs = reference({args})")
    w(f"    return {'outs' if many else 'outs[0]'}\n\n")
    w("@fused.register_fake")
    w(f"def _fake({sig}):")
    w(f"    outs = reference({args})")
    w(f"    return {'outs' if many else 'outs[0]'}\n\n")
    gsig = ", ".join(f"{g}: Tensor" for g in gs)
    gret = "Tensor" if len(xs) == 1 else f"tuple[{', '.join(['Tensor'] * len(xs))}]"
    w(f'@torch.library.custom_op(OP + "_bwd", mutates_args=())')
    w(f"def fused_backward({sig}, {gsig}) -> {gret}:")
    w('    """Gradients for every input through `fused_bwd`; an op of its own so that torch.compile traces the')
    w('    backward too. Called only where `bwd_layout` holds."""')
    w(f"    dxs = launch_bwd({args}, ({', '.join(gs)},))")
    w(f"    return {'dxs' if len(xs) > 1 else 'dxs[0]'}\n\n")
    w("@fused_backward.register_fake")
    w(f"def _fake_backward({sig}, {gsig}):")
    w(f"    return {'tuple(torch.empty_like(x) for x in (' + args + ',))' if len(xs) > 1 else 'torch.empty_like(x0)'}\n\n")
    w("def _setup(ctx, inputs, output):")
    w("    ctx.save_for_backward(*inputs)\n\n")
    w("def _backward(ctx, *grads):")
    w("    inputs = ctx.saved_tensors")
    w("    if bwd_layout(inputs, grads) is None:")
    w("        return reference_vjp(reference, inputs, grads)")
    w(f"    dxs = torch.ops.{op_name.replace('::', '.')}_bwd(*inputs, *grads)")
    w(f"    return {'dxs' if len(xs) > 1 else '(dxs,)'}\n\n")
    w("fused.register_autograd(_backward, setup_context=_setup)")
    return "\n".join(lines) + "\n"


def load(region: Region) -> tuple[ModuleType, Path]:
    """Write (if new) and import the module of `region`; returns it and its file."""
    body = render(region, "routec_fused::r_HASH")
    digest = hashlib.sha256(body.encode()).hexdigest()[:16]
    source = body.replace("r_HASH", f"r_{digest}")
    folder = cache_dir()
    path = folder / f"fused_{digest}.py"
    name = f"routec_fused_{digest}"
    if name in sys.modules:  # already registered in this process (the op registry is global)
        module = sys.modules[name]
        return module, Path(module.__file__ or path)
    if not path.is_file() or path.read_text(encoding="utf-8") != source:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".fused_{digest}.{os.getpid()}.tmp"
        tmp.write_text(source, encoding="utf-8")
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module, path


def op_of(module: ModuleType) -> Any:
    """The `OpOverload` a fused graph node calls."""
    namespace, _, name = module.OP.partition("::")
    return getattr(getattr(torch.ops, namespace), name).default
