"""The benchmark runner works on CPU: every scan case is timed, and the JSON report is complete."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_runner_small_scan_cases_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ROUTEC_BACKEND", "ROUTEC_POISON")}
    out_dir = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--device", "cpu", "--small", "--filter", "^(linear|selective)_scan",
         "--out", str(out_dir), "--repeats", "3"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out_dir / "results.json").read_text())
    names = [case["name"] for case in report["cases"]]
    expected = [
        "linear_scan fwd B2 L256 D64 fp32", "linear_scan fwd B2 L256 D64 bf16", "linear_scan fwd+bwd B2 L256 D64 fp32",
        "selective_scan fwd B1 L64 D32 N4 fp32", "selective_scan fwd+bwd B1 L64 D32 N4 fp32",
        "selective_scan fwd B1 L64 D32 N4 bf16",
    ]
    assert names == expected
    assert report["copy"]["gbps"] > 0
    for case in report["cases"]:
        impls = case["impls"]
        assert impls[case["ours"]]["status"] == "ok" and impls[case["baseline"]]["status"] == "ok", case["name"]
        for label, r in impls.items():
            if r["status"] != "ok":
                assert r["status"].startswith("unavailable:"), (case["name"], label, r["status"])
                continue
            for key in ("time_ms", "speedup_vs_baseline", "ours_speedup"):
                assert math.isfinite(r[key]) and r[key] > 0, (case["name"], label, key, r[key])
            if case["bytes"]:
                assert math.isfinite(r["pct_copy"]) and r["pct_copy"] > 0
        assert impls[case["baseline"]]["speedup_vs_baseline"] == 1.0
        assert impls[case["ours"]]["ours_speedup"] == 1.0
    assert "linear_scan fwd" in proc.stdout and "% copy" in proc.stdout
