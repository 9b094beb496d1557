"""A run's checkpoint state: what a resumable checkpoint holds and how a trainer gets it back.

Model and gate tensors, optimizer state, every rank's RNG state, the step, lambda, the
budget controller (with its measured correction), the calibration measurements and the
settings; written by rank 0 only, atomically (:func:`~gator_hw.train.checkpoint.save_checkpoint`).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from gator_hw.errors import GatorError
from gator_hw.train.checkpoint import Checkpoint, model_signature, save_checkpoint

if TYPE_CHECKING:
    from gator_hw.train.loop import _Trainer

__all__ = ["meta", "restore", "rng_states", "save", "tensors"]


def rng_states(tr: _Trainer) -> dict[str, torch.Tensor]:
    """Every rank's RNG state (``rng.cpu.R``, ``rng.cuda.R``): each rank draws its own gate
    noise, so a resume must give each its own state back. Collective under DDP."""
    mine = {"cpu": torch.get_rng_state()}
    if tr.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(tr.device)
    every = [mine]
    if tr.run.dist.enabled:
        every = [None] * tr.run.dist.world
        dist.all_gather_object(every, mine)
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


def meta(tr: _Trainer) -> dict[str, Any]:
    """The checkpoint's JSON side: progress, controller, calibrations, settings, config."""
    groups = [
        {k: v for k, v in g.items() if k != "params"}
        for g in tr.optimizer.state_dict()["param_groups"]
    ]
    return {
        "epoch": tr.epoch,
        "step": tr.step,
        "lam": tr.lam,
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
    if tr.run.dist.main:
        save_checkpoint(tr.run.out / name, tensors(tr, rng), meta(tr))


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
    if tr.budget is not None and m.get("controller"):
        tr.budget.load_state_dict(m["controller"])
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
