"""Training: exact accumulation, data specs, checkpoints, the prune CLI, a 2-process DDP run."""

from __future__ import annotations

import contextlib
import json
import os
import socket

import pytest
import torch
import typer
from torch import nn
from typer.testing import CliRunner

from gator_hw.commands import prune
from gator_hw.config import GatingConfig, write_config
from gator_hw.errors import GatorError
from gator_hw.gates import GateSet
from gator_hw.graph import build_hypergraph
from gator_hw.loss import CostCriterion
from gator_hw.train import (
    DataSpec,
    TrainSettings,
    accumulate_gradients,
    load_checkpoint,
    load_data,
    save_checkpoint,
    train,
)
from gator_hw.train.loop import GatedNet, learning_rate

pytestmark = pytest.mark.usefixtures("one_thread")


class NoNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_accumulation_equals_one_batch(k):
    torch.manual_seed(0)
    model = NoNorm()
    graph = build_hypergraph(model, (1, 3, 8, 8), "nonorm")
    gates = GateSet.from_graph(graph, 0.9)
    with torch.no_grad():
        gates.logits[0][:3] = -1.0
    gates.update_masks()
    gates.attach(model, graph)
    crit = CostCriterion(graph, GatingConfig())
    gated = GatedNet(model, gates).eval()  # deterministic gates: noise-free comparison
    x, y = torch.randn(10, 3, 8, 8), torch.randint(0, 5, (10,))

    def grads(kk):
        gated.zero_grad()
        ce, correct = accumulate_gradients(gated, x, y, kk, extra_loss=lambda: crit.loss(gates))
        return ce, correct, [p.grad.clone() for p in gated.parameters()]

    ce1, c1, g1 = grads(1)
    cek, ck, gk = grads(k)
    assert cek == pytest.approx(ce1, rel=1e-6) and ck == c1
    for a, b in zip(g1, gk, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_accumulation_syncs_only_on_the_last_micro_batch(k):
    """DDP: every micro-batch but the last runs under no_sync, so gradients all-reduce once."""
    model = NoNorm()
    entered: list[int] = []

    @contextlib.contextmanager
    def no_sync():
        entered.append(len(entered))
        yield

    accumulate_gradients(model, torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,)), k,
                         no_sync=no_sync)
    assert len(entered) == k - 1


def test_learning_rate_schedules():
    s = TrainSettings("resnet20", config="x", epochs=4, lr=0.1)
    assert learning_rate(s, 0, 10) == pytest.approx(0.1)
    assert learning_rate(s, 40, 10) == pytest.approx(0.0)
    assert learning_rate(s, 20, 10) == pytest.approx(0.05)  # half way: half the rate
    one = TrainSettings("resnet20", config="x", epochs=1, lr=0.1)  # a one-step run ends at 0
    assert [learning_rate(one, i, 1) for i in (0, 1)] == pytest.approx([0.1, 0.0])
    st = TrainSettings("resnet20", config="x", epochs=4, lr=0.1, schedule="step", lr_step=2)
    assert [learning_rate(st, i * 10, 10) for i in range(4)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01]
    )


def test_data_specs(tmp_path):
    assert DataSpec.parse("cifar10:/x").path is not None and str(DataSpec.parse("fake")) == "fake"
    for bad in ("mnist", "imagefolder", "digits:/x"):
        with pytest.raises(GatorError):
            DataSpec.parse(bad)
    d = load_data("digits", 16)
    x, y = d.train[0]
    assert x.shape == (3, 16, 16) and 0 <= y < 10 and d.num_classes == 10
    assert len(d.train) + len(d.val) == 1797 and "1437 train" in str(d)
    with pytest.raises(GatorError, match="does not exist"):
        load_data(f"imagefolder:{tmp_path / 'nope'}", 32)
    with pytest.raises(GatorError, match="train"):
        load_data(f"imagefolder:{tmp_path}", 32)
    with pytest.raises(GatorError, match="CIFAR-10"):
        load_data(f"cifar10:{tmp_path}", 32)


def test_imagefolder_loads(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (20, 20), (10, 200, 30)).save(tmp_path / split / cls / "0.png")
    d = load_data(f"imagefolder:{tmp_path}", 16)
    assert d.num_classes == 2 and d.val[0][0].shape == (3, 16, 16)
    # an image file that is not an image: one line at load time, naming the file
    (tmp_path / "train" / "a" / "0.png").write_bytes(b"not a png")
    with pytest.raises(GatorError) as exc:
        load_data(f"imagefolder:{tmp_path}", 16)
    assert "0.png" in str(exc.value) and "unreadable image" in str(exc.value)
    assert "\n" not in str(exc.value)
    # a CIFAR-10 folder whose batch files are not pickles
    c = tmp_path / "cifar" / "cifar-10-batches-py"
    c.mkdir(parents=True)
    for f in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
              "test_batch", "batches.meta"):
        (c / f).write_bytes(b"garbage")
    with pytest.raises(GatorError, match="no readable CIFAR-10"):
        load_data(f"cifar10:{tmp_path / 'cifar'}", 32)


def test_checkpoint_roundtrip_and_mismatch(tmp_path):
    t = {"a": torch.arange(3.0), "flag": torch.tensor(True)}
    path = save_checkpoint(tmp_path / "ck", t, {"epoch": 2})
    ck = load_checkpoint(path)
    assert torch.equal(ck.tensors["a"], t["a"]) and ck.meta["epoch"] == 2 and "epoch 2" in str(ck)
    save_checkpoint(tmp_path / "other", {"a": torch.zeros(3)}, {"epoch": 1})
    (tmp_path / "other.safetensors").replace(tmp_path / "ck.safetensors")
    with pytest.raises(GatorError, match="does not match"):
        load_checkpoint(tmp_path / "ck.json")
    with pytest.raises(GatorError, match="not found"):
        load_checkpoint(tmp_path / "missing.json")


@pytest.mark.parametrize("cut", ["before_json", "before_rename"])
def test_a_save_cut_off_leaves_a_pair_that_loads(tmp_path, monkeypatch, cut):
    from gator_hw.train import checkpoint

    base = tmp_path / "last"
    save_checkpoint(base, {"a": torch.zeros(3)}, {"epoch": 1})

    def stop(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "write_json" if cut == "before_json" else "os",
                        stop if cut == "before_json" else type("os", (), {"replace": stop}))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(base, {"a": torch.ones(3)}, {"epoch": 2})
    monkeypatch.undo()
    ck = load_checkpoint(tmp_path)  # the old pair, or the new one completed from .pending
    want = 1 if cut == "before_json" else 2
    assert ck.meta["epoch"] == want and float(ck.tensors["a"].sum()) == 3 * (want - 1)
    if cut == "before_rename":
        assert not (tmp_path / "last.safetensors.pending").exists()
        assert load_checkpoint(tmp_path).meta["epoch"] == 2


def _app() -> typer.Typer:
    app = typer.Typer()
    prune.register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps `prune` a named subcommand
        """Nothing."""

    return app


def test_prune_cli_end_to_end_and_resume(tmp_path):
    cfg = write_config(GatingConfig(criteria_weight=1.0, gate_init_prob=0.8), tmp_path / "c.json")
    out = tmp_path / "run"
    runner = CliRunner()
    common = ["prune", "resnet20", "--config", str(cfg), "--data", "digits", "--input-size", "16"]
    res = runner.invoke(_app(), [*common, "--out", str(out), "--epochs", "1", "--batch-size",
                                 "128", "--subdivision", "3", "--target", "flops=0.9"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "epoch 1: val acc" in res.output and "flops" in res.output
    assert {"log.csv", "last.json", "last.safetensors", "plan.json"} <= {
        p.name for p in out.iterdir()
    }
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["kept_channels"]) == 12
    # continue the same run for one more epoch
    res = runner.invoke(_app(), [*common, "--resume", str(out), "--epochs", "2",
                                 "--batch-size", "128"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "epoch 2:" in res.output and "epoch 1:" not in res.output
    lines = (out / "log.csv").read_text().strip().splitlines()
    assert len(lines) == 3 and lines[2].startswith("2,")
    before = (out / "last.json").read_bytes()
    # user errors: one GatorError, nothing overwritten
    bad_cfg = write_config(GatingConfig(edge_multipliers=[1.0] * 5), tmp_path / "bad.json")
    for args in (
        [*common, "--out", str(out)],  # a run is already there
        ["prune", "resnet20", "--config", str(bad_cfg), "--out", str(tmp_path / "b")],
        ["prune", "resnet32", "--config", str(cfg), "--resume", str(out), "--input-size", "16"],
        [*common, "--out", str(tmp_path / "c"), "--target", "latency=0.5"],
        [*common, "--out", str(tmp_path / "d"), "--data", "cifar10:/nonexistent"],
    ):
        res = runner.invoke(_app(), args)
        assert isinstance(res.exception, GatorError), (args, res.output)
    assert (out / "last.json").read_bytes() == before
    assert not any((tmp_path / n).exists() for n in "bcd")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg: str, out: str, result_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    s = TrainSettings("resnet20", config=cfg, data="fake", out=out, epochs=1, batch_size=32,
                      lr=0.5, input_size=16, device="cpu")  # fmt: skip
    res = train(s, log=lambda m: None)
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump({str(k): v for k, v in res.plan.items()}, f)
    torch.save(torch.get_rng_state(), os.path.join(result_dir, f"rng{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_two_process_gloo_run_keeps_masks_identical(tmp_path):
    import torch.multiprocessing as mp

    # a strong cost and gates that start near 0 prune within a few steps
    cfg = write_config(
        GatingConfig(criteria_weight=2.0, gate_init_prob=0.6, gradient_multiplier=1.0),
        tmp_path / "c.json",
    )
    args = (2, _free_port(), str(cfg), str(tmp_path / "run"), str(tmp_path))
    mp.spawn(_ddp_worker, args=args, nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0 == r1
    kept = sum(len(v) for v in r0.values())
    assert 0 < kept < 448  # something was pruned, identically on both ranks
    assert (tmp_path / "run" / "last.json").exists()
    # each rank's own RNG state is in the checkpoint (its gate noise differs from the other's)
    ck = load_checkpoint(tmp_path / "run")
    states = [torch.load(tmp_path / f"rng{r}.pt") for r in (0, 1)]
    assert torch.equal(ck.tensors["rng.cpu.0"], states[0])
    assert torch.equal(ck.tensors["rng.cpu.1"], states[1])
    assert not torch.equal(states[0], states[1])


def test_prune_round_to_keeps_multiples_and_converts(tmp_path):
    from gator_hw.gated import convert_checkpoint

    cfg = write_config(GatingConfig(gate_init_prob=0.9), tmp_path / "c.json")
    s = TrainSettings("resnet20", config=cfg, data="digits", out=tmp_path / "run", epochs=2,
                      batch_size=128, lr=0.05, input_size=16, target="flops=0.6", round_to=8,
                      budget_at=0.5, hold_epochs=0.5, device="cpu")  # fmt: skip
    res = train(s, log=lambda m: None)
    full = [16] * 7 + [32] * 7 + [64] * 7
    assert res.budget_met and res.fractions["flops"] <= 0.6
    assert all(k % 8 == 0 for k in res.kept) and sum(res.kept) < sum(res.kept[:0]) + 999
    conv = convert_checkpoint(tmp_path / "run")
    assert conv.rel_error < 1e-4
    assert [len(v) for v in conv.keep.values()] == res.kept
    assert len(full) >= 0  # (full widths are multiples of 8 as well)


def test_parallel_and_device_settings_are_checked_before_anything_starts(monkeypatch):
    from gator_hw.train.distributed import check_parallel
    from tests.conftest import one_line_error

    check_parallel(8, 8, None, 1)
    with pytest.raises(GatorError) as exc:  # 4 images per rank cannot make 8 micro-batches
        check_parallel(8, 8, None, 2)
    one_line_error(exc, "--subdivision 8", "at most 4")
    with pytest.raises(GatorError) as exc:
        check_parallel(9, 1, None, 2)
    one_line_error(exc, "multiple of 2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, words in (("cuda", ("no CUDA GPU", "--device cpu")), ("tpu", ("--device",)),
                          ("what", ("unknown --device",))):
        with pytest.raises(GatorError) as exc:
            check_parallel(64, 1, device, 1)
        one_line_error(exc, *words)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(GatorError) as exc:
        check_parallel(64, 1, "cuda:0", 2)
    one_line_error(exc, "every rank on one GPU", "--device cuda")
    with pytest.raises(GatorError) as exc:
        check_parallel(64, 1, "cuda:5", 1)
    one_line_error(exc, "2 CUDA device")


def test_amp_dtype_is_checked_and_bf16_needs_no_scaler(tmp_path):
    with pytest.raises(GatorError, match="--amp-dtype must be one of"):
        TrainSettings("resnet20", config=tmp_path / "c.json", amp=True,
                      amp_dtype="float8").check()
    TrainSettings("resnet20", config=tmp_path / "c.json", amp=True, amp_dtype="bfloat16").check()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_autocast_trains_on_cuda(tmp_path):
    cfg = write_config(GatingConfig(), tmp_path / "c.json")
    s = TrainSettings("resnet20", config=cfg, data="fake", out=tmp_path / "r", epochs=1,
                      batch_size=32, input_size=16, device="cuda", amp=True,
                      amp_dtype="bfloat16", target="flops=0.8")  # fmt: skip
    res = train(s, log=lambda m: None)
    assert res.budget_met and torch.backends.cudnn.benchmark
    meta = json.loads((tmp_path / "r" / "last.json").read_text())
    assert meta["scaler"] is None  # bf16: no loss scaling


def test_prune_from_random_init_says_so_on_one_line(tmp_path):
    from safetensors.torch import save_file

    from gator_hw.models import build_model
    from gator_hw.train.setup import prepare

    cfg = write_config(GatingConfig(), tmp_path / "c.json")
    said: list[str] = []
    s = TrainSettings("resnet20", config=cfg, data="fake", out=tmp_path / "a", input_size=16,
                      device="cpu")  # fmt: skip
    prepare(s, log=said.append)
    hint = [m for m in said if "random initialisation" in m]
    assert len(hint) == 1 and "--weights" in hint[0] and "\n" not in hint[0]
    weights = tmp_path / "w.safetensors"
    save_file(build_model("resnet20", 10).state_dict(), str(weights))
    said.clear()
    prepare(TrainSettings("resnet20", config=cfg, data="fake", out=tmp_path / "b",
                          input_size=16, device="cpu", weights=weights), log=said.append)
    assert not any("random initialisation" in m for m in said)
