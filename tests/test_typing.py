"""STYLE rule 12: the type hints of routec.dsl and routec.compiler are checked by mypy, and it finds no error.

The check is `python -m mypy` from the repository root ([tool.mypy] in pyproject.toml names the packages and
maps the source folders to their import names through .mypy/routec/). The first run parses torch's annotations
(about 20 s on two cores); later runs reuse .mypy_cache/.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy")

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("dsl", "compiler")


def run_mypy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_links_give_the_source_folders_their_import_names():
    for folder in (*CHECKED, "codegen", "stdlib"):
        link = ROOT / ".mypy" / "routec" / folder
        assert link.is_symlink() and link.resolve() == (ROOT / folder).resolve(), link


def test_mypy_is_clean_on_dsl_and_compiler():
    result = run_mypy()
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    # Every module of both packages was checked (not an empty or partial selection).
    files = sum(1 for folder in CHECKED for _ in (ROOT / folder).rglob("*.py"))
    assert f"Success: no issues found in {files} source files" in report, report


def test_mypy_sees_the_packages_types(tmp_path):
    """The same configuration resolves routec.* to the sources and reports a real error with their types."""
    # mypy takes a program (-c) only without the configured package list, so check it with a copy lacking it.
    config = (ROOT / "pyproject.toml").read_text()
    listed = 'packages = ["routec.dsl", "routec.compiler"]\n'
    assert listed in config
    (tmp_path / "pyproject.toml").write_text(config.replace(listed, "").replace("$MYPY_CONFIG_FILE_DIR", str(ROOT)))
    code = "from routec.dsl import parse\nfrom routec.compiler.values import GateValue\nn: int = parse\nGateValue(1)\n"
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(tmp_path / "pyproject.toml"),
                             "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    report = result.stdout + result.stderr
    assert result.returncode == 1, report
    assert "Cannot find implementation" not in report, report
    assert 'expression has type "Callable[[str | bytes, str], Module]", variable has type "int"' in report, report
    assert 'Missing positional arguments "weights"' in report, report
