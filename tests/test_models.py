"""Model building by name and by file.py:factory, with clear errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from gator_hw.errors import GatorError
from gator_hw.models import available_models, build_model, default_input_size, load_weights
from gator_hw.network import load_network


def test_names_and_input_sizes() -> None:
    names = available_models()
    assert {"resnet50", "mobilenet_v2", "resnet56", "inception_v3"} <= set(names)
    assert default_input_size("resnet56") == 32
    assert default_input_size("inception_v3") == 299
    assert default_input_size("resnet50") == 224


def test_resnet56_is_the_gator_cifar_net() -> None:
    m = build_model("resnet56")
    convs = [p for n, p in m.named_parameters() if p.dim() == 4]
    assert len(convs) == 1 + 54 + 2  # stem, 27 blocks of two convs, 2 projection shortcuts
    assert m.fc.out_features == 10
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_same_seed_same_weights() -> None:
    a, b = build_model("resnet18", seed=3), build_model("resnet18", seed=3)
    assert torch.equal(a.conv1.weight, b.conv1.weight)


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(GatorError, match="did you mean .*resnet50") as exc:
        build_model("resnet05")
    assert "\n" not in str(exc.value)


def test_factory_file(tmp_path: Path) -> None:
    f = tmp_path / "net.py"
    f.write_text(
        "import torch.nn as nn\n"
        "def tiny(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(8, num_classes))\n"
    )
    m = build_model(f"{f}:tiny", num_classes=4)
    assert m[-1].out_features == 4
    with pytest.raises(GatorError, match="has no factory named 'tine'; did you mean tiny"):
        build_model(f"{f}:tine")
    with pytest.raises(GatorError, match="does not exist"):
        build_model(f"{tmp_path / 'missing.py'}:tiny")
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(GatorError, match="importing .* failed: RuntimeError: boom"):
        build_model(f"{bad}:tiny")


def test_load_weights_round_trip_and_mismatch(tmp_path: Path) -> None:
    a = build_model("resnet20", seed=1)
    torch.save({"module." + k: v for k, v in a.state_dict().items()}, tmp_path / "w.pt")
    b = load_weights(build_model("resnet20", seed=2), tmp_path / "w.pt")
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    with pytest.raises(GatorError, match="do not fit this model"):
        load_weights(build_model("resnet32"), tmp_path / "w.pt")
    with pytest.raises(GatorError, match="does not exist"):
        load_weights(a, tmp_path / "nope.pt")


def test_timm_models_build_by_name_with_random_weights(monkeypatch) -> None:
    pytest.importorskip("timm")
    m = build_model("timm:resnet18", num_classes=7)
    assert m.fc.out_features == 7 and not m.training
    assert default_input_size("timm:resnet18") == 224
    with pytest.raises(GatorError, match="did you mean timm:resnet18"):
        build_model("timm:resnet18x")
    monkeypatch.setitem(sys.modules, "timm", None)  # timm not installed
    with pytest.raises(GatorError, match=r"pip install 'gator-hw\[timm\]'"):
        build_model("timm:resnet18")


def test_network_reports_the_classes_its_model_outputs(tmp_path: Path) -> None:
    """The class count is read off the traced output, not taken from the request: a CIFAR net
    left at the default has 10 outputs, and a factory that ignores num_classes has its own."""
    net = load_network("resnet20", input_size=32)
    assert net.num_classes == net.model.fc.out_features == 10
    f = tmp_path / "fixed.py"
    f.write_text(
        "import torch.nn as nn\n"
        "def seven():\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(8, 7))\n"
    )
    assert load_network(f"{f}:seven", input_size=16, num_classes=1000).num_classes == 7
    assert load_network("resnet18", input_size=32, num_classes=5).num_classes == 5
