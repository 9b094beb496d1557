"""Torch-Pruning, used as its documentation recommends, for the peer comparison.

Benchmark-only: the package never imports Torch-Pruning (``pip install torch-pruning``).

- :func:`tp_prune` prunes a copy of a trained model with ``MetaPruner``: global pruning,
  ``GroupTaylorImportance`` (gradients of the cross-entropy on real training batches, taken
  again before every iterative step) or ``GroupMagnitudeImportance`` (L2), ``round_to``, the
  classifier ignored, iterative pruning in ``ITERATIVE_STEPS`` steps (its docs advise iterative
  pruning for large ratios). ``global_pruning=False`` gives uniform width scaling: every
  layer loses the same share of its channels.
- :func:`bisect_ratio` finds the pruning ratio whose *measured* latency ratio lands within a
  tolerance of a target (regula falsi on a monotone, noisy function).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import version

import torch
import torch.nn.functional as F
from torch import nn

#: Iterative pruning steps (Torch-Pruning's docs advise iterative pruning for large ratios).
ITERATIVE_STEPS = 5


@dataclass(frozen=True)
class Variant:
    """One way to prune with Torch-Pruning."""

    name: str
    importance: str  # "taylor" or "magnitude"
    round_to: int = 1
    global_pruning: bool = True

    @property
    def label(self) -> str:
        if not self.global_pruning:
            return "uniform width (L2 magnitude)"
        return f"Torch-Pruning {self.importance}, round_to {self.round_to}"


VARIANTS: tuple[Variant, ...] = (
    Variant("tp_taylor_r1", "taylor", 1),
    Variant("tp_taylor_r8", "taylor", 8),
    Variant("tp_magnitude_r1", "magnitude", 1),
    Variant("tp_magnitude_r8", "magnitude", 8),
    Variant("uniform", "magnitude", 1, global_pruning=False),
)


def tp_version() -> str:
    """The installed Torch-Pruning's distribution version."""
    return version("torch-pruning")


def _importance(kind: str):
    import torch_pruning as tp

    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    if kind == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    raise ValueError(f"unknown importance {kind!r}")


def _classifiers(model: nn.Module, num_classes: int) -> list[nn.Module]:
    return [m for m in model.modules()
            if isinstance(m, nn.Linear) and m.out_features == num_classes]


def tp_prune(model: nn.Module, example: torch.Tensor, variant: Variant, ratio: float, *,
             batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = (),
             num_classes: int | None = None, steps: int = ITERATIVE_STEPS) -> nn.Module:
    """A pruned copy of ``model`` (eval mode; ``model`` is untouched). ``batches`` feed the
    Taylor gradients (eval-mode BN, so its statistics stay the trained ones)."""
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    if ratio <= 0:
        return m
    n_out = num_classes or next(mod for mod in reversed(list(m.modules()))
                                if isinstance(mod, nn.Linear)).out_features
    pruner = tp.pruner.MetaPruner(
        m, example, importance=_importance(variant.importance), pruning_ratio=ratio,
        global_pruning=variant.global_pruning, iterative_steps=steps,
        round_to=variant.round_to if variant.round_to > 1 else None,
        ignored_layers=_classifiers(m, n_out),
    )
    batches = list(batches)
    for _ in range(steps):
        if variant.importance == "taylor":
            if not batches:
                raise ValueError("Taylor importance needs training batches")
            m.zero_grad(set_to_none=True)
            for x, y in batches:
                (F.cross_entropy(m(x), y) / len(batches)).backward()
        pruner.step()
    m.zero_grad(set_to_none=True)
    return m.eval()


@dataclass
class Bisection:
    """Where :func:`bisect_ratio` landed and every probe on the way."""

    ratio: float
    measured: float
    target: float
    probes: list[tuple[float, float]] = field(default_factory=list)

    @property
    def error(self) -> float:
        """Relative miss of the target: measured / target - 1."""
        return self.measured / self.target - 1.0


def bisect_ratio(measure: Callable[[float], float], target: float, *, hi: float = 0.95,
                 aim: float = 0.01, max_probes: int = 9) -> Bisection:
    """The ratio in ``[0, hi]`` whose ``measure`` (decreasing in the ratio, 1 at 0) is within
    ``aim`` of ``target`` relatively, or the closest probe after ``max_probes``.

    Regula falsi in the bracket, starting from the guess that latency scales with the square
    of the kept width; each step is kept inside the middle 80 % of the bracket so that noise
    cannot stall it at one end."""
    lo, f_lo, f_hi = 0.0, 1.0, None
    best: Bisection | None = None
    probes: list[tuple[float, float]] = []
    r = min(hi * 0.9, max(0.02, 1.0 - target ** 0.5))
    for _ in range(max_probes):
        m = measure(r)
        probes.append((r, m))
        if best is None or abs(m / target - 1) < abs(best.measured / target - 1):
            best = Bisection(r, m, target)
        if abs(m / target - 1) <= aim:
            break
        if m > target:
            lo, f_lo = r, m
        else:
            hi, f_hi = r, m
        est_hi = f_hi if f_hi is not None else max(0.0, (1 - hi) ** 2)
        frac = (f_lo - target) / max(f_lo - est_hi, 1e-9)
        r = lo + (hi - lo) * min(0.9, max(0.1, frac))
    assert best is not None
    best.probes = probes
    return best
