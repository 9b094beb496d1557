"""Pruning to a budget: the target, the schedule the kept network follows, and lambda.

``--target latency=0.5`` asks for a kept network whose predicted cost is at most half the full
net's. Reaching it is a schedule over the gate phase, in steps of the run, so that it takes
the same share of the run at 5 or 5,000 steps per epoch:

* **Ceiling** (:class:`BudgetSchedule`): the kept network may cost at most ``c(t)``, which
  stays 1 during a short warm-up (the logits learn which channels matter), falls linearly in
  log space to the budget ``tau`` at ``reach_step`` (``c = tau ** progress``, as HALP decays
  its latency budget), and stays ``tau`` until the gates freeze at ``freeze_step``.
* **lambda** (:class:`BudgetController`): under the per-edge gate learning rates of GATOR
  (``lr * gamma / w_e``), the cost loss moves every logit by ``lr * gamma * lambda *
  sigmoid'(theta) / (1 - momentum)`` per step, the same for every channel. lambda is set from
  that (so its effect does not depend on the learning rate or the steps per epoch) to hold the
  *expected* network, at the gates' open probabilities, just under the ceiling: the kept
  channels stay open with probability about ``margin`` (0.9), where their straight-through
  gradients measure how much the task needs them, and not near 0.5, where the trained and the
  deterministic network part ways.
* **Projection** (:func:`enforce_ceiling`, :func:`limit_overshoot`): after every step the kept
  network is held at the ceiling from both sides. If it costs more, the open channels that
  matter least per unit of cost saved are pruned for good (HALP's greedy knapsack order): a
  channel's importance is the running mean of its gate's squared batch gradient (the Taylor
  estimate of what closing it costs the task, :meth:`GateSet.update_importance`), compared
  across layers as it is (or normalised by its edge's mean, see :func:`_units`), and
  the cost is what the criterion predicts it saves at the current widths: with a latency
  config, the cost model's own prediction, staircase included (channels then close in blocks
  of 8 to 64 where a single channel saves nothing). If logits crossed zero faster than the
  ceiling falls, those that crossed are re-opened, least negative first, while it stays
  within. So the budget is met by ``reach_step`` whatever the data and the gains; a step
  removes at most one unit more than the schedule asks (the knapsack order is kept; the
  schedule catches up), and during the hold pruned channels come back, most important per
  unit of cost first (:func:`give_back`), while they fit, so the final network lands on the
  budget from below.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from gator_hw.errors import GatorError
from gator_hw.gates import GateSet
from gator_hw.loss import METRICS, CostCriterion

__all__ = [
    "Budget",
    "BudgetController",
    "BudgetSchedule",
    "BudgetStep",
    "BudgetTarget",
    "check_feasible",
    "closing_block",
    "enforce_ceiling",
    "give_back",
    "limit_overshoot",
]

#: Logit given to a channel re-opened by :func:`limit_overshoot`.
REOPEN_LOGIT = 0.5


@dataclass(frozen=True)
class BudgetTarget:
    """A budget: ``metric`` (latency, flops or params) at most ``fraction`` of the full net."""

    metric: str
    fraction: float

    @classmethod
    def parse(cls, spec: str) -> BudgetTarget:
        """Parse ``"latency=0.5"``; GatorError for anything else."""
        key, sep, value = spec.partition("=")
        key = key.strip().lower()
        if not sep or key not in METRICS:
            raise GatorError(
                f"--target {spec!r} is not METRIC=FRACTION; use one of "
                f"{', '.join(m + '=0.5' for m in METRICS)}"
            )
        try:
            frac = float(value)
        except ValueError:
            raise GatorError(
                f"--target {spec!r}: {value!r} is not a number; give a fraction such as 0.5"
            ) from None
        if not 0.0 < frac < 1.0 or math.isnan(frac):
            raise GatorError(
                f"--target {spec!r}: the fraction must be between 0 and 1 (exclusive) of the "
                "full network's cost, e.g. 0.5"
            )
        return cls(key, frac)

    def __str__(self) -> str:
        return f"{self.metric} <= {self.fraction:.3f} of the full net"


def check_feasible(
    target: BudgetTarget, criterion: CostCriterion, min_keep: Sequence[int] | None = None
) -> None:
    """GatorError if ``target`` is below what pruning every prunable channel reaches."""
    keep = torch.zeros(criterion.graph.n_edges, dtype=torch.float64)
    if min_keep is not None:
        keep = torch.tensor([float(k) for k in min_keep], dtype=torch.float64)
    floor = criterion.fraction(target.metric, keep)
    if target.fraction <= floor:
        raise GatorError(
            f"budget {target} is impossible: the layers that cannot be pruned already cost "
            f"{floor:.3f} of the full net; choose a fraction above {floor:.3f}"
        )


@dataclass(frozen=True)
class BudgetSchedule:
    """The ceiling on the kept network's cost at every step (module docstring)."""

    target: BudgetTarget
    start_step: int
    reach_step: int
    freeze_step: int
    scale: float = 1.0  # correction of the predicted ceiling by a measurement (calibration)

    @classmethod
    def for_run(
        cls,
        target: BudgetTarget,
        total_steps: int,
        *,
        budget_at: float = 0.5,
        hold_steps: int = 0,
        warmup: float = 0.1,
    ) -> BudgetSchedule:
        """Reach ``target`` after ``budget_at`` of ``total_steps``; freeze ``hold_steps`` later.

        The hold is cut so that the gates freeze before the run ends.
        """
        if not 0.0 < budget_at <= 1.0:
            raise GatorError(
                f"--budget-at must be a fraction of the run in (0, 1], got {budget_at}; e.g. 0.5"
            )
        reach = max(1, round(budget_at * total_steps))
        start = min(round(warmup * reach), reach - 1)
        freeze = min(reach + max(0, hold_steps), max(reach, total_steps - 1))
        return cls(target, start, reach, freeze)

    def progress(self, step: int) -> float:
        """Share of the descent done at ``step`` (0 before it starts, 1 from ``reach_step``)."""
        if step >= self.reach_step:
            return 1.0
        return max(0.0, (step - self.start_step) / max(1, self.reach_step - self.start_step))

    def ceiling(self, step: int) -> float:
        """Largest cost fraction the kept network may have after ``step`` optimizer steps."""
        return min(1.0, self.target.fraction ** self.progress(step) * self.scale)

    @property
    def bound(self) -> float:
        """The predicted cost the budget holds the kept network to (target times scale)."""
        return min(1.0, self.target.fraction * self.scale)

    def __str__(self) -> str:
        scale = f" (predicted ceiling x{self.scale:.3f}, measured)" if self.scale != 1.0 else ""
        return (
            f"{self.target}{scale}: ceiling falls from step {self.start_step}, met by step "
            f"{self.reach_step}, gates freeze at step {self.freeze_step}"
        )


@dataclass
class BudgetController:
    """lambda that holds the expected network just under the ceiling (module docstring).

    With ``E`` the cost at the open probabilities and ``c`` the ceiling,
    ``error = (E - margin * c) / ((1 - margin) * c)`` is 1 while the kept channels are all
    but certainly open and 0 once they are open with probability ``margin`` on average;
    ``lambda = clip(error, 0, max_push) * theta0 * (1 - momentum) / (steps * lr * gamma *
    mean sigmoid'(theta))``: at error 1 the logits fall by ``theta0`` over the ``steps`` of
    the descent, whatever the learning rate and the number of steps per epoch.
    """

    schedule: BudgetSchedule
    theta0: float
    gamma: float
    momentum: float
    margin: float = 0.9
    max_push: float = 4.0
    lam: float = 0.0
    lam_max: float = 1e6

    def error(self, step: int, expected: float) -> float:
        c = self.schedule.ceiling(step)
        return (expected - self.margin * c) / ((1.0 - self.margin) * c)

    def update(self, step: int, expected: float, lr: float, mean_slope: float) -> float:
        """Take one step; return the lambda for the next loss (0 once the gates freeze)."""
        s = self.schedule
        if step >= s.freeze_step:
            self.lam = 0.0
            return self.lam
        push = min(max(self.error(step, expected), 0.0), self.max_push)
        steps = max(1, s.reach_step - s.start_step)
        drift = self.theta0 * (1.0 - self.momentum) / steps
        denom = max(lr * self.gamma * max(mean_slope, 1e-6), 1e-12)
        self.lam = min(push * drift / denom, self.lam_max)
        return self.lam

    def state_dict(self) -> dict[str, float]:
        return {"lam": self.lam}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.lam = float(state["lam"])


# ---------------------------------------------------------------------- projection
@dataclass
class _Units:
    """Closing units, lowest mean logit first: edge, size, and the channels of each."""

    edge: torch.Tensor
    size: torch.Tensor
    order: list[torch.Tensor]  # per edge: open channels sorted by logit (ascending)
    start: torch.Tensor  # unit's offset into its edge's order

    def __len__(self) -> int:
        return len(self.edge)

    def channels(self, k: int) -> dict[int, torch.Tensor]:
        """Edge -> channels of the first ``k`` units."""
        out: dict[int, list[torch.Tensor]] = {}
        for e, s, n in zip(self.edge[:k].tolist(), self.start[:k].tolist(),
                           self.size[:k].tolist(), strict=True):
            out.setdefault(e, []).append(self.order[e][s:s + n])
        return {e: torch.cat(v) for e, v in out.items()}


def _units(
    gates: GateSet, open_sets: list[torch.Tensor], costs: Mapping[int, tuple[int, float]],
    power: float = 1.0, norm: float = 0.0,
) -> _Units:
    """Every closable edge's open channels cut into closing units, least important per cost
    first.

    ``costs[e]`` is ``(block, saving per channel)``. Within an edge, channels go by importance
    (ties: by logit), and a unit takes the edge's open count down to the next multiple of its
    block; an edge that must keep channels never loses its last unit. A unit's score is its
    channels' importance over the cost it saves, HALP's greedy knapsack order; its mean logit
    breaks ties. With ``norm`` 0 (the default) the importances are the raw Taylor scores, a
    global ranking as Molchanov et al. 2019 and HALP use: they estimate the loss of closing a
    channel, and differ by orders of magnitude between layers because what each layer is
    worth to the task does (on a small task, the widest late layers are nearly free to cut).
    With ``norm`` 1 they are divided by the edge's mean importance when pruning started
    (layer-wise normalisation, Molchanov et al. 2017): every edge's mean channel then counts
    alike and the cost decides between edges; the scale is fixed at that step because one that
    followed the live mean would grow with the closing gradients of a narrowing edge and the
    re-opening gradients of its pruned channels, and let a cheap-to-cut edge collapse. Values
    between interpolate (the scale to the power ``norm``). ``power`` raises the importances
    to it: 1 is HALP's order, 0 leaves the allocation between edges to the cost alone (the
    logits still order the channels within an edge).
    """
    edges, sizes, starts, scores, ties, order = [], [], [], [], [], []
    for e, g in enumerate(open_sets):
        idx = torch.nonzero(g > 0).flatten()
        theta = gates.logits[e].detach()[idx].to(torch.float64).cpu()
        imp = _normalised_importance(gates, e, norm)[idx.cpu()]
        imp = imp.clamp_min(0) ** power if power != 1.0 else imp
        srt = torch.argsort(theta, stable=True)
        srt = srt[torch.argsort(imp[srt], stable=True)]
        srt = _round_robin(srt, idx, gates.conv_groups[e], gates.channels[e])
        order.append(idx[srt])
        if e not in costs or len(idx) == 0:
            continue
        c, n = len(idx), math.lcm(costs[e][0], gates.conv_groups[e])
        first = c % n if n > 1 else 0
        bounds = torch.arange(first, c + 1, n) if n > 1 else torch.arange(0, c + 1)
        if first:
            bounds = torch.cat([torch.zeros(1, dtype=bounds.dtype), bounds])
        bounds = bounds[bounds <= c - gates.min_keep[e]] if gates.min_keep[e] else bounds
        if len(bounds) < 2:
            continue
        lo, hi = bounds[:-1], bounds[1:]

        def seg_sum(x: torch.Tensor, lo=lo, hi=hi) -> torch.Tensor:
            cs = torch.cat([x.new_zeros(1), torch.cumsum(x, 0)])
            return cs[hi] - cs[lo]

        edges.append(torch.full((len(lo),), e))
        sizes.append(hi - lo)
        starts.append(lo)
        scores.append(seg_sum(imp[srt]) / (costs[e][1] * (hi - lo)))
        ties.append(seg_sum(theta[srt]) / (hi - lo))
    if not edges:
        empty = torch.zeros(0, dtype=torch.long)
        return _Units(empty, empty, order, empty)
    perm = torch.argsort(torch.cat(ties), stable=True)
    perm = perm[torch.argsort(torch.cat(scores)[perm], stable=True)]
    return _Units(torch.cat(edges)[perm], torch.cat(sizes)[perm], order, torch.cat(starts)[perm])


def _round_robin(srt: torch.Tensor, idx: torch.Tensor, groups: int, channels: int
                 ) -> torch.Tensor:
    """``srt`` (an order of the open channels ``idx`` of an edge of ``channels`` in ``groups``
    conv groups) reordered so that each group gives its next channel in turn: every prefix of a
    multiple of the groups closes the same count in each (their open counts being equal)."""
    if groups <= 1 or not len(idx):
        return srt
    group = (idx.cpu()[srt] // (channels // groups)).long()
    rank = torch.zeros_like(group)
    for gi in torch.unique(group).tolist():
        where = torch.nonzero(group == gi).flatten()
        rank[where] = torch.arange(len(where))
    return srt[torch.argsort(rank, stable=True)]


def _normalised_importance(gates: GateSet, edge: int, norm: float = 0.0) -> torch.Tensor:
    """``edge``'s channel importances over the edge's scale to the power ``norm`` (layer-wise
    normalisation at 1, raw Taylor scores at 0), float64 on the CPU. The scale is the mean
    importance of its channels when pruning started, all of them open
    (:meth:`GateSet.fix_importance_scale`), or their mean now before that; as they are while
    all are zero."""
    every = gates.edge_importance(edge).to(torch.float64).cpu()
    if norm == 0.0:
        return every
    ref = float(gates.importance_scale[edge])
    mean = ref if ref > 0 else float(every.mean())
    return every / mean ** norm if mean > 0 else every


def _reopen(gates: GateSet, edge: int, idx: torch.Tensor | list[int],
            optimizer: torch.optim.Optimizer | None) -> None:
    """Open channels ``idx`` of ``edge`` again: mask on, logit ``REOPEN_LOGIT``, momentum 0."""
    gates.mask(edge)[idx] = True
    gates.logits[edge][idx] = REOPEN_LOGIT
    buf = optimizer.state.get(gates.logits[edge], {}).get("momentum_buffer") if optimizer else None
    if buf is not None:
        buf[idx] = 0.0


def _after_closing(kept: torch.Tensor, units: _Units, k: int) -> torch.Tensor:
    removed = torch.zeros_like(kept)
    removed.index_add_(0, units.edge[:k], units.size[:k].to(kept))
    return kept - removed


def closing_block(gates: GateSet, criterion: CostCriterion, metric: str) -> int:
    """Channels the projection closes at a time: ``round_to``, and at least 8 for a cost
    model's latency (its staircase makes a single channel off an aligned width cost time)."""
    n = gates.round_to
    if metric == "latency" and criterion.latency is not None:
        n = n * max(1, 8 // math.gcd(n, 8))
    return n


#: prefixes evaluated per batch when looking for the fewest units that reach the ceiling
_CHUNK = 512


@torch.no_grad()
def enforce_ceiling(
    gates: GateSet, criterion: CostCriterion, metric: str, ceiling: float,
    power: float = 1.0, norm: float = 0.0,
) -> int:
    """Prune the open channels least important per unit of cost until the kept network costs
    <= ``ceiling``.

    Channels close in units of :func:`closing_block` (ordered by :func:`_units`), only on
    edges whose narrowing by a unit lowers the predicted cost; the shortest prefix of units
    that reaches the ceiling is pruned. Returns the number of channels pruned; GatorError if
    no pruning can reach the ceiling.
    """
    det = gates.deterministic()
    kept = torch.tensor([float(g.sum()) for g in det], dtype=torch.float64)
    if criterion.fraction(metric, kept) <= ceiling:
        return 0
    block = closing_block(gates, criterion, metric)
    units = _units(gates, det, _unit_costs(criterion, metric, kept, block), power, norm)
    k, best = None, float("inf")
    for lo in range(1, len(units) + 1, _CHUNK):
        ks = list(range(lo, min(lo + _CHUNK, len(units) + 1)))
        fr = criterion.fraction_batch(metric, torch.stack(
            [_after_closing(kept, units, j) for j in ks]))
        best = min(best, float(fr.min()))
        ok = torch.nonzero(fr <= ceiling + 1e-12).flatten()
        if len(ok):
            k = ks[int(ok[0])]
            break
    if k is None:
        raise GatorError(
            f"cannot prune to {metric} <= {ceiling:.3f}: pruning every channel that still "
            f"lowers the predicted cost gives {best:.3f}; choose a larger --target fraction"
        )
    taken = _land(criterion, metric, kept, units, k, ceiling)
    closed = 0
    for e, n in enumerate(taken):
        if n:
            gates.mask(e)[units.order[e][:n]] = False
            closed += n
    return closed


def _land(
    criterion: CostCriterion, metric: str, kept: torch.Tensor, units: _Units, k: int,
    ceiling: float,
) -> list[int]:
    """Channels to prune per edge (a prefix of its order): the first ``k`` units, the shortest
    prefix of the knapsack order that reaches the ceiling, then any earlier unit that is no
    longer needed given back (last taken first).

    The last unit may take the network below the ceiling (one unit ahead of the schedule,
    which catches up); it is never swapped for a unit of another edge that merely lands
    closer: with a ceiling falling a little every step that swap would choose nearly every
    unit by how little it saves, not by its importance per cost.
    """
    per_edge: dict[int, list[int]] = {}
    for e, n in zip(units.edge.tolist(), units.size.tolist(), strict=True):
        per_edge.setdefault(e, []).append(n)
    count = [0] * len(kept)  # units taken per edge
    for e in units.edge[:k].tolist():
        count[e] += 1

    def removed(cnt: list[int]) -> list[int]:
        return [sum(per_edge.get(e, [])[:c]) for e, c in enumerate(cnt)]

    last = int(units.edge[k - 1])
    order = [e for e in reversed(units.edge[: k - 1].tolist())]
    for e in dict.fromkeys(order):  # give back whole units, last taken first
        while count[e] > (1 if e == last else 0):
            c = list(count)
            c[e] -= 1
            w = kept - torch.tensor(removed(c), dtype=kept.dtype)
            if criterion.fraction(metric, w) > ceiling + 1e-12:
                break
            count = c
    return removed(count)


def _unit_costs(
    criterion: CostCriterion, metric: str, kept: torch.Tensor, block: int
) -> dict[int, tuple[int, float]]:
    """Per edge: the smallest block (``block`` times 1, 2, 4 or 8) whose first closing unit,
    down to the next multiple of it, lowers the predicted cost, and that saving per channel.

    A staircase cost model can see no gain in 128 -> 120 channels but one in 128 -> 96; edges
    where no block saves anything are left alone.
    """
    sizes = [block * m for m in (1, 2, 4, 8)]
    probes, steps = [kept], []
    for e in range(len(kept)):
        for n in sizes:
            p = kept.clone()
            steps.append((e, n, min(float(p[e]), float(p[e]) % n or n)))
            p[e] = p[e] - steps[-1][2]
            probes.append(p)
    fr = criterion.fraction_batch(metric, torch.stack(probes))
    out: dict[int, tuple[int, float]] = {}
    for (e, n, size), f in zip(steps, fr[1:].tolist(), strict=True):
        if e not in out and kept[e] > 0 and size > 0 and f < float(fr[0]):
            out[e] = (n, (float(fr[0]) - f) / size)
    return out


@torch.no_grad()
def limit_overshoot(
    gates: GateSet,
    criterion: CostCriterion,
    metric: str,
    ceiling: float,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Re-open channels that just crossed zero while the kept network stays <= ``ceiling``.

    Call it before :meth:`GateSet.update_masks`. Candidates are live channels with a negative
    logit, least negative first; a re-opened channel gets logit ``REOPEN_LOGIT`` and its
    momentum is cleared. Returns the number re-opened.
    """
    cands = sorted(
        ((float(t[i]), e, i) for e, t in enumerate(gates.logits)
         for i in torch.nonzero(gates.mask(e) & (t.detach() < 0)).flatten().tolist()),
        reverse=True,
    )  # fmt: skip
    if not cands:
        return 0
    chosen = [g > 0 for g in gates.deterministic()]
    kept0 = torch.tensor([float(c.sum()) for c in chosen], dtype=torch.float64)
    rows = [kept0]
    for _, e, i in cands:  # widths after re-opening each prefix (rounded like the gates)
        chosen[e][i] = True
        w = rows[-1].clone()
        w[e] = float(max(gates.valid_count(e, int(chosen[e].sum())), int(kept0[e])))
        rows.append(w)
    fr = criterion.fraction_batch(metric, torch.stack(rows))
    if float(fr[0]) > ceiling:
        return 0
    bad = torch.nonzero(fr > ceiling + 1e-12).flatten()
    k = int(bad[0]) - 1 if len(bad) else len(cands)
    for _, e, i in cands[:k]:
        _reopen(gates, e, [i], optimizer)  # a live channel: its mask is on already
    return k


# ---------------------------------------------------------------------- one budget
@torch.no_grad()
def give_back(
    gates: GateSet,
    criterion: CostCriterion,
    metric: str,
    ceiling: float,
    optimizer: torch.optim.Optimizer | None = None,
    norm: float = 0.0,
) -> int:
    """Re-open pruned channels, most important per unit of added cost first, while the kept
    network stays <= ``ceiling`` (after a measurement raised it). Returns how many.

    Channels come back in units of :func:`closing_block` (one per conv group in turn on a
    grouped edge), an edge's most important pruned channels first (importance normalised by
    the edge's scale to the power ``norm``, as :func:`_units` does); a re-opened channel gets
    logit ``REOPEN_LOGIT`` and its momentum is cleared.
    """
    kept = gates.kept_widths()
    if criterion.fraction(metric, kept) > ceiling:
        return 0
    block = closing_block(gates, criterion, metric)
    det = gates.deterministic()
    pool: dict[int, torch.Tensor] = {}
    value: dict[int, torch.Tensor] = {}
    for e, g in enumerate(det):
        idx = torch.nonzero(g == 0).flatten()
        if not len(idx):
            continue
        imp = _normalised_importance(gates, e, norm)[idx.cpu()]
        srt = torch.argsort(imp, descending=True, stable=True)
        srt = _round_robin(srt, idx, gates.conv_groups[e], gates.channels[e])
        pool[e], value[e] = idx[srt], imp[srt]
    opened = 0
    while pool:
        cands = [(e, min(math.lcm(block, gates.conv_groups[e]), len(idx)))
                 for e, idx in pool.items()]
        probes = [kept]
        for e, n in cands:
            probes.append(kept.clone())
            probes[-1][e] += n
        base, *fr = criterion.fraction_batch(metric, torch.stack(probes)).tolist()
        best, pick = -1.0, None
        for (e, n), f in zip(cands, fr, strict=True):
            if f > ceiling + 1e-12:
                continue
            score = float(value[e][:n].sum()) / max(f - base, 1e-12)
            if score > best:
                best, pick = score, (e, n)
        if pick is None:
            break
        e, n = pick
        _reopen(gates, e, pool[e][:n], optimizer)
        kept[e] += n
        opened += n
        pool[e], value[e] = pool[e][n:], value[e][n:]
        if not len(pool[e]):
            del pool[e], value[e]
    return opened


@dataclass
class BudgetStep:
    """What the budget did after one optimizer step."""

    ceiling: float
    natural: float
    kept: float
    expected: float
    closed: int
    reopened: int
    lam: float


class Budget:
    """Target, schedule, lambda and projection of one run; :meth:`step` after each update."""

    def __init__(
        self,
        schedule: BudgetSchedule,
        criterion: CostCriterion,
        *,
        theta0: float,
        gamma: float,
        momentum: float,
        importance_power: float = 1.0,
        importance_norm: float = 0.0,
    ) -> None:
        self.schedule, self.criterion = schedule, criterion
        self.importance_power, self.importance_norm = importance_power, importance_norm
        self.target = schedule.target
        self.controller = BudgetController(schedule, theta0, gamma, momentum)
        self.closed = self.reopened = 0
        self._scale_fixed = False  # a resumed run re-checks the loaded scales once

    @property
    def metric(self) -> str:
        return self.target.metric

    def start(self, gates: GateSet, lr: float) -> float:
        """lambda for the first step, before any update (every gate open)."""
        return self.controller.update(0, 1.0, lr, _mean_slope(gates))

    def done(self, step: int) -> bool:
        return step >= self.schedule.freeze_step

    def step(
        self,
        step: int,
        gates: GateSet,
        *,
        lr: float,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> BudgetStep:
        """Hold the kept network at the ceiling after ``step`` updates; return the new lambda."""
        c, crit, m = self.schedule.ceiling(step), self.criterion, self.metric
        if self.importance_norm and step >= self.schedule.start_step and not self._scale_fixed:
            self._scale_fixed = gates.fix_importance_scale()  # only a normalised order reads it
        natural = crit.fraction(m, gates.kept_widths())  # this step's crossings, none undone
        reopened = limit_overshoot(gates, crit, m, c, optimizer)
        gates.update_masks()
        closed = enforce_ceiling(gates, crit, m, c, self.importance_power, self.importance_norm)
        if self.schedule.progress(step) >= 1.0 and not closed:
            # the hold: fill up to the budget (a last unit may have landed below it)
            reopened += give_back(gates, crit, m, c, optimizer, self.importance_norm)
        kept = gates.kept_widths()
        crit.relinearize(kept)
        expected = crit.fraction(m, gates.expected_channels().detach().cpu())
        lam = self.controller.update(step, expected, lr, _mean_slope(gates))
        self.closed, self.reopened = self.closed + closed, self.reopened + reopened
        return BudgetStep(c, natural, crit.fraction(m, kept), expected, closed, reopened, lam)

    def rescale(
        self, scale: float, gates: GateSet, optimizer: torch.optim.Optimizer | None = None
    ) -> int:
        """Hold the kept network to ``target * scale`` of predicted cost from now on (a
        measurement showed the cost model off by ``1 / scale``); a raised ceiling re-opens
        pruned channels up to it (:func:`give_back`), a lowered one prunes at the next
        :meth:`step`. Returns the channels re-opened."""
        self.schedule = replace(self.schedule, scale=float(scale))
        self.controller.schedule = self.schedule
        opened = give_back(gates, self.criterion, self.metric, self.schedule.bound, optimizer,
                           self.importance_norm)
        self.reopened += opened
        return opened

    def state_dict(self) -> dict[str, float | int]:
        return {**self.controller.state_dict(), "closed": self.closed, "reopened": self.reopened,
                "scale": self.schedule.scale}

    def load_state_dict(self, state: Mapping[str, float | int]) -> None:
        self.controller.load_state_dict(state)
        self.closed, self.reopened = int(state["closed"]), int(state["reopened"])
        self.schedule = replace(self.schedule, scale=float(state.get("scale", 1.0)))
        self.controller.schedule = self.schedule

    def __str__(self) -> str:
        return str(self.schedule)


@torch.no_grad()
def _mean_slope(gates: GateSet) -> float:
    """Mean ``sigmoid'(theta)`` over the live channels."""
    total, n = 0.0, 0
    for e, t in enumerate(gates.logits):
        live = gates.mask(e)
        s = torch.sigmoid(t.detach()[live])
        total += float((s * (1 - s)).sum())
        n += int(live.sum())
    return total / max(n, 1)
