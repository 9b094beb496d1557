"""``gator-hw prune``: train learned channel gates under a hardware cost loss (or budget)."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from gator_hw.commands.common import InputSize, ModelName, console
from gator_hw.train.loop import TrainSettings, train
from gator_hw.train.progress import epoch_progress

__all__ = ["CostSource", "Schedule", "register"]


class Schedule(str, Enum):
    """Learning-rate schedules."""

    cosine = "cosine"
    step = "step"


class GateNorm(str, Enum):
    """How gate gradients compare between edges."""

    none = "none"
    edge = "edge"


class CostSource(str, Enum):
    """Where the latency cost comes from."""

    auto = "auto"
    multipliers = "multipliers"


class AmpDtype(str, Enum):
    """Autocast dtype of --amp."""

    float16 = "float16"
    bfloat16 = "bfloat16"


class Calibrate(str, Enum):
    """When to time the kept network and correct the latency budget by it."""

    auto = "auto"
    on = "on"
    off = "off"


def prune_cmd(
    model: ModelName,
    config: Annotated[
        Path,
        typer.Option(
            "--config", exists=True, dir_okay=False, help="Gating config JSON (GATOR format)."
        ),
    ],
    data: Annotated[
        str,
        typer.Option(
            "--data", help="digits | digitmax (two digits in clutter, label the larger: "
            "accuracy at stake) | fake | imagefolder:PATH (train/, val/) | cifar10:PATH."
        ),
    ] = "digits",
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Run folder (log.csv, checkpoints, plan.json)."),
    ] = None,
    epochs: Annotated[
        int, typer.Option(help="Total epochs (gate training + fine-tuning).")
    ] = 10,
    lr: Annotated[float, typer.Option(help="Base learning rate of SGD.")] = 0.05,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="Weight decay (L2).")] = 5e-4,
    batch_size: Annotated[
        int, typer.Option(help="Images per optimizer step (all ranks).")
    ] = 64,
    subdivision: Annotated[
        int, typer.Option(help="Split each batch into K micro-batches (exact accumulation).")
    ] = 1,
    amp: Annotated[
        bool, typer.Option(help="Mixed precision on CUDA: autocast to --amp-dtype.")
    ] = False,
    amp_dtype: Annotated[
        AmpDtype, typer.Option(help="With --amp: float16 (with loss scaling) or bfloat16.")
    ] = AmpDtype.float16,
    schedule: Annotated[
        Schedule, typer.Option(help="Learning-rate schedule.")
    ] = Schedule.cosine,
    lr_step: Annotated[
        int, typer.Option(help="With --schedule step: epochs between x0.1 steps.")
    ] = 30,
    resume: Annotated[
        Path | None, typer.Option(help="Checkpoint (run folder or NAME.json) to continue.")
    ] = None,
    save_interval: Annotated[
        int, typer.Option(help="Also keep epoch_NNN checkpoints every N epochs (0: never).")
    ] = 0,
    checkpoint_every: Annotated[
        int, typer.Option(
            help="Also write the resumable last checkpoint every N optimizer steps within an "
            "epoch (0: at epoch ends only); --resume then continues mid-epoch with the same "
            "data order and random numbers.")
    ] = 0,
    target: Annotated[
        str | None,
        typer.Option(
            help="Budget METRIC=FRACTION of the full net (latency=0.5, flops=0.5, "
            "params=0.5); lambda adapts, gates stop once it is met and holds."
        ),
    ] = None,
    budget_at: Annotated[
        float, typer.Option(
            help="With --target: share of the epochs by which the kept network meets the "
            "budget (its cost ceiling falls from 1 to the target in log space).")
    ] = 0.5,
    hold_epochs: Annotated[
        float, typer.Option(help="Epochs the budget holds before the gates freeze.")
    ] = 1.0,
    round_to: Annotated[
        int, typer.Option(
            help="Keep every edge's width a multiple of N (hardware-friendly widths).")
    ] = 1,
    cost: Annotated[
        CostSource, typer.Option(
            help="auto: the config's embedded cost model when it has one; multipliers: "
            "the original GATOR recipe (edge_multipliers) even then.")
    ] = CostSource.auto,
    importance_power: Annotated[
        float, typer.Option(
            help="With --target: exponent on the channel importances in "
            "the budget's pruning order (1: importance per unit of cost, HALP's; 0: cost "
            "alone decides between edges).")
    ] = 1.0,
    importance_norm: Annotated[
        float, typer.Option(
            help="With --target: how channel importances compare between edges in the "
            "budget's pruning order: divided by their edge's mean to this power (1: each "
            "edge's mean counts alike; 0: raw Taylor scores, a global ranking as in HALP).")
    ] = 0.0,
    gate_norm: Annotated[
        GateNorm, typer.Option(
            help="How gate gradients compare between edges: none (GATOR's raw gradients) or "
            "edge (each edge's divided by its RMS, so the cost, not the distance to the "
            "classifier, decides which layers shrink).")
    ] = GateNorm.none,
    calibrate: Annotated[
        Calibrate, typer.Option(
            help="With --target latency=F: time the kept network on this device when the "
            "budget is reached and mid-hold, and correct the predicted ceiling so the "
            "measured ratio meets F (auto: when this is the table's device).")
    ] = Calibrate.auto,
    gate_epochs: Annotated[
        int | None, typer.Option(help="Without --target: freeze gates after N epochs.")
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="Starting weights: a state dict file (.pt/.pth/.safetensors) or a torchvision "
            "weights name (DEFAULT, IMAGENET1K_V2, ...) from the torch hub cache."
        ),
    ] = None,
    input_size: InputSize = None,
    num_classes: Annotated[
        int | None, typer.Option(help="Classifier outputs (default: the data's classes).")
    ] = None,
    workers: Annotated[int, typer.Option(help="Data-loading worker processes.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of initialisation, split and noise.")] = 0,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda or cuda:N (default: cuda if available).")
    ] = None,
) -> None:
    """Prune MODEL's channels with learned gates trained under the config's cost loss.

    Within an epoch a progress bar shows step i/N, the loss, lambda and the ETA (plain lines
    at every tenth of the epoch when stdout is not a terminal). Every epoch prints validation
    accuracy (deterministic gates), the loss terms, lambda, kept channels and the predicted
    latency / FLOPs / params against the budget; the run folder gets log.csv, resumable
    checkpoints and plan.json (kept channels per edge). Under torchrun, trains with
    DistributedDataParallel (rank 0 reports).
    """
    settings = TrainSettings(
        model=model, config=config, data=data, out=out, epochs=epochs, lr=lr,
        momentum=momentum, weight_decay=weight_decay, batch_size=batch_size,
        subdivision=subdivision, amp=amp, amp_dtype=amp_dtype.value, schedule=schedule.value,
        lr_step=lr_step,
        resume=resume, save_interval=save_interval, checkpoint_every=checkpoint_every,
        target=target, budget_at=budget_at,
        hold_epochs=hold_epochs, round_to=round_to, cost_source=cost.value,
        importance_power=importance_power, importance_norm=importance_norm,
        gate_norm=gate_norm.value,
        calibrate=calibrate.value,
        gate_epochs=gate_epochs, weights=weights, input_size=input_size,
        num_classes=num_classes, workers=workers, seed=seed, device=device,
    )  # fmt: skip
    result = train(settings, log=lambda m: console.print(m, highlight=False, soft_wrap=True),
                   progress=epoch_progress(console))
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 reports
    frac = ", ".join(f"{k} {100 * v:.1f}%" for k, v in result.fractions.items())
    met = "" if result.budget_met is None else f"; budget met: {result.budget_met}"
    console.print(f"kept {sum(result.kept)} channels; predicted {frac}{met}")
    console.print(f"run folder: {result.out}")


def register(app: typer.Typer) -> None:
    """Add the ``prune`` command to ``app``."""
    app.command("prune")(prune_cmd)
