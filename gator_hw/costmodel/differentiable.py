"""The fitted cost model as a differentiable latency function of the edge widths.

Pruning optimises the cost model's own prediction (METHOD.md §4, "native"), not multipliers
linearised at full width. For the linear candidates the prediction is a linear function of the
layer features, and those are exact functions of the widths computed in torch
(:meth:`~gator_hw.costmodel.features.FeatureMap.layer_torch`), so::

    L(n) = intercept + coef . features(n)          (= CostModel.predict at integer widths)

``flops_linear`` is ``a + b * FLOPs(n)``; ``ridge`` folds its standardisation into ``coef`` and
``intercept``; ``nnls`` is read as is. The per-layer FLOPs and bytes are quadratic in ``n``
(exact gradients); the staircase features get the surrogate gradients described in
:mod:`~gator_hw.costmodel.features`.

Tree ensembles are piecewise constant in the widths: :class:`LatencyFunction` linearises them
at the kept widths (a backward difference over one eighth of each edge's width), and
:meth:`LatencyFunction.relinearize` refreshes the slopes when the kept network changes.
"""

from __future__ import annotations

import numpy as np
import torch

from gator_hw.costmodel.model import CANDIDATES, CostModel

__all__ = ["LINEAR_METHODS", "LatencyFunction"]

#: Candidates whose prediction is linear in their features (exactly differentiable).
LINEAR_METHODS: tuple[str, ...] = ("flops_linear", "ridge", "nnls")


def _linear_form(cm: CostModel) -> tuple[np.ndarray, float]:
    """``(coef, intercept)`` of the estimator in its raw feature space."""
    est = cm.estimator
    if hasattr(est, "steps"):  # StandardScaler -> RidgeCV
        scaler, reg = est.steps[0][1], est.steps[-1][1]
        coef = np.asarray(reg.coef_, dtype=float) / scaler.scale_
        return coef, float(reg.intercept_ - coef @ scaler.mean_)
    return np.asarray(est.coef_, dtype=float).ravel(), float(est.intercept_)


class LatencyFunction:
    """Predicted latency (ms) of a network at edge widths ``n``, as a torch function.

    Parameters
    ----------
    cost_model : CostModel
        A fitted cost model (any candidate).
    """

    def __init__(self, cost_model: CostModel) -> None:
        self.cost_model = cost_model
        self.method = cost_model.method
        self.linear = self.method in LINEAR_METHODS
        self.full = torch.tensor(cost_model.full_widths(), dtype=torch.float64)
        if self.linear:
            coef, b = _linear_form(cost_model)
            self.coef = torch.tensor(coef, dtype=torch.float64)
            self.intercept = b
        else:
            self.relinearize(self.full)
        self.full_ms = float(self.predict(self.full)[0])

    def _features(self, n: torch.Tensor) -> torch.Tensor:
        fmap = self.cost_model.fmap
        if CANDIDATES[self.method] == "flops":
            return fmap.flops_torch(n)[:, None] / 1e9
        return fmap.layer_torch(n)

    def __call__(self, n: torch.Tensor) -> torch.Tensor:
        """Latency in ms at widths ``n`` (shape (E,) -> scalar, (S, E) -> (S,)), float64."""
        x = n.to(torch.float64)
        rows = torch.atleast_2d(x)
        if self.linear:
            out = self.intercept + self._features(rows) @ self.coef.to(rows.device)
        else:
            out = self._ref_ms + (rows - self._ref.to(rows.device)) @ self._slope.to(rows.device)
        return out[0] if x.dim() == 1 else out

    def predict(self, widths: torch.Tensor | np.ndarray) -> np.ndarray:
        """Exact predictions (ms) of integer width vectors, shape (S,)."""
        w = np.atleast_2d(np.asarray(torch.as_tensor(widths).detach().cpu(), dtype=float))
        if self.linear:
            with torch.no_grad():
                return self(torch.from_numpy(w)).numpy()
        return self.cost_model.predict(w)

    def relinearize(self, n: torch.Tensor) -> None:
        """Tree models: slopes ``dL/dn_e`` from backward differences at widths ``n``."""
        if self.linear:
            return
        ref = torch.as_tensor(n, dtype=torch.float64).detach().cpu().round()
        steps = torch.clamp(torch.ceil(ref / 8), min=1.0)
        probes = [ref.clone()]
        for e in range(len(ref)):
            p = ref.clone()
            p[e] = max(ref[e] - steps[e], 0.0) if ref[e] > 0 else ref[e] + steps[e]
            probes.append(p)
        t = self.cost_model.predict(torch.stack(probes).numpy())
        dn = (torch.stack(probes[1:]) - ref).diagonal().numpy()
        slope = (t[1:] - t[0]) / np.where(dn == 0, 1.0, dn)
        self._ref, self._ref_ms = ref, float(t[0])
        self._slope = torch.tensor(slope, dtype=torch.float64)

    def __str__(self) -> str:
        kind = "exact" if self.linear else "re-linearised"
        return f"LatencyFunction({self.method}, {kind}, full net {self.full_ms:.4g} ms)"
