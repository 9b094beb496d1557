"""The network variants a profile times: the full net, single-edge probes and random nets.

A variant is a channel count for every prunable edge. Three kinds:

* ``baseline``: every edge at full width (id ``full``); timed in every round.
* ``edge``: one edge ``e`` at ``round(f * C_e)`` channels (half up) for each width fraction
  ``f``, optionally rounded to a multiple of ``round_to``, then to a count the edge can keep
  (``graph.valid_keep_count``); the rest full. Id ``e003-k32`` (edge 3 keeps 32 channels).
  Probes that keep every channel, or repeat an earlier probe, are dropped.
* ``random``: seeded random nets, per-edge keep ratio uniform in [0.25, 1] (the lower end is
  ``--random-min-keep``); every second one
  (odd index) has its channel counts rounded to multiples of 8. Id ``r007-1a2b3c4d`` (index
  and a digest of the widths). These are the held-out validation set of the cost model.

Ids are stable: the same graph, fractions, ``round_to`` and seed give the same ids, which is
what lets an interrupted profile resume.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gator_hw.errors import GatorError
from gator_hw.graph.hypergraph import HyperGraph

__all__ = [
    "RANDOM_KEEP_RANGE",
    "RANDOM_ROUND_TO",
    "Variant",
    "baseline_variant",
    "build_variants",
    "edge_variants",
    "keep_count",
    "parse_widths",
    "random_variants",
]

#: Per-edge keep ratio range of the random validation nets.
RANDOM_KEEP_RANGE: tuple[float, float] = (0.25, 1.0)
#: Channel multiple of the rounded half of the random nets.
RANDOM_ROUND_TO: int = 8

KINDS = ("baseline", "edge", "random")


@dataclass(frozen=True)
class Variant:
    """One network to time: kept channels per edge (edge order) and how it was chosen.

    ``edge`` and ``fraction`` describe single-edge probes; they are -1 and 1.0 otherwise.
    """

    vid: str
    kind: str
    widths: tuple[int, ...]
    edge: int = -1
    fraction: float = 1.0

    def narrowed(self, graph: HyperGraph) -> dict[int, int]:
        """Edge index -> kept channels, for the edges this variant narrows."""
        return {e.gid: n for e, n in zip(graph.edges, self.widths, strict=True) if n != e.channels}

    def __str__(self) -> str:
        if self.kind == "edge":
            return (
                f"{self.vid}: edge {self.edge} at {self.widths[self.edge]} ch ({self.fraction:g})"
            )
        kept = sum(self.widths)
        return f"{self.vid}: {self.kind}, {kept} channels kept over {len(self.widths)} edges"


def parse_widths(widths: str | float | Sequence[float]) -> tuple[float, ...]:
    """Parse width fractions (``"0.25,0.5"`` or numbers); each must lie in (0, 1].

    Raises
    ------
    GatorError
        For an empty list, a non-number, or a fraction outside (0, 1].
    """
    if isinstance(widths, str):
        parts = [p.strip() for p in widths.split(",") if p.strip()]
    elif isinstance(widths, (int, float)):
        parts = [widths]
    else:
        parts = list(widths)
    if not parts:
        raise GatorError("--widths is empty; pass fractions such as 0.5 or 0.25,0.5,0.75")
    out: list[float] = []
    for p in parts:
        try:
            f = float(p)
        except ValueError:
            raise GatorError(
                f"--widths: '{p}' is not a number; pass fractions such as 0.25,0.5,0.75"
            ) from None
        if not (0.0 < f <= 1.0) or math.isnan(f):
            raise GatorError(
                f"--widths: {p} is outside (0, 1]; a width is the fraction of an edge's "
                "channels kept, e.g. 0.5"
            )
        out.append(f)
    return tuple(dict.fromkeys(out))


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _round_multiple(n: int, m: int, channels: int) -> int:
    if channels <= m:
        return n
    return min(channels, max(m, m * _half_up(n / m)))


def keep_count(graph: HyperGraph, edge: int, fraction: float, round_to: int | None = None) -> int:
    """Channels edge ``edge`` keeps at ``fraction`` (half up, optional multiple, valid count)."""
    channels = graph.edge(edge).channels
    n = max(1, _half_up(fraction * channels))
    if round_to:
        n = _round_multiple(n, round_to, channels)
    return graph.valid_keep_count(edge, n)


def baseline_variant(graph: HyperGraph) -> Variant:
    """The full-width network (id ``full``)."""
    return Variant("full", "baseline", tuple(e.channels for e in graph.edges))


def edge_variants(
    graph: HyperGraph, fractions: Sequence[float], round_to: int | None = None
) -> list[Variant]:
    """Single-edge probes: edge-major, fractions in the given order, duplicates dropped."""
    full = [e.channels for e in graph.edges]
    out: list[Variant] = []
    for e in graph.edges:
        seen: set[int] = set()
        for f in fractions:
            n = keep_count(graph, e.gid, f, round_to)
            if n == e.channels or n in seen:
                continue
            seen.add(n)
            widths = list(full)
            widths[e.gid] = n
            out.append(Variant(f"e{e.gid:03d}-k{n}", "edge", tuple(widths), e.gid, float(f)))
    return out


def _digest(widths: Sequence[int]) -> str:
    return hashlib.sha1(",".join(map(str, widths)).encode()).hexdigest()[:8]


def random_variants(
    graph: HyperGraph, n: int, seed: int = 0, min_keep: float | None = None
) -> list[Variant]:
    """``n`` seeded random nets; odd indices have widths rounded to multiples of 8.

    Per-edge keep ratios are uniform in [``min_keep``, 1] (default ``RANDOM_KEEP_RANGE``):
    lower it to cover the deeply pruned nets a small budget produces.
    """
    if n < 0:
        raise GatorError(f"--random-nets must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    lo, hi = RANDOM_KEEP_RANGE
    if min_keep is not None:
        if not 0.0 < min_keep <= 1.0:
            raise GatorError(f"--random-min-keep must be in (0, 1], got {min_keep}; e.g. 0.05")
        lo = min_keep
    out: list[Variant] = []
    for i in range(n):
        ratios = rng.uniform(lo, hi, size=graph.n_edges)
        widths = []
        for e, r in zip(graph.edges, ratios, strict=True):
            k = max(1, _half_up(float(r) * e.channels))
            if i % 2 == 1:
                k = _round_multiple(k, RANDOM_ROUND_TO, e.channels)
            widths.append(graph.valid_keep_count(e.gid, k))
        out.append(Variant(f"r{i:03d}-{_digest(widths)}", "random", tuple(widths)))
    return out


def build_variants(
    graph: HyperGraph,
    fractions: Sequence[float],
    *,
    round_to: int | None = None,
    random_nets: int = 0,
    seed: int = 0,
    random_min_keep: float | None = None,
) -> tuple[Variant, ...]:
    """Baseline first, then the single-edge probes, then the random nets."""
    if round_to is not None and round_to < 1:
        raise GatorError(f"--round-to must be >= 1 channel, got {round_to}")
    return (
        baseline_variant(graph),
        *edge_variants(graph, fractions, round_to),
        *random_variants(graph, random_nets, seed, random_min_keep),
    )
