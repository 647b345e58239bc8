"""Run routec's benchmarks: `python benchmarks/run.py [--device cpu|cuda] [--small] [--filter REGEX] [--out DIR] [--repeats N]`.

Discovers every `benchmarks/cases_*.py` module; each exposes `cases(device, small) -> list[Case]`. All
cases run in this one process on one device, next to a copy ceiling measured in the same run; the ratio
table is printed and results.json (plus results.png when matplotlib is importable) written to --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import harness  # noqa: E402


def discover() -> list:
    """The `cases_*.py` modules next to this file, in name order."""
    modules = []
    for path in sorted(HERE.glob("cases_*.py")):
        spec = importlib.util.spec_from_file_location(f"routec_bench_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    return modules


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="small shapes (CPU, tests)")
    parser.add_argument("--filter", default="", help="run only cases whose group or name matches this regular "
                        "expression (re.search, so a plain substring works)")
    parser.add_argument("--out", default="out/bench", help="directory for results.json and results.png")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per impl (fewer for slow ones)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")

    started = time.perf_counter()
    report = {"info": harness.device_info(args.device), "args": vars(args)}
    report["copy"] = harness.copy_ceiling(args.device, args.repeats)
    report["cases"] = []
    for module in discover():
        for case in module.cases(args.device, args.small):
            if args.filter and not (re.search(args.filter, case.group) or re.search(args.filter, case.name)):
                continue
            print(f"running {case.name} ...", file=sys.stderr, flush=True)
            report["cases"].append(harness.run_case(case, args.device, args.repeats, report["copy"]["gbps"]))
            print("\n".join(harness.format_case(report["cases"][-1])), file=sys.stderr, flush=True)
            harness.write_report(report, Path(args.out), chart=False)
    report["wall_s"] = time.perf_counter() - started
    print(harness.format_table(report))
    harness.write_report(report, Path(args.out))
    if "chart" in report:
        print(report["chart"])
    print(f"wrote {Path(args.out) / 'results.json'} ({report['wall_s']:.1f} s)")
    return report


if __name__ == "__main__":
    main()
