"""The training order of an epoch: a function of ``(seed, epoch)`` alone, resumable part-way.

A run resumed from a mid-epoch checkpoint must see the rest of the epoch exactly as an
uninterrupted run would: the same permutation (so it is drawn from a generator seeded by
``seed + epoch``, as :class:`~torch.utils.data.DistributedSampler` does, never from a
generator whose state the earlier epochs advanced), and none of the images the epoch already
trained on (:meth:`EpochOrder.set_epoch` with ``skip``; they are not loaded at all). The
loader's own generator (the seeds of its worker processes) is re-seeded per epoch too, so
iterating the loader draws nothing from the global RNG.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

__all__ = ["EpochOrder"]


class EpochOrder(Sampler[int]):
    """Shuffled indices of ``data`` for one epoch; under DDP this rank's share of them.

    Parameters
    ----------
    data : the training set.
    seed : the run's seed; epoch ``e`` is shuffled by a generator seeded ``seed + e``.
    rank, world : this rank and the number of ranks (``world > 1``: DistributedSampler's
        split, padded to equal shares, seeded the same way).

    Pass :attr:`loader_generator` as the DataLoader's ``generator``.
    """

    def __init__(self, data: Dataset, seed: int, rank: int = 0, world: int = 1) -> None:
        self.size, self.seed = len(data), int(seed)
        self.shard = DistributedSampler(data, world, rank, seed=seed) if world > 1 else None
        self.loader_generator = torch.Generator().manual_seed(self.seed)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Order the next iteration as epoch ``epoch``, leaving out its first ``skip`` indices."""
        self.epoch, self.skip = int(epoch), int(skip)
        self.loader_generator.manual_seed(self.seed + self.epoch)
        if self.shard is not None:
            self.shard.set_epoch(self.epoch)

    def indices(self) -> list[int]:
        """The whole epoch's order (this rank's share), ``skip`` not applied."""
        if self.shard is not None:
            return list(self.shard)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.skip:])

    def __len__(self) -> int:
        full = len(self.shard) if self.shard is not None else self.size
        return max(full - self.skip, 0)
