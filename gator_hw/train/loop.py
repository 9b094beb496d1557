"""Gated pruning training: SGD with momentum, the cost loss, a budget, checkpoints, DDP.

One run lives in one folder::

    run/log.csv            one row per epoch (accuracy, loss terms, lambda, predicted costs)
    run/last.{json,safetensors}        resumable checkpoint (every epoch, and every
                                       ``checkpoint_every`` steps within one; gator_hw.train.state)
    run/epoch_NNN.{json,safetensors}   every ``save_interval`` epochs
    run/plan.json          edge -> kept channel indices (for gator_hw.slim), at the end

Distributed: started by ``torchrun``, the ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` variables
select DistributedDataParallel (gloo on CPU, nccl on CUDA). Gate gradients are all-reduced like
any other; the masks are compared across ranks every epoch; only rank 0 writes files.

Resuming: an epoch's data order depends on ``(seed, epoch)`` alone (gator_hw.train.order), so
a run resumed from a mid-epoch checkpoint skips the batches the epoch took and continues with
the restored RNG states exactly as an uninterrupted run (with ``workers > 0`` the augmentation
of the remaining images is re-drawn: worker RNG states are not checkpointed).
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from gator_hw.atomic import write_json, write_text
from gator_hw.budget import Budget, BudgetSchedule
from gator_hw.errors import GatorError
from gator_hw.gates import GateSet
from gator_hw.loss import (
    COST_SOURCES,
    GATE_NORMS,
    edge_gradient_scale,
    gate_param_groups,
    refresh_gate_groups,
)
from gator_hw.train.calibration import CALIBRATE_MODES, Calibrator, calibration_spec
from gator_hw.train.checkpoint import (
    model_signature,
)
from gator_hw.train.distributed import (
    check_masks,
    reduce_sum,
)
from gator_hw.train.norms import recalibrate_norms, recalibrated_norms
from gator_hw.train.progress import StepProgress
from gator_hw.train.setup import Run, loaders, prepare
from gator_hw.train.state import EpochTally, restore
from gator_hw.train.state import save as save_state

__all__ = [
    "SCHEDULES",
    "EpochRow",
    "GatedNet",
    "TrainSettings",
    "accumulate_gradients",
    "learning_rate",
    "train",
]

#: Autocast dtypes of ``--amp`` (bfloat16 needs no loss scaling).
AMP_DTYPES: tuple[str, ...] = ("float16", "bfloat16")

#: Learning-rate schedules.
SCHEDULES: tuple[str, ...] = ("cosine", "step")

#: Training batches that re-estimate batch-norm statistics for the deterministic gates.
NORM_BATCHES = 16



@dataclass(frozen=True)
class TrainSettings:
    """Everything ``gator-hw prune`` needs; each field is one CLI option."""

    model: str
    config: Path
    data: str = "digits"
    out: Path | None = None
    epochs: int = 10
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    subdivision: int = 1
    amp: bool = False
    amp_dtype: str = "float16"
    schedule: str = "cosine"
    lr_step: int = 30
    resume: Path | None = None
    save_interval: int = 0
    checkpoint_every: int = 0  # optimizer steps between mid-epoch checkpoints (0: none)
    target: str | None = None
    budget_at: float = 0.5
    hold_epochs: float = 1.0
    round_to: int = 1
    cost_source: str = "auto"
    importance_power: float = 1.0
    importance_norm: float = 0.0
    gate_norm: str = "none"
    calibrate: str = "auto"
    gate_epochs: int | None = None
    weights: str | Path | None = None  # a state dict file or a torchvision weights name
    input_size: int | None = None
    num_classes: int | None = None
    workers: int = 0
    seed: int = 0
    device: str | None = None

    def check(self) -> None:
        """GatorError for values no run can use."""
        for name in ("epochs", "batch_size", "subdivision", "lr_step"):
            if getattr(self, name) < 1:
                raise GatorError(f"--{name.replace('_', '-')} must be >= 1")
        if self.lr <= 0:
            raise GatorError(f"--lr must be > 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise GatorError(f"--schedule must be one of {', '.join(SCHEDULES)}")
        if self.save_interval < 0 or self.workers < 0:
            raise GatorError("--save-interval and --workers must be >= 0")
        if self.checkpoint_every < 0:
            raise GatorError(f"--checkpoint-every must be >= 0 steps (0: only at epoch ends), "
                             f"got {self.checkpoint_every}")
        if not 0.0 < self.budget_at <= 1.0:
            raise GatorError(
                f"--budget-at must be a fraction of the epochs in (0, 1], got {self.budget_at}"
            )
        if self.round_to < 1:
            raise GatorError(f"--round-to must be >= 1, got {self.round_to}; use e.g. 8")
        if not 0.0 <= self.importance_power <= 4.0:
            raise GatorError(
                f"--importance-power must be in [0, 4], got {self.importance_power}; 1 is HALP's"
            )
        if not 0.0 <= self.importance_norm <= 1.0:
            raise GatorError(
                f"--importance-norm must be in [0, 1], got {self.importance_norm}; 1 divides "
                "each edge's importances by their mean, 0 keeps the raw Taylor scores"
            )
        if self.amp_dtype not in AMP_DTYPES:
            raise GatorError(f"--amp-dtype must be one of {', '.join(AMP_DTYPES)}, got "
                             f"{self.amp_dtype!r}")
        if self.calibrate not in CALIBRATE_MODES:
            raise GatorError(f"--calibrate must be one of {', '.join(CALIBRATE_MODES)}")
        if self.gate_norm not in GATE_NORMS:
            raise GatorError(f"--gate-norm must be one of {', '.join(GATE_NORMS)}, got "
                             f"{self.gate_norm!r}")
        if self.cost_source not in COST_SOURCES:
            raise GatorError(f"--cost must be one of {', '.join(COST_SOURCES)}")


@dataclass
class EpochRow:
    """What one epoch logs (a CSV row)."""

    epoch: int
    lr: float
    lam: float
    ce: float
    cost: float
    train_acc: float
    val_acc: float
    kept: list[int]
    fractions: dict[str, float]
    target: str
    budget_met: bool
    gates: str
    seconds: float
    ceiling: float | None = None
    closed: int = 0
    reopened: int = 0
    measured: float | None = None
    notes: list[str] = field(default_factory=list)

    def csv_row(self) -> dict[str, Any]:
        row = {k: v for k, v in asdict(self).items() if k not in ("kept", "fractions", "notes")}
        row.update({f"pred_{k}": round(v, 6) for k, v in self.fractions.items()})
        row["kept"] = " ".join(map(str, self.kept))
        return row

    def __str__(self) -> str:
        frac = ", ".join(f"{k} {100 * v:.1f}%" for k, v in self.fractions.items())
        ceiling = "" if self.ceiling is None else f", ceiling {100 * self.ceiling:.1f}%"
        moves = f"; pruned by ceiling {self.closed}, re-opened {self.reopened}" if (
            self.closed or self.reopened) else ""
        if self.measured is not None:
            moves += f"; measured latency {100 * self.measured:.1f}%"
        return (
            f"epoch {self.epoch}: val acc {100 * self.val_acc:.2f}% "
            f"(train {100 * self.train_acc:.2f}%), "
            f"ce {self.ce:.4f}, cost {self.cost:.4f}, lambda {self.lam:.3g}, lr {self.lr:.3g}; "
            f"predicted {frac}; target {self.target}{' (met)' if self.budget_met else ''}"
            f"{ceiling}; gates {self.gates}; kept {sum(self.kept)} ch{moves}; "
            f"{self.seconds:.1f}s"
        )


class GatedNet(nn.Module):
    """A model and its gates as one module (what DDP wraps); calls the model."""

    def __init__(self, net: nn.Module, gates: GateSet) -> None:
        super().__init__()
        self.net, self.gates = net, gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ---------------------------------------------------------------------- small pure pieces
def learning_rate(s: TrainSettings, step: int, steps_per_epoch: int) -> float:
    """Base learning rate at optimizer step ``step`` (cosine over all steps, or x0.1 steps)."""
    if s.schedule == "cosine":
        total = max(1, s.epochs * steps_per_epoch)
        return 0.5 * s.lr * (1.0 + math.cos(math.pi * min(step, total) / total))
    return s.lr * 0.1 ** ((step // steps_per_epoch) // s.lr_step)


def accumulate_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    k: int,
    *,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[float, int]:
    """Forward/backward ``x`` in ``k`` micro-batches; gradients equal one batch's.

    Each micro-batch's mean cross-entropy (and ``extra_loss()``, a batch-independent term) is
    scaled by its share ``n_i / n`` of the batch, so the sum over micro-batches is exactly the
    full batch's loss for any ``k``, including uneven splits. Returns the batch's mean
    cross-entropy and its number of correct predictions.
    """
    backward = backward or (lambda loss: loss.backward())
    n, ce_sum, correct = len(y), 0.0, 0
    chunks = list(zip(torch.tensor_split(x, k), torch.tensor_split(y, k), strict=True))
    for i, (xi, yi) in enumerate(chunks):
        share = len(yi) / n
        sync = no_sync() if (no_sync is not None and i < len(chunks) - 1) else None
        with sync or contextlib.nullcontext():
            with autocast():
                out = model(xi)
                ce = F.cross_entropy(out.float(), yi)
            loss = ce * share
            if extra_loss is not None:
                loss = loss + extra_loss() * share
            backward(loss)
        ce_sum += float(ce.detach()) * len(yi)
        correct += int((out.detach().argmax(1) == yi).sum())
    return ce_sum / n, correct


# ---------------------------------------------------------------------- the run
class _Trainer:
    """Holds the live objects of one run; every method is one phase of an epoch."""

    def __init__(self, run: Run, log: Callable[[str], None],
                 progress: StepProgress | None = None) -> None:
        self.run, self.s, self.log = run, run.settings, log
        self.progress = progress or StepProgress()
        self.device = run.device
        self.model = run.net.model.to(self.device)
        self.gates = GateSet.from_graph(
            run.net.graph, run.config.gate_init_prob, round_to=self.s.round_to
        ).to(self.device)
        self.gates.attach(self.model, run.net.graph)
        self.module = GatedNet(self.model, self.gates)
        self.criterion = run.criterion.to(self.device)
        self.train_loader, self.val_loader, self.order = loaders(run)
        self.steps_per_epoch = len(self.train_loader)
        self.budget = self._budget()
        self.calibrator = self._calibrator()
        self.lam = run.config.criteria_weight
        self.optimizer = self._optimizer()
        if self.budget is not None:
            self.lam = self.budget.start(self.gates,
                                         learning_rate(self.s, 0, self.steps_per_epoch))
        self.amp = self.s.amp and self.device.type == "cuda"
        self.scaling = self.amp and self.s.amp_dtype == "float16"  # bf16 has fp32's range
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.scaling)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels
        self.epoch, self.step = 0, 0
        self.tally: EpochTally | None = None  # the epoch in progress
        # the budget's (closed, re-opened) counts at the start of the epoch (its row's moves)
        self.epoch_moves = (self.budget.closed, self.budget.reopened) if self.budget else (0, 0)
        if run.checkpoint is not None:
            restore(self, run.checkpoint)
        self.ddp = self._wrap()

    # -- setup
    def _budget(self) -> Budget | None:
        run, s = self.run, self.s
        if run.target is None:
            return None
        hold = max(0, round(s.hold_epochs * self.steps_per_epoch))
        sched = BudgetSchedule.for_run(
            run.target, s.epochs * self.steps_per_epoch, budget_at=s.budget_at, hold_steps=hold
        )
        p = run.config.gate_init_prob
        return Budget(sched, self.criterion, theta0=math.log(p / (1 - p)),
                      gamma=run.config.gradient_multiplier, momentum=s.momentum,
                      importance_power=s.importance_power, importance_norm=s.importance_norm)

    def _calibrator(self) -> Calibrator:
        """Measurements of the kept network (:mod:`.calibration`), or why there are none."""
        mode, b, d = self.s.calibrate, self.budget, self.run.dist
        if b is None or b.metric != "latency" or self.criterion.latency is None:
            if mode == "on":
                raise GatorError("--calibrate on needs --target latency=F and a config with a "
                                 "cost model (make-config from a latency table)")
            return Calibrator(None, "off (no latency budget from a cost model)", mode)
        spec, note = calibration_spec(self.run.config.cost_model, self.device, mode)
        return Calibrator(spec, note, mode, b.schedule, main=d.main, distributed=d.enabled)

    def measure(self) -> tuple[float, tuple[float, float]]:
        """Measured latency ratio of the kept network and its range."""
        return self.calibrator.measure(self.model, self.run.net.graph, self.gates, self.device)

    def _calibrate(self) -> None:
        predicted = self.criterion.fraction("latency", self.gates.kept_widths())
        measured, spread = self.measure()
        point, refused = self.calibrator.record(self.step, predicted, measured, spread,
                                                self.budget.schedule.scale)
        where = f"epoch {self.epoch + 1} step {self.step}"
        if refused:
            self.log(f"{where}: {refused}; the ceiling stays")
            return
        opened = self.budget.rescale(point.scale, self.gates, self.optimizer)
        self.log(f"{where}: {point}; re-opened {opened} ch")

    def _edge_scale(self) -> torch.Tensor | None:
        """``--gate-norm edge``: each edge's gate-gradient scale (None: GATOR's raw gradients)."""
        return edge_gradient_scale(self.gates) if self.s.gate_norm == "edge" else None

    def _weights(self) -> torch.Tensor:
        """Per-edge divisors of the gate learning rates: ``w_e`` (times the edge scale)."""
        w = self.criterion.edge_weights(self.gates.kept_widths())
        scale = self._edge_scale()
        return w if scale is None else w * scale.to(w)

    def _optimizer(self) -> torch.optim.SGD:
        s = self.s
        groups = [
            {"params": [p for p in self.model.parameters() if p.requires_grad], "lr_scale": 1.0}
        ]
        groups += gate_param_groups(
            self.gates,
            self._weights(),
            gamma=self.run.config.gradient_multiplier,
            weight_decay=s.weight_decay,
        )
        return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)

    def _wrap(self) -> nn.Module:
        if not self.run.dist.enabled:
            return self.module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(self.module, device_ids=ids)

    @property
    def gates_training(self) -> bool:
        return not self.gates.frozen

    # -- checkpoints (gator_hw.train.state)
    def save(self, name: str) -> None:
        save_state(self, name)

    # -- one epoch
    def _set_lr(self) -> float:
        base = learning_rate(self.s, self.step, self.steps_per_epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = base * g["lr_scale"]
        return base

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=getattr(torch, self.s.amp_dtype), enabled=self.amp)

    def _batches(self, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches in its own order, after its first ``skip`` (already trained)."""
        self.order.set_epoch(self.epoch, skip * self.train_loader.batch_size)
        for x, y in self.train_loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _after_step(self) -> None:
        if not self.gates_training:
            return
        if self.budget is None:
            self.gates.update_masks()
        else:
            lr = learning_rate(self.s, self.step, self.steps_per_epoch)
            self.lam = self.budget.step(self.step, self.gates, lr=lr,
                                        optimizer=self.optimizer).lam
            if self.calibrator.due(self.step):
                self._calibrate()
        refresh_gate_groups(
            self.optimizer.param_groups,
            self._weights(),
            gamma=self.run.config.gradient_multiplier,
            weight_decay=self.s.weight_decay,
        )
        if self._should_freeze():
            self.gates.freeze()
            # fine-tuning starts from the kept network's own statistics
            recalibrate_norms(self.model, self._norm_batches())
            self.ddp = self._wrap()  # DDP must forget the logits, which no longer get grads
            self.log(f"epoch {self.epoch + 1} step {self.step}: gates frozen, fine-tuning weights")

    def _should_freeze(self) -> bool:
        if self.budget is not None:
            return self.budget.done(self.step)
        ge = self.s.gate_epochs
        return ge is not None and self.step >= ge * self.steps_per_epoch

    def _cost_term(self) -> Callable[[], torch.Tensor]:
        lam, scale = self.lam, self._edge_scale()
        return lambda: self.criterion.loss(self.gates, lam, edge_scale=scale)

    def _train_step(self, x: torch.Tensor, y: torch.Tensor,
                    no_sync: Callable[[], contextlib.AbstractContextManager] | None
                    ) -> tuple[float, float, int]:
        """One optimizer step on ``(x, y)``: its base lr, mean cross-entropy, correct count."""
        base = self._set_lr()
        self.optimizer.zero_grad(set_to_none=True)
        extra = self._cost_term() if self.gates_training else None
        ce, correct = accumulate_gradients(
            self.ddp,
            x,
            y,
            self.s.subdivision,
            extra_loss=extra,
            backward=lambda loss: self.scaler.scale(loss).backward(),
            no_sync=no_sync,
            autocast=self._autocast,
        )
        if self.gates_training:
            self.gates.update_importance(
                scale=float(self.scaler.get_scale()) if self.scaling else 1.0,
                reduce=dist.all_reduce if self.run.dist.enabled else None)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        self._after_step()
        return base, ce, correct

    def _checkpoint_due(self) -> bool:
        """``--checkpoint-every N``: this step closes a block of N, and is not the epoch's
        last (the epoch's own checkpoint follows its evaluation)."""
        every = self.s.checkpoint_every
        return every > 0 and self.step % every == 0 and self.tally.batches < self.steps_per_epoch

    def train_epoch(self) -> tuple[float, float, float, float]:
        """Train the epoch in progress to its end (the rest of it, when resumed mid-epoch).

        Returns the epoch's mean cross-entropy and accuracy over all ranks, the expected cost
        and the base learning rate after its last step.
        """
        self.ddp.train()
        tally = self.tally = self.tally or EpochTally(lr=self.s.lr)
        no_sync = getattr(self.ddp, "no_sync", None)
        self.progress.start(self.epoch, self.s.epochs, self.steps_per_epoch, tally.batches)
        try:
            for x, y in self._batches(tally.batches):
                base, ce, correct = self._train_step(x, y, no_sync)
                with torch.no_grad():
                    cost = float(self.criterion.cost(self.gates.expected_channels()))
                tally.add(ce, correct, len(y), cost, base)
                self.progress.update(tally.batches, tally.mean_ce,
                                     self.lam if self.gates_training else 0.0)
                if self._checkpoint_due():
                    self.save("last")
        finally:
            self.progress.stop()
        ce_sum, correct, n = reduce_sum([tally.ce, tally.correct, tally.images], self.run.dist,
                                        self.device)
        return ce_sum / max(n, 1), correct / max(n, 1), tally.cost, tally.lr

    def finish_epoch(self) -> float:
        """Close the epoch in progress; return the seconds it took (resumed parts included)."""
        seconds = self.tally.elapsed() if self.tally is not None else 0.0
        self.tally, self.epoch = None, self.epoch + 1
        return seconds

    def _norm_batches(self) -> Iterator[torch.Tensor]:
        """The first training images, in file order (no RNG used), on every rank alike."""
        loader = DataLoader(self.run.data.train, self.train_loader.batch_size, shuffle=False,
                            num_workers=0)
        for i, (x, _) in enumerate(loader):
            if i >= NORM_BATCHES:
                return
            yield x.to(self.device)

    def evaluate(self) -> float:
        """Val accuracy of the deterministic gates; while they train, with batch norms
        recalibrated for the kept network (:mod:`gator_hw.train.norms`)."""
        if not self.gates_training:
            return self._evaluate()
        with recalibrated_norms(self.model, self._norm_batches()):
            return self._evaluate()

    @torch.no_grad()
    def _evaluate(self) -> float:
        self.ddp.eval()
        correct, n = 0.0, 0.0
        for x, y in self.val_loader:
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                out = self.ddp(x)
            correct += float((out.argmax(1) == y).sum())
            n += len(y)
        correct, n = reduce_sum([correct, n], self.run.dist, self.device)
        return correct / max(n, 1.0)

    def row(self, ce: float, acc: float, cost: float, lr: float, val: float,
            seconds: float) -> EpochRow:
        kept = self.gates.kept_channels()
        fr = self.criterion.fractions(torch.tensor(kept, dtype=torch.float64))
        tgt = self.run.target
        met = tgt is not None and fr.get(tgt.metric, 1.0) <= self.bound + 1e-9
        gates = "frozen" if self.gates.frozen else "training"
        last = self.calibrator.points[-1] if self.calibrator.points else None
        measured = last.measured if last is not None and last.step > (
            self.epoch - 1) * self.steps_per_epoch else None
        b = self.budget
        moves = (b.closed, b.reopened) if b is not None else (0, 0)
        closed, reopened = (m - m0 for m, m0 in zip(moves, self.epoch_moves, strict=True))
        self.epoch_moves = moves
        return EpochRow(
            self.epoch,
            lr,
            self.lam if self.gates_training else 0.0,
            ce,
            cost,
            acc,
            val,
            kept,
            fr,
            f"{tgt.metric}<={tgt.fraction:g}" if tgt else "none",
            met,
            gates,
            seconds,
            ceiling=b.schedule.ceiling(self.step) if b is not None else None,
            closed=closed,
            reopened=reopened,
            measured=measured,
        )

    @property
    def bound(self) -> float:
        """What the kept network's predicted cost must not exceed: the target, corrected by
        the measurements (calibration)."""
        if self.budget is not None:
            return self.budget.schedule.bound
        return self.run.target.fraction if self.run.target is not None else 1.0


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    """Append a row to the CSV log atomically (rewrites the small file in one step)."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(row))
    if not old:
        w.writeheader()
    w.writerow(row)
    write_text(path, old + buf.getvalue())


@dataclass(frozen=True)
class TrainResult:
    """Where the run is and how it ended."""

    out: Path
    rows: list[EpochRow]
    kept: list[int]
    fractions: dict[str, float]
    budget_met: bool | None
    plan: dict[int, list[int]]


def train(settings: TrainSettings, log: Callable[[str], None] = print,
          progress: StepProgress | None = None) -> TrainResult:
    """Run (or resume) gated pruning training; see the module docstring for the files.

    ``progress`` shows the steps within each epoch (:mod:`gator_hw.train.progress`; rank 0
    only); by default nothing but ``log``'s lines is shown.

    Raises
    ------
    GatorError
        For any invalid input, before anything is written.
    """
    run = prepare(settings, log)
    torch.manual_seed(settings.seed + run.dist.rank)  # gate noise differs per rank
    tr = _Trainer(run, log if run.dist.main else (lambda _m: None),
                  progress if run.dist.main else None)
    if run.dist.main:
        run.out.mkdir(parents=True, exist_ok=True)
        if run.checkpoint is None:
            write_json(run.out / "settings.json", _meta_settings(settings, run))
    if settings.amp and not tr.amp:
        tr.log("--amp needs CUDA; training in float32")
    tr.log(f"{run.net} | {run.data} | {run.criterion} | budget {tr.budget or 'none'}"
           + (f" | measured latency: {tr.calibrator.note}" if tr.budget is not None else ""))
    rows = []
    while tr.epoch < settings.epochs:
        ce, acc, cost, lr = tr.train_epoch()
        val = tr.evaluate()
        check_masks(tr.gates, run.dist)
        seconds = tr.finish_epoch()
        row = tr.row(ce, acc, cost, lr, val, seconds)
        rows.append(row)
        tr.log(str(row))
        if run.dist.main:
            _append_csv(run.out / "log.csv", row.csv_row())
        tr.save("last")
        if settings.save_interval and tr.epoch % settings.save_interval == 0:
            tr.save(f"epoch_{tr.epoch:03d}")
        if run.dist.enabled:
            dist.barrier()
    kept = tr.gates.kept_channels()
    fr = run.criterion.fractions(torch.tensor(kept, dtype=torch.float64))
    met = None if run.target is None else fr[run.target.metric] <= tr.bound + 1e-9
    final = None
    if tr.calibrator.on and tr.calibrator.points:
        m, spread = tr.measure()
        final = {"measured": m, "spread": list(spread), "predicted": fr["latency"]}
        tr.log(f"the kept network measures {m:.3f} of the full net's latency (rounds "
               f"{spread[0]:.3f}-{spread[1]:.3f}; target {run.target.fraction:g}, predicted "
               f"{fr['latency']:.3f})")
    if run.dist.main:
        write_json(run.out / "plan.json", _plan(tr, fr, met, final))
    if met is False:
        t = run.target
        raise GatorError(
            f"budget {t} not met: the kept network is predicted at {fr[t.metric]:.3f} "
            f"(bound {tr.bound:.3f}) after {settings.epochs} epochs; resume with more --epochs "
            f"or an earlier --budget-at (run folder {run.out})"
        )
    return TrainResult(run.out, rows, kept, fr, met, tr.gates.kept_indices())


def _meta_settings(s: TrainSettings, run: Run) -> dict[str, Any]:
    return {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()},
        "signature": model_signature(run.net.graph),
        "config": run.config.to_dict(),
        "world_size": run.dist.world,
        "torch": torch.__version__,
    }


def _plan(tr: _Trainer, fr: dict[str, float], met: bool | None,
          final: dict[str, Any] | None = None) -> dict[str, Any]:
    g = tr.run.net.graph
    return {
        "model": g.model_name,
        "input_shape": list(g.input_shape),
        "kept": {
            e.name: idx for e, idx in zip(g.edges, tr.gates.kept_indices().values(), strict=True)
        },
        "kept_channels": tr.gates.kept_channels(),
        "fractions": fr,
        "budget_met": met,
        "calibrations": tr.calibrator.state(),
        "measured_latency": final,
    }
