"""Closed-loop latency: measuring the kept network, correcting the ceiling, giving back channels."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from gator_hw.budget import Budget, BudgetSchedule, BudgetTarget, enforce_ceiling, give_back
from gator_hw.config import GatingConfig, read_config, write_config
from gator_hw.costmodel.make import make_config
from gator_hw.errors import GatorError
from gator_hw.gates import GateSet
from gator_hw.loss import CostCriterion
from gator_hw.network import load_network
from gator_hw.profile.timing import cpu_name, make_spec
from gator_hw.train import TrainSettings, train
from gator_hw.train import calibration as train_calibration
from gator_hw.train.calibration import calibration_spec, correction, measure_kept
from tests.conftest import cached_network, one_line_error
from tests.synthetic import write_synthetic_table

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def latency_config(tmp_path_factory):
    d = tmp_path_factory.mktemp("cal")
    table = write_synthetic_table(d / "r18_b4.csv", cached_network("resnet18", 32))
    return write_config(make_config([table], method="ridge", input_size=32).config,
                        d / "cfg.json")


def _kept_fraction(crit: CostCriterion, gates: GateSet, metric: str) -> float:
    return crit.fraction(metric, gates.kept_widths())


def test_give_back_reopens_the_most_important_up_to_the_ceiling() -> None:
    g = cached_network("resnet20").graph
    crit = CostCriterion(g, GatingConfig())
    gates = GateSet.from_graph(g, 0.9)
    torch.manual_seed(0)
    with torch.no_grad():
        gates.importance.copy_(torch.rand(gates.importance.shape))
    enforce_ceiling(gates, crit, "flops", 0.5)
    low = _kept_fraction(crit, gates, "flops")
    closed = {e: set(torch.nonzero(~gates.mask(e)).flatten().tolist()) for e in range(len(gates))}
    opened = give_back(gates, crit, "flops", 0.6)
    high = _kept_fraction(crit, gates, "flops")
    assert opened > 0 and low < high <= 0.6
    # within an edge, the re-opened channels are its most important pruned ones
    for e, was in closed.items():
        back = {i for i in was if bool(gates.mask(e)[i])}
        still = was - back
        if back and still:
            imp = gates.edge_importance(e)
            assert min(float(imp[i]) for i in back) >= max(float(imp[i]) for i in still)
        assert all(float(gates.logits[e][i].detach()) > 0 for i in back)
    # nothing left that fits: every edge's next unit would cross the ceiling
    assert give_back(gates, crit, "flops", 0.6) == 0
    # a ceiling below the kept network gives nothing back
    assert give_back(gates, crit, "flops", 0.3) == 0


def test_rescale_moves_the_bound_and_survives_a_state_round_trip() -> None:
    g = cached_network("resnet20").graph
    crit = CostCriterion(g, GatingConfig())
    gates = GateSet.from_graph(g, 0.9)
    sched = BudgetSchedule.for_run(BudgetTarget("flops", 0.5), 100, hold_steps=10)
    budget = Budget(sched, crit, theta0=2.2, gamma=0.2, momentum=0.9)
    enforce_ceiling(gates, crit, "flops", sched.ceiling(sched.reach_step))
    assert _kept_fraction(crit, gates, "flops") <= 0.5
    opened = budget.rescale(1.2, gates)
    assert budget.schedule.bound == pytest.approx(0.6)
    assert budget.schedule.ceiling(sched.reach_step) == pytest.approx(0.6)
    assert budget.schedule.ceiling(0) == 1.0  # never above the full net
    assert opened > 0 and 0.5 < _kept_fraction(crit, gates, "flops") <= 0.6
    again = Budget(sched, crit, theta0=2.2, gamma=0.2, momentum=0.9)
    again.load_state_dict(budget.state_dict())
    assert again.schedule.scale == 1.2 and again.controller.schedule.scale == 1.2
    budget.rescale(0.9, gates)  # lowered: the next step prunes to it
    budget.step(sched.reach_step + 1, gates, lr=0.01)
    assert _kept_fraction(crit, gates, "flops") <= 0.45 + 1e-9


def test_correction_is_predicted_over_measured_within_limits() -> None:
    assert correction(0.5, 0.46) == pytest.approx(0.5 / 0.46)
    with pytest.raises(GatorError) as exc:
        correction(0.5, 0.3)
    one_line_error(exc, "does not describe this device", "--calibrate off")


def test_calibration_spec_follows_the_table_and_the_device(latency_config) -> None:
    doc = read_config(latency_config).cost_model
    spec, why = calibration_spec(doc, torch.device("cpu"))
    assert spec is not None and spec.batch == 4 and spec.input_size == 32 and spec.threads == 1
    assert spec.device_name == cpu_name() and why.startswith("on")
    other = {**doc, "context": {**doc["context"], "device_name": "Some Other CPU"}}
    spec, why = calibration_spec(other, torch.device("cpu"))
    assert spec is None and "Some Other CPU" in why
    with pytest.raises(GatorError) as exc:
        calibration_spec(other, torch.device("cpu"), "on")
    one_line_error(exc, "Some Other CPU", "--calibrate")
    assert calibration_spec(doc, torch.device("cpu"), "off")[0] is None
    assert calibration_spec(None, torch.device("cpu"))[0] is None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_measure_kept_times_the_converted_network_and_leaves_the_model_alone(
        latency_config, device) -> None:
    """On CUDA too: a run trains there, the kept network is converted on the CPU and timed
    on the spec's device."""
    net = load_network("resnet18", input_size=32)
    net.model.to(device)
    gates = GateSet.from_graph(net.graph, 0.9).to(device)
    with torch.no_grad():
        for t in gates.logits:
            t[: len(t) * 3 // 4] = -1.0  # keep a quarter of every edge
    gates.update_masks()
    gates.attach(net.model, net.graph)
    net.model.train()
    spec, _ = calibration_spec(read_config(latency_config).cost_model, torch.device("cpu"))
    spec = replace(spec, batch=8, min_block_s=0.02, repeats=4)
    if device == "cuda":
        spec = make_spec("resnet18", device="cuda", batch=8, input_size=32, repeats=4)
    x = torch.randn(2, 3, 32, 32, device=device)
    gates.eval()
    with torch.no_grad():
        before = net.model.eval()(x)
    net.model.train()
    ratio, (lo, hi) = measure_kept(net.model, net.graph, gates, spec, rounds=2)
    assert 0 < lo <= ratio <= hi < 0.7  # a quarter of the channels, a sixteenth of the FLOPs
    assert net.model.training and gates.attached
    with torch.no_grad():
        after = net.model.eval()(x)
    torch.testing.assert_close(before, after)


def _latency_run(config, out, *, epochs: int, hold_epochs: float) -> TrainSettings:
    """A short ResNet-18 run on fake data to ``latency=0.6``, half the epochs to reach it."""
    return TrainSettings("resnet18", config=config, data="fake", out=out, epochs=epochs,
                         batch_size=64, lr=0.02, target="latency=0.6", input_size=32,
                         device="cpu", budget_at=0.5, hold_epochs=hold_epochs)


def test_a_latency_run_lands_where_the_measurement_says(latency_config, tmp_path,
                                                        monkeypatch) -> None:
    """The device measures 10 % under the cost model: the run keeps more, so that the
    measured ratio (predicted x 0.9) meets the target."""
    crit = CostCriterion(cached_network("resnet18", 32).graph, read_config(latency_config))

    factors = iter([0.9, 0.85, 0.9])  # two measurements in the run, one at its end

    def fake_measure(model, graph, gates, spec, rounds=3):
        m = next(factors) * crit.fraction("latency", gates.kept_widths())
        return m, (m * 0.99, m * 1.01)

    monkeypatch.setattr(train_calibration, "measure_kept", fake_measure)
    s = _latency_run(latency_config, tmp_path / "run", epochs=3, hold_epochs=1.0)
    lines: list[str] = []
    res = train(s, log=lines.append)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    cals = plan["calibrations"]
    assert len(cals) == 2 and all(c["accepted"] for c in cals)
    assert cals[0]["scale"] == pytest.approx(1 / 0.9, rel=1e-3)
    import math

    from gator_hw.train.calibration import POOL_SCALE

    p0, p1 = cals[0]["predicted"], cals[1]["predicted"]
    w0 = math.exp(-abs(math.log(p0 / p1)) / POOL_SCALE)  # the nearer net counts more
    pooled = math.exp((w0 * math.log(1 / 0.9) + math.log(1 / 0.85)) / (w0 + 1))
    assert cals[1]["scale"] == pytest.approx(pooled, rel=1e-6)
    assert 1 / 0.9 < pooled < 1 / 0.85
    assert 0.6 < res.fractions["latency"] <= 0.6 * pooled + 1e-9  # more kept than predicted 0.6
    assert plan["measured_latency"]["measured"] == pytest.approx(
        0.9 * res.fractions["latency"])
    assert plan["measured_latency"]["measured"] <= 0.9 * 0.6 * pooled + 1e-9
    assert res.budget_met and any("measured latency ratio" in line for line in lines)
    header = next(line for line in lines if "measured latency:" in line)
    assert "measured latency: on" in header
    # off: no measurement, the predicted latency meets the target itself
    res = train(replace(s, out=tmp_path / "off", calibrate="off", epochs=2, hold_epochs=0.5),
                log=lambda m: None)
    assert res.fractions["latency"] <= 0.6 + 1e-9
    assert json.loads((tmp_path / "off" / "plan.json").read_text())["calibrations"] == []


def test_a_measurement_far_from_the_prediction_is_reported_not_followed(
        latency_config, tmp_path, monkeypatch) -> None:
    def far(model, graph, gates, spec, rounds=3):
        return 0.2, (0.19, 0.21)  # nothing like what any cost model of this net predicts

    monkeypatch.setattr(train_calibration, "measure_kept", far)
    s = _latency_run(latency_config, tmp_path / "auto", epochs=2, hold_epochs=0.5)
    lines: list[str] = []
    res = train(s, log=lines.append)
    assert res.budget_met and res.fractions["latency"] <= 0.6 + 1e-9
    assert any("does not describe this device" in line and "ceiling stays" in line
               for line in lines)
    cals = json.loads((tmp_path / "auto" / "plan.json").read_text())["calibrations"]
    assert cals and not any(c["accepted"] for c in cals) and all(c["scale"] == 1.0 for c in cals)
    with pytest.raises(GatorError) as exc:
        train(replace(s, out=tmp_path / "on", calibrate="on"), log=lambda m: None)
    one_line_error(exc, "does not describe this device")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_latency_run_on_cuda_measures_its_kept_network_there(tmp_path) -> None:
    """A run on the GPU its table names converts and times the kept network there during the
    run and at its end (the law is synthetic, so a measurement may be refused, not crash)."""
    net = load_network("resnet20", input_size=32)
    table = write_synthetic_table(tmp_path / "t.csv", net, device="cuda")
    cfg = write_config(make_config([table], method="ridge", input_size=32).config,
                       tmp_path / "c.json")
    s = TrainSettings("resnet20", config=cfg, data="fake", out=tmp_path / "r", epochs=2,
                      batch_size=32, input_size=32, device="cuda", target="latency=0.8",
                      amp=True, amp_dtype="bfloat16")
    train(s, log=lambda m: None)
    doc = json.loads((tmp_path / "r" / "plan.json").read_text())
    assert doc["calibrations"] and all(c["measured"] > 0 for c in doc["calibrations"])
    assert doc["measured_latency"]["measured"] > 0
