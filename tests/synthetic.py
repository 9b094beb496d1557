"""Synthetic profile tables with a known latency law, written by the real table code."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gator_hw.costmodel.features import FeatureMap
from gator_hw.network import Network
from gator_hw.profile.tables import Cell, build_table, table_metadata, write_tables
from gator_hw.profile.timing import make_spec
from gator_hw.profile.variants import build_variants

BATCH = 4


def true_latency_ms(net: Network, widths: np.ndarray) -> np.ndarray:
    """A latency law FLOPs cannot express: the stem and layer1 cost 3x per FLOP, and layers
    whose channel counts are not multiples of 8 pay 30 % extra."""
    fmap = FeatureMap(net.graph, BATCH)
    calls = [c for c in net.graph.calls if c.kind != "norm"]
    rate = np.array([3.0 if c.module.startswith(("layer1", "conv1")) else 1.0 for c in calls])
    x = fmap.layer(widths)
    mis8 = x[:, fmap.layer_names().index("flops_mis8")]
    return 0.4 + 2.0 * x[:, 0 : 2 * len(calls) : 2] @ rate + 0.6 * mis8


def write_synthetic_table(
    path: Path, net: Network, *, fractions=(0.25, 0.5, 0.75), random_nets: int = 30,
    rounds: int = 3, noise: float = 0.003, seed: int = 0, device: str = "cpu",
) -> Path:
    """Time nothing: build cells from ``true_latency_ms`` (+ noise and round drift), write them
    as if timed on ``device`` (the sidecar names it)."""
    g = net.graph
    spec = make_spec(net.name, batch=BATCH, input_size=net.input_size, threads=1, device=device)
    variants = build_variants(g, fractions, random_nets=random_nets, seed=seed)
    truth = true_latency_ms(net, np.array([v.widths for v in variants]))
    rng = np.random.default_rng(seed)
    cells = []
    for r in range(rounds):
        for v, t in zip(variants, truth, strict=True):
            times = t * (1 + 0.01 * r) * (1 + noise * rng.standard_normal(10)) / 1e3
            cells.append(Cell(r, v.vid, tuple(float(x) for x in times), 1))
    table = build_table(g, variants, cells, spec)
    settings = {"widths": list(fractions), "random_nets": random_nets, "rounds": rounds,
                "seed": seed}
    write_tables(table, path, table_metadata(table, g, spec, settings=settings))
    return path
