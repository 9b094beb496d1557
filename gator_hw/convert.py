"""Conversion: kept channels per edge -> a really smaller model that equals the gated one.

Edges that keep channels are sliced by ``gator_hw.slim``. An edge that keeps *no* channel
cuts every layer that reads only it from the data: what those layers compute no longer depends
on the input (a residual branch whose inner edge is empty, say). Such a part of the network is
evaluated once and replaced by the constant it produces (its last batch-norm shift pushed
through what follows), then removed with its now unused writers, so the converted model equals
the gated one exactly. The result is a ``torch.fx.GraphModule`` when anything was folded, and a
copy of the original class otherwise.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import fx, nn

from gator_hw.errors import GatorError
from gator_hw.graph import HyperGraph, trace
from gator_hw.graph.cuts import constant_nodes, disconnects, readers_only_of, removable_edges
from gator_hw.masking import mask_model
from gator_hw.slim import layout_index, slim

__all__ = ["CONST_PREFIX", "constant_nodes", "convert", "disconnects", "removable_edges"]

#: buffers holding folded constants are named ``gator_const_<k>`` in the converted model
CONST_PREFIX = "gator_const_"


def _values(gm: fx.GraphModule, nodes: set[fx.Node], example: torch.Tensor) -> dict:
    """Run ``gm`` once and return the values of ``nodes`` (batch 1: they are input-free)."""
    values: dict[fx.Node, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node):
            result = super().run_node(n)
            if n in nodes:
                values[n] = result.detach().clone()
            return result

    with torch.no_grad():
        Recorder(gm).run(example)
    return values


def _is_tensor(node: fx.Node) -> bool:
    """Whether a traced node produced a tensor (shape reads give Python ints)."""
    return hasattr(node.meta.get("tensor_meta"), "shape")


def _frontier(const: set[fx.Node]) -> set[fx.Node]:
    """Constant tensors to fold: read by a non-constant node or by a non-tensor op.

    Shape reads of a constant stay in the graph (they read the folded tensor, so a batch size
    they return follows the input's).
    """
    return {
        n for n in const
        if n.op != "get_attr" and _is_tensor(n)
        and any(u not in const or not _is_tensor(u) for u in n.users)
    }


def _fold(model: nn.Module, graph: HyperGraph, keep: Mapping[int, Sequence[int]],
          empty: set[int]) -> fx.GraphModule:
    """Trace ``model`` and replace the parts cut off by ``empty`` edges with constants."""
    gm = trace(model, graph.input_shape, graph.model_name)
    if disconnects(graph, empty):
        alone = [g for g in sorted(empty) if disconnects(graph, {g})]
        names = ", ".join(graph.edges[g].name for g in (alone or sorted(empty)))
        raise GatorError(
            f"removing every channel of {names} disconnects the network output from its input; "
            "keep at least one channel there"
        )
    names = constant_nodes(graph, empty)
    const = {n for n in gm.graph.nodes if n.name in names}
    frontier = _frontier(const)
    handles = mask_model(gm, graph, keep)
    try:
        param = next(gm.parameters())
        was_training = gm.training
        gm.eval()
        example = torch.zeros(graph.input_shape, device=param.device, dtype=param.dtype)
        values = _values(gm, frontier, example)
        gm.train(was_training)
    finally:
        for h in handles:
            h.remove()
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_after(placeholder):
        batch = gm.graph.call_method("size", (placeholder, 0))
    for k, node in enumerate(sorted(frontier, key=lambda n: n.name)):
        name = f"{CONST_PREFIX}{k}"
        value = values[node]
        layout = graph.node_layouts.get(node.name)
        if layout is not None and value.dim() >= 2:  # slice to the channels that stay
            dim = -1 if node.name in graph.channels_last else 1
            value = value.index_select(dim, layout_index(layout, keep).to(value.device))
        gm.register_buffer(name, value.contiguous())
        with gm.graph.inserting_before(node):
            new = gm.graph.get_attr(name)
            if value.dim() >= 1:  # batch 1 -> the input's batch (a view, no copy)
                new = gm.graph.call_method("expand", (new, batch, *value.shape[1:]))
        node.replace_all_uses_with(new)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def convert(model: nn.Module, graph: HyperGraph, keep: Mapping[int | str, Sequence[int]]
            ) -> nn.Module:
    """Remove every channel not in ``keep`` (edge -> kept indices) for real.

    Edges not named keep all their channels. An edge may keep none when every layer that reads
    it reads nothing else (``removable_edges``); the parts of the network that this cuts off
    are folded into constants. The model is used in eval mode (batch-norm statistics).
    """
    full = graph.normalize_plan(keep, min_keep=0)
    empty = {g for g, idx in full.items() if not idx}
    bad = sorted(empty - readers_only_of(graph))
    if bad:
        e = graph.edges[bad[0]]
        raise GatorError(
            f"edge {e.name} keeps no channel but is read together with other channels "
            "(a concatenation); keep at least one channel of it"
        )
    if not empty:
        return slim(model, graph, full).eval()
    gm = _fold(copy.deepcopy(model).eval(), graph, full, empty)
    left = {name for name, _ in gm.named_modules()}
    for e in (graph.edges[g] for g in sorted(empty)):
        still = sorted({s.module for s in e.sites} & left)
        if still:
            raise GatorError(
                f"edge {e.name} keeps no channel but {still[0]} still uses it; keep at least one"
            )
    kept = {g: idx for g, idx in full.items() if idx}
    return slim(gm, graph, kept, missing_ok=True).eval()
