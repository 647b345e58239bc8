"""The compiler's stages, in order — the table of contents of `routec.compiler`.

| stage     | function                         | result                                                   |
|-----------|----------------------------------|----------------------------------------------------------|
| parse     | `routec.dsl.parse`               | frozen AST with spans (every `use`d file too)            |
| elaborate | `compiler.build.elaborate`       | names resolved, parameters bound, shapes checked, blocks |
|           |                                  | and repeats expanded, modules built, fx graph emitted    |
| fx        | `compiler.build.finish`          | the linted `torch.fx.GraphModule` (dead code removed)    |
| (batch)   | `passes.batch_calls.batch_module`| independent calls of one shared per-sample module run as |
|           |                                  | one call on the stacked batch (every compile; shown by   |
|           |                                  | `--dump-after fx`)                                       |
| fuse      | `compiler.passes.fuse_module`    | elementwise regions replaced by generated Triton kernels |
|           |                                  | (when kernels run as Triton; `compile_source(fuse=…)`)   |
| code      | `GraphModule.code`               | the Python `forward` the graph runs                      |
| emit      | `compiler.emit.emit_module`      | a standalone module rebuilding the network (`-o out.py`) |

`routec compile SPEC --dump-after STAGE` prints a stage's result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..dsl import parse, read_source

STAGES = ("parse", "elaborate", "fx", "fuse", "code", "emit")


def dump(net: Any, stage: str, path: Path, params: Optional[dict] = None) -> str:
    """The printable result of `stage` for the compiled `net` built from `path` (with `params`)."""
    if stage == "list":
        return "\n".join(STAGES)
    if stage == "parse":
        return parse(read_source(path), str(path)).model_dump_json(indent=2, exclude_none=True)
    if stage == "elaborate":
        lines = [f"{name}: {tuple(p.shape)}" for name, p in net.named_parameters()]
        return "\n".join(lines)
    if stage == "fx":
        return str(net.graph)
    if stage == "fuse":
        from .passes.fusion import FUSED_KERNELS

        files = net.graph_module.meta.get(FUSED_KERNELS, [])
        parts = [net.graph_module.code.strip("\n")]
        for f in dict.fromkeys(files):
            parts.append(f"# ---- {f}\n{Path(f).read_text(encoding='utf-8').rstrip()}")
        return "\n\n".join(parts)
    if stage == "code":
        return net.graph_module.code
    if stage == "emit":
        from .emit import emit_module

        return emit_module(net, path, params)
    raise SystemExit(f"routec: unknown stage {stage!r}; stages: {', '.join(STAGES)}")
