"""Progress within a training epoch: a rich bar on a terminal, plain lines in logs.

An ImageNet epoch is hours, so ``gator-hw prune`` shows where it is inside one: step ``i/N``,
the epoch's running cross-entropy, lambda and the time left. On a terminal that is a rich bar
(transient: the epoch's log row takes its place); when stdout is not a terminal (CI, a pipe,
a file) it is one plain line at every tenth of the epoch and at least every few minutes, so a
log holds no bar redraws. Only rank 0 shows progress (:func:`gator_hw.train.loop.train`).
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

__all__ = ["BarProgress", "LineProgress", "StepProgress", "epoch_progress", "eta_text"]


class StepProgress:
    """Progress that shows nothing: library calls, and every rank but rank 0."""

    def start(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        """Epoch ``epoch`` (0-based) of ``epochs`` begins with ``done`` of its ``steps`` taken
        (``done > 0`` when a run resumes mid-epoch)."""

    def update(self, done: int, loss: float, lam: float) -> None:
        """``done`` steps of the epoch are taken; ``loss`` is its mean cross-entropy so far."""

    def stop(self) -> None:
        """The epoch's training steps are over (or were interrupted)."""


def eta_text(seconds: float) -> str:
    """``H:MM:SS`` (days spelled out), or ``?`` before there is a rate."""
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


class LineProgress(StepProgress):
    """One plain line per tenth of the epoch, and at least every ``every_s`` seconds.

    The rate and ETA count only the steps this process took (a resumed epoch's earlier steps
    took no time here).
    """

    def __init__(
        self,
        log: Callable[[str], None],
        *,
        parts: int = 10,
        every_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log, self.parts, self.every_s, self.clock = log, parts, every_s, clock
        self._head, self._steps, self._first = "", 1, 0
        self._t0 = self._last_t = 0.0
        self._part = 0

    def start(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        self._head, self._steps, self._first = f"epoch {epoch + 1}/{epochs}", max(steps, 1), done
        self._t0 = self._last_t = self.clock()
        self._part = done * self.parts // self._steps

    def update(self, done: int, loss: float, lam: float) -> None:
        now = self.clock()
        part = done * self.parts // self._steps
        if part == self._part and now - self._last_t < self.every_s:
            return
        self._part, self._last_t = part, now
        took = done - self._first
        rate = took / (now - self._t0) if took and now > self._t0 else math.nan
        eta = (self._steps - done) / rate if rate > 0 else math.inf
        speed = f"{rate:.2f} steps/s" if math.isfinite(rate) else "- steps/s"
        self.log(
            f"{self._head} step {done}/{self._steps} ({100 * done / self._steps:.0f}%): "
            f"loss {loss:.4f}, lambda {lam:.3g}, {speed}, ETA {eta_text(eta)}"
        )


class BarProgress(StepProgress):
    """A rich progress bar on ``console``: step i/N, loss, lambda, elapsed time and ETA."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._bar: Progress | None = None
        self._task = 0

    def start(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.stop()
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lambda {task.fields[lam]:.3g}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task(f"epoch {epoch + 1}/{epochs}", total=steps,
                                        completed=done, loss=math.nan, lam=math.nan)

    def update(self, done: int, loss: float, lam: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done, loss=loss, lam=lam)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def epoch_progress(console: Console) -> StepProgress:
    """A bar when ``console`` writes to a terminal, else plain lines printed on it."""
    if console.is_terminal:
        return BarProgress(console)
    return LineProgress(lambda m: console.print(m, highlight=False, soft_wrap=True))
