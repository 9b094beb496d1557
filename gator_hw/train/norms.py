"""Batch-norm statistics of the network the deterministic gates keep.

During gate training a channel whose logit is near zero is dropped in many training forwards,
so the running statistics of the layers after it describe a mixture; the deterministic
(evaluated, converted) network keeps it always, and its batch norms then normalise with the
wrong statistics (val accuracy can fall by tens of points while train accuracy does not).
:func:`recalibrated_norms` re-estimates them on training images with the deterministic gates,
as weight-sharing and slimmable networks do before evaluating a sub-network.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

__all__ = ["recalibrate_norms", "recalibrated_norms"]


def _norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def recalibrated_norms(
    model: nn.Module, batches: Iterable[torch.Tensor], *, restore: bool = True
) -> Iterator[int]:
    """Within the block, batch norms hold statistics measured on ``batches`` in eval mode.

    The model runs in eval mode (deterministic gates) with only its batch norms accumulating
    a plain average of the batch statistics. With ``restore`` the previous statistics come
    back on exit; without it the new ones stay. Yields the number of batches used.
    """
    norms = _norms(model)
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(),
              m.momentum) for m in norms]
    was = model.training
    n = 0
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
            m.train()
        with torch.no_grad():
            for x in batches:
                model(x)
                n += 1
        for m, s in zip(norms, saved, strict=True):
            m.momentum = s[3]
            m.eval()
        yield n
    finally:
        for m, s in zip(norms, saved, strict=True):
            m.momentum = s[3]
            if restore or n == 0:
                m.running_mean.copy_(s[0])
                m.running_var.copy_(s[1])
                m.num_batches_tracked.copy_(s[2])
        model.train(was)


def recalibrate_norms(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Keep the statistics :func:`recalibrated_norms` measures; return the batches used."""
    with recalibrated_norms(model, batches, restore=False) as n:
        return n
