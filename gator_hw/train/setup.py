"""Setting a run up: every input validated before anything is written, the process group
joined, the data loaded and the loaders built (their order set per epoch, resumable mid-epoch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, DistributedSampler

from gator_hw.budget import BudgetTarget, check_feasible
from gator_hw.config import GatingConfig, read_config
from gator_hw.errors import GatorError
from gator_hw.graph.cuts import min_keep_counts
from gator_hw.loss import CostCriterion
from gator_hw.network import Network, load_network
from gator_hw.train.checkpoint import Checkpoint, check_signature, load_checkpoint
from gator_hw.train.data import Datasets, load_data
from gator_hw.train.distributed import Dist, check_parallel, init_dist, world_size
from gator_hw.train.order import EpochOrder

if TYPE_CHECKING:
    from gator_hw.train.loop import TrainSettings

__all__ = ["RUN_FILES", "Run", "loaders", "prepare"]

#: Files whose presence marks a folder as holding a run (never overwritten without --resume).
RUN_FILES = ("log.csv", "last.json")


@dataclass
class Run:
    """The validated inputs of one run, on this rank."""

    settings: TrainSettings
    net: Network
    data: Datasets
    config: GatingConfig
    criterion: CostCriterion
    target: BudgetTarget | None
    out: Path
    checkpoint: Checkpoint | None
    dist: Dist
    device: torch.device


def prepare(s: TrainSettings, log: Callable[[str], None] = print) -> Run:
    """Validate every input before anything is written (GatorError on the first problem)."""
    s.check()
    check_parallel(s.batch_size, s.subdivision, s.device, world_size())
    d, device = init_dist(s.device)
    config = read_config(s.config)
    target = BudgetTarget.parse(s.target) if s.target else None
    ckpt = load_checkpoint(s.resume) if s.resume else None
    out = Path(s.out) if s.out else (ckpt.path.parent if ckpt else None)
    if out is None:
        raise GatorError("pass --out DIR for the run folder (or --resume a checkpoint)")
    if ckpt is None and any((out / f).exists() for f in RUN_FILES):
        raise GatorError(
            f"{out} already holds a run; pass --resume {out} to continue it or a new --out"
        )
    size = s.input_size
    if size is None:
        from gator_hw.models import default_input_size

        size = default_input_size(s.model)
    data = load_data(s.data, size, seed=s.seed)
    if s.num_classes is not None and s.num_classes != data.num_classes:
        raise GatorError(
            f"--num-classes {s.num_classes} but {data.spec} has {data.num_classes} classes; "
            "drop --num-classes or use matching data"
        )
    net = load_network(
        s.model, input_size=size, num_classes=data.num_classes, weights=s.weights, seed=s.seed,
        log=log,
    )
    if s.weights is None and ckpt is None:
        log(f"{s.model} starts from its random initialisation: pruning learns which channels "
            "matter from trained weights, so pass --weights FILE (or a torchvision weights name)")
    if net.num_classes != data.num_classes:
        raise GatorError(
            f"{s.model} has {net.num_classes} outputs but {data.spec} has {data.num_classes} "
            "classes; build it with matching --num-classes"
        )
    criterion = CostCriterion(net.graph, config, cost_source=s.cost_source)
    if target is not None:
        check_feasible(target, criterion, min_keep_counts(net.graph))
    if ckpt is not None:
        check_signature(ckpt.meta, net.graph, str(ckpt.path))
    return Run(s, net, data, config, criterion, target, out, ckpt, d, device)


def loaders(run: Run) -> tuple[DataLoader, DataLoader, EpochOrder]:
    """Train loader (its order set per epoch by the returned :class:`EpochOrder`) and val."""
    s, d = run.settings, run.dist
    per_rank = s.batch_size // d.world  # check_parallel: divides, and >= subdivision
    order = EpochOrder(run.data.train, s.seed, d.rank, d.world)
    vsampler = (
        DistributedSampler(run.data.val, d.world, d.rank, shuffle=False) if d.enabled else None
    )
    pin = run.device.type == "cuda"
    kw = {"num_workers": s.workers, "pin_memory": pin, "persistent_workers": s.workers > 0}
    train = DataLoader(
        run.data.train,
        per_rank,
        sampler=order,
        drop_last=True,
        generator=order.loader_generator,
        **kw,
    )
    if len(train) == 0:
        raise GatorError(
            f"--batch-size {s.batch_size} is larger than the {len(run.data.train)} training "
            "images; use a smaller batch"
        )
    val = DataLoader(run.data.val, per_rank, shuffle=False, sampler=vsampler, **kw)
    return train, val, order
