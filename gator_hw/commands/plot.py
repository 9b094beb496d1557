"""``gator-hw plot``: FLOPs vs latency, parity, per-edge shares and multipliers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gator_hw.commands.common import InputSize, console

__all__ = ["register"]


def plot_cmd(
    tables: Annotated[list[Path], typer.Option(
        "--tables", "--timing", exists=True, dir_okay=False, help="Tidy profile table(s).")],
    model_file: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False,
        help="Cost model JSON (adds the parity plot and its multipliers).")] = None,
    config: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, help="Gating config whose multipliers to draw.")] = None,
    model: Annotated[str | None, typer.Option(
        help="Network the tables measured (default: recorded beside the table).")] = None,
    input_size: InputSize = None,
    out: Annotated[Path, typer.Option(help="Folder for the PNG and SVG files.")] = Path(
        "plots"),
) -> None:
    """Draw FLOPs vs measured latency, predicted vs measured, shares and multipliers."""
    from gator_hw.config import read_config
    from gator_hw.costmodel.make import table_context
    from gator_hw.costmodel.model import load_cost_model
    from gator_hw.errors import GatorError
    from gator_hw.network import load_network
    from gator_hw.report import plot_all

    ctx = table_context(tables[0])
    name = model or ctx.get("model")
    if not name:
        raise GatorError(f"{tables[0]} has no metadata naming its model; pass --model")
    net = load_network(name, input_size=input_size or ctx.get("input_size"))
    cm = load_cost_model(model_file, net.graph) if model_file else None
    mu = None
    if config is not None:
        cfg = read_config(config)
        cfg.check_edges(net.graph.n_edges, name)
        mu = cfg.edge_multipliers
    for path in plot_all(net, tables, out, cost_model=cm, multipliers=mu):
        console.print(str(path))


def register(app: typer.Typer) -> None:
    """Add ``plot`` to ``app``."""
    app.command("plot")(plot_cmd)
