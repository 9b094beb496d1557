"""Long epochs: progress within an epoch, and mid-epoch checkpoints that resume exactly.

The tiny run: resnet20 on digits at 16x16, batch 128 (11 steps per epoch), 2 epochs under a
flops budget whose gates freeze at step 21, so a resume meets gate noise, the budget's
projection, the freeze and the data augmentation's random shifts.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from gator_hw.cli import app, main
from gator_hw.config import GatingConfig, write_config
from gator_hw.errors import GatorError
from gator_hw.train import TrainSettings, load_checkpoint, loop, train
from gator_hw.train.order import EpochOrder
from gator_hw.train.progress import BarProgress, LineProgress, epoch_progress
from tests.conftest import one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS_PER_EPOCH = 11  # 1437 digits // 128


class Killed(Exception):
    """Stands for the process dying mid-epoch (SIGKILL, a pre-empted job)."""


def _settings(folder: Path, **kw) -> TrainSettings:
    cfg = write_config(GatingConfig(criteria_weight=1.0, gate_init_prob=0.8), folder / "c.json")
    return TrainSettings("resnet20", config=cfg, data="digits", out=folder / "run", epochs=2,
                         batch_size=128, input_size=16, target="flops=0.7", device="cpu",
                         **kw)  # fmt: skip


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run (no mid-epoch checkpoints); its run folder."""
    folder = tmp_path_factory.mktemp("straight")
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # module scope: set up before the one_thread fixture
    try:
        train(_settings(folder), log=lambda m: None)
    finally:
        torch.set_num_threads(old)
    return folder / "run"


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "log.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def _kill_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    real = loop._Trainer._after_step

    def dying(self) -> None:
        real(self)
        if self.step == step:
            raise Killed

    monkeypatch.setattr(loop._Trainer, "_after_step", dying)


@pytest.mark.parametrize(
    ("every", "kill", "saved"),
    [(4, 7, 4), (4, 14, 12), (3, 22, 21)],  # in epoch 1; in epoch 2; after the gates froze
)
def test_killed_mid_epoch_resumes_as_if_never_stopped(tmp_path, monkeypatch, straight, every,
                                                      kill, saved):
    s = _settings(tmp_path, checkpoint_every=every)
    with monkeypatch.context() as m:
        _kill_at(m, kill)
        with pytest.raises(Killed):
            train(s, log=lambda _m: None)
    run = s.out
    ck = load_checkpoint(run)
    tally = ck.meta["tally"][0]
    assert ck.meta["step"] == saved and tally["batches"] == saved % STEPS_PER_EPOCH
    assert ck.meta["epoch"] == saved // STEPS_PER_EPOCH and tally["images"] > 0
    before = (run / "last.json").read_bytes()
    # another batch size cannot continue the epoch: one line, nothing written
    with pytest.raises(GatorError) as exc:
        train(replace(s, resume=run, out=None, batch_size=64), log=lambda _m: None)
    one_line_error(exc, "mid-epoch", "--batch-size 128")
    assert (run / "last.json").read_bytes() == before
    lines: list[str] = []
    res = train(replace(s, resume=run, out=None), log=lines.append)
    assert res.rows[0].epoch == saved // STEPS_PER_EPOCH + 1  # the interrupted epoch's row
    assert _rows(run) == _rows(straight)
    assert json.loads((run / "plan.json").read_text()) == json.loads(
        (straight / "plan.json").read_text())
    a, b = load_checkpoint(run), load_checkpoint(straight)
    assert a.tensors.keys() == b.tensors.keys()
    for k, v in b.tensors.items():  # model, gate logits and masks, momentum, RNG states
        assert torch.equal(a.tensors[k], v), k
    for k in ("epoch", "step", "lam", "controller", "moves", "optimizer_groups"):
        assert a.meta[k] == b.meta[k], k
    assert a.meta["tally"] is None


def test_epoch_order_depends_on_seed_and_epoch_only():
    data = list(range(50))
    a, b = EpochOrder(data, seed=3), EpochOrder(data, seed=3)
    a.set_epoch(0), b.set_epoch(0)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == data
    b.set_epoch(1, skip=20)  # b never iterated epoch 0: nothing carried over
    assert list(b) == list(a)[20:] and len(b) == 30
    a.set_epoch(1)
    x = torch.empty((), dtype=torch.int64).random_(generator=a.loader_generator).item()
    b.set_epoch(1, skip=20)
    assert torch.empty((), dtype=torch.int64).random_(generator=b.loader_generator).item() == x
    shard = EpochOrder(data, seed=3, rank=1, world=2)
    shard.set_epoch(1, skip=5)
    assert len(shard) == 20 and list(shard) == shard.indices()[5:]


def test_plain_progress_lines_when_stdout_is_not_a_terminal(tmp_path, monkeypatch):
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(var, raising=False)
    s = _settings(tmp_path)
    args = ["prune", "resnet20", "--config", str(s.config), "--data", "digits", "--input-size",
            "16", "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "128",
            "--checkpoint-every", "5", "--device", "cpu"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    steps = [ln for ln in res.output.splitlines() if ln.startswith("epoch 1/1 step ")]
    assert 5 <= len(steps) <= STEPS_PER_EPOCH, res.output
    assert steps[-1].startswith("epoch 1/1 step 11/11 (100%): loss ")
    assert all("lambda" in ln and "ETA" in ln for ln in steps)
    assert "\r" not in res.output and "\x1b" not in res.output and "\u2501" not in res.output
    assert "epoch 1: val acc" in res.output


def test_line_progress_every_tenth_and_every_few_minutes():
    lines: list[str] = []
    now = [0.0]
    p = LineProgress(lines.append, every_s=300.0, clock=lambda: now[0])
    p.start(epoch=2, epochs=90, steps=1000, done=400)  # resumed 400 steps in
    for done in range(401, 1001):
        now[0] += 4.0  # a tenth of the epoch takes 400 s
        p.update(done, 1.5, 0.25)
    p.stop()
    # a line at each of the 6 tenths left, and one 300 s after each of them (and the start)
    assert [ln.split()[3] for ln in lines] == [f"{d}/1000" for t in range(4, 10)
                                              for d in (100 * t + 75, 100 * t + 100)]
    assert lines[1] == ("epoch 3/90 step 500/1000 (50%): loss 1.5000, lambda 0.25, "
                        "0.25 steps/s, ETA 0:33:20")
    assert lines[-1].startswith("epoch 3/90 step 1000/1000 (100%)")
    assert lines[-1].endswith("ETA 0:00:00")


def test_bar_on_a_terminal_lines_otherwise():
    term = Console(file=io.StringIO(), force_terminal=True, width=120)
    bar = epoch_progress(term)
    assert isinstance(bar, BarProgress)
    bar.start(0, 3, 10, 0)
    bar.update(4, 2.25, 0.5)
    bar.stop()
    assert "epoch 1/3" in term.file.getvalue()
    assert isinstance(epoch_progress(Console(file=io.StringIO())), LineProgress)


def test_negative_checkpoint_every_is_one_line(tmp_path, capsys):
    with pytest.raises(GatorError) as exc:
        replace(_settings(tmp_path), checkpoint_every=-1).check()
    one_line_error(exc, "--checkpoint-every", ">= 0", "-1")
    s = _settings(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["prune", "resnet20", "--config", str(s.config), "--out", str(tmp_path / "r"),
              "--checkpoint-every", "-3"])
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--checkpoint-every" in err[0]
    assert not (tmp_path / "r").exists()
