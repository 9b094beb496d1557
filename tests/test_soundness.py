"""Soundness where the channel rules stop: channels-last linears, ops without a rule, shape
reads of folded constants, and grouped convs under learned gates."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gator_hw.accounting import flop_counter_flops, layer_cost, network_cost
from gator_hw.convert import convert
from gator_hw.errors import GatorError
from gator_hw.gates import GateSet
from gator_hw.graph import build_hypergraph
from gator_hw.loss import quadratic_cost
from gator_hw.masking import masked_output
from gator_hw.slim import slim
from tests.conftest import cached_network, one_line_error, randomize_norms

SHAPE = (1, 3, 8, 8)


class TokenNet(nn.Module):
    """Convs, then a token MLP on (B, N, C) (as ViT / MaxViT blocks), a matmul attention and a
    transposed conv: every pattern whose channels-last or rule-less ops must stay untouched."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.c2 = nn.Conv2d(12, 16, 3, padding=1)
        self.up = nn.ConvTranspose2d(16, 16, 2, stride=2)
        self.c3 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.mlp1 = nn.Linear(16, 24)  # reads (B, 64 tokens, 16): in_features != dim 1
        self.mlp2 = nn.Linear(24, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c2(torch.relu(self.bn1(self.c1(x))))
        x = self.c3(self.up(x))
        t = x.flatten(2).transpose(1, 2)
        t = t + self.mlp2(torch.relu(self.mlp1(t)))
        att = torch.softmax(t @ t.transpose(1, 2), dim=-1)
        return self.head((att @ t).mean(1))


@pytest.fixture(scope="module")
def token_net() -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    m = randomize_norms(TokenNet()).double().eval()
    return m, build_hypergraph(m, SHAPE, "tokennet")


def test_a_linear_on_tokens_is_recorded_with_its_feature_dims(token_net) -> None:
    _, g = token_net
    call = next(c for c in g.calls if c.module == "mlp1")
    assert sum(s.width for s in call.in_layout) == 16  # features, not the 64 tokens of dim 1
    assert sum(s.width for s in call.out_layout) == 24
    assert call.spatial_out == 64 and call.channels_last
    assert call.in_layout[0].gid >= g.n_edges  # features from a transpose: frozen
    # the stem edge, and the MLP's hidden channels (mlp1 -> relu -> mlp2, channels-last)
    assert sorted(e.name for e in g.edges) == ["c1", "mlp1"]
    hidden = next(e for e in g.edges if e.name == "mlp1")
    assert {(s.module, s.role) for s in hidden.sites} == {("mlp1", "out"), ("mlp2", "in")}


def test_gated_channels_last_edges_train_and_convert(token_net) -> None:
    m, g = token_net
    model = copy.deepcopy(m)
    gates = GateSet.from_graph(g, 0.5).to(torch.float64).attach(model, g)
    model.train()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    model(x).sum().backward()  # per-sample gates (3, 24) on a (3, 64, 24) tensor
    hidden = next(e.gid for e in g.edges if e.name == "mlp1")
    assert gates.logits[hidden].grad is not None and gates.logits[hidden].grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        gates.logits[hidden].copy_(torch.linspace(-1, 1, 24, dtype=torch.float64))
        ref = model(x)
    gates.detach()
    small = convert(model, g, gates.kept_indices())
    assert small.mlp1.out_features < 24
    assert torch.allclose(small(x), ref, atol=1e-10)


def test_the_empty_plan_is_the_identity(token_net) -> None:
    m, g = token_net
    s = slim(m, g, {})
    for (k, a), b in zip(m.state_dict().items(), s.state_dict().values(), strict=True):
        assert a.shape == b.shape and torch.equal(a, b), k


def test_flops_include_what_ops_without_a_rule_do(token_net) -> None:
    m, g = token_net
    assert g.fixed_flops > 0  # the attention matmuls and the transposed conv
    assert network_cost(g).flops == flop_counter_flops(m, SHAPE)
    assert network_cost(g, batch=3).flops == flop_counter_flops(m, (3, *SHAPE[1:]))
    hidden = next(e.gid for e in g.edges if e.name == "mlp1")
    plan = {0: [1, 4, 5, 9, 10], hidden: list(range(0, 24, 3))}
    small = slim(m, g, plan)
    widths = {0: 5, hidden: 8}
    assert network_cost(g, widths).flops == flop_counter_flops(small, SHAPE)
    q = quadratic_cost(g, "flops")
    w = torch.tensor([float(widths[e.gid]) for e in g.edges], dtype=torch.float64)
    assert float(q(w)) == pytest.approx(
        network_cost(g, widths).flops, rel=1e-12)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert torch.allclose(small(x), masked_output(m, g, plan, x), atol=1e-10)


def test_slim_names_a_model_that_does_not_match_its_graph(token_net) -> None:
    m, g = token_net
    other = TokenNet().double()
    other.c2 = nn.Conv2d(12, 16, 1)  # same channels: fine
    slim(other, g, {0: [0, 1]})
    other.c2 = nn.Conv2d(10, 16, 1)
    with pytest.raises(GatorError) as exc:
        slim(other, g, {0: [0, 1]})
    one_line_error(exc, "c2", "does not match")


class ShapeRead(nn.Module):
    """A residual branch whose output's shape is read: emptying the branch folds it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.c3 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        b = self.c3(torch.relu(self.bn2(self.c2(x))))
        y = (x + b) * b.shape[2] / b.size(0)
        return self.fc(y.mean((2, 3)))


def test_convert_folds_a_branch_whose_shape_is_read() -> None:
    torch.manual_seed(0)
    m = randomize_norms(ShapeRead()).eval()
    g = build_hypergraph(m, SHAPE)
    gid = next(e.gid for e in g.edges if e.name == "c2")
    c = convert(m, g, {gid: []})
    assert not any(n == "c2" for n, _ in c.named_modules())
    for batch in (1, 3):  # the batch size read from the folded branch follows the input
        x = torch.randn(batch, 3, 8, 8)
        assert torch.allclose(c(x), masked_output(m, g, {gid: []}, x), atol=1e-5)


# ------------------------------------------------------------------------ grouped convs
def test_gates_keep_the_same_count_in_every_conv_group() -> None:
    gates = GateSet([12], init_prob=0.5, conv_groups=[3])
    with torch.no_grad():
        gates.logits[0].copy_(torch.tensor([1, 2, 3, -1, -2, 5, 6, -7, -8, -3, -4, -5.0]))
    # open per group: 3, 2, 0 of 4 -> 5 of 12, rounded up to 2 per group (6)
    kept = gates.deterministic()[0].reshape(3, 4)
    assert kept.sum(1).tolist() == [2, 2, 2]
    assert kept[0].tolist() == [0, 1, 1, 0]  # the largest logits of each group
    assert kept[1].tolist() == [0, 1, 1, 0] and kept[2].tolist() == [0, 1, 1, 0]
    gates.update_masks()
    assert gates.mask(0).reshape(3, 4).sum(1).tolist() == [2, 2, 2]
    with pytest.raises(GatorError):
        GateSet([10], conv_groups=[3])


@pytest.mark.parametrize("name", ["resnext50_32x4d", "regnet_x_400mf"])
def test_gated_grouped_models_with_random_logits_convert(name: str) -> None:
    net = cached_network(name, 32)
    gates = GateSet.from_graph(net.graph)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in gates.logits:
            t.copy_(torch.randn(t.shape, generator=gen))
    gates.update_masks()
    keep = gates.kept_indices()
    model = copy.deepcopy(net.model).double().eval()  # float64: random deep nets amplify rounding
    small = convert(model, net.graph, keep)  # a grouped plan that is uneven would raise
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    gates.attach(model, net.graph)
    try:
        gates.eval()
        with torch.no_grad():
            ref = model(x)
    finally:
        gates.detach()
    with torch.no_grad():
        out = small(x)
    assert sum(map(len, keep.values())) < sum(e.channels for e in net.graph.edges)
    assert torch.allclose(out, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))


def test_a_gated_run_on_a_grouped_model_converts(tmp_path, one_thread) -> None:
    from gator_hw.config import GatingConfig, write_config
    from gator_hw.gated import convert_checkpoint
    from gator_hw.train.loop import TrainSettings, train

    cfg = write_config(GatingConfig(criteria_weight=2.0, gate_init_prob=0.6), tmp_path / "c.json")
    train(TrainSettings(model="regnet_x_400mf", config=cfg, data="digits", out=tmp_path / "run",
                        epochs=1, batch_size=128, lr=0.05, input_size=16, target="flops=0.6",
                        hold_epochs=0.2), log=lambda _m: None)
    r = convert_checkpoint(tmp_path / "run")
    grouped = [e.gid for e in r.net.graph.edges if e.groups > 1]
    assert grouped and any(len(r.keep[g]) < r.net.graph.edges[g].channels for g in grouped)
    assert network_cost(r.net.graph, {g: len(i) for g, i in r.keep.items()}).flops <= 0.61 * (
        network_cost(r.net.graph).flops)
    assert r.rel_error <= 1e-3


class Attention(nn.Module):
    def __init__(self, e: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, e, 2, stride=2)
        self.att = nn.MultiheadAttention(e, 4, batch_first=True)
        self.head = nn.Linear(e, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.att(t, t, t, need_weights=False)[0].mean(1))


def test_attention_flops_are_counted_although_inference_fuses_them() -> None:
    torch.manual_seed(0)
    m = Attention().eval()
    g = build_hypergraph(m, SHAPE)
    n, e = 16, 16  # tokens (8x8 input, stride 2) and embedding
    attention = 2 * n * e * 3 * e + 2 * 2 * n * n * e + 2 * n * e * e
    calls = [c for c in g.calls if c.kind.startswith("attention")]
    assert sum(layer_cost(c, {}).flops for c in calls) == attention  # now layer calls
    assert g.fixed_flops == 0  # the fused inference kernel would hide all of it
    assert network_cost(g).flops == flop_counter_flops(m, SHAPE)


class CatPlusConv(nn.Module):
    """``cat(a, b) + conv(...)``: the add joins two concatenated edges with one 8-channel edge,
    whose layouts differ; all three must freeze (no sound way to prune them apart)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x), self.b(x)], 1) + self.c(x))


def test_an_add_of_mismatched_concatenations_freezes_both_sides() -> None:
    g = build_hypergraph(CatPlusConv().eval(), SHAPE)
    assert g.n_edges == 0
    frozen = {grp.name: grp.frozen_reasons for grp in g.frozen}
    for name in ("a", "b", "c"):
        assert any("different channel concatenations" in r for r in frozen[name]), name
