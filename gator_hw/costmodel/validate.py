"""Score latency predictors on held-out random nets: the cost model against two baselines.

* ``cost model``: the fitted ``CostModel``.
* ``flops_linear``: latency = a + b * FLOPs, fitted on the same networks as the cost model.
* ``gator_additive``: the original recipe: each edge's half-width probe gives its multiplier
  mu_e = dT_e% / dF_e%, and a network's saving is the sum over edges of mu_e times the FLOPs
  (%) that narrowing that edge alone to its width saves.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
from sklearn.linear_model import LinearRegression

from gator_hw.costmodel.dataset import Samples, load_samples
from gator_hw.costmodel.model import CostModel, fit_cost_model
from gator_hw.errors import GatorError
from gator_hw.graph.hypergraph import HyperGraph

__all__ = ["RepeatedScores", "Scores", "additive_predict", "repeated_holdout", "score", "validate"]

METRICS = ("mape", "within5", "within10", "spearman", "mean_signed", "worst")
BASELINES = ("flops_linear", "gator_additive")


@dataclass(frozen=True)
class Scores:
    """Accuracy of one predictor on held-out networks (errors in % of the measured latency)."""

    predictor: str
    n: int
    mape: float
    within5: float
    within10: float
    spearman: float
    mean_signed: float
    worst: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def at_least_as_good_as(self, other: Scores) -> bool:
        """No worse than ``other`` on every metric (|mean signed error| for the bias)."""
        return (self.mape <= other.mape and self.within5 >= other.within5
                and self.within10 >= other.within10 and self.spearman >= other.spearman
                and abs(self.mean_signed) <= abs(other.mean_signed) and self.worst <= other.worst)


def score(name: str, measured: np.ndarray, predicted: np.ndarray) -> Scores:
    """MAPE, share within +-5 % / +-10 %, Spearman rho, mean signed and worst error."""
    err = 100.0 * (predicted - measured) / measured
    rho = float(spearmanr(measured, predicted).statistic) if len(measured) > 2 else float("nan")
    return Scores(
        name, len(measured), float(np.mean(np.abs(err))),
        float(np.mean(np.abs(err) <= 5.0) * 100.0), float(np.mean(np.abs(err) <= 10.0) * 100.0),
        rho, float(np.mean(err)), float(np.max(np.abs(err))),
    )


def additive_predict(model: CostModel, samples: Samples, widths: np.ndarray) -> np.ndarray:
    """The original additive half-width model, from the edge probes closest to half width."""
    fmap, graph = model.fmap, model.graph
    full = model.full_widths()
    f0 = fmap.flops(full[None])[0]
    t0 = samples.baseline_ms
    probes = samples.subset(samples.kind == "edge")
    mu = np.zeros(graph.n_edges)
    for e in range(graph.n_edges):
        own = np.flatnonzero(probes.edge == e)
        if len(own) == 0:
            raise GatorError(
                f"edge {graph.edges[e].name} has no probe in the table; the additive baseline "
                "needs every edge profiled (gator-hw profile --widths 0.5)"
            )
        i = own[np.argmin(np.abs(probes.fraction[own] - 0.5))]
        df = 100.0 * (f0 - fmap.flops(probes.widths[i][None])[0]) / f0
        dt = 100.0 * (t0 - probes.latency_ms[i]) / t0
        mu[e] = dt / df if df > 0 else 0.0
    out = []
    for w in np.atleast_2d(widths):
        saved = 0.0
        for e in range(graph.n_edges):
            if w[e] != full[e]:
                one = full.copy()
                one[e] = w[e]
                saved += mu[e] * 100.0 * (f0 - fmap.flops(one[None])[0]) / f0
        out.append(t0 * (1.0 - saved / 100.0))
    return np.asarray(out)


def validate(model: CostModel, samples: Samples) -> tuple[list[Scores], dict]:
    """Score the cost model and both baselines on the random nets held out from fitting."""
    held = (samples.kind == "random") & ~np.isin(samples.variant, model.fit_variants)
    test = samples.subset(held)
    if len(test) < 3:
        raise GatorError(
            f"only {len(test)} held-out random nets in the tables; validation needs at least 3: "
            "profile with --random-nets 20 (half are held out)"
        )
    fit = samples.subset(np.isin(samples.variant, model.fit_variants))
    flin = LinearRegression().fit(model.fmap.flops(fit.widths)[:, None], fit.latency_ms)
    preds = {
        "cost model": model.predict(test.widths),
        "flops_linear": flin.predict(model.fmap.flops(test.widths)[:, None]),
        "gator_additive": additive_predict(model, fit, test.widths),
    }
    scores = [score(k, test.latency_ms, v) for k, v in preds.items()]
    detail = {
        "variants": test.variant.tolist(),
        "measured_ms": test.latency_ms.tolist(),
        "flops": model.fmap.flops(test.widths).tolist(),
        **{f"predicted_ms:{k}": v.tolist() for k, v in preds.items()},
    }
    return scores, detail


@dataclass(frozen=True)
class RepeatedScores:
    """``validate`` over several random holdouts, each with the whole fit (selection included).

    ``runs[predictor]`` holds one :class:`Scores` per split; ``chosen`` counts the candidate
    each fit picked; ``wins[baseline]`` the splits where the cost model was at least as good
    as that baseline on every metric.
    """

    runs: dict[str, list[Scores]]
    chosen: Counter = field(default_factory=Counter)
    wins: dict[str, int] = field(default_factory=dict)

    @property
    def splits(self) -> int:
        return len(next(iter(self.runs.values()))) if self.runs else 0

    def mean(self, predictor: str) -> dict[str, float]:
        """Mean of every metric over the splits, plus ``abs_bias`` (mean |signed error|)."""
        runs = self.runs[predictor]
        out = {m: float(np.mean([getattr(s, m) for s in runs])) for m in METRICS}
        out["abs_bias"] = float(np.mean([abs(s.mean_signed) for s in runs]))
        return out

    def as_dict(self) -> dict:
        return {"splits": self.splits, "chosen": dict(self.chosen), "wins": self.wins,
                "mean": {p: self.mean(p) for p in self.runs}}


def repeated_holdout(
    tables: Sequence[str | Path], graph: HyperGraph, *, splits: int = 10, method: str = "auto",
    holdout: float = 0.5,
) -> RepeatedScores:
    """Refit on ``splits`` seeded random halves of the random nets and validate each.

    One split of 20-30 held-out nets is noisy; the spread over splits says how much.
    """
    if splits < 1:
        raise GatorError(f"--splits must be >= 1, got {splits}")
    samples = load_samples(tables, graph)
    runs: dict[str, list[Scores]] = {}
    chosen: Counter = Counter()
    wins = dict.fromkeys(BASELINES, 0)
    for seed in range(splits):
        cm = fit_cost_model(tables, graph, method=method, holdout=holdout, holdout_seed=seed)
        chosen[cm.method] += 1
        scores, _ = validate(cm, samples)
        by = {s.predictor: s for s in scores}
        for s in scores:
            runs.setdefault(s.predictor, []).append(s)
        for base in BASELINES:
            wins[base] += by["cost model"].at_least_as_good_as(by[base])
    return RepeatedScores(runs, chosen, wins)
