"""The shipped profile tables, configs and cost models agree with each other and the models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gator_hw.config import read_config
from gator_hw.costmodel.model import load_cost_model
from gator_hw.network import load_network
from gator_hw.profile.tables import read_table, sidecar_path

ROOT = Path(__file__).resolve().parents[1]
COST_MODELS = sorted((ROOT / "cfg").glob("*.costmodel.json"))
TABLES = sorted(p for p in (ROOT / "profiles").glob("*/*.csv") if not p.stem.endswith("_gator"))


def test_something_is_shipped() -> None:
    assert COST_MODELS and TABLES


@pytest.mark.parametrize("table", TABLES, ids=lambda p: p.stem)
def test_shipped_table_loads_against_its_model(table: Path) -> None:
    meta = json.loads(sidecar_path(table).read_text())
    net = load_network(meta["model"], input_size=meta["input_size"],
                       num_classes=meta["num_classes"])
    df = read_table(table, net.graph)
    assert meta["n_edges"] == net.graph.n_edges and (df["kind"] == "baseline").any()
    assert meta["device"]["device_name"] and meta["regime"] in ("cpu", "cuda-graph", "cuda-eager")


@pytest.mark.parametrize("path", COST_MODELS, ids=lambda p: p.stem)
def test_shipped_config_matches_its_refitted_cost_model(path: Path, monkeypatch,
                                                        tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # the files travel: found from any working directory
    doc = json.loads(path.read_text())
    classes = doc["context"].get("num_classes") or 1000
    net = load_network(doc["model"], input_size=doc["input_shape"][-1], num_classes=classes)
    cm = load_cost_model(path, net.graph)  # re-reads the tables, checks their hashes, refits
    cfg = read_config(path.with_name(path.name.replace(".costmodel.json", ".json")))
    assert len(cfg.edge_multipliers) == net.graph.n_edges
    assert cm.multipliers() == pytest.approx(doc["multipliers"], rel=1e-6)
    assert cfg.edge_multipliers == pytest.approx(doc["multipliers"], rel=1e-6)
    assert [(t["path"], t["sha256"]) for t in cfg.provenance["tables"]] == [
        (t["path"], t["sha256"]) for t in doc["tables"]]
    assert doc["versions"]["scikit_learn"] and all("relpath" in t for t in doc["tables"])
    # the config carries the same model: it rebuilds and predicts what the file does
    from gator_hw.costmodel.embedded import embedded_cost_model

    assert cfg.cost_model is not None
    again = embedded_cost_model(cfg.cost_model, net.graph)
    assert again.multipliers() == pytest.approx(doc["multipliers"], rel=1e-6)
