"""Hyperedge discovery: which channels of a network must be pruned together."""

from gator_hw.graph.build import build_hypergraph, trace
from gator_hw.graph.hypergraph import (
    ChannelGroup,
    Hyperedge,
    HyperGraph,
    LayerCall,
    Plan,
    Seg,
    Site,
)
from gator_hw.graph.rules import channel_rule

__all__ = [
    "ChannelGroup",
    "HyperGraph",
    "Hyperedge",
    "LayerCall",
    "Plan",
    "Seg",
    "Site",
    "build_hypergraph",
    "channel_rule",
    "trace",
]
