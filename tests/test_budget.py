"""Budgets: parsing, the schedule, lambda, and the projection that holds the kept network."""

from __future__ import annotations

import math

import pytest
import torch

from gator_hw.budget import (
    Budget,
    BudgetController,
    BudgetSchedule,
    BudgetTarget,
    _normalised_importance,
    check_feasible,
    enforce_ceiling,
    limit_overshoot,
)
from gator_hw.config import GatingConfig
from gator_hw.errors import GatorError
from gator_hw.gates import GateSet
from gator_hw.loss import CostCriterion, gate_param_groups, refresh_gate_groups
from tests.conftest import cached_network, one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")


def test_budget_target_parsing() -> None:
    assert BudgetTarget.parse("latency=0.5") == BudgetTarget("latency", 0.5)
    assert "flops" in str(BudgetTarget.parse(" FLOPS=0.25"))
    for bad in ("latency", "speed=0.5", "flops=abc", "flops=1.5", "flops=0"):
        with pytest.raises(GatorError):
            BudgetTarget.parse(bad)


def test_feasibility() -> None:
    g = cached_network("resnet20").graph
    crit = CostCriterion(g, GatingConfig())
    check_feasible(BudgetTarget("flops", 0.05), crit)
    with pytest.raises(GatorError) as exc:
        check_feasible(BudgetTarget("latency", 0.5), crit)
    one_line_error(exc, "latency config", "make-config")
    slow = CostCriterion(g, GatingConfig(edge_multipliers=[0.01] * g.n_edges))
    with pytest.raises(GatorError) as exc:
        check_feasible(BudgetTarget("latency", 0.5), slow)
    one_line_error(exc, "impossible", "choose a fraction above")


def test_schedule_falls_in_log_space_and_freezes_before_the_end() -> None:
    s = BudgetSchedule.for_run(BudgetTarget("flops", 0.25), 1000, budget_at=0.5, hold_steps=100)
    assert (s.start_step, s.reach_step, s.freeze_step) == (50, 500, 600)
    assert s.ceiling(0) == s.ceiling(50) == 1.0
    mid = (50 + 500) / 2
    assert s.ceiling(int(mid)) == pytest.approx(0.5, rel=1e-9)  # geometric midpoint of 1, 0.25
    assert s.ceiling(500) == s.ceiling(900) == 0.25
    assert all(s.ceiling(t + 1) <= s.ceiling(t) for t in range(1000))
    short = BudgetSchedule.for_run(BudgetTarget("flops", 0.5), 10, budget_at=1.0, hold_steps=50)
    assert short.reach_step == 10 and short.freeze_step == 10
    with pytest.raises(GatorError):
        BudgetSchedule.for_run(BudgetTarget("flops", 0.5), 10, budget_at=0.0)


def test_lambda_asks_the_same_logit_drift_at_any_number_of_steps() -> None:
    """lambda * lr * gamma * slope * steps / (1 - momentum) is the descent theta0 at error 1."""
    t = BudgetTarget("flops", 0.5)
    out = {}
    for steps in (10, 1000):
        s = BudgetSchedule.for_run(t, steps, budget_at=1.0, warmup=0.0)
        c = BudgetController(s, theta0=5.0, gamma=0.2, momentum=0.9)
        assert c.error(0, 1.0) == pytest.approx(1.0)  # everything open: error 1
        lam = c.update(0, expected=1.0, lr=0.1, mean_slope=0.01)
        out[steps] = lam * 0.1 * 0.2 * 0.01 * steps / (1 - 0.9)
    assert out[10] == pytest.approx(5.0) and out[1000] == pytest.approx(5.0)
    s = BudgetSchedule.for_run(t, 100, budget_at=1.0)
    c = BudgetController(s, theta0=5.0, gamma=0.2, momentum=0.9)
    assert c.update(50, expected=0.9 * s.ceiling(50), lr=0.1, mean_slope=0.01) == 0.0
    assert c.update(50, expected=0.3, lr=0.1, mean_slope=0.01) == 0.0  # far below: no push
    assert c.update(50, expected=s.ceiling(50), lr=0.1, mean_slope=0.01) > 0.0
    d = BudgetController(s, theta0=5.0, gamma=0.2, momentum=0.9)
    d.load_state_dict(c.state_dict())
    assert d.state_dict() == c.state_dict()
    assert c.update(s.freeze_step, expected=1.0, lr=0.1, mean_slope=0.01) == 0.0


def _simulate(steps_per_epoch: int, epochs: int = 8, *, round_to: int = 1, seed: int = 0):
    """Gates of ResNet-20 under the real cost loss, budget and GATOR learning rates, with a
    synthetic task gradient (each channel has a random importance). Returns per-step records."""
    g = cached_network("resnet20").graph
    crit = CostCriterion(g, GatingConfig())
    gates = GateSet.from_graph(g, 0.995, round_to=round_to)
    torch.manual_seed(seed)
    importance = [torch.rand(c) ** 3 for c in gates.channels]
    total = steps_per_epoch * epochs
    sched = BudgetSchedule.for_run(BudgetTarget("flops", 0.35), total, budget_at=0.5,
                                   hold_steps=steps_per_epoch)
    budget = Budget(sched, crit, theta0=math.log(0.995 / 0.005), gamma=0.2, momentum=0.9)
    w = crit.edge_weights(crit.full_widths)
    opt = torch.optim.SGD(gate_param_groups(gates, w, gamma=0.2, weight_decay=0.0), lr=0.05,
                          momentum=0.9)
    lam = budget.controller.update(0, 1.0, 0.05, 0.995 * 0.005)
    records = []
    for step in range(1, total + 1):
        for grp in opt.param_groups:
            grp["lr"] = 0.05 * grp["lr_scale"]
        opt.zero_grad()
        probs = gates.open_prob()
        task = -sum((p * i).sum() for p, i in zip(probs, importance, strict=True)) * 1e-3
        (task + crit.loss(gates, lam)).backward()
        opt.step()
        rec = budget.step(step, gates, lr=0.05, optimizer=opt)
        lam = rec.lam
        refresh_gate_groups(opt.param_groups, crit.edge_weights(
            torch.tensor(gates.kept_channels(), dtype=torch.float64)), gamma=0.2,
            weight_decay=0.0)
        records.append((step, rec, gates.kept_channels()))
        if budget.done(step):
            break
    return sched, budget, records


@pytest.mark.parametrize(("steps_per_epoch", "epochs"), [(5, 8), (200, 3)])
def test_schedule_meets_the_budget_at_any_steps_per_epoch(steps_per_epoch, epochs) -> None:
    sched, budget, records = _simulate(steps_per_epoch, epochs)
    for step, rec, _ in records:
        assert rec.kept <= sched.ceiling(step) + 1e-9  # never above the ceiling
        assert math.isfinite(rec.lam) and rec.lam >= 0
    at_reach = next(r for s, r, _ in records if s == sched.reach_step)
    assert 0.33 <= at_reach.kept <= 0.35  # met by the schedule's step, without overshoot
    assert budget.done(records[-1][0])
    # every pruned channel was pruned either by its logit or by the ceiling (and some given
    # back during the hold)
    pruned = sum(gates_full(records)) - sum(records[-1][2])
    assert 0 < budget.closed <= pruned + budget.reopened


def gates_full(records) -> list[int]:
    return [e.channels for e in cached_network("resnet20").graph.edges]


def test_round_to_keeps_multiples_through_masks_and_ceiling() -> None:
    sched, budget, records = _simulate(20, round_to=8)
    full = [e.channels for e in cached_network("resnet20").graph.edges]
    for _, _, kept in records:
        assert all(k % 8 == 0 or k == f for k, f in zip(kept, full, strict=True))
    assert records[-1][1].kept <= 0.35 + 1e-9


def test_enforce_ceiling_prunes_lowest_logits_first_and_limit_overshoot_reopens() -> None:
    g = cached_network("resnet20").graph
    crit = CostCriterion(g, GatingConfig())
    gates = GateSet.from_graph(g, 0.9)
    torch.manual_seed(0)
    with torch.no_grad():
        for t in gates.logits:
            t.copy_(torch.rand(t.shape) * 4 + 0.1)
    closed = enforce_ceiling(gates, crit, "flops", 0.6)
    kept = torch.tensor(gates.kept_channels(), dtype=torch.float64)
    assert closed > 0 and crit.fraction("flops", kept) <= 0.6
    gone = torch.cat([t.detach()[~gates.mask(e)] for e, t in enumerate(gates.logits)])
    spared = [t.detach()[gates.mask(e)] for e, t in enumerate(gates.logits)
              if not (gates.min_keep[e] and int(gates.mask(e).sum()) == 1)]
    assert len(gone) and float(gone.max()) <= float(torch.cat(spared).min())
    # an avalanche: every live logit of the last edge crosses zero in one step
    e = g.n_edges - 1
    with torch.no_grad():
        gates.logits[e][gates.mask(e)] = -0.01 * torch.arange(1, int(gates.mask(e).sum()) + 1.0)
    before = crit.fraction("flops", torch.tensor(gates.kept_channels(), dtype=torch.float64))
    assert before < 0.6
    reopened = limit_overshoot(gates, crit, "flops", 0.6)
    gates.update_masks()
    after = crit.fraction("flops", torch.tensor(gates.kept_channels(), dtype=torch.float64))
    assert reopened > 0 and before < after <= 0.6
    with pytest.raises(GatorError) as exc:
        enforce_ceiling(gates, crit, "flops", 1e-6)
    one_line_error(exc, "larger --target")



def test_enforce_ceiling_prunes_least_important_per_cost_and_lands_on_the_ceiling() -> None:
    g = cached_network("resnet20").graph
    crit = CostCriterion(g, GatingConfig())
    gates = GateSet.from_graph(g, 0.9)
    per_channel = crit.edge_weights(crit.full_widths)  # FLOPs saved per channel, per edge
    with torch.no_grad():
        gates.importance.fill_(1.0)
    # equal importance: the edges whose channels cost the most go first (cost knapsack)
    enforce_ceiling(gates, crit, "flops", 0.97)
    hit = {e for e in range(g.n_edges) if not bool(gates.mask(e).all())}
    top = {e for e in range(g.n_edges) if float(per_channel[e]) >= float(per_channel.max()) * 0.999}
    assert top & hit and len(hit - top) <= 1  # plus at most the one unit that lands it
    # zero importance goes first whatever it costs
    gates = GateSet.from_graph(g, 0.9)
    cheap = int(torch.argmin(per_channel))
    with torch.no_grad():
        gates.importance.fill_(1.0)
        s = sum(gates.channels[:cheap])
        gates.importance[s:s + 5] = 0.0
    enforce_ceiling(gates, crit, "flops", 0.999)
    assert (~gates.mask(cheap)).sum() >= 1
    assert not (~gates.mask(cheap))[5:].any()  # only the unimportant ones of that edge
    # the kept network ends just under the ceiling (within one channel's cost)
    for ceiling in (0.8, 0.6, 0.45):
        enforce_ceiling(gates, crit, "flops", ceiling)
        f = crit.fraction("flops", torch.tensor(gates.kept_channels(), dtype=torch.float64))
        assert ceiling - 2 * float(per_channel.max()) <= f <= ceiling


def test_importance_power_zero_leaves_the_allocation_to_the_cost() -> None:
    g = cached_network("resnet20").graph
    crit = CostCriterion(g, GatingConfig())
    torch.manual_seed(0)
    imp = torch.rand(sum(e.channels for e in g.edges)) ** 4  # very uneven importances

    def pruned(importance: torch.Tensor, power: float) -> list[list[bool]]:
        gates = GateSet.from_graph(g, 0.9)
        with torch.no_grad():
            gates.importance.copy_(importance)
        enforce_ceiling(gates, crit, "flops", 0.6, power)
        return [gates.mask(e).tolist() for e in range(len(gates))]

    flat = pruned(torch.ones_like(imp), 1.0)
    assert pruned(imp, 0.0) == flat  # the importances no longer matter
    assert pruned(imp, 1.0) != flat and pruned(imp, 0.5) != pruned(imp, 1.0)


def test_importance_norm_one_compares_edges_by_cost_and_zero_by_raw_taylor_scores() -> None:
    """An edge whose every channel scores 100x lower than the rest: normalised (norm 1), that
    is the same as equal scores and the cost decides; raw (norm 0), it goes first although its
    channels save the least cost."""
    g = cached_network("resnet20").graph
    crit = CostCriterion(g, GatingConfig())
    cheap = int(torch.argmin(crit.edge_weights(crit.full_widths)))
    start = sum(e.channels for e in g.edges[:cheap])

    def pruned(quiet: float, norm: float) -> list[int]:
        gates = GateSet.from_graph(g, 0.9)
        with torch.no_grad():
            gates.importance.fill_(1.0)
            gates.importance[start:start + g.edges[cheap].channels] = quiet
        enforce_ceiling(gates, crit, "flops", 0.9, 1.0, norm)
        return gates.kept_channels()

    flat = pruned(1.0, 1.0)
    assert pruned(0.01, 1.0) == flat  # a per-edge scale does not change the normalised order
    assert flat[cheap] == g.edges[cheap].channels  # the cost alone leaves the cheap edge alone
    raw = pruned(0.01, 0.0)
    assert raw[cheap] < g.edges[cheap].channels  # raw scores: the quiet edge goes first
    lost = [e.channels - k for e, k in zip(g.edges, raw, strict=True)]
    assert lost[cheap] > 4 * (sum(lost) - lost[cheap])  # others: only what lands the ceiling


def test_importance_scale_is_fixed_when_pruning_starts_so_a_shrinking_edge_grows_dearer(
) -> None:
    """Each edge's importances are normalised by their mean when pruning started, not by their
    mean now: closing gradients that grow as an edge shrinks, or the re-opening gradients of
    its pruned channels, must not make its last channels look cheap to the task."""
    g = cached_network("resnet20").graph
    crit = CostCriterion(g, GatingConfig())
    gates = GateSet.from_graph(g, 0.9)
    sched = BudgetSchedule(BudgetTarget("flops", 0.5), start_step=3, reach_step=10,
                           freeze_step=12)
    budget = Budget(sched, crit, theta0=2.0, gamma=0.2, momentum=0.9, importance_norm=1.0)
    with torch.no_grad():
        gates.importance.copy_(torch.rand(gates.importance.shape) + 0.5)
    budget.step(2, gates, lr=0.1)
    assert float(gates.importance_scale.abs().sum()) == 0.0  # not before the descent starts
    budget.step(3, gates, lr=0.1)
    means = torch.stack([gates.edge_importance(e).mean() for e in range(len(gates))])
    torch.testing.assert_close(gates.importance_scale, means)
    e = 0
    before = _normalised_importance(gates, e, 1.0).clone()
    with torch.no_grad():
        gates.edge_importance(e).mul_(3.0)  # every channel of the edge now matters 3x more
    budget.step(4, gates, lr=0.1)
    torch.testing.assert_close(gates.importance_scale, means)  # set once
    assert budget._scale_fixed and gates.fix_importance_scale()  # and no longer re-checked
    torch.testing.assert_close(_normalised_importance(gates, e, 1.0), 3.0 * before,
                               rtol=1e-6, atol=0.0)
    # the scale travels with the gates (a resumed run normalises as the interrupted one)
    other = GateSet.from_graph(g, 0.9)
    other.load_state_dict(gates.state_dict())
    torch.testing.assert_close(other.importance_scale, means)
    # an edge with no importance yet stays unset, and says so
    fresh = GateSet.from_graph(g, 0.9)
    with torch.no_grad():
        fresh.importance.copy_(torch.rand(fresh.importance.shape) + 0.5)
        fresh.edge_importance(1).zero_()
    assert not fresh.fix_importance_scale()
    assert float(fresh.importance_scale[1]) == 0.0 and float(fresh.importance_scale[0]) > 0


def _grouped_gates(seed: int) -> tuple:
    """RegNet's graph, its FLOPs criterion and gates with random positive logits."""
    g = cached_network("regnet_x_400mf", 32).graph
    gates = GateSet.from_graph(g, 0.9)
    torch.manual_seed(seed)
    with torch.no_grad():
        for t in gates.logits:
            t.copy_(torch.rand(t.shape) * 4 + 0.1)
    return g, CostCriterion(g, GatingConfig()), gates


def test_enforce_ceiling_keeps_grouped_edges_balanced_and_under_the_ceiling() -> None:
    g, crit, gates = _grouped_gates(0)
    enforce_ceiling(gates, crit, "flops", 0.5)
    grouped = [e for e in g.edges if e.groups > 1]
    assert grouped
    for e in grouped:  # the masks themselves are balanced, not only the rounded-up gates
        counts = gates.mask(e.gid).reshape(e.groups, -1).sum(1)
        assert len(set(counts.tolist())) == 1, e.name
    assert any(int(gates.mask(e.gid).sum()) < e.channels for e in grouped)
    kept = torch.tensor(gates.kept_channels(), dtype=torch.float64)
    assert crit.fraction("flops", kept) <= 0.5 + 1e-9


def test_give_back_reopens_grouped_edges_evenly() -> None:
    from gator_hw.budget import give_back

    g, crit, gates = _grouped_gates(1)
    with torch.no_grad():
        gates.importance.copy_(torch.rand(gates.importance.shape))
    enforce_ceiling(gates, crit, "flops", 0.4)
    opened = give_back(gates, crit, "flops", 0.6)
    assert opened > 0
    for e in (e for e in g.edges if e.groups > 1):
        assert len(set(gates.mask(e.gid).reshape(e.groups, -1).sum(1).tolist())) == 1, e.name
    kept = torch.tensor(gates.kept_channels(), dtype=torch.float64)
    assert 0.4 < crit.fraction("flops", kept) <= 0.6 + 1e-9


def test_a_small_step_closes_the_best_unit_not_the_one_that_saves_least() -> None:
    """A ceiling that falls a little each step needs one unit per step: that unit is the
    knapsack's best (here, equal importances: the edge whose channels cost the most), even
    though a cheaper channel elsewhere would land closer under the ceiling."""
    g = cached_network("resnet20").graph
    crit = CostCriterion(g, GatingConfig())
    per_channel = crit.edge_weights(crit.full_widths)
    for _ in range(3):
        gates = GateSet.from_graph(g, 0.9)
        with torch.no_grad():
            gates.importance.fill_(1.0)
        full = crit.fraction("flops", gates.kept_widths())
        assert enforce_ceiling(gates, crit, "flops", full - 1e-9) == 1
        hit = [e for e in range(g.n_edges) if not bool(gates.mask(e).all())]
        assert float(per_channel[hit[0]]) == pytest.approx(float(per_channel.max()), rel=1e-3)


def test_the_hold_gives_back_what_a_last_unit_took_below_the_budget() -> None:
    g = cached_network("resnet20").graph
    crit = CostCriterion(g, GatingConfig())
    sched = BudgetSchedule(BudgetTarget("flops", 0.6), 0, 10, 40)
    budget = Budget(sched, crit, theta0=2.2, gamma=0.2, momentum=0.9)
    gates = GateSet.from_graph(g, 0.9)
    with torch.no_grad():
        gates.importance.fill_(1.0)
    enforce_ceiling(gates, crit, "flops", 0.5)  # well below the budget
    below = crit.fraction("flops", gates.kept_widths())
    rec = budget.step(20, gates, lr=0.01)  # a hold step
    assert below < rec.kept <= 0.6 and rec.reopened > 0
    assert 0.6 - rec.kept < 0.6 - below
