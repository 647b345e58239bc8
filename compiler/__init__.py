"""routec.compiler: checks a parsed spec, lowers it through torch.fx, and returns a runnable `nn.Module`.

`load(spec, **params)` takes a path or `stdlib:<name>`; `compile_file(path, **params)` and
`compile_source(text, filename, **params)` do the same from a file or a string. The stages are listed in
`routec.compiler.pipeline`.
"""

from __future__ import annotations

import contextlib

from pathlib import Path
from typing import Any, Optional, Union

import torch

from .. import stdlib
from ..dsl import read_source
from .module import RoutedModule

__all__ = ["compile_source", "compile_file", "load", "RoutedModule"]


def compile_source(text: str, filename: str = "<string>", *, model: Optional[str] = None,
                   fuse: Optional[bool] = None, graph_passes: bool = True,
                   device: Union[str, torch.device, None] = None, **params: Any) -> RoutedModule:
    """Compile spec `text`; `model` picks a model or block by name (default: the file's last `model`).

    `device` is where parameters are created (e.g. "cuda"; "meta" checks a paper-size spec without
    allocating its weights).

    `graph_passes` runs the exact graph rewrites (docs/passes.md): `batch_calls` (independent calls of one
    shared per-sample module become one call on the concatenated batch), `multiroute` (independent
    multi-route scans of equal sizes become one launch) and `channel_gate` (relu(bn(conv(x))) times a per-sample
    0/1 channel mask skips the off filters in eval). False keeps the graph as elaborated.

    `fuse` runs the elementwise fusion pass (`compiler.passes.fusion`); None fuses when the kernels will run
    as Triton (ROUTEC_BACKEND=triton, or CUDA present and the backend not forced to `reference`).
    """
    from .build import elaborate
    from .passes import fuse_module, should_fuse, verify
    from .passes.batch_calls import batch_module
    from .passes.channel_gate import gate_module
    from .passes.multiroute import merge_routes

    with torch.device(device) if device is not None else contextlib.nullcontext():
        net = elaborate(filename, text, params, model=model)
    if graph_passes:
        for rewrite in (batch_module, merge_routes, gate_module):
            if rewrite(net):
                verify(net.graph_module)
    if should_fuse(fuse):
        fuse_module(net)
        verify(net.graph_module)
    return net


def compile_file(path: Union[str, Path], *, model: Optional[str] = None, fuse: Optional[bool] = None,
                 graph_passes: bool = True, device: Union[str, torch.device, None] = None,
                 **params: Any) -> RoutedModule:
    return compile_source(read_source(path), str(path), model=model, fuse=fuse, graph_passes=graph_passes,
                          device=device, **params)


def resolve_spec(spec: Union[str, Path]) -> Path:
    """`stdlib:<name>` → the stdlib file; anything else is a path."""
    text = str(spec)
    if text.startswith("stdlib:"):
        return stdlib.path(text[len("stdlib:"):])
    return Path(text)


def load(spec: Union[str, Path], *, model: Optional[str] = None, fuse: Optional[bool] = None,
         graph_passes: bool = True, device: Union[str, torch.device, None] = None,
         **params: Any) -> RoutedModule:
    """Build the module of `spec` (a path or `stdlib:<name>`) with the given parameter values."""
    return compile_file(resolve_spec(spec), model=model, fuse=fuse, graph_passes=graph_passes, device=device,
                        **params)
