"""Which edges may lose every channel: residual branches, not cuts of the network.

An edge whose every reader reads nothing else can be emptied: the layers it feeds then compute
constants (folded away by conversion). Unless the network output itself becomes constant: then
the edge is a cut (a plain chain, a stage's highway) and must keep a channel.
"""

from __future__ import annotations

from gator_hw.graph.hypergraph import READ_ROLES, HyperGraph

__all__ = [
    "constant_nodes", "disconnects", "min_keep_counts", "readers_only_of", "removable_edges"
]


def readers_only_of(graph: HyperGraph) -> set[int]:
    """Edges whose every reading layer reads nothing else (never an edge that a layer norm
    normalises or attention's matmuls read: those keep a channel)."""
    layouts = {c.module: c.in_layout for c in graph.calls}
    out = set()
    for e in graph.edges:
        if any(s.role in ("ln", "attn") for s in e.sites):
            continue
        readers = {s.module for s in e.sites if s.role in READ_ROLES}
        if readers and all(
            all(seg.gid == e.gid for seg in layouts[m]) for m in readers if m in layouts
        ):
            out.add(e.gid)
    return out


def _cut_readers(graph: HyperGraph, empty: set[int]) -> set[str]:
    """Layers whose whole input is made of empty edges."""
    return {
        c.module for c in graph.calls
        if c.in_layout and all(seg.gid in empty for seg in c.in_layout)
    }


def constant_nodes(graph: HyperGraph, empty: set[int]) -> set[str]:
    """Traced nodes whose value no longer depends on the input once ``empty`` edges are gone."""
    cut = _cut_readers(graph, empty)
    const: set[str] = set()
    for name, (op, module, inputs) in graph.dataflow.items():
        if op in ("placeholder", "output"):
            continue
        if (op == "call_module" and module in cut) or op == "get_attr" or (
            inputs and all(a in const for a in inputs)
        ):
            const.add(name)
    return const


def disconnects(graph: HyperGraph, empty: set[int]) -> bool:
    """Whether emptying ``empty`` leaves the network output independent of its input."""
    const = constant_nodes(graph, empty)
    return any(
        a in const for op, _, inputs in graph.dataflow.values() if op == "output" for a in inputs
    )


def removable_edges(graph: HyperGraph) -> set[int]:
    """Edges that may keep no channel: read by nothing else, and not a cut of the network.

    Emptying such an edge removes the part of the network it feeds (a residual branch) and
    folds what that part added into a constant.
    """
    return {g for g in readers_only_of(graph) if not disconnects(graph, {g})}


def min_keep_counts(graph: HyperGraph) -> list[int]:
    """Channels each edge must keep: 0 for removable branches, 1 for cuts of the network."""
    removable = removable_edges(graph)
    return [0 if e.gid in removable else 1 for e in graph.edges]
