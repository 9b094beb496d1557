"""Exports of converted models reload and equal PyTorch (ONNX, TorchScript, torch.export)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gator_hw.convert import convert, removable_edges
from gator_hw.export import export_onnx, export_program, export_torchscript
from tests.conftest import cached_network, random_plan, randomize_norms


def _converted(name: str, size: int):
    net = cached_network(name, size)
    plan = random_plan(net.graph, seed=2)
    branches = sorted(removable_edges(net.graph))
    if branches:
        plan[branches[0]] = []  # a folded constant must export too
    import copy

    model = randomize_norms(copy.deepcopy(net.model))
    return convert(model, net.graph, plan), net.graph.input_shape


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])  # ViT: test_transformers
def test_onnx_round_trip(name: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model, shape = _converted(name, 64)
    report = export_onnx(model, shape, tmp_path / "m.onnx")
    assert report.verified and report.rel_error <= 1e-4
    assert (tmp_path / "m.onnx").stat().st_size > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary left behind


def test_torchscript_and_program_round_trip(tmp_path: Path) -> None:
    model, shape = _converted("resnet18", 32)
    ts = export_torchscript(model, shape, tmp_path / "m.pt")
    ep = export_program(model, shape, tmp_path / "m.pt2")
    assert ts.verified and ep.verified
    assert "max rel. error" in str(ts)
    loaded = torch.export.load(str(tmp_path / "m.pt2")).module()
    x = torch.randn(5, *shape[1:])
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), rtol=1e-4, atol=1e-5)
