"""Gather what the figures show from tables, a cost model and a config, and draw them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gator_hw import plots
from gator_hw.costmodel.dataset import Samples, load_samples
from gator_hw.costmodel.features import FeatureMap
from gator_hw.costmodel.make import table_context
from gator_hw.costmodel.model import CostModel
from gator_hw.costmodel.validate import validate
from gator_hw.errors import GatorError
from gator_hw.network import Network

__all__ = ["edge_shares", "plot_all"]


def edge_shares(samples: Samples, fmap: FeatureMap) -> tuple[np.ndarray, np.ndarray]:
    """Per edge, FLOPs and latency saved (% of the full net) by its probe closest to half width."""
    n = fmap.graph.n_edges
    f0 = fmap.flops(samples.widths[samples.kind == "baseline"][:1])[0]
    fs, ls = np.full(n, np.nan), np.full(n, np.nan)
    for e in range(n):
        own = np.flatnonzero((samples.kind == "edge") & (samples.edge == e))
        if len(own):
            i = own[np.argmin(np.abs(samples.fraction[own] - 0.5))]
            fs[e] = 100.0 * (f0 - fmap.flops(samples.widths[i][None])[0]) / f0
            ls[e] = 100.0 * (samples.baseline_ms - samples.latency_ms[i]) / samples.baseline_ms
    return fs, ls


def plot_all(
    net: Network,
    tables: Sequence[str | Path],
    out_dir: str | Path,
    *,
    cost_model: CostModel | None = None,
    multipliers: Sequence[float] | None = None,
) -> list[Path]:
    """Draw every figure the inputs allow into ``out_dir`` (PNG + SVG); return the files."""
    samples = load_samples(tables, net.graph)
    ctx = {**table_context(tables[0]), "model": net.name}
    fmap = FeatureMap(net.graph, samples.batch, samples.dtype)
    names = [e.name for e in net.graph.edges]
    files = plots.save_figure(
        plots.flops_vs_latency(samples, fmap.flops(samples.widths), ctx), out_dir,
        "flops_vs_latency")
    fs, ls = edge_shares(samples, fmap)
    if not np.isnan(fs).all():
        files += plots.save_figure(plots.share_bars(names, fs, ls, ctx), out_dir, "edge_shares")
    if cost_model is not None:
        try:
            _, detail = validate(cost_model, samples)
        except GatorError:
            detail = None  # no held-out nets: no parity plot
        if detail is not None:
            measured = np.asarray(detail["measured_ms"])
            preds = {k.split(":", 1)[1]: np.asarray(v) for k, v in detail.items()
                     if k.startswith("predicted_ms:")}
            files += plots.save_figure(plots.parity(measured, preds, ctx), out_dir, "parity")
        multipliers = multipliers or cost_model.multipliers()
    if multipliers is not None:
        files += plots.save_figure(plots.multipliers_bar(names, multipliers, ctx), out_dir,
                                   "multipliers")
    return files
