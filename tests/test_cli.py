"""The gator-hw command line: exit codes, one-line errors, JSON output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from gator_hw.cli import app, main

runner = CliRunner()


def test_every_command_has_help() -> None:
    names = [c.name for c in app.registered_commands]
    assert {"edges", "models"} <= set(names)
    for name in names:
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Usage" in result.output


def test_edges_json_matches_the_graph() -> None:
    result = runner.invoke(app, ["edges", "resnet56", "--json"])
    assert result.exit_code == 0
    report = json.loads(result.output)
    assert report["n_edges"] == 30
    assert report["gator_units"] == 122800.625
    first = report["edges"][0]
    assert first["prunable"] and first["index"] == 0 and first["flops_share"] > 0


def test_edges_table_prints() -> None:
    result = runner.invoke(app, ["edges", "resnet20"])
    assert result.exit_code == 0
    assert "prunable" in result.output and "network input" in result.output


def test_edges_table_wraps_names_instead_of_cutting_them() -> None:
    """At 60 columns long edge names and frozen reasons fold onto more lines; nothing is cut."""
    from gator_hw.network import load_network

    result = runner.invoke(app, ["edges", "densenet121", "--input-size", "32"],
                           env={"COLUMNS": "60"})
    assert result.exit_code == 0 and "\u2026" not in result.output  # no ellipsis
    rows: list[list[str]] = []  # the "#" and "edge" cells, a folded cell's lines joined
    for line in result.output.splitlines():
        cells = line.split("\u2502")
        if len(cells) < 4:
            continue
        if cells[1].strip() or not rows:
            rows.append([cells[1].strip(), cells[2].strip()])
        else:
            rows[-1][1] += cells[2].strip()
    names = [name for idx, name in rows if idx.isdigit()]
    want = [e.name for e in load_network("densenet121", input_size=32).graph.edges]
    assert names == want and max(map(len, want)) > 20  # long names, whole


def test_user_error_is_one_line_on_stderr_with_exit_1() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gator_hw", "edges", "resnet5"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown model 'resnet5'" in lines[0]
    assert "Traceback" not in proc.stderr


def test_main_exits_with_1_on_gator_error(capsys) -> None:
    try:
        main(["edges", "not_a_model_at_all"])
    except SystemExit as exc:
        assert exc.code == 1
    else:  # pragma: no cover
        raise AssertionError("main did not exit")
    assert "unknown model" in capsys.readouterr().err


def test_make_config_validate_plot_commands(tmp_path) -> None:
    from tests.conftest import cached_network
    from tests.synthetic import write_synthetic_table

    table = write_synthetic_table(tmp_path / "r18.csv", cached_network("resnet18", 32),
                                  fractions=(0.5,), random_nets=12)
    cfg, cm = tmp_path / "cfg.json", tmp_path / "cm.json"
    r = runner.invoke(app, ["make-config", "--timing", str(table), "--out", str(cfg),
                            "--model-out", str(cm)])
    assert r.exit_code == 0, r.output
    assert len(json.loads(cfg.read_text())["edge_multipliers"]) == 12
    r = runner.invoke(app, ["validate", "--model-file", str(cm), "--json-out",
                            str(tmp_path / "v.json"), "--splits", "2"])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "v.json").read_text())
    scores = doc["scores"]
    assert [s["predictor"] for s in scores] == ["cost model", "flops_linear", "gator_additive"]
    assert doc["repeated"]["splits"] == 2 and "mean over 2 random holdouts" in r.output
    r = runner.invoke(app, ["plot", "--tables", str(table), "--model-file", str(cm), "--out",
                            str(tmp_path / "plots")])
    assert r.exit_code == 0, r.output
    made = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert made == sorted(f"{s}.{e}" for s in ("flops_vs_latency", "edge_shares", "parity",
                                                "multipliers") for e in ("png", "svg"))


def test_usage_error_exits_2_without_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gator_hw", "edges", "resnet18", "--bogus"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "No such option" in proc.stderr and "Traceback" not in proc.stderr


def test_edges_with_a_profile_adds_latency(tmp_path) -> None:
    from tests.conftest import cached_network
    from tests.synthetic import write_synthetic_table

    table = write_synthetic_table(tmp_path / "r18.csv", cached_network("resnet18", 32),
                                  fractions=(0.5,), random_nets=0)
    r = runner.invoke(app, ["edges", "resnet18", "--input-size", "32", "--profile", str(table),
                            "--json"])
    assert r.exit_code == 0, r.output
    rows = [e for e in json.loads(r.output)["edges"] if e["prunable"]]
    savings = [e["latency_saving_pct"] for e in rows]
    assert None not in savings
    stem = next(e for e in rows if e["name"] == "conv1+2")  # 35 % of the FLOPs, 3x per FLOP
    assert stem["latency_saving_pct"] == max(savings) > 10


def test_make_config_warns_when_flops_is_the_best_model(tmp_path, monkeypatch) -> None:
    import tests.synthetic as syn
    from gator_hw.costmodel.features import FeatureMap
    from tests.conftest import cached_network

    def flops_law(net, widths):
        return 0.5 + 3.0 * FeatureMap(net.graph, syn.BATCH).flops(widths) / 1e9

    monkeypatch.setattr(syn, "true_latency_ms", flops_law)
    table = syn.write_synthetic_table(tmp_path / "f.csv", cached_network("resnet18", 32),
                                      fractions=(0.5,), random_nets=12, noise=0.02)
    r = runner.invoke(app, ["make-config", "--timing", str(table), "--out",
                            str(tmp_path / "c.json")])
    assert r.exit_code == 0, r.output
    assert "cost model: flops_linear" in r.output
    assert "no candidate predicted this table better than FLOPs" in r.output
    mu = json.loads((tmp_path / "c.json").read_text())["edge_multipliers"]
    assert max(mu) - min(mu) < 1e-9


def test_make_config_factor_writes_a_plain_flops_config(tmp_path) -> None:
    from gator_hw.config import read_config
    from gator_hw.loss import CostCriterion
    from tests.conftest import cached_network

    out = tmp_path / "flops.json"
    r = runner.invoke(app, ["make-config", "--factor", "flops", "--model", "resnet18",
                            "--input-size", "32", "--out", str(out)])
    assert r.exit_code == 0, r.output
    cfg = read_config(out)
    assert cfg.factor_type == "flop_factor" and cfg.edge_multipliers is None
    assert cfg.cost_model is None and cfg.provenance["method"] == "factor:flops"
    crit = CostCriterion(cached_network("resnet18", 32).graph, cfg)
    assert cfg.static_total_cost == pytest.approx(float(crit.flops(crit.flops.full)))
    assert float(crit.cost(crit.full_widths)) == pytest.approx(1.0)
    mem = tmp_path / "mem.json"
    r = runner.invoke(app, ["make-config", "--factor", "memory", "--model", "resnet18",
                            "--input-size", "32", "--out", str(mem)])
    assert r.exit_code == 0 and read_config(mem).factor_type == "memory_factor"
    from gator_hw.errors import GatorError

    for args in (["--factor", "flops", "--out", str(tmp_path / "x.json")],  # no --model
                 ["--factor", "speed", "--model", "resnet18", "--out", str(tmp_path / "y.json")],
                 []):  # neither tables nor a factor
        r = runner.invoke(app, ["make-config", *args])
        assert isinstance(r.exception, GatorError) and "\n" not in str(r.exception), r.output
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()


def test_bench_needs_at_least_one_round(tmp_path) -> None:
    r = runner.invoke(app, ["bench", str(tmp_path), "--rounds", "0"])
    assert r.exit_code == 2 and "rounds" in r.output
