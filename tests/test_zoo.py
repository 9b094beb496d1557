"""One model of each torchvision family through every soundness check (the full matrix is
``benchmarks/zoo.py``): FLOPs exact, the empty plan the identity, slim == masked, convert ==
gated."""

from __future__ import annotations

import pytest

from gator_hw.models import build_model
from gator_hw.soundness import check_model, zoo_input_size

#: one of each family; the transformers and ConvNeXt have no prunable edge yet (channels-last)
FAMILIES = {
    "resnet18": True, "vgg11_bn": True, "mobilenet_v3_small": True, "efficientnet_b0": True,
    "regnet_x_400mf": True, "densenet121": True, "shufflenet_v2_x0_5": True, "googlenet": True,
    "maxvit_t": True, "convnext_tiny": False, "vit_b_32": False, "swin_t": False,
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_is_sound(name: str, one_thread) -> None:
    row = check_model(name, build_model(name), zoo_input_size(name))
    assert row.error == ""
    assert row.empty_plan_changes == 0
    assert row.flops_error <= 1e-12 and row.half_flops_error <= 1e-12
    assert row.slim_error <= 1e-9 and row.convert_error <= 1e-9
    assert (row.edges > 0) == FAMILIES[name]
    if row.edges:
        assert row.half_flops_ratio < 0.8
