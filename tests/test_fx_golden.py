"""Golden fx graphs: `str(load(example).graph)` for every spec in `examples/`.

The printed graph names every node, module path, custom op and argument, but no weight values, so it
does not depend on the random initialisation; a change in lowering (kernel selection, node order, a new
runtime function) shows up as a diff here. `tests/golden/fx/<example>.txt` holds the graph of the
file's default model (its last `model`); a file with several models also has `<example>.<Model>.txt`
for each other one. The graphs are compiled with ROUTEC_BACKEND=reference (the elaborated graph, before
any rewrite that only applies when the Triton kernels run). `pytest --update-golden` rewrites them (review the diff).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from routec.compiler import load
from routec.dsl import parse, read_source

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.route"))
FX = Path(__file__).parent / "golden" / "fx"


def models_of(path: Path) -> list[str]:
    return [d.name for d in parse(read_source(path), str(path)).definitions if d.kind == "model"]


def cases() -> list[tuple[str, Path, str | None]]:
    """(golden file name, example, model) — the default model, then any other models of the file."""
    out: list[tuple[str, Path, str | None]] = []
    for path in EXAMPLES:
        out.append((f"{path.stem}.txt", path, None))
        out += [(f"{path.stem}.{m}.txt", path, m) for m in models_of(path)[:-1]]
    return out


CASES = cases()


def graph_text(path: Path, model: str | None) -> str:
    return str(load(path, model=model).graph)


@pytest.mark.parametrize("golden_name,path,model", CASES, ids=[c[0][:-4] for c in CASES])
def test_fx_golden(golden_name, path, model, golden, monkeypatch):
    # the graph as elaborated: the reference backend keeps optional Triton-only rewrites out of it
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")
    golden.check(f"fx/{golden_name}", graph_text(path, model))


def test_every_golden_has_its_example(golden):
    """No stale golden files for examples (or models) that no longer exist."""
    if golden.update:
        for stale in set(p.name for p in FX.glob("*.txt")) - {c[0] for c in CASES}:
            (FX / stale).unlink()
    assert sorted(p.name for p in FX.glob("*.txt")) == sorted(c[0] for c in CASES)
    assert len(EXAMPLES) >= 6


def test_graph_text_does_not_depend_on_the_weights():
    path = ROOT / "examples" / "moe.route"
    torch.manual_seed(0)
    first = load(path)
    torch.manual_seed(1)
    second = load(path)
    assert not torch.equal(first.state_dict()["layers.0.moemlp.experts.w1"],
                           second.state_dict()["layers.0.moemlp.experts.w1"])
    assert str(first.graph) == str(second.graph)
    assert "call_module" in str(first.graph)
