"""The cost loss: exactness, a hand computation, multipliers, reference configs, the budget."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from gator_hw.accounting import network_cost
from gator_hw.config import GatingConfig, read_config
from gator_hw.errors import GatorError
from gator_hw.gates import GateSet
from gator_hw.graph import build_hypergraph
from gator_hw.loss import (
    CostCriterion,
    edge_gradient_scale,
    gate_param_groups,
    quadratic_cost,
    refresh_gate_groups,
)
from tests.conftest import cached_network

pytestmark = pytest.mark.usefixtures("one_thread")


class TwoConv(nn.Module):
    """conv 3->4 (3x3) -> conv 4->6 (3x3, stride 2) -> avgpool -> fc 6->2, on 8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def tiny():
    model = TwoConv()
    return model, build_hypergraph(model, (1, 3, 8, 8), "twoconv")


def _gated(graph, theta0, theta1):
    gates = GateSet.from_graph(graph)
    with torch.no_grad():
        gates.logits[0].copy_(torch.tensor(theta0))
        gates.logits[1].copy_(torch.tensor(theta1))
    return gates


def test_loss_matches_hand_computation(tiny):
    _, graph = tiny
    assert [e.channels for e in graph.edges] == [4, 6]
    # GATOR units (MACs / 64 input pixels): conv1 27 n0, conv2 9 n0 n1 (4x4 out) / 4, fc n1/32
    full = 27 * 4 + 2.25 * 4 * 6 + 6 / 32
    crit = CostCriterion(graph, GatingConfig(criteria_weight=0.5))
    assert crit.static_total_cost == pytest.approx(full)
    t0, t1 = [2.0, -1.0, 0.5, 3.0], [1.0, 1.0, -2.0, 0.0, 4.0, 2.0]
    gates = _gated(graph, t0, t1)
    gates.mask(1)[5] = False
    s0, s1 = torch.sigmoid(torch.tensor(t0)), torch.sigmoid(torch.tensor(t1))
    s1[5] = 0.0
    n0, n1 = float(s0.sum()), float(s1.sum())
    loss = crit.loss(gates)
    assert float(loss.detach()) == pytest.approx(
        0.5 * (27 * n0 + 2.25 * n0 * n1 + n1 / 32) / full, rel=1e-6
    )
    loss.backward()
    g0 = 0.5 * (27 + 2.25 * n1) / full * s0 * (1 - s0)
    g1 = 0.5 * (2.25 * n0 + 1 / 32) / full * s1 * (1 - s1)
    assert torch.allclose(gates.logits[0].grad, g0.float(), rtol=1e-5)
    assert torch.allclose(gates.logits[1].grad, g1.float(), rtol=1e-5)
    # the original's per-channel weights w_e = dC/dn_e / S
    w = crit.edge_weights(torch.tensor([n0, n1], dtype=torch.float64))
    assert w.tolist() == pytest.approx([(27 + 2.25 * n1) / full, (2.25 * n0 + 1 / 32) / full])


def test_memory_factor_counts_params(tiny):
    _, graph = tiny
    crit = CostCriterion(graph, GatingConfig(factor_type="memory_factor"))
    n = torch.tensor([3.0, 5.0])
    # conv1 27 n0, conv2 9 n0 n1, fc 2 n1 + 2 bias
    assert float(crit.factor(n)) == pytest.approx(27 * 3 + 9 * 15 + 2 * 5 + 2)
    assert crit.static_total_cost == pytest.approx(27 * 4 + 9 * 24 + 12 + 2)


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2"])
def test_quadratic_cost_agrees_with_network_cost(name):
    net = cached_network(name, 32 if name == "mobilenet_v2" else None)
    g = net.graph
    quads = {m: quadratic_cost(g, m) for m in ("flops", "params", "bytes")}
    rng = random.Random(0)
    for _ in range(4):
        w = {e.gid: rng.randint(0, e.channels) for e in g.edges}
        n = torch.tensor([float(w[i]) for i in range(g.n_edges)])
        c = network_cost(g, w)
        assert float(quads["flops"](n)) == pytest.approx(c.flops, rel=1e-12)
        assert float(quads["params"](n)) == pytest.approx(c.params, rel=1e-12)
        assert float(quads["bytes"](n)) == pytest.approx(c.bytes, rel=1e-12)
    with pytest.raises(ValueError):
        quadratic_cost(g, "watts")


def test_multipliers_reproduce_their_definition(tiny):
    _, graph = tiny
    crit = CostCriterion(graph, GatingConfig(edge_multipliers=[1.8, 0.4]))
    f = crit.flops
    full = f.full
    for e, mu in ((0, 1.8), (1, 0.4)):
        probe = full.clone()
        probe[e] = full[e] // 2
        d_lat = float(f.weighted(probe, crit.mu) - f(full))
        d_flops = float(f(probe) - f(full))
        assert d_lat == pytest.approx(mu * d_flops)
    ones = torch.ones(2, dtype=torch.float64)
    n = torch.tensor([1.0, 5.0])
    assert float(f.weighted(n, ones)) == pytest.approx(float(f(n)))
    fr = crit.fractions(full)
    assert fr["latency"] == pytest.approx(1.0) and set(fr) == {"latency", "flops", "params"}


def test_config_with_wrong_edge_count_is_rejected(tiny):
    _, graph = tiny
    with pytest.raises(GatorError, match="2 hyperedges"):
        CostCriterion(graph, GatingConfig(edge_multipliers=[1.0, 1.0, 1.0]))


def test_reference_configs_drive_the_loss(reference_dir):
    r56 = cached_network("resnet56")
    for name in ("resnet_56_flops_config.json", "resnet_56_memory_config.json"):
        crit = CostCriterion(r56.graph, read_config(reference_dir / name))
        gates = GateSet.from_graph(r56.graph, crit.config.gate_init_prob)
        loss = crit.loss(gates)
        loss.backward()
        assert torch.isfinite(loss) and all(t.grad is not None for t in gates.logits)
        # the published S is the full net's cost in the same units
        assert float(crit.cost(crit.full_widths)) == pytest.approx(1.0, rel=0.01)
    r50 = cached_network("resnet50")
    for name in (
        "resnet_50_flops_config.json",
        "resnet_50_flops_rel_timing_config_batch_32.json",
        "resnet_50_memory_adjusted_config.json",
    ):
        crit = CostCriterion(r50.graph, read_config(reference_dir / name))
        gates = GateSet.from_graph(r50.graph, crit.config.gate_init_prob)
        crit.loss(gates).backward()
        assert all(torch.isfinite(t.grad).all() for t in gates.logits)
    # ResNet-50: 81456 units in its convs plus the fc; the original's S is its (wrong) 76848
    crit = CostCriterion(r50.graph, read_config(reference_dir / "resnet_50_flops_config.json"))
    assert float(crit.cost(crit.full_widths)) == pytest.approx(
        (81456 + 2048 * 1000 / 224**2) / 76848
    )
    assert crit.has_latency is False
    lat = CostCriterion(
        r50.graph, read_config(reference_dir / "resnet_50_flops_rel_timing_config_batch_32.json")
    )
    assert lat.fraction("latency", lat.full_widths / 2) < 1.0
    assert "edge multipliers" in str(lat)


def test_gate_param_groups_scale_lr_by_inverse_weight(tiny):
    _, graph = tiny
    gates = GateSet.from_graph(graph)
    w = torch.tensor([0.2, 0.05], dtype=torch.float64)
    groups = gate_param_groups(gates, w, gamma=0.2, weight_decay=1e-4)
    assert [g["lr_scale"] for g in groups] == pytest.approx([1.0, 4.0])
    assert [g["lr_scale"] * g["weight_decay"] for g in groups] == pytest.approx([1e-4, 1e-4])
    refresh_gate_groups(groups, torch.tensor([0.1, 0.0]), gamma=0.2, weight_decay=1e-4)
    assert groups[0]["lr_scale"] == pytest.approx(2.0)
    assert groups[1]["lr_scale"] == pytest.approx(0.2 / (0.01 * 0.1))  # floored weight


def test_published_configs_train_with_exactly_the_multiplied_cost(reference_dir):
    """Without a cost model nothing changed: the loss is lambda * C_mu(n) / S, value and
    gradient, computed here from the quadratic forms by hand."""
    r50 = cached_network("resnet50")
    cfg = read_config(reference_dir / "resnet_50_flops_rel_timing_config_batch_32.json")
    assert cfg.cost_model is None
    crit = CostCriterion(r50.graph, cfg)
    assert crit.latency is None and crit.source == "edge multipliers"
    q, mu = crit.flops, torch.tensor(cfg.edge_multipliers, dtype=torch.float64)
    gates = GateSet.from_graph(r50.graph, cfg.gate_init_prob)
    torch.manual_seed(0)
    with torch.no_grad():
        for t in gates.logits:
            t.add_(torch.randn_like(t))
    n = gates.expected_channels().detach().to(torch.float64)
    full, d = q.full, n - q.full
    mid = (q.full + n) / 2
    by_hand = q(full) + (mu * d * (q.linear + q.quad @ mid)).sum()
    loss = crit.loss(gates)
    assert float(loss.detach()) == pytest.approx(cfg.criteria_weight * float(by_hand) /
                                        cfg.static_total_cost, rel=1e-6)
    loss.backward()
    # d loss / d theta_c = lambda * w_e * sigmoid'(theta_c), w_e = mu_e dC/dn_e at the mid-path
    x = n.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(q.weighted(x, mu), x)
    for e in (0, 7, 36):
        t = gates.logits[e].detach().to(torch.float64)
        want = cfg.criteria_weight * g[e] / cfg.static_total_cost * torch.sigmoid(t) * (
            1 - torch.sigmoid(t))
        assert torch.allclose(gates.logits[e].grad.to(torch.float64), want, rtol=1e-4)


def _with_importance(graph, per_edge):
    gates = GateSet.from_graph(graph)
    with torch.no_grad():
        for e, v in enumerate(per_edge):
            gates.edge_importance(e).fill_(v)
    return gates


def test_edge_gradient_scale_is_each_edges_rms_over_the_geometric_mean(tiny):
    _, graph = tiny
    assert edge_gradient_scale(GateSet.from_graph(graph)).tolist() == [1.0, 1.0]  # unmeasured
    gates = _with_importance(graph, [4.0, 0.25])  # RMS 2 and 0.5: geometric mean 1
    assert edge_gradient_scale(gates).tolist() == pytest.approx([2.0, 0.5])
    gates.mask(0)[:2] = False  # only live channels count
    gates.edge_importance(0)[:2] = 100.0
    assert edge_gradient_scale(gates).tolist() == pytest.approx([2.0, 0.5])
    clipped = edge_gradient_scale(_with_importance(graph, [1e4, 1e-4]), clip=10.0)
    assert clipped.tolist() == pytest.approx([10.0, 0.1])


def test_edge_scale_changes_the_cost_gradient_not_its_value(tiny):
    _, graph = tiny
    crit = CostCriterion(graph, GatingConfig(criteria_weight=0.5))
    plain, scaled = _gated(graph, [0.3] * 4, [-0.2] * 6), _gated(graph, [0.3] * 4, [-0.2] * 6)
    s = torch.tensor([3.0, 0.5], dtype=torch.float64)
    a, b = crit.loss(plain), crit.loss(scaled, edge_scale=s)
    assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-12)
    a.backward()
    b.backward()
    for e in range(2):
        torch.testing.assert_close(scaled.logits[e].grad, plain.logits[e].grad * float(s[e]))


def test_normalised_gates_keep_the_cost_push_and_divide_the_task_gradient(tiny):
    """--gate-norm edge: learning rates gamma / (w_e s_e) and the cost gradient times s_e, so
    the cost moves every logit exactly as under GATOR's rates, and a task gradient by 1/s_e."""
    _, graph = tiny
    crit = CostCriterion(graph, GatingConfig(criteria_weight=1.0))

    def step(scale, task):
        gates = _gated(graph, [0.4, 0.1, -0.3, 0.7], [0.4, 0.2, 0.9, -0.5, 0.3, 0.1])
        w = crit.edge_weights(gates.kept_widths())
        w = w if scale is None else w * scale
        opt = torch.optim.SGD(gate_param_groups(gates, w, gamma=0.2, weight_decay=0.0), lr=1.0)
        for g in opt.param_groups:
            g["lr"] = g["lr_scale"]
        before = [t.detach().clone() for t in gates.logits]
        loss = crit.loss(gates, edge_scale=scale) if task is None else sum(
            (t * k).sum() for t, k in zip(gates.logits, task, strict=True))
        loss.backward()
        opt.step()
        return [b - t.detach() for b, t in zip(before, gates.logits, strict=True)]

    scale = torch.tensor([3.0, 1 / 3.0], dtype=torch.float64)
    for a, b in zip(step(None, None), step(scale, None), strict=True):
        torch.testing.assert_close(a, b)
    task = [torch.linspace(-1, 1, 4), torch.linspace(1, 2, 6)]
    for e, (a, b) in enumerate(zip(step(None, task), step(scale, task), strict=True)):
        torch.testing.assert_close(b, a / float(scale[e]))


def test_unknown_gate_norm_is_one_line_error():
    from gator_hw.train import TrainSettings

    with pytest.raises(GatorError, match="--gate-norm must be one of none, edge"):
        TrainSettings("resnet20", config="x", gate_norm="layer").check()
