"""Hyperedge discovery on real torchvision models and on hand-made corner cases."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from gator_hw.errors import GatorError
from gator_hw.graph import build_hypergraph, channel_rule
from tests.conftest import cached_network

GATOR_RESNET50_CHANNELS = (
    [64]
    + [64, 64] * 3 + [256]
    + [128, 128] * 4 + [512]
    + [256, 256] * 6 + [1024]
    + [512, 512] * 3 + [2048]
)


def test_resnet50_has_the_gator_edges_in_gator_order() -> None:
    g = cached_network("resnet50").graph
    assert g.n_edges == 37
    assert [e.channels for e in g.edges] == GATOR_RESNET50_CHANNELS
    assert g.edges[0].writers == ("conv1",)
    assert g.edges[1].writers == ("layer1.0.conv1",)
    assert g.edges[2].writers == ("layer1.0.conv2",)
    # edge 7 is the layer1 highway: every block's conv3, the downsample, and all readers
    highway = g.edges[7]
    assert set(highway.writers) == {
        "layer1.0.conv3", "layer1.0.downsample.0", "layer1.1.conv3", "layer1.2.conv3"
    }
    readers = {s.module for s in highway.sites if s.role == "in"}
    assert readers == {
        "layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1", "layer2.0.downsample.0"
    }
    assert g.edges[36].channels == 2048 and "fc" in {s.module for s in g.edges[36].sites}


def test_resnet18_stem_and_layer1_highway_are_one_edge() -> None:
    g = cached_network("resnet18").graph
    stem = next(e for e in g.edges if "conv1" in e.writers)
    assert {"layer1.0.conv2", "layer1.1.conv2"} <= set(stem.writers)
    assert g.n_edges == 12


def test_inputs_and_classifier_outputs_are_frozen() -> None:
    g = cached_network("resnet18").graph
    reasons = {r for f in g.frozen for r in f.frozen_reasons}
    assert {"network input", "network output"} <= reasons
    fc_out = [f for f in g.frozen if any(s.module == "fc" and s.role == "out" for s in f.sites)]
    assert fc_out and not fc_out[0].prunable


def test_depthwise_conv_shares_its_edge_with_the_expansion() -> None:
    g = cached_network("mobilenet_v2").graph
    e = next(e for e in g.edges if "features.2.conv.1.0" in e.writers)
    roles = {s.module: s.role for s in e.sites}
    assert roles["features.2.conv.0.0"] == "out" and roles["features.2.conv.1.0"] == "dw"
    assert roles["features.2.conv.2"] == "in"


def test_squeeze_excitation_scale_joins_the_expanded_edge() -> None:
    g = cached_network("efficientnet_b0").graph
    e = next(e for e in g.edges if "features.2.0.block.1.0" in e.writers)
    modules = {s.module: s.role for s in e.sites}
    assert modules["features.2.0.block.2.fc2"] == "out"  # the SE scale writes these channels
    assert modules["features.2.0.block.2.fc1"] == "in"  # and the squeeze reads them
    squeeze = next(e for e in g.edges if e.writers == ("features.2.0.block.2.fc1",))
    assert squeeze.channels == 4


def test_grouped_convs_couple_input_and_output_with_a_group_constraint() -> None:
    g = cached_network("resnext50_32x4d").graph
    e = next(e for e in g.edges if "layer1.0.conv2" in e.writers)
    assert e.groups == 32 and e.channels == 128
    assert {s.role for s in e.sites if s.module == "layer1.0.conv2"} == {"gconv"}
    with pytest.raises(GatorError, match="same number of channels in every group"):
        g.normalize_plan({e.gid: [0, 1]})
    assert g.valid_keep_count(e.gid, 70) == 64


def test_densenet_concatenation_gives_offsets() -> None:
    g = cached_network("densenet121").graph
    e = next(e for e in g.edges if e.writers == ("features.denseblock1.denselayer1.conv2",))
    assert e.channels == 32
    reads = {s.module: s.offset for s in e.sites if s.role == "in"}
    # layer1's growth channels sit after the 64 stem channels in every later layer's input
    assert reads["features.denseblock1.denselayer2.conv1"] == 64
    norms = {s.module: s.offset for s in e.sites if s.role == "norm"}
    assert norms["features.denseblock1.denselayer6.norm1"] == 64


def test_flatten_into_linear_spreads_channels_over_features() -> None:
    g = cached_network("vgg16_bn").graph
    last = g.edges[12]
    site = next(s for s in last.sites if s.module == "classifier.0")
    assert site.role == "in" and site.repeat == 49 and last.channels == 512


class _Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y = torch.roll(y, 1, dims=1)  # mixes channels: no rule, so a's edge must freeze
        z = self.c(torch.relu(self.b(y)))
        return self.head(z.mean((2, 3)))


def test_unknown_op_freezes_what_it_touches_with_the_reason() -> None:
    g = build_hypergraph(_Odd().eval(), (1, 3, 8, 8), "odd")
    frozen = {f.name: f for f in g.frozen}
    assert "a" in frozen and any("roll" in r for r in frozen["a"].frozen_reasons)
    assert [e.name for e in g.edges] == ["b", "c"]  # b and c stay prunable, in forward order
    assert "no channel rule" in str(frozen["a"])


def test_registering_a_rule_twice_fails() -> None:
    with pytest.raises(ValueError, match="already registered"):
        channel_rule(nn.Conv2d)(lambda b, call: None)


@pytest.mark.parametrize("key", ["relu", "method:", "method:not a name", 3, None])
def test_a_rule_key_that_can_never_match_is_rejected(key) -> None:
    from gator_hw.errors import GatorError

    with pytest.raises(GatorError) as exc:
        channel_rule(key)
    assert "\n" not in str(exc.value) and "channel_rule key" in str(exc.value)
    if key == "relu":
        assert "'method:relu'" in str(exc.value)  # names the fix
    with pytest.raises(GatorError, match="at least one key"):
        channel_rule()


def test_untraceable_model_gives_one_line() -> None:
    class Dyn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow
                return self.c(x)
            return x

    with pytest.raises(GatorError, match="cannot be traced") as exc:
        build_hypergraph(Dyn(), (1, 3, 8, 8), "dyn")
    assert "\n" not in str(exc.value)


def test_bad_input_size_gives_one_line() -> None:
    from gator_hw.network import load_network

    with pytest.raises(GatorError, match="does not run on an input of shape") as exc:
        load_network("vgg16_bn", input_size=8)
    assert "--input-size" in str(exc.value) and "\n" not in str(exc.value)


_BOOM: list[BaseException] = []


def _boom(x: torch.Tensor) -> torch.Tensor:
    """A traced leaf that fails when run (what a model's own forward may do)."""
    raise _BOOM[0]


torch.fx.wrap("_boom")


class _Fails(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _boom(self.c(x))


@pytest.mark.parametrize("raise_, words, not_words", [
    (MemoryError("cannot allocate 40 GB"), ["ran out of memory", "CPU"], ["--input-size"]),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), ["ran out of memory"],
     ["--input-size"]),
    (KeyError("weights"), ["forward raised KeyError", "fix the model"], ["--input-size"]),
    (RuntimeError("Given groups=1, weight of size [8, 3, 3, 3], expected input[1, 4, 8, 8]"),
     ["--input-size"], ["memory"]),
])
def test_a_model_that_fails_on_its_input_says_why(raise_, words, not_words) -> None:
    _BOOM[:] = [raise_]
    with pytest.raises(GatorError) as exc:
        build_hypergraph(_Fails(), (1, 3, 8, 8), "fails")
    msg = str(exc.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert not any(w in msg for w in not_words), msg


def test_edge_lookup_and_plan_errors() -> None:
    g = cached_network("resnet18").graph
    assert g.edge(g.edges[3].name) is g.edges[3]
    with pytest.raises(GatorError, match="unknown edge 'nope'"):
        g.normalize_plan({"nope": [0]})
    with pytest.raises(GatorError, match="out of range"):
        g.normalize_plan({99: [0]})
    with pytest.raises(GatorError, match="must keep at least 1"):
        g.normalize_plan({0: []})
    with pytest.raises(GatorError, match="channels 0..63"):
        g.normalize_plan({0: [64]})
    assert g.normalize_plan({0: [3, 1]})[0] == [1, 3]


def test_debug_strings() -> None:
    g = cached_network("resnet18").graph
    assert "12 edges" in str(g)
    text = g.summary()
    assert text.count("\n") == len(g.groups)
    site = g.edges[0].sites[0]
    assert str(site).startswith(site.module + ":")


@pytest.mark.parametrize("training", [True, False])
def test_discovery_leaves_the_model_in_its_own_mode(training: bool) -> None:
    model = torchvision.models.resnet18(num_classes=10).train(training)
    build_hypergraph(model, (1, 3, 32, 32))
    assert all(m.training == training for m in model.modules())


class _NeedsSize(nn.Module):
    """A model that checks its input size (as torchvision's ViT does) and prints a note."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.shape[2] == 32, "Wrong image height! Expected 32")
        return self.conv(x)


def test_an_input_the_model_refuses_is_one_line_and_no_traceback(capsys) -> None:
    with pytest.raises(GatorError) as exc:
        build_hypergraph(_NeedsSize(), (1, 3, 16, 16), "needs32")
    assert "--input-size" in str(exc.value) and "\n" not in str(exc.value)
    assert "Traceback" not in capsys.readouterr().err  # torch's ShapeProp prints one
    build_hypergraph(_NeedsSize(), (1, 3, 32, 32), "needs32")
    assert capsys.readouterr().err == ""
