"""Gated pruning training: data, the training loop and checkpoints (``gator-hw prune``)."""

from __future__ import annotations

from gator_hw.train.checkpoint import load_checkpoint, save_checkpoint
from gator_hw.train.data import Datasets, DataSpec, load_data
from gator_hw.train.loop import EpochRow, TrainResult, TrainSettings, accumulate_gradients, train

__all__ = [
    "DataSpec",
    "Datasets",
    "EpochRow",
    "TrainResult",
    "TrainSettings",
    "accumulate_gradients",
    "load_checkpoint",
    "load_data",
    "save_checkpoint",
    "train",
]
