"""`RoutedModule`: the nn.Module users get from `load` — the compiled fx graph and its outputs by name."""

from __future__ import annotations

from collections import namedtuple
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn


class RoutedModule(nn.Module):
    """A compiled spec. `forward(*inputs)` returns a tensor (one unnamed `out`) or a NamedTuple.

    Outputs: the spec's `out`s by name; with exits, training mode adds `exits` (every exit's output, in
    order) and `exit_scores` (per exit, the score its threshold rule compares, e.g. its confidence) and eval mode gives the per-sample selected `out` and its `exit_index`; gates with auxiliary
    losses add `aux_loss`. Parameter names follow the spec (docs/compiler.md).
    """

    # Set with object.__setattr__ (kept out of nn.Module's registry); declared so their types are known.
    graph_module: fx.GraphModule
    sources: dict[str, str]

    def __init__(self, gm: fx.GraphModule, name: str, out_names: list[str], exit_names: list[str],
                 has_aux: bool, inputs: list, stats: list, sources: dict[str, str], n_scores: int = 0):
        super().__init__()
        # The graph's modules and parameters are registered here under their spec paths (the same objects),
        # so names, state_dict keys, .to() and DDP see the spec's structure; the GraphModule that runs them
        # is held outside the registry.
        object.__setattr__(self, "graph_module", gm)
        for child_name, child in gm.named_children():
            self.add_module(child_name, child)
        for param_name, param in gm.named_parameters(recurse=False):
            self.register_parameter(param_name, param)
        self.spec_name = name
        self.out_names = list(out_names)
        self.exit_names = list(exit_names)
        self.has_aux = has_aux
        self.inputs = list(inputs)
        self.routing = list(stats)  # (kind, spec name, fx node name) of every gate, path gate and scan
        object.__setattr__(self, "sources", sources)
        fields = list(out_names)
        self.n_scores = n_scores
        train_fields = [f for f in fields if f != "exit_index"] + (["exits"] if exit_names else [])
        train_fields += ["exit_scores"] if n_scores else []
        if has_aux:
            fields.append("aux_loss")
            train_fields.append("aux_loss")
        self._eval_type = namedtuple(f"{name}Output", fields) if fields != ["out"] else None
        self._train_type = namedtuple(f"{name}TrainOutput", train_fields) if train_fields != ["out"] else None

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def forward(self, *inputs: torch.Tensor) -> Any:
        outs, exits, aux = self.graph_module(*inputs)
        if self.training:
            values = [v for n, v in zip(self.out_names, outs) if n != "exit_index"]
            if self.exit_names:
                values.append(tuple(exits[: len(self.exit_names)]))
            if self.n_scores:
                values.append(tuple(exits[len(self.exit_names):]))
            if self.has_aux:
                values.append(aux)
            return values[0] if self._train_type is None else self._train_type(*values)
        values = list(outs)
        if self.has_aux:
            values.append(aux)
        return values[0] if self._eval_type is None else self._eval_type(*values)
