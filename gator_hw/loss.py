"""The hardware cost ("criteria") loss and the per-edge gate learning rates.

Cost of a network as a function of its edge widths (METHOD.md §3)
------------------------------------------------------------------
Every layer's cost is bilinear in the live channel counts on its two sides
(:func:`gator_hw.accounting.layer_cost`), so the whole network's cost is a quadratic form in the
vector ``n`` of edge widths::

    C(n) = c0 + b . n + 1/2 n^T Q n            (exact at every width, integer or not)

:func:`quadratic_cost` reads ``c0, b, Q`` off ``layer_cost`` call by call, so it agrees with
:func:`gator_hw.accounting.network_cost` at integer widths by construction.

Edge multipliers ``mu_e`` (the original's latency customisation) scale the cost each edge is
charged. With ``N`` the full widths, the multiplied cost is the path integral of
``mu_e dC/dn_e`` from ``N`` to ``n``; ``C`` is quadratic, so the midpoint rule is exact::

    C_mu(n) = C(N) + sum_e mu_e (n_e - N_e) dC/dn_e((N + n) / 2)

It equals ``C(n)`` when every ``mu_e`` is 1, and for one edge probed alone it reproduces the
multiplier's definition (time change = ``mu_e`` x FLOPs change), so it is the latency the
multipliers predict. Its gradient at ``N`` is ``mu_e dC/dn_e``: the original's per-channel weight.

The loss is ``lambda * C_mu(n) / S`` with ``n`` the expected open channels (``sum sigmoid(theta)
* mask``), ``lambda = criteria_weight`` and ``S = static_total_cost``. Units: ``flop_factor`` and
``latency`` count FLOPs in the original GATOR units (MACs / input pixels,
:func:`gator_hw.accounting.gator_units`), so published ``static_total_cost`` values mean the same;
``memory_factor`` counts parameters. The gradient equals the original criterion's
(``sum_e w_e sum_c g_ec`` with ``w_e = mu_e dC/dn_e / S`` at the live widths); its value is the
cost fraction itself rather than the original's, which counts bilinear layers twice.

A config made by ``make-config`` from profile tables carries its fitted cost model
(``cost_model``). Then the loss is the cost model's own predicted latency of the expected
network, ``lambda * L(n) / L(N)`` (:class:`~gator_hw.costmodel.differentiable.LatencyFunction`),
and every "predicted latency" (budget, logs, summary) is the cost model's prediction of the
kept network; the multipliers stay in the config for the original recipe
(``cost_source="multipliers"`` uses them here too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import torch

from gator_hw.accounting import Cost, layer_cost
from gator_hw.config import GatingConfig
from gator_hw.errors import GatorError
from gator_hw.gates import GateSet
from gator_hw.graph.hypergraph import HyperGraph

__all__ = [
    "COST_SOURCES",
    "GATE_NORMS",
    "METRICS",
    "CostCriterion",
    "QuadraticCost",
    "edge_gradient_scale",
    "gate_param_groups",
    "quadratic_cost",
    "refresh_gate_groups",
]

#: Budget metrics a target may name.
METRICS: tuple[str, ...] = ("latency", "flops", "params")

#: Where the latency cost comes from: ``auto`` (the config's cost model when it carries one,
#: else its multipliers / factor) or ``multipliers`` (the original recipe even then).
COST_SOURCES: tuple[str, ...] = ("auto", "multipliers")

#: How the task gradients of the gate logits compare between edges: ``none`` (GATOR's, raw)
#: or ``edge`` (divided by each edge's RMS gate gradient, :func:`edge_gradient_scale`).
GATE_NORMS: tuple[str, ...] = ("none", "edge")

#: Edge cost weights below this fraction of the mean weight are raised to it before they
#: divide a learning rate (an edge with mu_e = 0 would otherwise get an infinite one).
WEIGHT_FLOOR = 0.01


@dataclass(frozen=True)
class QuadraticCost:
    """``C(n) = const + linear . n + 1/2 n^T quad n`` over the edge widths ``n`` (float64).

    ``full`` holds the full widths ``N``; ``unit`` names what is counted.
    """

    const: float
    linear: torch.Tensor
    quad: torch.Tensor
    full: torch.Tensor
    unit: str

    def __call__(self, n: torch.Tensor) -> torch.Tensor:
        """``C(n)`` for widths ``n`` of shape (E,) (a scalar) or (S, E) (shape (S,))."""
        n = n.to(self.linear)
        return self.const + n @ self.linear + 0.5 * ((n @ self.quad) * n).sum(-1)

    def grad(self, n: torch.Tensor) -> torch.Tensor:
        """``dC/dn`` at ``n``, shape ``(E,)`` (or ``(S, E)``)."""
        return self.linear + n.to(self.linear) @ self.quad

    def weighted(self, n: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """``C_mu(n)``: the cost with edge ``e`` charged ``mu_e`` times (module docstring)."""
        n = n.to(self.linear)
        d = n - self.full
        return self(self.full) + (mu.to(d) * d * self.grad((self.full + n) / 2)).sum(-1)

    def to(self, device: torch.device | str) -> QuadraticCost:
        return QuadraticCost(
            self.const,
            self.linear.to(device),
            self.quad.to(device),
            self.full.to(device),
            self.unit,
        )


def _metric(call_cost: Cost, metric: str, first_call: bool, bpe: int) -> float:
    if metric == "flops":
        return call_cost.flops
    if metric == "params":
        return call_cost.params if first_call else 0.0
    # bytes: a shared layer's weights are read once (as network_cost counts them)
    return call_cost.bytes if first_call else call_cost.bytes - call_cost.params * bpe


def quadratic_cost(
    graph: HyperGraph, metric: str = "flops", *, scale: float = 1.0, unit: str | None = None
) -> QuadraticCost:
    """Read the exact quadratic form of ``metric`` (``flops``, ``params`` or ``bytes``).

    Each layer call's cost is a polynomial of degree <= 2 in the widths of the few edges it
    touches, so finite differences of :func:`~gator_hw.accounting.layer_cost` at widths
    -1, 0, 1 give its coefficients exactly. ``scale`` multiplies everything (unit change).
    """
    if metric not in ("flops", "params", "bytes"):
        raise ValueError(f"unknown metric {metric!r}")
    e_count, bpe = graph.n_edges, 4
    const, lin = 0.0, torch.zeros(e_count, dtype=torch.float64)
    quad = torch.zeros(e_count, e_count, dtype=torch.float64)
    seen: set[str] = set()
    for call in graph.calls:
        first = call.module not in seen
        seen.add(call.module)
        edges = sorted({s.gid for s in (*call.in_layout, *call.out_layout) if s.gid < e_count})

        def f(w: dict[int, float], call=call, first=first, edges=edges) -> float:
            widths = {**dict.fromkeys(edges, 0.0), **w}
            return _metric(layer_cost(call, widths, bytes_per_element=bpe), metric, first, bpe)

        f0 = f({})
        const += f0
        ones = {a: f({a: 1.0}) for a in edges}
        for a in edges:
            fm = f({a: -1.0})
            lin[a] += (ones[a] - fm) / 2
            quad[a, a] += ones[a] + fm - 2 * f0
        for a, b in combinations(edges, 2):
            c = f({a: 1.0, b: 1.0}) - ones[a] - ones[b] + f0
            quad[a, b] += c
            quad[b, a] += c
    if metric == "flops":
        const += graph.fixed_flops
    full = torch.tensor([float(e.channels) for e in graph.edges], dtype=torch.float64)
    return QuadraticCost(const * scale, lin * scale, quad * scale, full, unit or metric)


class CostCriterion:
    """The cost loss of one network under one gating config.

    Parameters
    ----------
    graph : HyperGraph
        The network's hyperedges and layer calls.
    config : GatingConfig
        ``factor_type``, ``static_total_cost``, ``edge_multipliers`` (one per edge), and the
        fitted ``cost_model`` where ``make-config`` embedded one.
    cost_source : str
        ``auto``: the config's cost model when it carries one (else its multipliers);
        ``multipliers``: the original recipe's multiplied cost even then.

    Raises
    ------
    GatorError
        If the config's edge multipliers or cost model do not match the graph's edges.
    """

    def __init__(
        self, graph: HyperGraph, config: GatingConfig, *, cost_source: str = "auto"
    ) -> None:
        if cost_source not in COST_SOURCES:
            raise GatorError(
                f"unknown cost source {cost_source!r}; use one of {', '.join(COST_SOURCES)}"
            )
        config.check_edges(graph.n_edges, graph.model_name)
        self.graph = graph
        self.config = config
        pixels = math.prod(graph.input_shape[2:])
        self.flops = quadratic_cost(graph, "flops", scale=1.0 / (2.0 * pixels), unit="gator")
        self.params = quadratic_cost(graph, "params")
        self.mu = torch.tensor(config.multipliers_or_ones(graph.n_edges), dtype=torch.float64)
        self.latency = None
        if config.cost_model is not None and cost_source == "auto":
            from gator_hw.costmodel.differentiable import LatencyFunction
            from gator_hw.costmodel.embedded import embedded_cost_model

            self.latency = LatencyFunction(embedded_cost_model(config.cost_model, graph))
        self.has_latency = config.edge_multipliers is not None or self.latency is not None
        self.factor = self.params if config.factor_type == "memory_factor" else self.flops
        full = float(self.factor.weighted(self.factor.full, self.mu))
        self.static_total_cost = config.static_total_cost or full

    def to(self, device: torch.device | str) -> CostCriterion:
        """Move the cost tensors to ``device`` (in place); return self."""
        self.flops, self.params = self.flops.to(device), self.params.to(device)
        self.factor = self.params if self.config.factor_type == "memory_factor" else self.flops
        self.mu = self.mu.to(device)
        return self

    @property
    def full_widths(self) -> torch.Tensor:
        return self.factor.full

    @property
    def source(self) -> str:
        """What the loss charges: the cost model, the multipliers, or the plain factor."""
        if self.latency is not None:
            return f"cost model ({self.latency.method})"
        if self.config.edge_multipliers is not None:
            return "edge multipliers"
        return self.config.factor_type

    def cost(self, n: torch.Tensor) -> torch.Tensor:
        """Normalised cost (the loss before ``lambda``), differentiable in the widths ``n``.

        ``L(n) / L(N)`` with a cost model, else ``C_mu(n) / S``.
        """
        if self.latency is not None:
            return self.latency(n) / self.latency.full_ms
        return self.factor.weighted(n, self.mu) / self.static_total_cost

    def loss(self, gates: GateSet, weight: float | None = None,
             edge_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``lambda * cost(expected open channels)`` as a scalar of the logits' dtype.

        ``edge_scale`` (E,) multiplies the gradient that reaches each edge's expected width
        (not the value): paired with learning rates divided by it, the cost still moves every
        logit alike while the task gradients are divided by it (:func:`edge_gradient_scale`).
        """
        lam = self.config.criteria_weight if weight is None else weight
        n = gates.expected_channels()
        if edge_scale is not None:
            s = edge_scale.to(n)
            n = n * s + (n * (1.0 - s)).detach()  # value n, gradient s * d/dn
        return (lam * self.cost(n)).to(n.dtype)

    @torch.no_grad()
    def edge_weights(self, n: torch.Tensor) -> torch.Tensor:
        """Per-channel cost weight ``w_e = d cost / dn_e`` at widths ``n``, shape ``(E,)``."""
        x = n.detach().to(torch.float64).clone().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.cost(x), x)
        return g

    def relinearize(self, kept: torch.Tensor) -> None:
        """Refresh a tree cost model's slopes at the kept widths (no-op otherwise)."""
        if self.latency is not None:
            self.latency.relinearize(kept)

    def metrics(self) -> tuple[str, ...]:
        """The budget metrics this criterion can predict."""
        return METRICS if self.has_latency else METRICS[1:]

    @torch.no_grad()
    def fraction_batch(self, metric: str, widths: torch.Tensor) -> torch.Tensor:
        """``metric`` of each row of ``widths`` (S, E) as a fraction of the full net, (S,).

        Latency is the cost model's exact prediction when the config carries one, else the
        multiplied cost ``C_mu``.
        """
        w = torch.atleast_2d(widths.detach().to(torch.float64))
        if metric not in self.metrics():
            raise GatorError(
                f"a {metric} budget needs a latency config, but the config has neither a cost "
                "model nor edge_multipliers; make one with gator-hw make-config --timing TABLE "
                "or use --target flops=..."
            )
        if metric == "latency" and self.latency is not None:
            return torch.from_numpy(self.latency.predict(w.cpu()) / self.latency.full_ms)
        full = self.flops.full
        if metric == "latency":
            out = self.flops.weighted(w.to(full), self.mu) / self.flops(full)
        elif metric == "flops":
            out = self.flops(w.to(full)) / self.flops(full)
        elif metric == "params":
            out = self.params(w.to(full)) / self.params(full)
        else:
            raise GatorError(f"unknown budget metric {metric!r}; use one of {', '.join(METRICS)}")
        return out.cpu()

    def fraction(self, metric: str, n: torch.Tensor) -> float:
        """:meth:`fraction_batch` of one width vector."""
        return float(self.fraction_batch(metric, n)[0])

    def fractions(self, n: torch.Tensor) -> dict[str, float]:
        """Predicted latency (where known), FLOPs and params at widths ``n``, as fractions."""
        return {m: self.fraction(m, n) for m in self.metrics()}

    def __str__(self) -> str:
        return (
            f"CostCriterion({self.graph.model_name}, {self.source}, "
            f"S={self.static_total_cost:g}, lambda={self.config.criteria_weight:g})"
        )


def gate_param_groups(
    gates: GateSet, weights: torch.Tensor, *, gamma: float, weight_decay: float
) -> list[dict]:
    """One optimizer group per edge: ``lr = base_lr * gamma / w_e`` (see ``lr_scale``).

    The weight decay is divided by the same factor so that ``lr * weight_decay`` is unchanged.
    The trainer sets each group's ``lr`` to ``base_lr * group["lr_scale"]``.
    """
    groups = []
    for e, (theta, scale) in enumerate(zip(gates.logits, _lr_scales(weights, gamma), strict=True)):
        groups.append(
            {"params": [theta], "edge": e, "lr_scale": scale, "weight_decay": weight_decay / scale}
        )
    return groups


def refresh_gate_groups(
    groups: Sequence[dict], weights: torch.Tensor, *, gamma: float, weight_decay: float
) -> None:
    """Update the gate groups' ``lr_scale`` and weight decay for new edge weights ``w_e(t)``."""
    scales = _lr_scales(weights, gamma)
    for g in groups:
        if "edge" in g:
            g["lr_scale"] = scales[g["edge"]]
            g["weight_decay"] = weight_decay / scales[g["edge"]]


@torch.no_grad()
def edge_gradient_scale(gates: GateSet, clip: float = 10.0) -> torch.Tensor:
    """Per edge, the RMS gate gradient of its live channels over their geometric mean across
    edges, float64 ``(E,)`` clipped to ``[1/clip, clip]`` (1 where nothing is measured yet).

    Gate gradients near the classifier are orders of magnitude larger than near the input, so
    under GATOR's learning rates they, not the cost, decide which edges shrink. Dividing each
    edge's task gradient by its scale (``--gate-norm edge``) compares channels by importance
    *relative to their layer* per unit of cost, as the budget's projection does
    (layer-wise normalisation, Molchanov et al. 2017).
    """
    rms = []
    for e in range(len(gates)):
        live = gates.mask(e).cpu()
        imp = gates.edge_importance(e).detach().to(torch.float64).cpu()[live]
        rms.append(float(imp.mean().sqrt()) if imp.numel() else 0.0)
    r = torch.tensor(rms, dtype=torch.float64)
    pos = r > 0
    if not bool(pos.any()):
        return torch.ones(len(gates), dtype=torch.float64)
    out = torch.ones_like(r)
    out[pos] = r[pos] / torch.exp(torch.log(r[pos]).mean())
    return out.clamp(1.0 / clip, clip)


def _lr_scales(weights: torch.Tensor, gamma: float) -> list[float]:
    w = weights.detach().to(torch.float64).abs()
    pos = w[w > 0]
    floor = WEIGHT_FLOOR * (float(pos.mean()) if pos.numel() else 1.0)
    return [gamma / max(float(x), floor) for x in w]
