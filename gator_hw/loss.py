"""The hardware cost ("criteria") loss, per-edge gate learning rates and the budget controller.

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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations

import torch

from gator_hw.accounting import Cost, layer_cost
from gator_hw.config import GatingConfig
from gator_hw.errors import GatorError
from gator_hw.gates import GateSet
from gator_hw.graph.hypergraph import HyperGraph

__all__ = [
    "METRICS",
    "BudgetController",
    "BudgetTarget",
    "CostCriterion",
    "QuadraticCost",
    "gate_param_groups",
    "quadratic_cost",
    "refresh_gate_groups",
]

#: Budget metrics a target may name.
METRICS: tuple[str, ...] = ("latency", "flops", "params")

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
        n = n.to(self.linear)
        return self.const + n @ self.linear + 0.5 * n @ (self.quad @ n)

    def grad(self, n: torch.Tensor) -> torch.Tensor:
        """``dC/dn`` at ``n``, shape ``(E,)``."""
        return self.linear + self.quad @ n.to(self.linear)

    def weighted(self, n: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """``C_mu(n)``: the cost with edge ``e`` charged ``mu_e`` times (module docstring)."""
        n = n.to(self.linear)
        d = n - self.full
        return self(self.full) + (mu.to(d) * d * self.grad((self.full + n) / 2)).sum()

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
    full = torch.tensor([float(e.channels) for e in graph.edges], dtype=torch.float64)
    return QuadraticCost(const * scale, lin * scale, quad * scale, full, unit or metric)


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


class CostCriterion:
    """The cost loss of one network under one gating config.

    Parameters
    ----------
    graph : HyperGraph
        The network's hyperedges and layer calls.
    config : GatingConfig
        ``factor_type``, ``static_total_cost``, ``edge_multipliers`` (one per edge).

    Raises
    ------
    GatorError
        If the config's edge multipliers do not match the graph's edges.
    """

    def __init__(self, graph: HyperGraph, config: GatingConfig) -> None:
        config.check_edges(graph.n_edges, graph.model_name)
        self.graph = graph
        self.config = config
        pixels = math.prod(graph.input_shape[2:])
        self.flops = quadratic_cost(graph, "flops", scale=1.0 / (2.0 * pixels), unit="gator")
        self.params = quadratic_cost(graph, "params")
        self.mu = torch.tensor(config.multipliers_or_ones(graph.n_edges), dtype=torch.float64)
        self.has_latency = config.edge_multipliers is not None
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

    def cost(self, n: torch.Tensor) -> torch.Tensor:
        """Normalised cost ``C_mu(n) / S`` (the loss before ``lambda``), differentiable in n."""
        return self.factor.weighted(n, self.mu) / self.static_total_cost

    def loss(self, gates: GateSet, weight: float | None = None) -> torch.Tensor:
        """``lambda * C_mu(expected open channels) / S`` as a float32 scalar."""
        lam = self.config.criteria_weight if weight is None else weight
        n = gates.expected_channels()
        return (lam * self.cost(n)).to(n.dtype)

    @torch.no_grad()
    def edge_weights(self, n: torch.Tensor) -> torch.Tensor:
        """Per-channel cost weight ``w_e = d(C_mu / S)/dn_e`` at widths ``n``, shape ``(E,)``."""
        x = n.detach().to(torch.float64).clone().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.factor.weighted(x, self.mu), x)
        return g / self.static_total_cost

    def fractions(self, n: torch.Tensor) -> dict[str, float]:
        """Predicted cost at widths ``n`` as fractions of the full net (latency needs mu)."""
        n = n.detach().to(torch.float64)
        out = {}
        if self.has_latency:
            out["latency"] = float(self.flops.weighted(n, self.mu) / self.flops(self.flops.full))
        out["flops"] = float(self.flops(n) / self.flops(self.flops.full))
        out["params"] = float(self.params(n) / self.params(self.params.full))
        return out

    def fraction(self, metric: str, n: torch.Tensor) -> float:
        """One entry of :meth:`fractions`; GatorError if the metric cannot be predicted."""
        fr = self.fractions(n)
        if metric not in fr:
            raise GatorError(
                f"a {metric} budget needs latency multipliers, but the config has no "
                "edge_multipliers; pass a latency config (gator-hw make-config) or use "
                "--target flops=..."
            )
        return fr[metric]

    def check_target(self, target: BudgetTarget) -> None:
        """GatorError if ``target`` is below what pruning every edge to nothing reaches."""
        floor = self.fraction(target.metric, torch.zeros_like(self.flops.full))
        if target.fraction <= floor:
            raise GatorError(
                f"budget {target} is impossible: the layers that cannot be pruned already cost "
                f"{floor:.3f} of the full net; choose a fraction above {floor:.3f}"
            )

    def __str__(self) -> str:
        return (
            f"CostCriterion({self.graph.model_name}, {self.config.factor_type}, "
            f"S={self.static_total_cost:g}, lambda={self.config.criteria_weight:g}, "
            f"{'with' if self.has_latency else 'no'} edge multipliers)"
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


def _lr_scales(weights: torch.Tensor, gamma: float) -> list[float]:
    w = weights.detach().to(torch.float64).abs()
    pos = w[w > 0]
    floor = WEIGHT_FLOOR * (float(pos.mean()) if pos.numel() else 1.0)
    return [gamma / max(float(x), floor) for x in w]


@dataclass
class BudgetController:
    """Adapts ``lambda`` so the network's predicted cost falls to a budget, then stops gates.

    Each step it receives ``expected`` (cost fraction at the expected open channels) and
    ``kept`` (cost fraction of the deterministic gates: the network that would be kept)::

        error = expected / target - 1                    (continuous, moves before masks do)
        if kept > target: error = max(error, 0.25 * (kept / target - 1))  (keep pushing)
        lambda <- clip(lambda * exp(gain * error), lambda_min, lambda_max)

    The budget is *met* once ``kept <= target``; masks are permanent, so it then holds. From
    then on the returned lambda is 0 (no more cost pressure); after ``hold_steps`` further
    steps (the gates settle under the task loss alone) :attr:`done` turns True and the trainer
    freezes the gates. The trainer also stops an avalanche from overshooting the budget: see
    ``gator_hw.train.loop`` (channels that crossed zero in the step that met the budget are
    re-opened, least negative first, as long as the budget stays met).

    Parameters
    ----------
    target : BudgetTarget
    lam : float
        Initial lambda (the config's ``criteria_weight``).
    gain : float
        Log-change of lambda per step at 100 % relative error.
    hold_steps : int
        Steps the budget must stay met before gate training stops.
    """

    target: BudgetTarget
    lam: float
    gain: float = 0.02
    hold_steps: int = 100
    lam_min: float = 1e-4
    lam_max: float = 1e4
    met_steps: int = 0
    done: bool = False
    history: list[tuple[float, float, float]] = field(default_factory=list, repr=False)

    def update(self, expected: float, kept: float) -> float:
        """Take one step; return the lambda to use for the next loss."""
        tau = self.target.fraction
        error = expected / tau - 1.0
        if kept > tau:
            error = max(error, 0.25 * (kept / tau - 1.0))
            self.met_steps = 0
        else:
            self.met_steps += 1
            self.done = self.done or self.met_steps >= self.hold_steps
        self.lam = min(max(self.lam * math.exp(self.gain * error), self.lam_min), self.lam_max)
        self.history = (self.history + [(expected, kept, self.lam)])[-1000:]
        return 0.0 if self.met else self.lam

    @property
    def met(self) -> bool:
        return self.met_steps > 0

    def state_dict(self) -> dict[str, float | int | bool]:
        """JSON-ready state (for checkpoints)."""
        return {"lam": self.lam, "met_steps": self.met_steps, "done": self.done}

    def load_state_dict(self, state: Mapping[str, float | int | bool]) -> None:
        self.lam = float(state["lam"])
        self.met_steps = int(state["met_steps"])
        self.done = bool(state["done"])

    def __str__(self) -> str:
        state = "done" if self.done else ("met" if self.met else "pushing")
        return f"BudgetController({self.target}, lambda={self.lam:.4g}, {state})"
