"""Tests for gator_hw.costmodel.gator: the original GATOR latency multipliers."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose

from gator_hw.config import GatingConfig
from gator_hw.costmodel import (
    GATOR_COLUMNS,
    gator_config_from_table,
    gator_multipliers,
    outlier_filter,
    read_gator_csv,
    write_gator_csv,
)
from gator_hw.errors import GatorError
from tests.conftest import one_line_error as _one_line_error

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
PUBLISHED = [
    (
        "timinig_resnet_50_edges_7_runs_batch_32.csv",
        "resnet_50_flops_rel_timing_config_batch_32.json",
        7,
    ),
    (
        "timinig_resnet_50_edges_9_runs_batch_8.csv",
        "resnet_50_flops_rel_timing_config_batch_8.json",
        9,
    ),
]
HEADER = ", ".join(GATOR_COLUMNS)


def _reference(name: str) -> Path:
    path = REFERENCE / name
    if not path.is_file():
        pytest.skip(
            f"reference fixture {name} not found under {REFERENCE} (shared/reference absent)"
        )
    return path




def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "t.csv"
    path.write_text(text)
    return path


def _table(rows: list[tuple[int, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["label", "flops_pct", "time_ms"]).astype(
        {"label": "int64", "flops_pct": "float64", "time_ms": "float64"}
    )


# --- reading ---------------------------------------------------------------------------


@pytest.mark.parametrize(("csv_name", "cfg_name", "runs"), PUBLISHED)
def test_read_published_tables(csv_name: str, cfg_name: str, runs: int) -> None:
    df = read_gator_csv(_reference(csv_name))
    assert list(df.columns) == ["label", "flops_pct", "time_ms"]
    assert df["label"].dtype == np.int64
    assert df["flops_pct"].dtype == np.float64 and df["time_ms"].dtype == np.float64
    assert len(df) == 38 * runs  # full net + 37 hyperedges, `runs` rows each
    assert (df.groupby("label").size() == runs).all()
    assert sorted(df["label"].unique()) == list(range(38))
    assert (df.loc[df["label"] == 0, "flops_pct"] == 100.0).all()
    assert df.loc[df["label"] == 8, "flops_pct"].iloc[0] == 94.3369


def test_read_minimal_table_values(tmp_path: Path) -> None:
    path = _write(tmp_path, f"{HEADER}\n 0, 100.0000,  10.5\n\n 1,  90.0,  9.25\n\u200b\n")
    df = read_gator_csv(path)
    pd.testing.assert_frame_equal(df, _table([(0, 100.0, 10.5), (1, 90.0, 9.25)]))


# --- the published multipliers ----------------------------------------------------------


@pytest.mark.parametrize(("csv_name", "cfg_name", "runs"), PUBLISHED)
def test_reproduces_published_multipliers(csv_name: str, cfg_name: str, runs: int) -> None:
    df = read_gator_csv(_reference(csv_name))
    published = json.loads(_reference(cfg_name).read_text())["edge_multipliers"]
    mu = gator_multipliers(df)
    assert mu.shape == (37,)
    assert_allclose(mu, published, rtol=1e-9, atol=0)


def test_worked_example_batch_32_edge_7() -> None:
    df = read_gator_csv(_reference(PUBLISHED[0][0]))
    t0 = outlier_filter(df.loc[df["label"] == 0, "time_ms"].to_numpy()).mean()
    t7 = outlier_filter(df.loc[df["label"] == 8, "time_ms"].to_numpy()).mean()
    assert t0 == pytest.approx(49.8512, abs=1e-4)
    assert t7 == pytest.approx(44.7505, abs=1e-4)
    assert 100 * (t0 - t7) / t0 == pytest.approx(10.2319, abs=1e-4)
    assert gator_multipliers(df)[7] == pytest.approx(1.80677, abs=1e-5)


def test_multipliers_hand_example() -> None:
    # Baseline 10 ms (no outliers); edge 0: runs 8, 8, 8, 8, 20 -> 20 is dropped, T = 8;
    # dT = 20 %, F = 90 % -> dF = 10 %, mu = 2.  Edge 1: 9 ms at F = 75 % -> 10 / 25 = 0.4.
    df = _table(
        [(0, 100.0, 10.0)] * 3
        + [(1, 90.0, t) for t in (8.0, 8.0, 8.0, 8.0, 20.0)]
        + [(2, 75.0, 9.0)] * 2
    )
    assert_allclose(gator_multipliers(df), [2.0, 0.4], rtol=1e-12)


def test_edge_without_flops_saving_raises() -> None:
    df = _table([(0, 100.0, 10.0), (1, 90.0, 9.0), (2, 100.0, 9.5)])
    with pytest.raises(GatorError) as exc:
        gator_multipliers(df)
    _one_line_error(exc, "edge 1", "label 2", "saves no FLOPs")


def test_gator_config_from_table() -> None:
    path = _reference(PUBLISHED[0][0])
    published = json.loads(_reference(PUBLISHED[0][1]).read_text())
    cfg = gator_config_from_table(path)
    assert cfg.factor_type == "flop_factor"
    assert (cfg.criteria_weight, cfg.gradient_multiplier, cfg.gate_init_prob) == (0.25, 0.2, 0.995)
    assert cfg.static_total_cost is None
    assert_allclose(cfg.edge_multipliers, published["edge_multipliers"], rtol=1e-9, atol=0)
    assert cfg.provenance == {
        "method": "gator",
        "table": path.name,
        "table_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }

    template = GatingConfig(
        criteria_weight=1.0, static_total_cost=76848.0, provenance={"batch": 32}
    )
    cfg = gator_config_from_table(path, template)
    assert cfg.criteria_weight == 1.0 and cfg.static_total_cost == 76848.0
    assert cfg.provenance["batch"] == 32 and cfg.provenance["method"] == "gator"
    assert template.edge_multipliers is None and template.provenance == {"batch": 32}
    # Same keys and values as the published config, plus provenance.
    d = cfg.to_dict()
    assert set(d) == set(published) | {"provenance"}


# --- outlier filter ------------------------------------------------------------------------


def _brute_force_filter(values: list[float], k: float) -> list[float]:
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / n) ** 0.5
    if std == 0:
        return list(values)
    return [v for v in values if abs(v - mean) / std < k]


def test_outlier_filter_hand_example() -> None:
    # x = 9, 10, 10, 10, 11, 20: mean 70/6 = 11.667, population std sqrt(85.333/6) = 3.771.
    # |z| = 0.71, 0.44, 0.44, 0.44, 0.18, 2.21 -> only 20 is dropped at k = 1.5.
    x = np.array([9.0, 10.0, 10.0, 10.0, 11.0, 20.0])
    expected = [9.0, 10.0, 10.0, 10.0, 11.0]
    assert _brute_force_filter(x.tolist(), 1.5) == expected
    assert outlier_filter(x).tolist() == expected
    # At k = 2.5 nothing is dropped.
    assert outlier_filter(x, k=2.5).tolist() == x.tolist()
    # The filter runs once only: a second pass (mean 10, std sqrt(0.4), |z(9)| = 1.58)
    # would drop 9 and 11 as well.
    assert outlier_filter(outlier_filter(x)).tolist() == [10.0, 10.0, 10.0]


def test_outlier_filter_boundary_is_strict() -> None:
    # Nine 0s and four 1s: the 1s sit at |z| = 1.5 (up to rounding). With k set to exactly
    # that z they must be dropped: the test is |z| < k, not <=.
    x = np.array([0.0] * 9 + [1.0] * 4)
    k = float(np.abs(1.0 - x.mean()) / x.std())
    assert k == pytest.approx(1.5)
    assert outlier_filter(x, k).tolist() == [0.0] * 9
    assert outlier_filter(x, k + 1e-9).tolist() == x.tolist()


def test_outlier_filter_matches_brute_force_randomly() -> None:
    rng = np.random.default_rng(0)
    for n, k in itertools.product((1, 2, 3, 7, 9, 20), (1.2, 1.5, 2.0)):
        x = rng.normal(10.0, 1.0, size=n)
        x[rng.integers(n)] += rng.choice([0.0, 8.0])
        assert outlier_filter(x, k).tolist() == _brute_force_filter(x.tolist(), k)


def test_outlier_filter_constant_and_errors() -> None:
    assert outlier_filter(np.array([5.0, 5.0, 5.0])).tolist() == [5.0, 5.0, 5.0]
    with pytest.raises(GatorError) as exc:
        outlier_filter(np.array([]))
    _one_line_error(exc, "empty")
    with pytest.raises(GatorError) as exc:
        outlier_filter(np.array([1.0, 2.0]), k=1.0)
    _one_line_error(exc, "k must be > 1")


# --- writing -----------------------------------------------------------------------------


def test_write_read_round_trip(tmp_path: Path) -> None:
    df = _table(
        [(0, 100.0, 49.54), (0, 100.0, 49.9123456789), (1, 97.6369, 48.1954), (1, 97.6369, 48.2)]
    )
    path = write_gator_csv(df, tmp_path / "out" / "t.csv")
    text = path.read_text()
    assert text.splitlines()[0] == HEADER
    assert text.splitlines()[1] == " 0, 100.0000,  49.5400"  # original layout
    pd.testing.assert_frame_equal(read_gator_csv(path), df)  # full precision kept


def test_write_reproduces_published_file_byte_for_byte(tmp_path: Path) -> None:
    src = _reference(PUBLISHED[1][0])
    out = write_gator_csv(read_gator_csv(src), tmp_path / "copy.csv")
    assert out.read_text() == src.read_text()


def test_write_rejects_bad_frame(tmp_path: Path) -> None:
    with pytest.raises(GatorError) as exc:
        write_gator_csv(pd.DataFrame({"label": [0], "time_ms": [1.0]}), tmp_path / "x.csv")
    _one_line_error(exc, "flops_pct")
    assert not (tmp_path / "x.csv").exists()


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", ["empty"]),
        ("\n  \n", ["empty"]),
        (f"{HEADER}\n", ["no data rows"]),
        ("edge (layer) removed, flops cost percentage\n0, 100.0\n", ["'run time'", "lacks"]),
        ("edge, flops cost percentage, run time\n0, 100.0, 1.0\n", ["'edge (layer) removed'"]),
        (f"{HEADER}\n 0, 100.0, 1.0\n 1, 90.0, fast\n", ["line 3", "'run time'", "'fast'"]),
        (f"{HEADER}\n 0, 100.0, 1.0\n 1, ninety, 2.0\n", ["line 3", "'flops cost percentage'"]),
        (f"{HEADER}\n 0, 100.0, 1.0\n 1, 90.0, nan\n", ["line 3", "'nan'"]),
        (f"{HEADER}\n 0, 100.0, 1.0\n 1, 90.0\n", ["line 3", "2 cells"]),
        (f"{HEADER}\n 0.5, 100.0, 1.0\n", ["line 2", "not an integer"]),
        (f"{HEADER}\n 1, 90.0, 1.0\n 2, 80.0, 1.0\n", ["no baseline rows", "label 0"]),
        (f"{HEADER}\n 0, 100.0, 1.0\n 1, 90.0, 1.0\n 3, 80.0, 1.0\n", ["contiguous", "2"]),
        (f"{HEADER}\n 0, 100.0, 1.0\n -1, 90.0, 1.0\n", ["contiguous", "-1"]),
        (f"{HEADER}\n 0, 100.0, 1.0\n 1, 90.0, 0.0\n", ["run time", "> 0"]),
        (f"{HEADER}\n 0, 100.0, 1.0\n 1, 90.0, 1.0\n 1, 91.0, 1.0\n", ["label 1", "same"]),
    ],
)
def test_bad_tables(tmp_path: Path, text: str, words: list[str]) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(GatorError) as exc:
        read_gator_csv(path)
    _one_line_error(exc, str(path), *words)


def test_missing_table(tmp_path: Path) -> None:
    path = tmp_path / "absent.csv"
    with pytest.raises(GatorError) as exc:
        read_gator_csv(path)
    _one_line_error(exc, str(path), "not found")
    with pytest.raises(GatorError):
        gator_config_from_table(path)
