"""Kernel launches per forward, measured with `torch.profiler` (`routec run --stats`).

On CUDA the count is the profiler's device-side kernel events (not yet checked on a GPU: no device time in
the session that wrote this). On the CPU there are no kernel events,
so the profiler's operator tree stands in for them, counting what would be one launch on a GPU:

* every leaf `aten::` operator (one with no operator below it) that computes something — views, reshapes,
  allocations and other metadata-only operators (`NO_KERNEL`) count zero;
* every `triton::` range: generated fusion kernels mark each launch with one (under TRITON_INTERPRET=1 the
  kernel itself runs in NumPy and leaves no operator behind);
* a custom op (`routec::…`, `routec_fused::…`) with nothing counted below it counts one: it ran a Triton
  kernel in the interpreter. Ops that launch two or three kernels are still counted once, so on the CPU the
  figure for the hand-written routing ops is a lower bound.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

NO_KERNEL = {
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::view", "aten::_unsafe_view", "aten::reshape",
    "aten::as_strided", "aten::expand", "aten::expand_as", "aten::t", "aten::transpose", "aten::permute",
    "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice", "aten::alias", "aten::detach",
    "aten::lift_fresh", "aten::split", "aten::chunk", "aten::unbind", "aten::narrow", "aten::flatten",
    "aten::unflatten", "aten::view_as", "aten::resolve_conj", "aten::resolve_neg", "aten::_reshape_alias",
    "aten::contiguous", "aten::to", "aten::result_type", "aten::size", "aten::stride", "aten::numel",
    "aten::dim", "aten::is_floating_point", "aten::item", "aten::_local_scalar_dense", "aten::broadcast_tensors",
    "aten::movedim", "aten::unfold", "aten::split_with_sizes", "aten::sym_size", "aten::matrix_H",
}


def _count(event: Any) -> int:
    below = sum(_count(child) for child in event.cpu_children)
    name = event.name
    if name.startswith("triton::"):
        return 1
    if below:
        return below
    if name.startswith("aten::"):
        return 0 if name in NO_KERNEL else 1
    if "::" in name and name.split("::")[0].startswith("routec"):
        return 1
    return 0


@contextlib.contextmanager
def _native_stderr_quiet() -> Iterator[None]:
    """Silence file descriptor 2 while profiling: some torch builds' profiler backend (kineto) logs a line
    to native stderr at every profiler start and stop, which would land in `routec run --stats` output. The
    forward being profiled has already run once (the warm-up), so no error of its own is hidden."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured or replaced stderr: nothing native to silence
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, fd)
    finally:
        os.close(saved)


def count_launches(net: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> int:
    """Kernel launches of one `net(*inputs)` call, without autograd (see the module docstring for the rules)."""
    cuda = any(x.is_cuda for x in inputs)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad():
        net(*inputs)  # first call: compile kernels and fill caches outside the measurement
        with _native_stderr_quiet(), profile(activities=activities) as prof:
            net(*inputs)
            if cuda:
                torch.cuda.synchronize()
    events = prof.events()
    if cuda:  # device kernel events; older profilers attach them to the launching CPU op instead
        device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        return len(device) if device else sum(len(getattr(e, "kernels", [])) for e in events)
    return sum(_count(e) for e in events if e.cpu_parent is None)
