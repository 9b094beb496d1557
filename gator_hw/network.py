"""A model together with its hypergraph: the starting point of every gator-hw step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from gator_hw.errors import GatorError
from gator_hw.graph import HyperGraph, build_hypergraph
from gator_hw.models import build_model, default_input_size, load_weights

__all__ = ["Network", "load_network"]


@dataclass(frozen=True)
class Network:
    """A built model, the name it was built from, its input shape and its hypergraph."""

    name: str
    model: nn.Module
    graph: HyperGraph
    input_size: int
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, 3, self.input_size, self.input_size)

    def __str__(self) -> str:
        return f"{self.name} @ {self.input_size}x{self.input_size}: {self.graph.n_edges} edges"


def load_network(
    name: str,
    *,
    input_size: int | None = None,
    num_classes: int = 1000,
    weights: str | Path | None = None,
    seed: int | None = 0,
    log: Callable[[str], None] | None = None,
) -> Network:
    """Build ``name`` (random init, or ``weights``: a state dict file or a torchvision weights
    name), trace it and discover its hyperedges; ``log`` hears what loading the weights did."""
    if input_size is not None and input_size < 1:
        raise GatorError(f"--input-size must be a positive number of pixels, got {input_size}")
    size = input_size or default_input_size(name)
    model = build_model(name, num_classes, seed=seed)
    if weights is not None:
        load_weights(model, weights, name=name, log=log)
    graph = build_hypergraph(model, (1, 3, size, size), name)
    n_out = output_channels(graph) or getattr(model, "num_classes", None)
    return Network(name, model, graph, size, int(n_out or num_classes))


def output_channels(graph) -> int | None:
    """The outputs per sample the traced network returns (its classes), from the layout of its
    one output tensor; None when it returns several or the layout is unknown."""
    outs = [inputs for op, _, inputs in graph.dataflow.values() if op == "output"]
    if len(outs) != 1 or len(outs[0]) != 1:
        return None
    layout = graph.node_layouts.get(outs[0][0])
    return sum(s.length * s.repeat for s in layout) if layout else None
