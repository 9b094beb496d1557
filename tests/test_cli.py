"""The gator-hw command line: exit codes, one-line errors, JSON output."""

from __future__ import annotations

import json
import subprocess
import sys

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
