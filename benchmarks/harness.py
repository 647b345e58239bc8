"""Timing harness for routec benchmarks: cases, timers, the copy ceiling, the ratio table, JSON and a chart.

A `Case` names zero-argument callables (routec's implementation and its anchors). Every impl of every case
is timed in the same process on the same device, next to a device-copy ceiling measured in that run, so
the ratios (not the absolute times) are what a table from one machine says.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch


@dataclass
class Case:
    """One workload and the implementations that compute it.

    impls: label -> zero-argument callable doing one full run of the workload (inputs prepared outside).
    baseline: the label the ratios are relative to; ours: the label of routec's implementation.
    bytes / flops: ideal bytes moved and FLOPs of one run (None when not meaningful).
    unavailable: label -> reason, for anchors that could not even be built (import failed, unsupported).
    """

    name: str
    group: str
    impls: dict[str, Callable[[], object]]
    baseline: str
    ours: str
    bytes: Optional[float] = None
    flops: Optional[float] = None
    notes: str = ""
    unavailable: dict[str, str] = field(default_factory=dict)


def optional_impl(case_impls: dict, unavailable: dict, label: str, build: Callable[[], Callable[[], object]]) -> None:
    """Add `label` to `case_impls` if `build()` succeeds (imports, checks); else record why not."""
    try:
        case_impls[label] = build()
    except Exception as exc:  # an anchor that cannot be built is reported, never fatal
        unavailable[label] = f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_callable(fn: Callable[[], object], device: str, repeats: int, warmup: int = 2,
                  budget_s: float = 3.0) -> tuple[float, int]:
    """Median time of one call in ms, and the number of timed calls.

    CUDA: CUDA events around each call after `warmup` calls; CPU: time.perf_counter. Slow impls (a
    Python loop over time) get fewer repeats, at least 3, so that one impl takes about `budget_s`.
    """
    start = time.perf_counter()
    fn()  # first call: compilation, autotuning, caches
    _sync(device)
    first = time.perf_counter() - start
    if first > budget_s / 4:
        warmup = 0  # a slow impl (a Python loop over time) is warm after one call
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    _sync(device)
    per_call = (time.perf_counter() - start) / warmup if warmup else first
    n = max(3, min(repeats, int(budget_s / max(per_call, 1e-6))))
    times = []
    for _ in range(n):
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), n


def copy_ceiling(device: str, repeats: int) -> dict:
    """Device-copy bandwidth: clone of a large tensor, (read + write bytes) / median time."""
    nbytes = (1 << 30) if device == "cuda" else (64 << 20)
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    ms, n = time_callable(lambda: x.clone(), device, max(repeats, 10))
    return {"bytes": 2 * nbytes, "time_ms": ms, "gbps": 2 * nbytes / ms / 1e6, "repeats": n}


def device_info(device: str) -> dict:
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["name"] = torch.cuda.get_device_name()
    else:
        info["name"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def run_case(case: Case, device: str, repeats: int, ceiling_gbps: float) -> dict:
    """Time every impl of `case`; failures at run time are recorded like unavailable anchors."""
    results: dict[str, dict] = {}
    for label, fn in case.impls.items():
        try:
            ms, n = time_callable(fn, device, repeats)
            results[label] = {"status": "ok", "time_ms": ms, "repeats": n}
        except Exception as exc:
            results[label] = {"status": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
        if device == "cuda":
            torch.cuda.empty_cache()
    results.update({label: {"status": reason} for label, reason in case.unavailable.items()})
    base = results.get(case.baseline, {}).get("time_ms")
    ours = results.get(case.ours, {}).get("time_ms")
    for label, r in results.items():
        if r["status"] != "ok":
            continue
        t = r["time_ms"]
        r["speedup_vs_baseline"] = base / t if base else None
        r["ours_speedup"] = t / ours if ours else None  # how many times faster ours is than this impl
        if case.bytes:
            r["gbps"] = case.bytes / t / 1e6
            r["pct_copy"] = 100.0 * r["gbps"] / ceiling_gbps
        if case.flops:
            r["tflops"] = case.flops / t / 1e9
    return {
        "name": case.name, "group": case.group, "baseline": case.baseline, "ours": case.ours,
        "bytes": case.bytes, "flops": case.flops, "notes": case.notes, "impls": results,
    }


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


HEADER = f"  {'impl':<34} {'time ms':>10} {'x baseline':>11} {'ours faster':>12} {'GB/s':>8} {'% copy':>7}"


def format_case(case: dict) -> list[str]:
    """One case's block of the ratio table: one row per impl, routec's marked with '*'."""
    lines = [f"{case['name']}  [baseline: {case['baseline']}, ours: {case['ours']}]"]
    if case["notes"]:
        lines.append(f"  note: {case['notes']}")
    lines.append(HEADER)
    for label, r in case["impls"].items():
        mark = "*" if label == case["ours"] else " "
        if r["status"] != "ok":
            lines.append(f" {mark}{label:<34} {r['status']}")
            continue
        lines.append(
            f" {mark}{label:<34} {r['time_ms']:>10.4f} {_fmt(r.get('speedup_vs_baseline'), '>10.2f')}x "
            f"{_fmt(r.get('ours_speedup'), '>11.2f')}x {_fmt(r.get('gbps'), '>8.1f')} {_fmt(r.get('pct_copy'), '>6.1f')}%"
        )
    return lines


def format_table(report: dict) -> str:
    """The ratio table: the device and its copy ceiling, then one block per case."""
    lines = [
        f"device: {report['info']['name']} ({report['info']['device']}), torch {report['info']['torch']}, "
        f"triton {report['info']['triton']}",
        f"copy ceiling: {report['copy']['gbps']:.0f} GB/s (clone of {report['copy']['bytes'] // 2 >> 20} MiB)",
        "",
    ]
    for case in report["cases"]:
        lines += format_case(case) + [""]
    return "\n".join(lines)


def write_chart(report: dict, path: Path) -> Optional[str]:
    """A horizontal bar chart of times per case (log scale); returns a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"chart skipped: matplotlib not importable ({exc})"
    cases = [c for c in report["cases"] if any(r["status"] == "ok" for r in c["impls"].values())]
    if not cases:
        return "chart skipped: no timed impls"
    fig, axes = plt.subplots(len(cases), 1, figsize=(9, 1.0 + 0.45 * sum(len(c["impls"]) for c in cases) + 0.6 * len(cases)))
    axes = [axes] if len(cases) == 1 else list(axes)
    for ax, case in zip(axes, cases):
        ok = [(label, r["time_ms"]) for label, r in case["impls"].items() if r["status"] == "ok"]
        labels = [label for label, _ in ok]
        colors = ["tab:orange" if label == case["ours"] else "tab:blue" for label in labels]
        ax.barh(labels, [t for _, t in ok], color=colors)
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_title(case["name"], fontsize=9)
        ax.set_xlabel("ms (log)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"routec benchmarks on {report['info']['name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_report(report: dict, out_dir: Path, chart: bool = True) -> None:
    """results.json (and results.png unless `chart` is false, as for the partial reports written after
    every case so that an interrupted run still leaves its finished cases behind)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if chart:
        note = write_chart(report, out_dir / "results.png")
        if note:
            report["chart"] = note
    (out_dir / "results.json").write_text(json.dumps(report, indent=2))
