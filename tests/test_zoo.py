"""One model of each torchvision family through every soundness check (the full matrix is
``benchmarks/zoo.py``): FLOPs exact, the empty plan the identity, slim == masked, convert ==
gated."""

from __future__ import annotations

import pytest

from gator_hw.models import build_model
from gator_hw.soundness import check_model, zoo_input_size

#: one of each family; VGG is test_slim's vgg16_bn (its 400 MB classifier made this check the
#: slowest test)
FAMILIES = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf",
            "densenet121", "shufflenet_v2_x0_5", "googlenet", "maxvit_t", "convnext_tiny",
            "vit_b_32", "swin_t"]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_is_sound(name: str, one_thread) -> None:
    row = check_model(name, build_model(name), zoo_input_size(name))
    assert row.error == ""
    assert row.empty_plan_changes == 0
    assert row.flops_error <= 1e-12 and row.half_flops_error <= 1e-12
    assert row.slim_error <= 1e-9 and row.convert_error <= 1e-9
    assert row.input_sensitivity > 1e-6  # the output depends on the input: the checks bite
    assert row.edges > 0 and row.half_flops_ratio < 0.7
    if name in ("convnext_tiny", "vit_b_32", "swin_t", "maxvit_t"):  # streams, heads, MLPs
        assert row.half_flops_ratio <= 0.35 and row.fixed_flops_share == 0.0


#: timm (optional): its functional batch norm (BatchNormAct2d), its LayerNorm2d, its ViT
TIMM = {"efficientnet_b0": 64, "convnext_atto": 64, "vit_tiny_patch16_224": 64}


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_family_is_sound(name: str, one_thread) -> None:
    timm = pytest.importorskip("timm")
    kwargs = {"img_size": TIMM[name]} if name.startswith("vit") else {}
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)  # no download
    row = check_model(f"timm:{name}", model, TIMM[name])
    assert row.error == "" and row.empty_plan_changes == 0
    assert row.flops_error <= 1e-12 and row.half_flops_error <= 1e-12
    assert row.slim_error <= 1e-9 and row.convert_error <= 1e-9
    assert row.input_sensitivity > 1e-6
    assert row.half_flops_ratio < (0.3 if name != "vit_tiny_patch16_224" else 0.5)
