"""The batch_calls pass (compiler/passes/batch_calls.py): independent calls of one shared per-sample module
become one call on the inputs stacked along the batch.

Each case builds the same spec twice with the same weights: as elaborated (`compiler.build.elaborate`, no
pass) and after the pass (`batch_module`, or `load`/`compile_source`, which run it on every compile), and
compares outputs and every parameter's gradient, with the global generator seeded identically before each
run so RSMamba's random token shuffle draws the same permutation in both.
"""

from __future__ import annotations

import operator
from pathlib import Path

import torch
from torch import nn

from routec import stdlib
from routec.codegen import layers as L
from routec.codegen.mamba import MambaMixer
from routec.compiler import compile_source, load
from routec.compiler.build import elaborate
from routec.compiler.passes import count_launches
from routec.compiler.passes.batch_calls import (
    SPLIT_META, batch_graph, batch_module, count_calls, find_groups, per_sample,
)

ROOT = Path(__file__).parent.parent
RSMAMBA = dict(d=16, depth=2, inner=32, size=32, classes=5)
SELECTIVE = dict(d=8, depth=2, classes=3)


def pair(text: str, filename: str = "<test>", **params):
    """(unmerged, merged) modules of `text` with the same weights; the merged one has run the pass."""
    plain = elaborate(filename, text, params)
    merged = elaborate(filename, text, params)
    merged.load_state_dict(plain.state_dict())
    batch_module(merged)
    return plain, merged


def mixer_calls(net, layers: int, path: str) -> list[int]:
    return [count_calls(net.graph_module, path.format(i)) for i in range(layers)]


def run(net, inputs, seed: int = 7):
    """Output and parameter gradients of one forward/backward (training or eval as `net` is set)."""
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = net(*inputs)
    out = out if isinstance(out, torch.Tensor) else out[0]
    weight = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
    (out * weight).sum().backward()
    grads = {name: p.grad for name, p in net.named_parameters()}
    return out.detach(), grads


def assert_same(plain, merged, inputs, atol=1e-5):
    for training in (True, False):
        plain.train(training)
        merged.train(training)
        out_a, grads_a = run(plain, inputs)
        out_b, grads_b = run(merged, inputs)
        torch.testing.assert_close(out_b, out_a, atol=atol, rtol=1e-5)
        assert grads_a.keys() == grads_b.keys()
        used = 0
        for name, g in grads_a.items():
            if g is None:
                assert grads_b[name] is None, name
                continue
            used += 1
            torch.testing.assert_close(grads_b[name], g, atol=atol, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        assert used > 0


# ---------------------------------------------------------------- RSMamba and examples/selective.route

def test_rsmamba_merges_the_three_mixer_calls_and_is_exact():
    text = stdlib.path("rsmamba").read_text()
    plain, merged = pair(text, "rsmamba.route", **RSMAMBA)
    path = "layers.{}.rsmambalayer.mixer"
    assert mixer_calls(plain, 2, path) == [3, 3]
    assert mixer_calls(merged, 2, path) == [1, 1]
    # the shared pre-norm is called once per layer, each call depending on the previous layer: not merged
    assert count_calls(plain.graph_module, "pre_norm") == count_calls(merged.graph_module, "pre_norm") == 2
    cats = [n for n in merged.graph.nodes if n.target is torch.cat]
    assert len(cats) == 2 and all(len(n.args[0]) == 3 for n in cats)
    img = torch.randn(2, 3, RSMAMBA["size"], RSMAMBA["size"])
    assert_same(plain, merged, [img])


def test_load_runs_the_pass_and_keeps_the_random_shuffle():
    """`load` (compile_source) batches on every compile; the same seed draws the same permutation, and
    a different seed a different result (the shuffle is really drawn, not frozen by the rewrite)."""
    text = stdlib.path("rsmamba").read_text()
    plain = elaborate("rsmamba.route", text, dict(RSMAMBA))
    net = load("stdlib:rsmamba", **RSMAMBA)
    net.load_state_dict(plain.state_dict())
    assert mixer_calls(net, 2, "layers.{}.rsmambalayer.mixer") == [1, 1]
    plain.eval()
    net.eval()
    img = torch.randn(2, 3, RSMAMBA["size"], RSMAMBA["size"])
    with torch.no_grad():
        torch.manual_seed(3)
        a = plain(img)
        torch.manual_seed(3)
        b = net(img)
        torch.manual_seed(4)
        c = net(img)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(c, b)


def test_selective_example_merges_and_is_exact():
    path = ROOT / "examples" / "selective.route"
    plain, merged = pair(path.read_text(), str(path), **SELECTIVE)
    name = "layers.{}.multiordermamba.mixer"
    assert mixer_calls(plain, 2, name) == [3, 3]
    assert mixer_calls(merged, 2, name) == [1, 1]
    x = torch.randn(2, 5, SELECTIVE["d"])
    assert_same(plain, merged, [x])


def test_paths_example_merges_and_is_exact():
    """examples/paths.route shares a CausalConv1d between two paths, next to a gumbel gate and sampled
    paths in training: the merge keeps every random draw where it was."""
    path = ROOT / "examples" / "paths.route"
    plain, merged = pair(path.read_text(), str(path), d=8, depth=2)
    name = "layers.{}.multiview.mixer"
    assert mixer_calls(plain, 2, name) == [2, 2]
    assert mixer_calls(merged, 2, name) == [1, 1]
    assert_same(plain, merged, [torch.randn(3, 5, 8)])


def test_launches_per_forward_drop_for_rsmamba():
    """The `routec run --stats` counter (CPU, reference backend): one launch per kernel on 3B rows instead of
    three on B rows (plus the stacking copy)."""
    text = stdlib.path("rsmamba").read_text()
    plain, merged = pair(text, "rsmamba.route", **RSMAMBA)
    img = torch.randn(2, 3, RSMAMBA["size"], RSMAMBA["size"])
    before = count_launches(plain.eval(), [img])
    after = count_launches(merged.eval(), [img])
    assert after < before / 2, (before, after)


def test_merged_model_compiles_fullgraph():
    text = stdlib.path("rsmamba").read_text()
    _, merged = pair(text, "rsmamba.route", **RSMAMBA)
    merged.eval()
    img = torch.randn(2, 3, RSMAMBA["size"], RSMAMBA["size"])
    torch._dynamo.reset()
    compiled = torch.compile(merged, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.manual_seed(5)
        want = merged(img)
        torch.manual_seed(5)
        got = compiled(img)
    torch.testing.assert_close(got, want)


def test_emitted_module_runs_the_merged_graph(tmp_path):
    """`routec compile -o`: the standalone file spells torch.cat / torch.split / batch_dim and computes the same."""
    import importlib.util

    from routec.compiler.emit import emit_module

    path = ROOT / "examples" / "selective.route"
    net = load(path, **SELECTIVE)
    out = tmp_path / "selective_net.py"
    out.write_text(emit_module(net, path, SELECTIVE))
    spec = importlib.util.spec_from_file_location("selective_net", out)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    standalone = mod.SelectiveNet()
    standalone.load_state_dict(net.state_dict())
    assert "torch.cat" in out.read_text()
    x = torch.randn(2, 5, SELECTIVE["d"])
    net.eval()
    standalone.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        a = net(x)
        torch.manual_seed(1)
        b = standalone(x)
    torch.testing.assert_close(b, a)


# ---------------------------------------------------------------- what is merged, what is not

def test_dependent_calls_are_not_merged():
    """`mixer(mixer(h))` runs the second call on the first's output: merging would make it depend on itself.
    With a third, independent call, that one joins the first call's group."""
    text = """
model M(d: int = 8) {
    in x: [B, L, d]
    mixer = MambaMixer(d, 16)
    out mixer(mixer(x))
}
model N(d: int = 8) {
    in x: [B, L, d]
    mixer = MambaMixer(d, 16)
    a = mixer(x)
    b = mixer(a)
    c = mixer(x -> flip(1))
    out a + b + c
}
"""
    plain = elaborate("<t>", text, {}, model="M")
    assert find_groups(plain.graph_module) == []
    assert batch_module(plain) == 0
    assert count_calls(plain.graph_module, "mixer") == 2
    plain, merged = pair_model(text, "N")
    assert count_calls(plain.graph_module, "mixer") == 3
    assert count_calls(merged.graph_module, "mixer") == 2  # a and c merged; b depends on a
    assert_same(plain, merged, [torch.randn(2, 6, 8)])


def test_crosswise_groups_are_rechecked_after_each_merge():
    """p(y) and p(q(x)) are independent, and so are q(x) and q(p(y)); but once the p calls are one call on
    [y; q(x)], q(p(y)) depends on q(x) through it: merging the q calls too would make a cycle. The pass
    merges one group at a time and recomputes the groups, so only the p calls merge."""
    text = """
model M(d: int = 8) {
    in x: [B, L, d]
    in y: [B, L, d]
    p = Linear(d, d)
    q = Linear(d, d)
    a = p(y)
    u = q(x)
    b = p(u)
    c = q(a)
    out b + c
}
"""
    plain, merged = pair_model(text, "M")
    assert len(find_groups(plain.graph_module)) == 2  # both pairs look mergeable on the original graph
    assert count_calls(merged.graph_module, "p") == 1
    assert count_calls(merged.graph_module, "q") == 2
    merged.graph.lint()
    assert_same(plain, merged, [torch.randn(2, 3, 8), torch.randn(2, 3, 8)])


def test_no_merge_that_would_reorder_random_draws():
    """The merged call goes after the latest input (here the second shuffle); the first call's user, a random
    shuffle, would have to move after the second shuffle, and the same seed would draw other permutations.
    Such a merge is refused; with a deterministic user (flip) it goes ahead and the output is unchanged."""
    text = """
model M(d: int = 8) {
    in x: [B, L, d]
    mixer = Linear(d, d)
    s = mixer(x) -> permute(1, random)
    b = x -> permute(1, random)
    out s * 2.0 + mixer(b)
}
"""
    plain = elaborate("<t>", text, {})
    assert find_groups(plain.graph_module) == []
    assert batch_module(plain) == 0
    plain, merged = pair_model(text.replace("s = mixer(x) -> permute(1, random)", "s = mixer(x) -> flip(1)"), "M")
    assert count_calls(merged.graph_module, "mixer") == 1
    assert_same(plain, merged, [torch.randn(2, 5, 8)])


def pair_model(text: str, model: str, **params):
    plain = elaborate("<t>", text, params, model=model)
    merged = elaborate("<t>", text, params, model=model)
    merged.load_state_dict(plain.state_dict())
    batch_module(merged)
    return plain, merged


def test_shared_batchnorm_is_not_merged():
    """BatchNorm normalises with the batch's statistics in training: calls on B rows each and one call on
    2B rows differ, so a shared BatchNorm stays as two calls (training and eval)."""
    text = """
model M(c: int = 4) {
    in x: [B, c, 6, 6]
    bn = BatchNorm2d(c)
    out bn(x) + bn(x -> flip(2))
}
"""
    plain = elaborate("<t>", text, {})
    assert count_calls(plain.graph_module, "bn") == 2
    assert batch_module(plain) == 0
    assert count_calls(plain.graph_module, "bn") == 2
    # the same structure with a per-sample norm does merge
    merged = elaborate("<t>", text.replace("BatchNorm2d(c)", "GroupNorm(2, c)"), {})
    assert batch_module(merged) == 1
    assert count_calls(merged.graph_module, "bn") == 1


def test_dropout_and_different_lengths_are_not_merged():
    """A shared Dropout(p > 0) draws a mask per call (merged, the draws would differ); a shared Linear on
    [B, L, d] and [B, T, d] is not merged (L and T need not agree)."""
    text = """
model M(d: int = 8) {
    in x: [B, L, d]
    in y: [B, T, d]
    drop = Dropout(0.5)
    lin = Linear(d, d)
    out (drop(x) -> mean(1)) + (drop(x -> flip(1)) -> mean(1)) + (lin(x) -> mean(1)) + (lin(y) -> mean(1))
}
"""
    plain = elaborate("<t>", text, {})
    assert count_calls(plain.graph_module, "drop") == count_calls(plain.graph_module, "lin") == 2
    assert find_groups(plain.graph_module) == []
    assert batch_module(plain) == 0
    # with p = 0 and equal lengths both merge
    same = elaborate("<t>", text.replace("Dropout(0.5)", "Dropout(0.0)").replace("[B, T, d]", "[B, L, d]"), {})
    assert batch_module(same) == 2
    assert count_calls(same.graph_module, "drop") == count_calls(same.graph_module, "lin") == 1


def test_calls_on_different_batch_sizes_merge():
    """Calls on [B, L, d] and [N, L, d] merge: each call's rows are read at run time for the split."""
    text = """
model M(d: int = 8) {
    in x: [B, L, d]
    in y: [N, L, d]
    mixer = MambaMixer(d, 16)
    a = mixer(x) -> mean(1) -> mean(0)
    b = mixer(y) -> mean(1) -> mean(0)
    out a + b
}
"""
    plain, merged = pair_model(text, "M")
    assert count_calls(merged.graph_module, "mixer") == 1
    assert_same(plain, merged, [torch.randn(2, 5, 8), torch.randn(3, 5, 8)])


def test_tuple_outputs_and_multi_input_cells():
    """A shared LSTMCell (inputs x, h, c; outputs (h, c)) on two independent batches, twice: the second
    step depends on the first, so 4 calls become 2, and the second merged call takes the first's stacked
    states as they are (no split then re-stack, no dead pieces left)."""
    text = """
model M(i: int = 5, n: int = 6) {
    in x: [B, i]
    in y: [B, i]
    cell = LSTMCell(i, n)
    h1, c1 = cell(x)
    h2, c2 = cell(y)
    h3, c3 = cell(x, (h1, c1))
    h4, c4 = cell(y, (h2, c2))
    out h3 * c3 + h4 - c4
}
"""
    plain, merged = pair_model(text, "M")
    assert count_calls(plain.graph_module, "cell") == 4
    assert count_calls(merged.graph_module, "cell") == 2
    assert sum(1 for n in merged.graph.nodes if n.target is torch.cat) == 2  # x and y, once per step
    assert all(n.users for n in merged.graph.nodes if n.op != "output")
    assert_same(plain, merged, [torch.randn(3, 5), torch.randn(3, 5)])


def test_block_called_twice_merges_layer_by_layer():
    """A block instance applied to two inputs calls each of its layers twice. Each layer's pair merges; a
    layer fed directly by the previous merged layer takes its merged tensor (LayerNorm → Linear: no cat),
    while an elementwise function between two layers (gelu) runs per piece and is stacked again."""
    text = """
block Branch(d: int) {
    in x: [B, L, d]
    out x -> Linear(d, 2 * d) -> gelu -> LayerNorm(2 * d) -> Linear(2 * d, d)
}
model M(d: int = 8) {
    in x: [B, L, d]
    f = Branch(d)
    out f(x) + f(x -> flip(1))
}
"""
    plain, merged = pair_model(text, "M")
    assert sum(1 for n in plain.graph.nodes if n.op == "call_module") == 6
    assert sum(1 for n in merged.graph.nodes if n.op == "call_module") == 3
    assert sum(1 for n in merged.graph.nodes if n.target is torch.cat) == 2
    assert_same(plain, merged, [torch.randn(2, 5, 8)])


def test_per_sample_whitelist():
    d = 8
    assert per_sample(MambaMixer(d, 16), 3)
    assert not per_sample(MambaMixer(d, 16), 2)
    assert per_sample(nn.Linear(d, d), 2) and not per_sample(nn.Linear(d, d), 1)
    assert per_sample(nn.LayerNorm(d), 2) and not per_sample(nn.LayerNorm((4, d)), 2)
    assert per_sample(L.TransformerBlock(d, 2), 3)
    assert not per_sample(L.TransformerBlock(d, 2, dropout=0.1), 3)
    assert not per_sample(L.SelfAttention(d, 2), 2)  # unbatched [L, d]: dim 0 is the tokens
    assert not per_sample(nn.Dropout(0.1), 2) and per_sample(nn.Dropout(0.0), 2)
    assert not per_sample(nn.BatchNorm1d(d), 2)
    block = L.TransformerBlock(d, 2)
    block.norm1 = nn.BatchNorm1d(d)  # a composite is judged by its contents
    assert not per_sample(block, 3)
    assert not per_sample(nn.Sequential(nn.Linear(d, d)), 2)  # not whitelisted: its forward is unknown

    class Sub(nn.Linear):
        def forward(self, x):
            return super().forward(x - x.mean(0))

    assert not per_sample(Sub(d, d), 2)  # exact classes only


def test_graph_stays_well_formed_and_marks_its_splits():
    text = stdlib.path("rsmamba").read_text()
    net = elaborate("rsmamba.route", text, dict(RSMAMBA))
    gm = net.graph_module
    assert batch_graph(gm) == 4  # 2 layers × (3 calls → 1)
    gm.graph.lint()
    splits = [n for n in gm.graph.nodes if n.meta.get(SPLIT_META)]
    assert len(splits) == 2 and all(n.meta[SPLIT_META] == 3 for n in splits)
    for s in splits:
        assert {u.target for u in s.users} == {operator.getitem}
    assert batch_graph(gm) == 0  # idempotent


def test_compile_source_on_meta_device():
    """The pass needs no tensors: a paper-size model on the meta device is batched too."""
    net = compile_source(stdlib.path("rsmamba").read_text(), "rsmamba.route", device="meta", depth=3)
    assert mixer_calls(net, 3, "layers.{}.rsmambalayer.mixer") == [1, 1, 1]
