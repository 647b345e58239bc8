"""Shared test helpers: the `golden` fixture and the `--update-golden` option.

A golden test renders some artifact (diagnostics, fx graphs, generated code) to text and compares it,
word for word, with a file under `tests/golden/`. `pytest --update-golden` rewrites the files instead
of comparing; review the diff before committing it.

    def test_something(golden):
        golden.check("syntax/missing_expression.expected", rendered_text)
"""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).parent / "golden"


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
