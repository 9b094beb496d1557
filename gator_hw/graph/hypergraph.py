"""The hypergraph: channel groups ("hyperedges"), the layer sides they touch, and their order.

Worked example (torchvision ResNet-18, first block)::

    conv1 -> bn1 -> relu -> maxpool -> layer1.0.conv1 -> ... -> layer1.0.conv2 -> bn2 -> (+) -> ...
      |                                    ^                                           ^
      '------------------------------------+---------------- identity -----------------'

The stem conv's output channels, ``layer1.0.conv1``'s input channels, ``layer1.0.conv2``'s
output channels (added to the identity) and the next blocks' inputs all share one index space:
one hyperedge with sites ``conv1:out``, ``bn1:norm``, ``layer1.0.conv1:in``,
``layer1.0.conv2:out``, ... Removing channel 7 of that edge removes it at every site at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from gator_hw.errors import GatorError

__all__ = ["ChannelGroup", "HyperGraph", "Hyperedge", "LayerCall", "Plan", "Seg", "Site"]

#: edge index (or edge name) -> kept channel indices; edges not named keep every channel
Plan = Mapping[int | str, Sequence[int] | torch.Tensor]

#: site roles: ``out`` writes channels (conv/linear output dim), ``in`` reads them (input dim),
#: ``dw`` a depthwise conv (reads and writes the same channels), ``gconv`` a grouped conv whose
#: input and output share the edge, ``norm`` a per-channel affine layer (batch norm), ``ln`` a
#: layer norm over the channels, ``param`` a parameter lined up with the channels (layer
#: scale, class token, position embedding; ``module`` is the parameter's name), ``attn`` the
#: query/key and value channels that attention's matmuls read.
ROLES = ("out", "in", "dw", "gconv", "norm", "ln", "param", "attn")
READ_ROLES = ("in", "dw", "gconv")
WRITE_ROLES = ("out", "dw", "gconv")


@dataclass(frozen=True)
class Site:
    """One layer side of a channel group: ``module`` dimension slice ``[offset, offset+n*repeat)``.

    ``repeat`` > 1 where a flatten spreads each channel over several features (VGG: 7x7).
    """

    module: str
    role: str
    offset: int = 0
    repeat: int = 1

    def __str__(self) -> str:
        extra = f"@{self.offset}" if self.offset else ""
        extra += f"x{self.repeat}" if self.repeat > 1 else ""
        return f"{self.module}:{self.role}{extra}"


@dataclass(frozen=True)
class Seg:
    """A run of a tensor's channel dimension: all ``length`` channels of group ``gid``.

    Each channel covers ``repeat`` consecutive positions (after a flatten of H x W).
    """

    gid: int
    length: int
    repeat: int = 1

    @property
    def width(self) -> int:
        return self.length * self.repeat


@dataclass(frozen=True)
class ChannelGroup:
    """A set of layer sides sharing one channel index space.

    Prunable groups are the hyperedges (``Hyperedge``); the others record why they are frozen.
    """

    gid: int
    name: str
    channels: int
    sites: tuple[Site, ...]
    groups: int = 1
    frozen_reasons: tuple[str, ...] = ()

    @property
    def prunable(self) -> bool:
        return not self.frozen_reasons

    @property
    def writers(self) -> tuple[str, ...]:
        """Modules that produce this group's channels, in forward order."""
        return tuple(dict.fromkeys(s.module for s in self.sites if s.role in WRITE_ROLES))

    def __str__(self) -> str:
        state = "prunable" if self.prunable else "frozen: " + "; ".join(self.frozen_reasons)
        return f"{self.name} [{self.channels} ch, {len(self.sites)} sites, {state}]"


Hyperedge = ChannelGroup  # a prunable ChannelGroup; its ``gid`` is its edge index


@dataclass(frozen=True)
class LayerCall:
    """One call of a layer with weights, with the channel layout of its input and output.

    ``kind`` is ``conv``, ``linear``, ``norm`` (batch or layer norm), ``param`` (a parameter
    lined up with channels), or ``attention`` / ``attention_core`` / ``attention_out`` (the
    packed projection, the matmuls and the output projection of a ``MultiheadAttention``, of
    Swin's window attention or of MaxViT's attention; ``module`` of the latter two:
    ``NAME.core``, and ``out_proj``, ``proj`` or ``merge``). ``spatial_in`` / ``spatial_out``
    are the positions per sample that each channel covers (H*W for conv; tokens for linear;
    for ``attention_core`` the queries and the keys each query attends to), and ``kernel`` the
    kernel area. ``depthwise`` convs have ``groups`` equal to their channels.
    """

    module: str
    kind: str
    order: int
    in_layout: tuple[Seg, ...]
    out_layout: tuple[Seg, ...]
    kernel: int = 1
    groups: int = 1
    depthwise: bool = False
    bias: bool = False
    spatial_in: int = 1
    spatial_out: int = 1
    stride: int = 1
    in_hw: tuple[int, ...] = ()
    out_hw: tuple[int, ...] = ()
    channels_last: bool = False  # a Linear on (batch, ..., features): channels are the last dim
    dim: int = 1  # kind ``param``: the parameter's dim that carries the channels


@dataclass(frozen=True)
class HyperGraph:
    """Complete, read-only picture of a network's channel groups.

    ``groups[:n_edges]`` are the prunable hyperedges in edge order (``gid`` == edge index); the
    rest are frozen groups (network input and output, channels touched by ops without a rule).
    ``calls`` are the weighted layer calls in forward order; ``node_layouts`` gives the channel
    layout of every traced tensor (by torch.fx node name), and ``dataflow`` every traced node as
    ``(op, module name for call_module, input node names)``, in forward order. ``fixed_flops``
    are the FLOPs per sample that ``FlopCounterMode`` counts outside ``calls`` (ops without a
    channel rule, e.g. attention matmuls): they read only frozen channels, so no plan changes
    them. ``channels_last`` names the nodes whose layout describes their last dim (the
    features of a (batch, ..., features) tensor), not dim 1.
    Edge order: by the forward position of the last layer that writes the edge's channels. For
    torchvision ResNet-50 this is the GATOR order (stem, per block inner1, inner2, then each
    stage's highway after its blocks).
    """

    model_name: str
    input_shape: tuple[int, ...]
    groups: tuple[ChannelGroup, ...]
    n_edges: int
    calls: tuple[LayerCall, ...]
    node_layouts: Mapping[str, tuple[Seg, ...]] = field(default_factory=dict)
    dataflow: Mapping[str, tuple[str, str, tuple[str, ...]]] = field(default_factory=dict)
    fixed_flops: float = 0.0
    channels_last: frozenset[str] = frozenset()  # nodes whose layout is their last dim

    @property
    def edges(self) -> tuple[ChannelGroup, ...]:
        return self.groups[: self.n_edges]

    @property
    def frozen(self) -> tuple[ChannelGroup, ...]:
        return self.groups[self.n_edges :]

    @property
    def widths(self) -> dict[int, int]:
        """Full channel count of every group (gid -> channels)."""
        return {g.gid: g.channels for g in self.groups}

    def edge(self, key: int | str) -> ChannelGroup:
        """Look an edge up by index or name; a clear error for anything else."""
        if isinstance(key, int) and not isinstance(key, bool):
            if 0 <= key < self.n_edges:
                return self.groups[key]
            raise GatorError(
                f"edge index {key} is out of range: {self.model_name} has {self.n_edges} prunable "
                f"edges (0..{self.n_edges - 1}); see `gator-hw edges {self.model_name}`"
            )
        for e in self.edges:
            if e.name == key:
                return e
        if str(key).lstrip("-").isdigit():
            return self.edge(int(key))
        raise GatorError(
            f"unknown edge '{key}' in {self.model_name}; see `gator-hw edges {self.model_name}` "
            "for the edge names"
        )

    def normalize_plan(self, plan: Plan, *, min_keep: int = 1) -> dict[int, list[int]]:
        """Validate a plan and return edge index -> sorted kept indices for every edge.

        Raises ``GatorError`` for an unknown edge, an index out of range, duplicates, fewer than
        ``min_keep`` channels, or a grouped-conv edge kept unevenly across its groups.
        """
        out = {e.gid: list(range(e.channels)) for e in self.edges}
        for key, kept in plan.items():
            e = self.edge(key)
            idx = kept.tolist() if isinstance(kept, torch.Tensor) else [int(i) for i in kept]
            idx_sorted = sorted(set(idx))
            if len(idx_sorted) != len(idx):
                raise GatorError(f"plan keeps duplicate channel indices on edge {e.name}")
            if idx_sorted and (idx_sorted[0] < 0 or idx_sorted[-1] >= e.channels):
                raise GatorError(
                    f"plan keeps channel {idx_sorted[-1] if idx_sorted[-1] >= 0 else idx_sorted[0]}"
                    f" of edge {e.name}, which has channels 0..{e.channels - 1}"
                )
            if len(idx_sorted) < min_keep:
                raise GatorError(
                    f"plan keeps {len(idx_sorted)} channels of edge {e.name}, which must keep at "
                    f"least {min_keep}; keep one or more channels there"
                )
            _check_group_balance(e, idx_sorted)
            out[e.gid] = idx_sorted
        return out

    def valid_keep_count(self, edge: int | str, n: int) -> int:
        """The closest channel count >= 1 that an edge can keep (a multiple of its conv groups)."""
        e = self.edge(edge)
        n = max(1, min(int(n), e.channels))
        g = e.groups
        return max(g, (n // g) * g) if g > 1 else n

    def first_channels_plan(self, widths: Mapping[int, int]) -> dict[int, list[int]]:
        """A plan keeping the first ``widths[e]`` channels of each named edge (group-balanced)."""
        plan: dict[int, list[int]] = {}
        for gid, n in widths.items():
            e = self.edge(gid)
            n = self.valid_keep_count(gid, n)
            per, size = n // e.groups, e.channels // e.groups
            plan[e.gid] = [g * size + i for g in range(e.groups) for i in range(per)]
        return plan

    def summary(self) -> str:
        """One line per group (edges first), for debugging and logs."""
        lines = [f"{self.model_name}: {self.n_edges} prunable edges, {len(self.frozen)} frozen"]
        lines += [f"  {g.gid:3d} {g}" for g in self.groups]
        return "\n".join(lines)

    def __str__(self) -> str:
        return (
            f"HyperGraph({self.model_name}, input {tuple(self.input_shape)}, "
            f"{self.n_edges} edges, {len(self.frozen)} frozen groups, {len(self.calls)} layers)"
        )


def _check_group_balance(e: ChannelGroup, idx: list[int]) -> None:
    if e.groups <= 1:
        return
    size = e.channels // e.groups
    counts = [0] * e.groups
    for i in idx:
        counts[i // size] += 1
    if len(set(counts)) != 1:
        raise GatorError(
            f"edge {e.name} feeds a grouped conv ({e.groups} groups of {size}); keep the same "
            f"number of channels in every group (got {counts[:4]}...)"
        )
