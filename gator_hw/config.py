"""GATOR-compatible gating configs: read, validate, write.

A gating config is the small JSON file the original GATOR ``main.py`` takes with
``--gating_config_path``. Its keys sit at the top level::

    {"factor_type": "flop_factor", "criteria_weight": 0.25, "gradient_multiplier": 0.2,
     "gate_init_prob": 0.995, "static_total_cost": 76848.0,
     "edge_multipliers": [1.18, 0.36, ...]}

gator-hw reads every config the original published unchanged and adds one optional key,
``provenance``, that records where the numbers came from (device, batch, dtype, the
SHA-256 of the timing table, method, model, version). Optional keys whose value is
``None`` (``static_total_cost``, ``edge_multipliers``) and an empty provenance are left out
when writing, so a published config round-trips to exactly its original keys and values.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any

from gator_hw.atomic import write_json
from gator_hw.errors import GatorError

__all__ = [
    "FACTOR_TYPES",
    "GatingConfig",
    "read_config",
    "write_config",
]

#: Valid values of ``factor_type``.
FACTOR_TYPES: tuple[str, ...] = ("flop_factor", "memory_factor", "latency")

#: Spellings accepted on read and the value each is normalised to.
_FACTOR_ALIASES: dict[str, str] = {"memmory_factor": "memory_factor"}

#: Top-level keys of the original GATOR config format.
_ORIGINAL_KEYS: tuple[str, ...] = (
    "factor_type",
    "criteria_weight",
    "gradient_multiplier",
    "gate_init_prob",
    "static_total_cost",
    "edge_multipliers",
)
_KNOWN_KEYS: frozenset[str] = frozenset(_ORIGINAL_KEYS) | {"provenance", "cost_model"}


def _as_float(name: str, value: Any) -> float:
    """Return ``value`` as a finite float, or raise a GatorError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise GatorError(f"{name} must be a number, got {value!r}; write it as a JSON number")
    out = float(value)
    if not math.isfinite(out):
        raise GatorError(f"{name} must be finite, got {out!r}; write a finite JSON number")
    return out


@dataclass
class GatingConfig:
    """Settings of the gating (pruning) loss, in the original GATOR format.

    Parameters
    ----------
    factor_type : str
        Per-channel cost factor: ``"flop_factor"`` (kernel area / stride**2),
        ``"memory_factor"`` (kernel area) or ``"latency"``. The original's misspelling
        ``"memmory_factor"`` is accepted and normalised to ``"memory_factor"``.
    criteria_weight : float
        lambda, the weight of the cost loss against the cross-entropy; >= 0.
    gradient_multiplier : float
        gamma, learning-rate multiplier of the gate logits; > 0.
    gate_init_prob : float
        Initial probability that a gate is open, in (0, 1).
    static_total_cost : float or None
        Divisor S of every edge's cost weight, > 0; ``None`` means the total cost of the
        full network.
    edge_multipliers : list of float or None
        One multiplier mu_e >= 0 per hyperedge, in hyperedge order; ``None`` means all 1.
    provenance : dict
        Where the numbers came from (e.g. ``device``, ``batch``, ``dtype``,
        ``table_sha256``, ``method``, ``model``, ``gator_hw_version``).
    cost_model : dict or None
        The fitted latency cost model (``gator_hw.costmodel.embedded``), written by
        ``make-config``: pruning then optimises its prediction instead of the multipliers.

    Raises
    ------
    GatorError
        If a field has an invalid value.
    """

    factor_type: str = "flop_factor"
    criteria_weight: float = 0.25
    gradient_multiplier: float = 0.2
    gate_init_prob: float = 0.995
    static_total_cost: float | None = None
    edge_multipliers: list[float] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    cost_model: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        factor = _FACTOR_ALIASES.get(self.factor_type, self.factor_type)
        if factor not in FACTOR_TYPES:
            raise GatorError(
                f"unknown factor_type {self.factor_type!r}; use one of {', '.join(FACTOR_TYPES)}"
            )
        self.factor_type = factor

        self.criteria_weight = _as_float("criteria_weight", self.criteria_weight)
        if self.criteria_weight < 0:
            raise GatorError(
                f"criteria_weight must be >= 0, got {self.criteria_weight}; "
                "set it to the weight of the cost loss (e.g. 0.25)"
            )
        self.gradient_multiplier = _as_float("gradient_multiplier", self.gradient_multiplier)
        if self.gradient_multiplier <= 0:
            raise GatorError(
                f"gradient_multiplier must be > 0, got {self.gradient_multiplier}; "
                "set it to the gate learning-rate multiplier (e.g. 0.2)"
            )
        self.gate_init_prob = _as_float("gate_init_prob", self.gate_init_prob)
        if not 0.0 < self.gate_init_prob < 1.0:
            raise GatorError(
                f"gate_init_prob must be strictly between 0 and 1, got {self.gate_init_prob}; "
                "use a value close to 1 such as 0.995"
            )
        if self.static_total_cost is not None:
            self.static_total_cost = _as_float("static_total_cost", self.static_total_cost)
            if self.static_total_cost <= 0:
                raise GatorError(
                    f"static_total_cost must be > 0, got {self.static_total_cost}; "
                    "remove it to use the total cost of the full network"
                )
        if self.edge_multipliers is not None:
            self.edge_multipliers = self._checked_multipliers(self.edge_multipliers)
        if not isinstance(self.provenance, dict) or not all(
            isinstance(k, str) for k in self.provenance
        ):
            raise GatorError(
                f"provenance must be a JSON object with string keys, got {self.provenance!r}; "
                "fix or remove the 'provenance' entry"
            )
        self.provenance = dict(self.provenance)
        if self.cost_model is not None and not isinstance(self.cost_model, dict):
            raise GatorError(
                f"cost_model must be a JSON object, got {type(self.cost_model).__name__}; "
                "make the config again with gator-hw make-config or remove the entry"
            )

    @staticmethod
    def _checked_multipliers(values: Any) -> list[float]:
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise GatorError(
                f"edge_multipliers must be a list of numbers, got {values!r}; "
                "write it as a JSON array or remove it"
            )
        out: list[float] = []
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, Real):
                raise GatorError(
                    f"edge_multipliers[{i}] must be a number, got {value!r}; "
                    "write it as a JSON number"
                )
            mu = float(value)
            if math.isnan(mu) or math.isinf(mu) or mu < 0:
                raise GatorError(
                    f"edge_multipliers[{i}] is {mu!r}; multipliers must be finite and >= 0, "
                    "regenerate the config with gator-hw make-config"
                )
            out.append(mu)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a JSON-ready dict in the original GATOR layout.

        Optional fields that are ``None`` and an empty provenance are omitted.
        """
        out: dict[str, Any] = {
            "factor_type": self.factor_type,
            "criteria_weight": self.criteria_weight,
            "gradient_multiplier": self.gradient_multiplier,
            "gate_init_prob": self.gate_init_prob,
        }
        if self.static_total_cost is not None:
            out["static_total_cost"] = self.static_total_cost
        if self.edge_multipliers is not None:
            out["edge_multipliers"] = list(self.edge_multipliers)
        if self.provenance:
            out["provenance"] = dict(self.provenance)
        if self.cost_model is not None:
            out["cost_model"] = self.cost_model
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GatingConfig:
        """Build a config from a dict in the original GATOR layout (see :meth:`to_dict`).

        Raises
        ------
        GatorError
            If ``d`` is not a dict, lacks ``factor_type``, has unknown keys, or a value is
            invalid.
        """
        if not isinstance(d, dict):
            raise GatorError(
                f"a gating config must be a JSON object, got {type(d).__name__}; "
                "see the GATOR config format (factor_type, criteria_weight, ...)"
            )
        unknown = sorted(set(d) - _KNOWN_KEYS)
        if unknown:
            raise GatorError(
                f"unknown config key(s) {', '.join(map(repr, unknown))}; "
                f"valid keys are {', '.join(_ORIGINAL_KEYS)}, provenance, cost_model"
            )
        if "factor_type" not in d:
            raise GatorError(f"config has no factor_type; add one of {', '.join(FACTOR_TYPES)}")
        if not isinstance(d["factor_type"], str):
            raise GatorError(
                f"factor_type must be a string, got {d['factor_type']!r}; "
                f"use one of {', '.join(FACTOR_TYPES)}"
            )
        kwargs = {k: d[k] for k in _ORIGINAL_KEYS if k in d}
        if d.get("provenance") is not None:
            kwargs["provenance"] = d["provenance"]
        if d.get("cost_model") is not None:
            kwargs["cost_model"] = d["cost_model"]
        return cls(**kwargs)

    def check_edges(self, n_edges: int, model_name: str = "the model") -> None:
        """Check that ``edge_multipliers`` (if set) has one value per hyperedge.

        Parameters
        ----------
        n_edges : int
            Number of hyperedges of the model the config is used with.
        model_name : str
            Name shown in the error message.

        Raises
        ------
        GatorError
            If the number of multipliers differs from ``n_edges``.
        """
        if self.edge_multipliers is not None and len(self.edge_multipliers) != n_edges:
            raise GatorError(
                f"config has {len(self.edge_multipliers)} edge_multipliers but {model_name} "
                f"has {n_edges} hyperedges; regenerate it with gator-hw make-config "
                "for this model"
            )

    def multipliers_or_ones(self, n_edges: int) -> list[float]:
        """Return the ``n_edges`` edge multipliers, or ``n_edges`` ones if none are set.

        Raises
        ------
        GatorError
            If ``edge_multipliers`` is set and its length differs from ``n_edges``.
        """
        self.check_edges(n_edges)
        if self.edge_multipliers is None:
            return [1.0] * n_edges
        return list(self.edge_multipliers)


def read_config(path: str | Path) -> GatingConfig:
    """Read a gating config JSON file (original GATOR format, optional provenance).

    Raises
    ------
    GatorError
        If the file is missing, is not valid JSON, or holds an invalid config; the
        message names the file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GatorError(
            f"config file {path} not found; pass the path of a gating config JSON"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GatorError(f"cannot read config file {path} ({exc}); check the path") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GatorError(
            f"config file {path} is not valid JSON (line {exc.lineno} column {exc.colno}: "
            f"{exc.msg}); fix the file or regenerate it with gator-hw make-config"
        ) from None
    try:
        return GatingConfig.from_dict(data)
    except GatorError as exc:
        raise GatorError(f"config file {path}: {exc}") from None


def write_config(cfg: GatingConfig, path: str | Path) -> Path:
    """Write ``cfg`` to ``path`` as JSON, atomically; return the path."""
    return write_json(path, cfg.to_dict())
