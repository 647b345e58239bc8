"""Semantic diagnostics (golden): what `compile_source` reports for specs that parse but do not make sense.

Each `tests/golden/semantic/<name>.route` is compiled with the parameter overrides of `PARAMS` (none by
default) and the full rendered `RouteError` is compared with `<name>.expected`; `pytest --update-golden`
rewrites the expected files (review the diff). Helper files that cases `use` live in `semantic/lib/`.
The cases compile with the golden directory as the working directory, so file names in the messages
are relative (`lib/blocks.route:8:14: …`) and the same on every machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from routec.compiler import compile_source
from routec.dsl import RouteError

SEMANTIC = Path(__file__).parent / "golden" / "semantic"
CASES = sorted(p.stem for p in SEMANTIC.glob("*.route"))

# Model parameter overrides and model choice, as a caller of `compile_source` / `load` passes them
# (strings are what `routec run --param k=v` passes).
PARAMS: dict[str, dict] = {
    "override_unknown_param": {"dpeth": 3},
    "override_param_type": {"depth": 2.5},
    "override_param_string": {"d": "eight"},
    "override_shape_param": {"img": "3, x, 8"},
    "override_several": {"depth": "two", "d": 2.5},
    "model_not_found": {"model": "Encodr"},
}

# Cases whose error the parser already reports (a syntax-level check): every other case must fail in
# the compiler's semantic checks (codes R1xx).
SYNTAX_LEVEL = {"paths_unknown_modifier"}


def compile_case(name: str, monkeypatch: pytest.MonkeyPatch) -> RouteError:
    monkeypatch.chdir(SEMANTIC)
    text = (SEMANTIC / f"{name}.route").read_text(encoding="utf-8")
    with pytest.raises(RouteError) as info:
        compile_source(text, f"{name}.route", **PARAMS.get(name, {}))
    return info.value


def test_enough_cases():
    assert len(CASES) >= 30
    assert set(PARAMS) <= set(CASES)


@pytest.mark.parametrize("name", CASES)
def test_semantic_golden(name, golden, monkeypatch):
    err = compile_case(name, monkeypatch)
    golden.check(f"semantic/{name}.expected", err.render() + "\n")
    if name not in SYNTAX_LEVEL:
        assert all(code.startswith("R1") for code in err.codes), err.codes


def test_overrides_fail_only_with_them(monkeypatch):
    """The override cases are valid specs: the error comes from the parameters passed, not the file."""
    monkeypatch.chdir(SEMANTIC)
    for name, params in PARAMS.items():
        if name.startswith("override_"):
            compile_source((SEMANTIC / f"{name}.route").read_text(), f"{name}.route")


def test_errors_inside_blocks_say_where_they_were_expanded(monkeypatch):
    err = compile_case("error_in_used_block", monkeypatch)
    (diag,) = err.diagnostics
    assert diag.span.file == "lib/blocks.route"
    assert [n.message for n in diag.notes] == ["while expanding `Broken` at error_in_used_block.route:5:9"]

    err = compile_case("error_in_nested_block", monkeypatch)
    (diag,) = err.diagnostics
    assert [n.message for n in diag.notes] == [
        "while expanding `Inner` at error_in_nested_block.route:8:9",
        "while expanding `Outer` at error_in_nested_block.route:13:9",
    ]


def test_one_mistake_is_reported_once(monkeypatch):
    """A failed statement poisons what it binds, and a repeated body reports its mistake once."""
    assert compile_case("repeated_error_once", monkeypatch).codes == ["R101"]
    assert compile_case("scan_state_shape", monkeypatch).codes == ["R166"]  # not also `y` undefined
    assert compile_case("emit_not_a_tensor", monkeypatch).codes == ["R160"]
    assert compile_case("several_errors", monkeypatch).codes == ["R101", "R121", "R101"]


def test_did_you_mean(monkeypatch):
    helps = {name: compile_case(name, monkeypatch).diagnostics[0].help for name in (
        "undefined_value", "undefined_layer", "undefined_block", "undefined_function", "unknown_gate_kind",
        "unknown_aggregator", "block_unknown_param", "use_missing_name", "use_unknown_stdlib",
        "override_unknown_param", "model_not_found")}
    assert helps == {
        "undefined_value": "did you mean `hidden`?",
        "undefined_layer": "did you mean `LayerNorm`?",
        "undefined_block": "did you mean `Encoder`?",
        "undefined_function": "did you mean `mean`?",
        "unknown_gate_kind": "did you mean `topk`?",
        "unknown_aggregator": "did you mean `sum`?",
        "block_unknown_param": "did you mean `hidden`?",
        "use_missing_name": "did you mean `Encoder`?",
        "use_unknown_stdlib": "did you mean `stdlib.rsmamba`?",
        "override_unknown_param": "did you mean `depth`?",
        "model_not_found": "did you mean `Encoder`?",
    }


def test_use_cycle_names_both_files(monkeypatch):
    (diag,) = compile_case("use_cycle", monkeypatch).diagnostics
    assert diag.code == "R100"
    assert "cycle_a.route → cycle_b.route → cycle_a.route" in diag.message


def test_python_keywords_as_input_names_compile():
    """Inputs become arguments of the generated `forward`: a Python keyword must not break it."""
    import torch

    net = compile_source("model Net(d: int = 4) {\n    in def: [B, d]\n    in class: [B, d]\n"
                         "    out def + class\n}\n", "keywords.route")
    x = torch.randn(2, 4)
    assert torch.equal(net(x, 2 * x), 3 * x)


def test_numpy_and_torch_scalars_are_parameter_values(monkeypatch):
    """A sweep's `np.int64(16)` is an int; a tensor with several values is still a type error."""
    import numpy as np
    import torch

    monkeypatch.chdir(SEMANTIC)
    text = (SEMANTIC / "override_param_type.route").read_text()
    net = compile_source(text, "override_param_type.route", d=np.int64(16), depth=torch.tensor(3))
    assert net.state_dict()["layers.2.linear.weight"].shape == (16, 16)
    assert "layers.3.linear.weight" not in net.state_dict()
    with pytest.raises(RouteError) as info:
        compile_source(text, "override_param_type.route", d=torch.ones(2))
    assert info.value.codes == ["R113"]
