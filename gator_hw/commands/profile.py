"""``gator-hw profile``: measure a latency table of slimmed networks on a device."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gator_hw.commands.common import (
    BackendName,
    BackendOption,
    InputSize,
    ModelName,
    NumClasses,
    console,
    err_console,
)
from gator_hw.profile.runner import ProfileRequest, ProfileResult, run
from gator_hw.profile.spec import TimingOptions

__all__ = ["DType", "print_summary", "register"]


class DType(str, Enum):
    """Weight and input dtype of the timed networks."""

    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


def print_summary(result: ProfileResult, top: int = 10) -> None:
    """Print paths, regime, noise floor, warnings and the top single-edge savings."""
    meta = result.metadata
    console.print(f"table   {result.table_path}")
    if result.gator_path is not None:
        console.print(f"GATOR   {result.gator_path}")
    console.print(f"meta    {result.json_path}")
    console.print(
        f"{result.timed} cells timed, {result.reused} reused, {meta['wall_s']:.1f} s; "
        f"regime: {meta['regime_note']}"
    )
    pair = meta.get("pair_noise_floor")
    pair_text = (
        f"; interleaved ratio noise (median IQR / median): {100 * pair:.2f} %"
        if pair is not None else ""
    )
    console.print(
        f"noise floor (baseline IQR / median): {100 * result.noise_floor:.2f} %{pair_text}; "
        f"baseline {meta['baseline_median_ms']:.4g} ms"
    )
    for w in result.warnings:
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    summary = result.summary()
    edges = summary[summary["kind"] == "edge"].head(top)
    if edges.empty:
        return
    table = Table(title=f"top {len(edges)} edges by time saved (median over rounds)")
    for col in ("#", "edge", "kept", "FLOPs saved %", "saved ms", "saved %", "worst IQR %"):
        table.add_column(col, justify="left" if col == "edge" else "right", overflow="fold",
                         min_width=12 if col == "edge" else None)
    for row in edges.itertuples():
        noisy = " (noisy)" if row.noisy_rounds else ""
        table.add_row(
            str(row.edge),
            row.edge_name,
            f"{row.kept}/{row.channels}",
            f"{row.flops_saved_pct:.2f}",
            f"{row.saving_ms:.4f}",
            f"{row.saving_pct:.2f}",
            f"{100 * row.rel_iqr:.2f}{noisy}",
        )
    console.print(table)


def profile_cmd(
    model: ModelName,
    device: Annotated[
        str, typer.Option("--device", help="Where to time: cpu, cuda or cuda:N.")
    ],
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Samples per timed forward (>= 1).")
    ],
    input_size: InputSize = None,
    dtype: Annotated[
        DType, typer.Option("--dtype", help="Weight and input dtype.")
    ] = DType.float32,
    channels_last: Annotated[
        bool, typer.Option("--channels-last", help="Time in NHWC (channels-last) layout.")
    ] = False,
    widths: Annotated[
        str,
        typer.Option(
            "--widths",
            help="Comma-separated width fractions in (0, 1] at which each edge is probed "
            "alone, e.g. 0.25,0.5,0.75.",
        ),
    ] = "0.5",
    round_to: Annotated[
        int | None,
        typer.Option("--round-to", help="Round probe channel counts to this multiple."),
    ] = None,
    random_nets: Annotated[
        int,
        typer.Option(
            "--random-nets",
            help="Also time N seeded random nets (keep ratio 0.25-1 per edge; half rounded "
            "to multiples of 8) for validating cost models.",
        ),
    ] = 0,
    random_min_keep: Annotated[
        float | None,
        typer.Option(
            "--random-min-keep",
            help="Lowest per-edge keep ratio of the random nets (default 0.25); lower it "
            "(e.g. 0.05) so the cost model sees the deeply pruned nets small budgets give.",
        ),
    ] = None,
    rounds: Annotated[
        int,
        typer.Option(
            "--rounds", help="Rounds; each times the baseline, then all variants interleaved."
        ),
    ] = 3,
    eager: Annotated[
        bool,
        typer.Option(
            "--eager", help="On CUDA, time plain eager calls instead of CUDA-graph replays."
        ),
    ] = False,
    interleave: Annotated[
        bool | None,
        typer.Option(
            "--interleave/--no-interleave",
            help="Pair every variant's timed blocks with blocks of the full net (ABBA) so a "
            "machine changing speed or clocks cancels out (default: on for CPU, off for CUDA "
            "until measured there; doubles the time).",
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option("--threads", help="CPU threads while timing (default: torch's)."),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the random nets and the round order.")
    ] = 0,
    num_classes: NumClasses = 1000,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Tidy CSV path (default profiles/<device>/<model>_b<B>_<dtype>[_cl].csv); "
            "the GATOR CSV, .json sidecar and .cells.json resume file go beside it.",
        ),
    ] = None,
    backend: BackendOption = BackendName.torch,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Time MODEL with each prunable edge narrowed (and random nets) on a device.

    Writes a tidy latency table, the GATOR-compatible CSV and a JSON sidecar. An
    interrupted run resumes when re-run with the same arguments.
    """
    timing = TimingOptions(
        device=device, batch=batch_size, input_size=input_size, dtype=dtype.value,
        channels_last=channels_last, eager=eager, threads=threads, interleave=interleave,
        backend=backend.value,
    )  # fmt: skip
    request = ProfileRequest.create(
        model, timing, widths=widths, round_to=round_to, random_nets=random_nets,
        rounds=rounds, seed=seed, num_classes=num_classes, random_min_keep=random_min_keep,
    )  # fmt: skip
    result = run(
        request,
        out,
        progress=not quiet,
        log=lambda msg: err_console.print(msg, highlight=False, soft_wrap=True),
    )
    print_summary(result)


def register(app: typer.Typer) -> None:
    """Add the ``profile`` command to ``app``."""
    app.command("profile")(profile_cmd)
