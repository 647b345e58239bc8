"""Shared test helpers: the `golden` fixture and the `--update-golden` option.

A golden test renders some artifact (diagnostics, fx graphs, generated code) to text and compares it,
word for word, with a file under `tests/golden/`. `pytest --update-golden` rewrites the files instead
of comparing; review the diff before committing it.

    def test_something(golden):
        golden.check("syntax/missing_expression.expected", rendered_text)
"""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).parent / "golden"

# Plain helper modules of the tests (stdlib_refs.py) import by name: --import-mode=importlib keeps tests/ off sys.path.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite the files under tests/golden/ with the current output instead of comparing",
    )


class Golden:
    """Compare text with `tests/golden/<relative path>`, or rewrite the file when updating."""

    def __init__(self, root: Path, update: bool):
        self.root = root
        self.update = update

    def path(self, relative: str) -> Path:
        return self.root / relative

    def check(self, relative: str, actual: str) -> None:
        path = self.path(relative)
        if self.update:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists() or path.read_text(encoding="utf-8") != actual:
                path.write_text(actual, encoding="utf-8")
            return
        if not path.exists():
            pytest.fail(f"missing golden file {path}; run `pytest --update-golden` to create it")
        expected = path.read_text(encoding="utf-8")
        if actual != expected:
            diff = "".join(
                difflib.unified_diff(
                    expected.splitlines(keepends=True),
                    actual.splitlines(keepends=True),
                    fromfile=f"{relative} (golden)",
                    tofile=f"{relative} (actual)",
                )
            )
            pytest.fail(f"output differs from golden file {relative}:\n{diff}", pytrace=False)


@pytest.fixture
def golden(request: pytest.FixtureRequest) -> Golden:
    return Golden(GOLDEN_DIR, bool(request.config.getoption("--update-golden")))


def _compile_for_sm90(module, specs, num_warps=4):
    """Compile kernels for an H100 (sm_90) without a GPU: front end, lowering and ptxas.

    Catches what the interpreter lets through (scalar/tensor type clashes in loops, tl.dot shapes). Runs
    in a subprocess without TRITON_INTERPRET, where @triton.jit gives compilable JITFunctions.
    specs: (kernel name, constexprs, argument types overriding pointers *fp32 / scalars i32).
    """
    pytest.importorskip("triton.backends.nvidia")
    script = f"""
import importlib, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
mod = importlib.import_module({module!r})
for name, constexprs, types in {specs!r}:
    fn = getattr(mod, name)
    sig = {{p.name: "constexpr" if p.is_constexpr else types.get(p.name, "*fp32" if p.name.endswith("_ptr") else "i32")
           for p in fn.params}}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                       options={{"num_warps": {num_warps}}})
    assert k.asm["cubin"], name
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture
def compile_for_sm90():
    """`compile_for_sm90(module, specs, num_warps=4)`: build kernels to sm_90 machine code (see above)."""
    return _compile_for_sm90


@pytest.fixture
def triton_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run `routec.codegen.ops` on the Triton kernels in the interpreter, outputs NaN-poisoned (kernel tests;
    TRITON_INTERPRET must also be set before the process starts, as the README's test command does)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ROUTEC_BACKEND", "triton")
    monkeypatch.setenv("ROUTEC_POISON", "1")


@pytest.fixture
def reference_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run `routec.codegen.ops` on the pure-PyTorch references."""
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")
