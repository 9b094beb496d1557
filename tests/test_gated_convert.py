"""From a gated training run to a converted model that equals it, through the CLI too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gator_hw.cli import app
from gator_hw.config import GatingConfig, write_config
from gator_hw.errors import GatorError
from gator_hw.gated import convert_checkpoint, load_gated
from gator_hw.io import load
from gator_hw.train.loop import TrainSettings, train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("gated")
    cfg = write_config(
        GatingConfig(criteria_weight=2.0, gate_init_prob=0.6, gradient_multiplier=1.0),
        tmp / "c.json",
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainSettings(model="resnet20", config=cfg, data="digits", out=tmp / "run",
                            epochs=1, batch_size=64, input_size=16), log=lambda _m: None)
    finally:
        torch.set_num_threads(threads)
    return tmp / "run"


def test_converted_run_equals_the_gated_model(run_dir: Path) -> None:
    net, gates, _, _ = load_gated(run_dir)
    kept = gates.kept_channels()
    assert sum(kept) < sum(e.channels for e in net.graph.edges)  # something was pruned
    r = convert_checkpoint(run_dir)
    assert r.rel_error <= 1e-4
    from gator_hw.accounting import flop_counter_flops, network_cost

    widths = {g: len(k) for g, k in r.keep.items()}
    assert r.flops_ratio == pytest.approx(
        network_cost(net.graph, widths).flops / network_cost(net.graph).flops, rel=1e-9)
    assert r.flops_ratio == pytest.approx(flop_counter_flops(r.model, net.input_shape)
                                          / flop_counter_flops(net.model, net.input_shape))
    assert r.params_ratio < 1 and f"FLOPs {100 * r.flops_ratio:.1f} %" in r.summary()
    assert sum(p.numel() for p in r.model.parameters()) < sum(
        p.numel() for p in net.model.parameters())


def test_convert_command_saves_a_loadable_model(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    res = CliRunner().invoke(app, ["convert", str(run_dir), "--out", str(out), "--data",
                                   "digits"])
    assert res.exit_code == 0, res.output
    assert "equals the gated model" in res.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["model"] == "resnet20" and plan["num_classes"] == 10
    model = load(out)
    x = torch.randn(3, 3, 16, 16)
    r = convert_checkpoint(run_dir)
    with torch.no_grad():
        assert torch.allclose(model(x), r.model(x), rtol=1e-5, atol=1e-6)
    res = CliRunner().invoke(app, ["eval", str(out), "--data", "digits"])
    assert res.exit_code == 0 and "top-1" in res.output


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "last.json").write_text("{}")
    with pytest.raises(GatorError, match="not a gator-hw checkpoint"):
        convert_checkpoint(tmp_path)
    with pytest.raises(GatorError, match="not found"):
        convert_checkpoint(tmp_path / "missing")


def test_bench_reports_flops_and_latency_ratios(run_dir: Path, tmp_path: Path) -> None:
    from gator_hw.evaluate import compare_latency
    from gator_hw.profile.timing import make_spec

    r = convert_checkpoint(run_dir)
    spec = make_spec("resnet20", batch=4, input_size=16, threads=1, repeats=3, warmup=1,
                     min_block_s=0.002)
    cmp = compare_latency(r.net.model, r.model, spec, flops_ratio=0.5, rounds=2)
    assert len(cmp.original_ms) == len(cmp.converted_ms) == 2
    assert cmp.latency_ratio > 0 and cmp.speedup == pytest.approx(1 / cmp.latency_ratio)
    assert "FLOPs ratio 0.500" in str(cmp)
    lo, hi = cmp.ratio_range
    assert lo <= cmp.latency_ratio <= hi and f"rounds {lo:.3f}-{hi:.3f}" in str(cmp)
    assert r.net.model.training is False and next(r.net.model.parameters()).requires_grad
    out = tmp_path / "pruned"
    assert CliRunner().invoke(app, ["convert", str(run_dir), "--out", str(out)]).exit_code == 0
    res = CliRunner().invoke(app, ["bench", str(out), "--batch-size", "2", "--rounds", "1",
                                   "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "FLOPs ratio" in res.output and "latency ratio" in res.output
