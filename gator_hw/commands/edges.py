"""``gator-hw models`` and ``gator-hw edges``: what can be built, and its hyperedges."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gator_hw.accounting import edge_costs, gator_units, network_cost
from gator_hw.commands.common import InputSize, ModelName, NumClasses, console
from gator_hw.models import available_models
from gator_hw.network import Network, load_network

__all__ = ["edges_report", "register"]


def _latency_shares(net: Network, table: Path | None) -> dict[int, float]:
    if table is None:
        return {}
    import numpy as np

    from gator_hw.costmodel.dataset import load_samples
    from gator_hw.costmodel.features import FeatureMap
    from gator_hw.report import edge_shares

    samples = load_samples([table], net.graph)
    _, ls = edge_shares(samples, FeatureMap(net.graph, samples.batch, samples.dtype))
    return {i: float(v) for i, v in enumerate(ls) if not np.isnan(v)}


def edges_report(net: Network, table: Path | None = None) -> dict:
    """The edge table of a network as plain data (what ``--json`` prints).

    With a profile ``table``, each edge also gets ``latency_saving_pct``: the latency its
    half-width probe saved, in % of the full network.
    """
    g = net.graph
    total = network_cost(g)
    costs = {c.edge: c for c in edge_costs(g)}
    latency = _latency_shares(net, table)
    rows = []
    for grp in g.groups:
        c = costs.get(grp.gid) if grp.prunable else None
        rows.append(
            {
                "index": grp.gid if grp.prunable else None,
                "name": grp.name,
                "channels": grp.channels,
                "groups": grp.groups,
                "members": [str(s) for s in grp.sites],
                "prunable": grp.prunable,
                "why_not": list(grp.frozen_reasons),
                "flops_per_channel": c.flops_per_channel if c else None,
                "params_per_channel": c.params_per_channel if c else None,
                "bytes_per_channel": c.bytes_per_channel if c else None,
                "flops_share": c.flops_share if c else None,
                "latency_saving_pct": latency.get(grp.gid) if grp.prunable else None,
            }
        )
    return {
        "model": net.name,
        "input_shape": list(g.input_shape),
        "n_edges": g.n_edges,
        "flops": total.flops,
        "params": total.params,
        "bytes": total.bytes,
        "gator_units": gator_units(g, total),
        "edges": rows,
    }


def models_cmd() -> None:
    """List the model names gator-hw can build (or pass path/to/file.py:factory)."""
    for name in available_models():
        console.print(name)


def edges_cmd(
    model: ModelName,
    input_size: InputSize = None,
    num_classes: NumClasses = 1000,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
    profile: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False,
                     help="A profile table of this model: adds measured latency savings."),
    ] = None,
) -> None:
    """Discover MODEL's hyperedges and print them with their cost shares."""
    net = load_network(model, input_size=input_size, num_classes=num_classes)
    report = edges_report(net, profile)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    table = Table(
        title=f"{net} ({report['flops'] / 1e9:.3f} GFLOPs, "
        f"{report['params'] / 1e6:.2f} M params)"
    )
    cols = [("#", "right"), ("edge", "left"), ("ch", "right"), ("FLOPs %", "right")]
    if profile is not None:
        cols.append(("lat. saved % @half", "right"))
    cols += [("sites", "right"), ("prunable", "left")]
    for col, just in cols:  # names wrap (fold), never cut with an ellipsis
        table.add_column(col, justify=just, overflow="fold",
                         min_width=12 if col in ("edge", "prunable") else None)
    for row in report["edges"]:
        share = f"{100 * row['flops_share']:.2f}" if row["flops_share"] is not None else "-"
        lat = row["latency_saving_pct"]
        cells = [
            "-" if row["index"] is None else str(row["index"]),
            row["name"] + (f" (g={row['groups']})" if row["groups"] > 1 else ""),
            str(row["channels"]),
            share,
        ]
        if profile is not None:
            cells.append("-" if lat is None else f"{lat:.2f}")
        cells += [
            str(len(row["members"])),
            "yes" if row["prunable"] else "no: " + "; ".join(row["why_not"]),
        ]
        table.add_row(*cells)
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add the ``models`` and ``edges`` commands to ``app``."""
    app.command("models")(models_cmd)
    app.command("edges")(edges_cmd)
