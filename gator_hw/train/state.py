"""A run's checkpoint state: what a resumable checkpoint holds and how a trainer gets it back.

Model and gate tensors, optimizer state, every rank's RNG state, the step, lambda, the
budget controller (with its measured correction), the calibration measurements and the
settings; written by rank 0 only, atomically (:func:`~gator_hw.train.checkpoint.save_checkpoint`).
A checkpoint written mid-epoch (``--checkpoint-every``) also holds every rank's
:class:`EpochTally`: the steps the epoch has taken and the sums its log row reports.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from gator_hw.errors import GatorError
from gator_hw.train.checkpoint import Checkpoint, model_signature, save_checkpoint

if TYPE_CHECKING:
    from gator_hw.train.loop import _Trainer

__all__ = ["EpochTally", "meta", "restore", "rng_states", "save", "tensors"]


@dataclass
class EpochTally:
    """The epoch in progress on one rank: steps taken and the running sums of its log row.

    A mid-epoch checkpoint saves every rank's tally, so a resumed epoch skips the ``batches``
    it already trained on and reports the same row as an uninterrupted one.
    """

    batches: int = 0  # optimizer steps of this epoch
    ce: float = 0.0  # cross-entropy x images
    correct: int | float = 0
    images: int = 0
    cost: float = 0.0  # expected cost after the last step
    lr: float = 0.0  # base learning rate of the last step
    seconds: float = 0.0  # time the epoch took before this process took it up
    started: float = field(default_factory=time.perf_counter, repr=False, compare=False)

    def add(self, ce: float, correct: int, images: int, cost: float, lr: float) -> None:
        """Count one step: its batch's mean cross-entropy, correct predictions and size."""
        self.batches += 1
        self.ce, self.correct = self.ce + ce * images, self.correct + correct
        self.images += images
        self.cost, self.lr = cost, lr

    @property
    def mean_ce(self) -> float:
        """Mean cross-entropy of the epoch so far (this rank's images)."""
        return self.ce / max(self.images, 1)

    def elapsed(self) -> float:
        """Seconds spent on the epoch, by this process and the ones it resumed."""
        return self.seconds + time.perf_counter() - self.started

    def state(self) -> dict[str, Any]:
        """A JSON-able copy (``seconds`` up to now)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "started"}
        return {**out, "seconds": self.elapsed()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EpochTally:
        """The tally :meth:`state` wrote, its clock restarted now."""
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name != "started"})


def _every_rank(tr: _Trainer, mine: Any) -> list[Any]:
    """``mine`` of every rank, in rank order (collective under DDP)."""
    if not tr.run.dist.enabled:
        return [mine]
    every = [None] * tr.run.dist.world
    dist.all_gather_object(every, mine)
    return every


def rng_states(tr: _Trainer) -> dict[str, torch.Tensor]:
    """Every rank's RNG state (``rng.cpu.R``, ``rng.cuda.R``): each rank draws its own gate
    noise, so a resume must give each its own state back. Collective under DDP."""
    mine = {"cpu": torch.get_rng_state()}
    if tr.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(tr.device)
    every = _every_rank(tr, mine)
    t = {f"rng.{k}.{r}": v for r, st in enumerate(every) for k, v in st.items()}
    t.update({f"rng.{k}": v for k, v in mine.items()})  # rank 0's, for older readers
    return t


def tensors(tr: _Trainer, rng: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: model, gates, optimizer state and the RNG states ``rng``."""
    t = {f"model.{k}": v for k, v in tr.model.state_dict().items()}
    t.update({f"gates.{k}": v for k, v in tr.gates.state_dict().items()})
    for idx, st in tr.optimizer.state_dict()["state"].items():
        t.update({f"optim.{idx}.{k}": v for k, v in st.items() if torch.is_tensor(v)})
    t.update(rng)
    return t


def meta(tr: _Trainer, tallies: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The checkpoint's JSON side: progress (with every rank's ``tallies`` mid-epoch),
    controller, calibrations, settings, config."""
    groups = [
        {k: v for k, v in g.items() if k != "params"}
        for g in tr.optimizer.state_dict()["param_groups"]
    ]
    return {
        "epoch": tr.epoch,
        "step": tr.step,
        "lam": tr.lam,
        "tally": tallies,  # None at an epoch's end
        "moves": list(tr.epoch_moves),  # the budget's closed / re-opened counts the row starts from
        "controller": tr.budget.state_dict() if tr.budget else None,
        "calibrations": tr.calibrator.state(),
        "scaler": tr.scaler.state_dict() if tr.scaling else None,
        "signature": model_signature(tr.run.net.graph),
        "num_classes": tr.run.net.num_classes,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(tr.s).items()},
        "config": tr.run.config.to_dict(),
        "optimizer_groups": groups,
        "torch": torch.__version__,
    }


def save(tr: _Trainer, name: str) -> None:
    """Write checkpoint ``name`` in the run folder (collective: every rank calls it)."""
    rng = rng_states(tr)  # every rank takes part
    tallies = _every_rank(tr, tr.tally.state()) if tr.tally is not None else None
    if tr.run.dist.main:
        save_checkpoint(tr.run.out / name, tensors(tr, rng), meta(tr, tallies))


def _tally(tr: _Trainer, ckpt: Checkpoint) -> EpochTally | None:
    """This rank's tally of a mid-epoch checkpoint (GatorError if the run cannot continue it)."""
    tallies = ckpt.meta.get("tally")
    if not tallies:
        return None
    batch = ckpt.meta.get("settings", {}).get("batch_size")
    if len(tallies) != tr.run.dist.world or batch != tr.s.batch_size:
        raise GatorError(
            f"checkpoint {ckpt.path} was written mid-epoch by {len(tallies)} rank(s) with "
            f"--batch-size {batch}; resume it with the same ranks and batch size"
        )
    tally = EpochTally.from_state(tallies[tr.run.dist.rank])
    if not 0 <= tally.batches < tr.steps_per_epoch:
        raise GatorError(
            f"checkpoint {ckpt.path} is {tally.batches} steps into an epoch of "
            f"{tr.steps_per_epoch}; resume with the data it was trained on"
        )
    return tally


def restore(tr: _Trainer, ckpt: Checkpoint) -> None:
    """Put a checkpoint back into a freshly built trainer (GatorError if it does not fit)."""
    try:
        tr.model.load_state_dict(ckpt.prefixed("model"))
        tr.gates.load_state_dict(ckpt.prefixed("gates"))
    except RuntimeError as exc:
        raise GatorError(f"checkpoint {ckpt.path} does not fit: {str(exc)[:200]}") from None
    tr.gates.to(tr.device)
    if tr.gates.frozen:
        tr.gates.freeze()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in ckpt.prefixed("optim").items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v.to(tr.device)
    groups = tr.optimizer.state_dict()["param_groups"]
    saved = ckpt.meta["optimizer_groups"]
    for g, sg in zip(groups, saved, strict=True):
        g.update({k: v for k, v in sg.items() if k != "params"})
    tr.optimizer.load_state_dict({"state": state, "param_groups": groups})
    m = ckpt.meta
    tr.epoch, tr.step, tr.lam = int(m["epoch"]), int(m["step"]), float(m["lam"])
    tr.tally = _tally(tr, ckpt)
    if tr.budget is not None and m.get("controller"):
        tr.budget.load_state_dict(m["controller"])
        tr.criterion.relinearize(tr.gates.kept_widths())  # as the last step left it
    if "moves" in m:
        tr.epoch_moves = tuple(int(v) for v in m["moves"])
    tr.calibrator.load(m.get("calibrations", []))
    if tr.scaling and m.get("scaler"):
        tr.scaler.load_state_dict(m["scaler"])
    rank, t = tr.run.dist.rank, ckpt.tensors
    if f"rng.cpu.{rank}" in t:
        torch.set_rng_state(t[f"rng.cpu.{rank}"])
    elif rank == 0:  # a checkpoint of another world size (or an older one): rank 0's
        torch.set_rng_state(t["rng.cpu"])
    cuda = t.get(f"rng.cuda.{rank}", t.get("rng.cuda") if rank == 0 else None)
    if tr.device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda, tr.device)
