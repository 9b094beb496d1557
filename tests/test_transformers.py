"""Residual streams of transformers and ConvNeXt: layer norm, permutes, parameter sites and
self-attention, checked against brute force, the masked model and torchvision's own forward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models import ConvNeXt, VisionTransformer
from torchvision.models.convnext import CNBlockConfig

from gator_hw.accounting import flop_counter_flops, network_cost
from gator_hw.attention import SlimAttention
from gator_hw.convert import convert
from gator_hw.graph import build_hypergraph
from gator_hw.masking import masked_attention, masked_layer_norm, masked_output
from gator_hw.slim import slim
from gator_hw.soundness import half_plan, random_plan, randomize_weights
from tests.conftest import sample_input, train_gates_then_convert

SHAPE = (1, 3, 32, 32)


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    m = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                          mlp_dim=32, num_classes=5)
    return randomize_weights(m.double().eval())


def tiny_convnext() -> ConvNeXt:
    torch.manual_seed(0)
    m = ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=5)
    return randomize_weights(m.double().eval())


def _stream(graph):
    """The edge that the position embedding (ViT) or the stem's layer norm (ConvNeXt) is on."""
    return next(e for e in graph.edges
                if any(s.role in ("param", "ln") and s.module in ("encoder.pos_embedding",
                                                                   "features.0.1")
                       for s in e.sites))


def test_vit_residual_stream_is_one_edge_with_its_tokens_norms_and_attention() -> None:
    g = build_hypergraph(tiny_vit(), SHAPE, "vit")
    stream = _stream(g)
    sites = {(s.module, s.role) for s in stream.sites}
    assert stream.channels == 16
    assert {("class_token", "param"), ("encoder.pos_embedding", "param"),
            ("conv_proj", "out"), ("encoder.ln", "ln"), ("heads.head", "in"),
            ("encoder.layers.encoder_layer_0.ln_1", "ln"),
            ("encoder.layers.encoder_layer_0.self_attention", "in"),
            ("encoder.layers.encoder_layer_0.self_attention.out_proj", "out"),
            ("encoder.layers.encoder_layer_1.mlp.3", "out")} <= sites
    qk = g.edge("encoder.layers.encoder_layer_0.self_attention:qk")
    v = g.edge("encoder.layers.encoder_layer_0.self_attention:v")
    assert qk.groups == v.groups == 2 and qk.channels == v.channels == 16
    assert g.fixed_flops == 0  # every matmul of attention is a layer call now
    assert len(g.frozen) == 2  # the network input and output only


def test_convnext_stream_carries_layer_scale_and_both_layer_norm_kinds() -> None:
    g = build_hypergraph(tiny_convnext(), SHAPE, "convnext")
    stream = _stream(g)
    roles = {(s.module, s.role) for s in stream.sites}
    assert {("features.0.0", "out"), ("features.0.1", "ln"), ("features.1.0.block.0", "dw"),
            ("features.1.0.block.2", "ln"), ("features.1.0.layer_scale", "param"),
            ("features.1.0.block.5", "out"), ("features.2.1", "in")} <= roles
    scale = next(c for c in g.calls if c.module == "features.1.0.layer_scale")
    assert scale.kind == "param" and scale.dim == 0  # (C, 1, 1) against (N, C, H, W)


@pytest.mark.parametrize("build", [tiny_vit, tiny_convnext])
def test_flops_are_exact_full_and_at_half_width(build) -> None:
    m = build()
    g = build_hypergraph(m, SHAPE)
    assert network_cost(g).flops == flop_counter_flops(m, SHAPE)
    half = half_plan(g)
    widths = {k: len(v) for k, v in half.items()}
    assert network_cost(g, widths).flops == flop_counter_flops(slim(m, g, half), SHAPE)
    assert network_cost(g, widths).flops < 0.4 * network_cost(g).flops  # zoo: <= 0.26


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), which=st.sampled_from(["vit", "convnext"]))
def test_slim_equals_masked_for_random_plans(seed: int, which: str) -> None:
    m = tiny_vit() if which == "vit" else tiny_convnext()
    g = build_hypergraph(m, SHAPE)
    plan = random_plan(g, seed)
    x = sample_input(SHAPE, seed)
    ref = masked_output(m, g, plan, x)
    with torch.no_grad():
        out = slim(m, g, plan)(x)
        full = m(x)
    assert (out - ref).abs().max() <= 1e-10 * ref.abs().max()
    if any(len(v) < g.edges[k].channels for k, v in plan.items()):
        assert (full - ref).abs().max() > 1e-6  # the plan bites


def test_empty_plan_changes_no_tensor() -> None:
    for m in (tiny_vit(), tiny_convnext()):
        g = build_hypergraph(m, SHAPE)
        small = slim(m, g, {})
        after = small.state_dict()
        assert all(torch.equal(after[k], v) for k, v in m.state_dict().items())


def test_masked_layer_norm_is_layer_norm_over_the_kept_channels() -> None:
    ln = nn.LayerNorm(10, dtype=torch.float64)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-1, 1)
    x = torch.randn(3, 4, 10, dtype=torch.float64)
    kept = torch.tensor([0, 2, 3, 7, 9])
    mask = torch.zeros(10, dtype=torch.float64)
    mask[kept] = 1
    got = masked_layer_norm(ln, x, mask.reshape(1, 1, 10), 2)[..., kept]
    want = F.layer_norm(x[..., kept], (5,), ln.weight[kept], ln.bias[kept], ln.eps)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert torch.allclose(masked_layer_norm(ln, x, torch.ones(1, 1, 10, dtype=torch.float64), 2),
                          ln(x), atol=1e-12)


def _brute_attention(m: nn.MultiheadAttention, x, in_idx, qk_idx, v_idx, out_idx):
    """Per head, the original's weights and scale on the kept channels, by explicit loops."""
    e, h = m.embed_dim, m.num_heads
    d = e // h
    w, b = m.in_proj_weight, m.in_proj_bias
    xs = x[..., in_idx]
    heads = []
    for j in range(h):
        q_rows = [i for i in qk_idx.tolist() if i // d == j]
        v_rows = [i for i in v_idx.tolist() if i // d == j]
        q = xs @ w[q_rows][:, in_idx].T + b[q_rows]
        k = xs @ w[[r + e for r in q_rows]][:, in_idx].T + b[[r + e for r in q_rows]]
        v = xs @ w[[r + 2 * e for r in v_rows]][:, in_idx].T + b[[r + 2 * e for r in v_rows]]
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
        heads.append(att @ v)
    o = torch.cat(heads, dim=-1)
    return o @ m.out_proj.weight[out_idx][:, v_idx].T + m.out_proj.bias[out_idx]


def test_slim_attention_is_the_original_on_the_kept_channels() -> None:
    torch.manual_seed(0)
    m = nn.MultiheadAttention(12, 3, batch_first=True, dtype=torch.float64).eval()
    with torch.no_grad():
        m.in_proj_bias.uniform_(-1, 1)
        m.out_proj.bias.uniform_(-1, 1)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    in_idx, out_idx = torch.tensor([0, 1, 4, 6, 7, 11]), torch.tensor([2, 3, 5, 9])
    qk_idx, v_idx = torch.tensor([1, 3, 4, 6, 8, 11]), torch.tensor([0, 5, 9])  # 2 and 1 per head
    slim_att = SlimAttention.from_mha(m, in_idx, qk_idx, v_idx, out_idx)
    got, weights = slim_att(x[..., in_idx], x[..., in_idx], x[..., in_idx], need_weights=False)
    assert weights is None
    want = _brute_attention(m, x, in_idx, qk_idx, v_idx, out_idx)
    assert torch.allclose(got, want, atol=1e-12)
    ones = torch.ones(36, dtype=torch.float64)
    full, _ = masked_attention(m, x, None, ones)
    assert torch.allclose(full, m(x, x, x, need_weights=False)[0], atol=1e-12)


def test_converted_vit_keeps_torchvision_forward_and_exports_to_onnx(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from gator_hw.export import export_onnx

    m = tiny_vit()
    g = build_hypergraph(m, SHAPE)
    plan = half_plan(g)
    small = convert(m, g, plan)
    assert type(small) is VisionTransformer and small.hidden_dim == 8
    assert isinstance(small.encoder.layers[0].self_attention, SlimAttention)
    x = sample_input(SHAPE, 1)
    with torch.no_grad():
        assert torch.allclose(small(x), masked_output(m, g, plan, x), atol=1e-10)
    report = export_onnx(small.float(), SHAPE, tmp_path / "vit.onnx")
    assert report.verified


def test_emptied_mlp_folds_and_traced_reshapes_follow_the_stream() -> None:
    m = tiny_vit()
    g = build_hypergraph(m, SHAPE)
    mlp = g.edge("encoder.layers.encoder_layer_1.mlp.0").gid
    plan = {**half_plan(g), mlp: []}
    small = convert(m, g, plan)  # a GraphModule: the stream's width was a number in reshape
    x = sample_input(SHAPE, 2)
    with torch.no_grad():
        assert torch.allclose(small(x), masked_output(m, g, plan, x), atol=1e-10)
    assert not any("encoder_layer_1.mlp" in n for n, _ in small.named_modules())


def test_gates_trained_on_a_vit_convert_to_the_gated_model() -> None:
    m = tiny_vit()
    g = build_hypergraph(m, SHAPE)
    gates, small = train_gates_then_convert(m, g, steps=4, batch=8)
    x = sample_input(SHAPE, 3)
    ref = gates.gated_output(m, g, x)
    with torch.no_grad():
        assert torch.allclose(small(x), ref, atol=1e-10 * float(ref.abs().max()))
    keep = gates.kept_indices()
    assert sum(map(len, keep.values())) < sum(e.channels for e in g.edges)


class CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 8, stride=8)
        self.ln = nn.LayerNorm(8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.query = nn.Parameter(torch.randn(1, 1, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.ln(self.stem(x).flatten(2).permute(0, 2, 1))
        q = self.query.expand(t.shape[0], -1, -1)
        return self.head(self.att(q, t, t, need_weights=False)[0][:, 0])


class WeightsOut(CrossAttention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.ln(self.stem(x).flatten(2).permute(0, 2, 1))
        return self.head(self.att(t, t, t)[0].mean(1))


@pytest.mark.parametrize(("model", "why"), [(CrossAttention, "is not a self-attention"),
                                            (WeightsOut, "returns its attention weights")])
def test_attention_it_cannot_prune_freezes_with_the_reason(model, why: str) -> None:
    m = model().eval()
    g = build_hypergraph(m, SHAPE)
    reasons = [r for grp in g.frozen for r in grp.frozen_reasons]
    assert any(why in r for r in reasons), reasons
    assert network_cost(g).flops == flop_counter_flops(m, SHAPE)
    assert all(torch.equal(slim(m, g, {}).state_dict()[k], v) for k, v in m.state_dict().items())


class SharedScale(nn.Module):
    """A scale lined up with channels and also read by an op without a rule."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.scale = nn.Parameter(torch.rand(6, 1, 1) + 0.5)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x) * self.scale
        return self.head(y) + torch.erf(self.scale).sum()


def test_a_parameter_also_read_elsewhere_freezes_its_channels() -> None:
    m = SharedScale().eval()
    g = build_hypergraph(m, SHAPE)
    conv = next(grp for grp in g.groups if "conv" in grp.writers)
    assert not conv.prunable
    assert any("also read by an op without a channel rule" in r for r in conv.frozen_reasons)


class LayerScale(SharedScale):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x) * self.scale)


def test_layer_scale_alone_is_a_prunable_site() -> None:
    m = LayerScale().eval()
    g = build_hypergraph(m, SHAPE)
    e = next(grp for grp in g.edges if "conv" in grp.writers)
    assert ("scale", "param") in {(s.module, s.role) for s in e.sites}
    x = torch.randn(2, 3, 32, 32)
    plan = {e.gid: [0, 3, 5]}
    small = slim(m, g, plan)
    assert small.scale.shape == (3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(small(x), masked_output(m, g, plan, x), atol=1e-6)


class ReadsWidth(nn.Module):
    """timm's attention pattern: the input's width, read from ``x.shape``, shapes another
    tensor; pruning the input would break that reshape."""

    def __init__(self, used: bool) -> None:
        super().__init__()
        self.used = used
        self.stem = nn.Conv2d(3, 8, 8, stride=8)
        self.ln = nn.LayerNorm(8)
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.ln(self.stem(x).flatten(2).transpose(1, 2))
        b, n, c = t.shape
        if not self.used:  # the width read but not used: nothing to freeze
            c = 8
        q = self.qkv(t).reshape(b, n, 3, c)[:, :, 0]
        return self.head(q.mean(1))


@pytest.mark.parametrize("used", [True, False])
def test_a_channel_count_read_as_a_number_freezes_those_channels(used: bool) -> None:
    m = ReadsWidth(used).eval()
    g = build_hypergraph(m, SHAPE)
    stem = next(grp for grp in g.groups if "stem" in grp.writers)
    assert stem.prunable is not used
    if used:
        assert any("read as a number" in r for r in stem.frozen_reasons)
    else:
        plan = {stem.gid: [1, 2, 5]}
        x = torch.randn(2, *SHAPE[1:])
        with torch.no_grad():
            assert torch.allclose(slim(m, g, plan)(x), masked_output(m, g, plan, x), atol=1e-6)
