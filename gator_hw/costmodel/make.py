"""From timing tables to a gating config: the original recipe or the fitted cost model."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gator_hw.config import GatingConfig
from gator_hw.costmodel.dataset import file_sha256
from gator_hw.costmodel.gator import gator_config_from_table
from gator_hw.costmodel.model import CANDIDATES, CostModel, fit_cost_model
from gator_hw.errors import GatorError

__all__ = ["FACTORS", "METHODS", "ConfigResult", "factor_config", "make_config", "table_context"]

METHODS = ("model", "gator", *CANDIDATES)

#: ``make-config --factor`` values and the factor_type each writes.
FACTORS: dict[str, str] = {"flops": "flop_factor", "memory": "memory_factor"}


@dataclass(frozen=True)
class ConfigResult:
    """A config and, for the regression methods, the cost model behind it."""

    config: GatingConfig
    cost_model: CostModel | None


def table_context(table: str | Path) -> dict:
    """Model name, input size, device, batch and dtype recorded beside a profile table."""
    from gator_hw.profile.tables import sidecar_path

    side = sidecar_path(table)
    if not side.is_file():
        return {}
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as exc:
        raise GatorError(f"{side} is not valid JSON ({exc}); profile again") from exc
    dev = meta.get("device", {}) if isinstance(meta.get("device"), dict) else {}
    return {
        "model": meta.get("model"),
        "input_size": meta.get("input_size"),
        "device": dev.get("device_name") or dev.get("device"),
        "batch": meta.get("batch"),
        "dtype": meta.get("dtype"),
        "channels_last": meta.get("channels_last"),
        "regime": meta.get("regime"),
        "backend": meta.get("backend", "torch"),
        "num_classes": meta.get("num_classes"),
    }


def make_config(
    tables: Sequence[str | Path],
    *,
    method: str = "model",
    model: str | None = None,
    input_size: int | None = None,
    template: GatingConfig | None = None,
) -> ConfigResult:
    """Build a GATOR config with latency ``edge_multipliers`` from timing tables.

    ``gator``: the original recipe on one GATOR-format CSV. ``model`` (default): fit and select
    the best cost model on tidy profile tables; or name one candidate (``ridge``, ``hgb``, ...).
    ``model`` (the network) defaults to the one recorded beside the tables.
    """
    if method not in METHODS:
        raise GatorError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    if not tables:
        raise GatorError("no timing table given; pass --timing PATH")
    for t in tables:
        if not Path(t).is_file():
            raise GatorError(f"timing table {t} does not exist")
    template = template or GatingConfig()
    if method == "gator":
        if len(tables) != 1:
            raise GatorError("--method gator reads exactly one GATOR-format timing table")
        cfg = gator_config_from_table(tables[0], template)
        if model is not None:
            from gator_hw.network import load_network

            net = load_network(model, input_size=input_size)
            cfg.check_edges(net.graph.n_edges, model)
            cfg.provenance["model"] = model
        return ConfigResult(cfg, None)

    from gator_hw.network import load_network

    ctx = table_context(tables[0])
    name = model or ctx.get("model")
    if not name:
        raise GatorError(f"{tables[0]} has no metadata naming its model; pass --model")
    net = load_network(name, input_size=input_size or ctx.get("input_size"),
                       num_classes=int(ctx.get("num_classes") or 1000))
    cm = fit_cost_model(tables, net.graph, method="auto" if method == "model" else method)
    from gator_hw.costmodel.embedded import embed_cost_model

    cfg = GatingConfig(
        factor_type=template.factor_type,
        criteria_weight=template.criteria_weight,
        gradient_multiplier=template.gradient_multiplier,
        gate_init_prob=template.gate_init_prob,
        static_total_cost=template.static_total_cost,
        edge_multipliers=cm.multipliers(),
        provenance={
            **template.provenance,
            **{k: v for k, v in ctx.items() if v is not None},
            "model": name,
            "method": f"model:{cm.method}",
            "cv_mape": cm.cv_mape,
            "tables": [{"path": str(t), "sha256": file_sha256(t)} for t in tables],
        },
        cost_model=embed_cost_model(cm),
    )
    return ConfigResult(cfg, cm)


def factor_config(
    factor: str,
    model: str,
    *,
    input_size: int | None = None,
    num_classes: int = 1000,
    template: GatingConfig | None = None,
) -> GatingConfig:
    """A plain FLOPs or memory config (no tables): the cost is exact FLOPs or parameters.

    ``static_total_cost`` is the full network's cost in the loss's units (GATOR MACs per input
    pixel for FLOPs, parameters for memory), so the original recipe reads the same numbers.
    """
    if factor not in FACTORS:
        raise GatorError(f"unknown --factor {factor!r}; use one of {', '.join(FACTORS)}")
    from gator_hw import __version__
    from gator_hw.loss import CostCriterion
    from gator_hw.network import load_network

    net = load_network(model, input_size=input_size, num_classes=num_classes)
    t = template or GatingConfig()
    cfg = GatingConfig(FACTORS[factor], t.criteria_weight, t.gradient_multiplier,
                       t.gate_init_prob)
    crit = CostCriterion(net.graph, cfg)
    cfg.static_total_cost = float(crit.factor(crit.factor.full))
    cfg.provenance = {"model": model, "input_size": net.input_size, "num_classes": num_classes,
                      "method": f"factor:{factor}", "gator_hw_version": __version__}
    return cfg
