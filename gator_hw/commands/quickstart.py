"""``gator-hw quickstart``: the main job on an embedded default, nothing to download."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gator_hw.commands.common import console

__all__ = ["register"]


def quickstart_cmd(
    out: Annotated[Path, typer.Option(help="Folder for tables, config, model, plots.")] = Path(
        "runs/quickstart"),
    model: Annotated[str, typer.Option(help="Network to profile (random weights).")] = (
        "resnet18"),
    input_size: Annotated[int, typer.Option(help="Input side in pixels.")] = 64,
    batch_size: Annotated[int, typer.Option(help="Images per forward.")] = 8,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    widths: Annotated[str, typer.Option(help="Width fractions probed per edge.")] = (
        "0.25,0.5,0.75"),
    random_nets: Annotated[int, typer.Option(
        help="Random pruned nets (half fit the model, half validate it).")] = 16,
    rounds: Annotated[int, typer.Option(help="Timing rounds.")] = 3,
    threads: Annotated[int, typer.Option(
        help="CPU threads for timing (1 is robust on a machine shared with other work).")] = 1,
) -> None:
    """Profile a model, fit the latency cost model, write a config, validate it and plot.

    Re-running resumes the profile where it stopped.
    """
    from gator_hw.commands.costmodel import _print_scores
    from gator_hw.pipeline import quickstart

    r = quickstart(out, model=model, input_size=input_size, batch=batch_size, device=device,
                   widths=widths, random_nets=random_nets, rounds=rounds, threads=threads)
    console.print(str(r.profile))
    _print_scores(r.scores)
    console.print(f"config:     {r.config_path}")
    console.print(f"cost model: {r.model_path}")
    console.print(f"plots:      {r.plots[0].parent}/ ({len(r.plots)} files)")


def register(app: typer.Typer) -> None:
    """Add ``quickstart`` to ``app``."""
    app.command("quickstart")(quickstart_cmd)
