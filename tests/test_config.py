"""Tests for gator_hw.config: GATOR-compatible gating configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gator_hw.config import FACTOR_TYPES, GatingConfig, read_config, write_config
from gator_hw.errors import GatorError
from tests.conftest import one_line_error as _one_line_error

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
REFERENCE_CONFIGS = sorted(REFERENCE.glob("*config*.json")) if REFERENCE.is_dir() else []


def _need_reference() -> None:
    if not REFERENCE_CONFIGS:
        pytest.skip(f"reference fixtures not found under {REFERENCE} (shared/reference absent)")




def test_reference_configs_present() -> None:
    _need_reference()
    assert len(REFERENCE_CONFIGS) == 6


@pytest.mark.parametrize("name", [p.name for p in REFERENCE_CONFIGS] or ["<none>"])
def test_reference_config_loads_and_round_trips(name: str, tmp_path: Path) -> None:
    _need_reference()
    path = REFERENCE / name
    original = json.loads(path.read_text())
    cfg = read_config(path)
    assert cfg.factor_type == original["factor_type"]
    assert cfg.criteria_weight == original["criteria_weight"]
    assert cfg.static_total_cost == original.get("static_total_cost")
    assert cfg.edge_multipliers == original.get("edge_multipliers")
    assert cfg.provenance == {}
    # to_dict reproduces exactly the original keys and values.
    assert cfg.to_dict() == original
    assert GatingConfig.from_dict(cfg.to_dict()) == cfg
    # Written and read back through a file.
    out = write_config(cfg, tmp_path / name)
    assert json.loads(out.read_text()) == original
    assert read_config(out) == cfg


def test_defaults() -> None:
    cfg = GatingConfig()
    assert (cfg.factor_type, cfg.criteria_weight, cfg.gradient_multiplier) == (
        "flop_factor",
        0.25,
        0.2,
    )
    assert cfg.gate_init_prob == 0.995
    assert cfg.static_total_cost is None and cfg.edge_multipliers is None
    assert cfg.to_dict() == {
        "factor_type": "flop_factor",
        "criteria_weight": 0.25,
        "gradient_multiplier": 0.2,
        "gate_init_prob": 0.995,
    }


def test_provenance_round_trip(tmp_path: Path) -> None:
    prov = {"device": "NVIDIA H100", "batch": 32, "dtype": "float32", "method": "gator"}
    cfg = GatingConfig(factor_type="latency", edge_multipliers=[1, 0.5], provenance=prov)
    d = cfg.to_dict()
    assert d["provenance"] == prov
    assert d["edge_multipliers"] == [1.0, 0.5]
    assert all(isinstance(x, float) for x in d["edge_multipliers"])
    path = write_config(cfg, tmp_path / "sub" / "c.json")
    assert read_config(path) == cfg
    # The provenance is copied, not shared.
    prov["batch"] = 8
    assert cfg.provenance["batch"] == 32


def test_memmory_misspelling_normalised() -> None:
    cfg = GatingConfig.from_dict({"factor_type": "memmory_factor"})
    assert cfg.factor_type == "memory_factor"
    assert cfg.to_dict()["factor_type"] == "memory_factor"


def test_unknown_factor_type_lists_valid_ones() -> None:
    with pytest.raises(GatorError) as exc:
        GatingConfig(factor_type="flops")
    _one_line_error(exc, "'flops'", *FACTOR_TYPES)


@pytest.mark.parametrize("value", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_gate_init_prob_must_be_open_interval(value: float) -> None:
    with pytest.raises(GatorError) as exc:
        GatingConfig(gate_init_prob=value)
    _one_line_error(exc, "gate_init_prob")


@pytest.mark.parametrize("bad", [[1.0, -0.5], [math.nan], [1.0, math.inf], ["x"], "1,2"])
def test_bad_multipliers(bad: object) -> None:
    with pytest.raises(GatorError) as exc:
        GatingConfig(edge_multipliers=bad)  # type: ignore[arg-type]
    _one_line_error(exc, "edge_multipliers")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("criteria_weight", -1.0),
        ("criteria_weight", "0.25"),
        ("gradient_multiplier", 0.0),
        ("static_total_cost", -5.0),
        ("static_total_cost", math.nan),
        ("gate_init_prob", True),
    ],
)
def test_bad_scalars(field: str, value: object) -> None:
    with pytest.raises(GatorError) as exc:
        GatingConfig(**{field: value})  # type: ignore[arg-type]
    _one_line_error(exc, field)


def test_unknown_keys_named() -> None:
    with pytest.raises(GatorError) as exc:
        GatingConfig.from_dict({"factor_type": "flop_factor", "lr": 0.1, "gamma": 2})
    _one_line_error(exc, "'lr'", "'gamma'", "unknown")


def test_missing_factor_type_and_non_object() -> None:
    with pytest.raises(GatorError) as exc:
        GatingConfig.from_dict({"criteria_weight": 1.0})
    _one_line_error(exc, "factor_type")
    with pytest.raises(GatorError) as exc:
        GatingConfig.from_dict([1, 2])  # type: ignore[arg-type]
    _one_line_error(exc, "JSON object")


def test_read_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(GatorError) as exc:
        read_config(path)
    _one_line_error(exc, str(path), "not found")


def test_read_config_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "factor_type": "flop_factor",\n  "criteria_weight": \n}\n')
    with pytest.raises(GatorError) as exc:
        read_config(path)
    _one_line_error(exc, str(path), "not valid JSON", "line 4")


def test_read_config_invalid_value_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"factor_type": "flop_factor", "gate_init_prob": 1.0}))
    with pytest.raises(GatorError) as exc:
        read_config(path)
    _one_line_error(exc, str(path), "gate_init_prob")


def test_check_edges() -> None:
    cfg = GatingConfig(edge_multipliers=[1.0] * 12)
    cfg.check_edges(12)
    with pytest.raises(GatorError) as exc:
        cfg.check_edges(37, "resnet50")
    msg = _one_line_error(exc)
    assert msg == (
        "config has 12 edge_multipliers but resnet50 has 37 hyperedges; "
        "regenerate it with gator-hw make-config for this model"
    )
    # Without multipliers any edge count is fine.
    GatingConfig().check_edges(5)


def test_multipliers_or_ones() -> None:
    assert GatingConfig().multipliers_or_ones(3) == [1.0, 1.0, 1.0]
    cfg = GatingConfig(edge_multipliers=[0.5, 2.0])
    got = cfg.multipliers_or_ones(2)
    assert got == [0.5, 2.0]
    got[0] = 9.0  # a copy: the config is unchanged
    assert cfg.edge_multipliers == [0.5, 2.0]
    with pytest.raises(GatorError) as exc:
        cfg.multipliers_or_ones(3)
    _one_line_error(exc, "2 edge_multipliers", "3 hyperedges")
