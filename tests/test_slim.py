"""Physical slimming equals the masked network, for every supported model family."""

from __future__ import annotations

import pytest
import torch

from gator_hw.accounting import flop_counter_flops, network_cost
from gator_hw.errors import GatorError
from gator_hw.masking import masked_output
from gator_hw.network import load_network
from gator_hw.slim import slim
from tests.conftest import cached_network, random_plan, randomize_norms

# (model, input size for the slim check, minimum prunable edges expected)
FAMILIES = [
    ("resnet18", 64, 12),
    ("resnet50", 64, 37),
    ("resnet56", 32, 30),
    ("vgg16_bn", 64, 15),
    ("mobilenet_v2", 64, 25),
    ("mobilenet_v3_small", 64, 20),
    ("efficientnet_b0", 64, 40),
    ("resnext50_32x4d", 64, 21),
    ("densenet121", 64, 120),
    ("regnet_y_400mf", 64, 30),
    ("googlenet", 64, 50),
]


@pytest.mark.parametrize(("name", "size", "min_edges"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_discovery_flops_and_slim_equals_masked(name: str, size: int, min_edges: int) -> None:
    net = load_network(name, input_size=size)
    model, g = randomize_norms(net.model), net.graph
    assert g.n_edges >= min_edges
    assert all(e.prunable for e in g.edges)
    # totals agree with FlopCounterMode on conv and linear FLOPs
    counted = flop_counter_flops(model, g.input_shape)
    assert network_cost(g).flops == pytest.approx(counted, rel=1e-6)

    plan = random_plan(g, seed=1)
    small = slim(model, g, plan)
    widths = {k: len(v) for k, v in plan.items()}
    assert network_cost(g, widths).flops == pytest.approx(
        flop_counter_flops(small, g.input_shape), rel=1e-6
    )
    assert network_cost(g, widths).params == sum(p.numel() for p in small.parameters())

    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x)
        masked = masked_output(model, g, plan, x)
        out = small(x)
        again = model(x)
    scale = masked.abs().max()
    assert (out - masked).abs().max() <= 1e-5 * scale
    assert (full - masked).abs().max() > 1e-3 * scale  # the plan really changed something
    assert torch.equal(again, full)  # hooks removed, original untouched


def test_full_default_sizes_flops_cross_check() -> None:
    for name in ("inception_v3", "resnet50"):
        net = cached_network(name)
        assert network_cost(net.graph).flops == pytest.approx(
            flop_counter_flops(net.model, net.graph.input_shape), rel=1e-6
        )


def test_slim_keeps_the_original_untouched_and_accepts_names() -> None:
    net = cached_network("resnet18", 32)
    e = net.graph.edges[0]
    small = slim(net.model, net.graph, {e.name: [0, 2, 4]})
    assert net.model.layer1[0].conv1.out_channels == 64
    assert small.layer1[0].conv1.out_channels == 3
    assert small.layer1[0].conv2.in_channels == 3


def test_grouped_conv_slices_within_groups() -> None:
    net = cached_network("resnext50_32x4d", 32)
    g = net.graph
    e = next(e for e in g.edges if "layer1.0.conv2" in e.writers)
    keep = g.first_channels_plan({e.gid: 64})
    small = slim(net.model, g, keep)
    conv = small.layer1[0].conv2
    assert (conv.in_channels, conv.out_channels, conv.groups) == (64, 64, 32)
    assert conv.weight.shape[1] == 2


def test_plan_keeping_zero_channels_is_rejected() -> None:
    net = cached_network("resnet18", 32)
    with pytest.raises(GatorError, match="keeps 0 channels of edge"):
        slim(net.model, net.graph, {0: []})
