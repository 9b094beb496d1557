"""Data-parallel runs: ranks from torchrun's environment, device checks, cross-rank checks."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gator_hw.errors import GatorError
from gator_hw.gates import GateSet

__all__ = ["Dist", "check_masks", "check_parallel", "init_dist", "reduce_sum", "world_size"]


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_size() -> int:
    """Ranks of this run (``WORLD_SIZE`` set by torchrun, else 1)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_parallel(batch_size: int, subdivision: int, device: str | None, world: int) -> None:
    """GatorError for a batch, subdivision or device that the ranks cannot share."""
    if batch_size % world:
        raise GatorError(
            f"--batch-size {batch_size} does not divide into {world} ranks; use a multiple "
            f"of {world} (each rank takes an equal share)"
        )
    if subdivision > batch_size // world:
        raise GatorError(
            f"--subdivision {subdivision} is larger than the {batch_size // world} images "
            f"each of the {world} ranks gets per step; use at most {batch_size // world}"
        )
    hint = device
    if hint is None:
        return
    try:
        dev = torch.device(hint)
    except (RuntimeError, ValueError):
        raise GatorError(f"unknown --device {hint!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise GatorError(f"--device {hint!r} is not supported; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GatorError(f"--device {hint} but no CUDA GPU is visible; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise GatorError(
            f"--device {hint}: only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    if dev.type == "cuda" and dev.index is not None and world > 1:
        raise GatorError(
            f"--device {hint} would put every rank on one GPU; under torchrun pass --device "
            "cuda (each rank takes the GPU of its LOCAL_RANK)"
        )


def init_dist(device_hint: str | None) -> tuple[Dist, torch.device]:
    world = world_size()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device_hint != "cpu"
    device = torch.device(device_hint or ("cuda" if cuda else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


def check_masks(gates: GateSet, d: Dist) -> None:
    if not d.enabled:
        return
    digest = gates.mask_digest()
    lo, hi = digest.clone(), digest.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(f"gate masks differ across ranks (rank {d.rank}): {lo} vs {hi}")


def reduce_sum(values: list[float], d: Dist, device: torch.device) -> list[float]:
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
