"""Swin (torchvision's SwinTransformer, V1 and V2): residual streams through patch merging,
the shifted window attention's query/key and value channels per head, and the MLPs, checked
against brute force, the masked model and torchvision's own forward, in float64."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models.swin_transformer import (
    PatchMergingV2,
    ShiftedWindowAttention,
    ShiftedWindowAttentionV2,
    SwinTransformer,
    SwinTransformerBlockV2,
)

from gator_hw.accounting import flop_counter_flops, network_cost
from gator_hw.attention import SlimWindowAttention
from gator_hw.graph import HyperGraph, build_hypergraph
from gator_hw.masking import masked_window_attention
from gator_hw.slim import slim
from gator_hw.soundness import half_plan, randomize_weights
from tests.conftest import (
    check_empty_plan,
    check_random_plan,
    converted_like_masked,
    rel_error,
    sample_input,
    train_gates_then_convert,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: threads only contend

#: 10 x 14 tokens: windows of 4 x 3 need padding in every stage, the first two stages shift
#: both ways, the last (3 x 4 tokens) only along its width
SHAPE = (1, 3, 40, 56)


@functools.cache
def _tiny(v2: bool) -> tuple[SwinTransformer, HyperGraph]:
    torch.manual_seed(0)
    kw = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
    m = SwinTransformer([4, 4], 8, [2, 2, 2], [2, 2, 4], [4, 3], num_classes=5, **kw)
    m = randomize_weights(m.double().eval())
    return m, build_hypergraph(m, SHAPE, "swin")


def tiny_swin(v2: bool) -> tuple[SwinTransformer, HyperGraph]:
    """A three-stage Swin (a fresh copy) and its graph."""
    m, g = _tiny(v2)
    return copy.deepcopy(m), g


@pytest.mark.parametrize("v2", [False, True])
def test_streams_heads_and_mlps_are_edges(v2: bool) -> None:
    _, g = tiny_swin(v2)
    assert len(g.frozen) == 2  # the network input and output only
    assert g.n_edges == 3 + 3 * 6  # a stream per stage; per block q/k, v and the MLP
    qk, v = g.edge("features.5.1.attn:qk"), g.edge("features.5.1.attn:v")
    assert qk.groups == v.groups == 4 and qk.channels == v.channels == 32
    stream = next(e for e in g.edges if "features.0.0" in e.writers)
    sites = {(s.module, s.role, s.offset) for s in stream.sites}
    want = {("features.0.0", "out", 0), ("features.0.2", "ln", 0),
            ("features.1.0.attn", "in", 0), ("features.1.0.attn.proj", "out", 0),
            ("features.1.0.norm1", "ln", 0), ("features.1.1.mlp.3", "out", 0),
            *(("features.2.reduction", "in", 8 * i) for i in range(4))}  # 2x2 patches merged
    if not v2:
        want |= {("features.2.norm", "ln", 8 * i) for i in range(4)}
    assert want <= sites and stream.channels == 8
    assert (g.fixed_flops > 0) == v2  # V2's position-bias MLP: the same for every input


@pytest.mark.parametrize("v2", [False, True])
def test_flops_are_exact_full_and_at_half_width(v2: bool) -> None:
    m, g = tiny_swin(v2)
    assert network_cost(g).flops == flop_counter_flops(m, SHAPE)
    half = half_plan(g)
    widths = {k: len(v) for k, v in half.items()}
    assert network_cost(g, widths).flops == flop_counter_flops(slim(m, g, half), SHAPE)
    assert network_cost(g, widths).flops < 0.6 * network_cost(g).flops


def _window_attention(v2: bool) -> ShiftedWindowAttention:
    """12 features, 3 heads, windows of 4 x 3 shifted by (2, 1); random biases everywhere
    (V2's key bias too: torchvision ignores it) and one logit scale above the clamp."""
    torch.manual_seed(1)
    cls = ShiftedWindowAttentionV2 if v2 else ShiftedWindowAttention
    m = cls(12, [4, 3], [2, 1], 3).double().eval()
    with torch.no_grad():
        m.qkv.bias.uniform_(-1, 1)
        m.proj.bias.uniform_(-1, 1)
        if v2:
            m.logit_scale.copy_(torch.tensor([1.0, 5.5, 3.0]).reshape(3, 1, 1))
        else:
            m.relative_position_bias_table.uniform_(-1, 1)
    return m


def _regions(size: int, window: int, shift: int) -> list[slice]:
    """The rows (or columns) of a rolled map that came from one place (the Swin paper's)."""
    if shift == 0:
        return [slice(0, size)]
    return [slice(0, size - window), slice(size - window, size - shift), slice(size - shift, size)]


def _brute_window_attention(m: nn.Module, x: torch.Tensor, in_idx, qk_idx, v_idx, out_idx
                            ) -> torch.Tensor:
    """Per window and head, by explicit loops: the original's weights on the kept channels,
    its head's relative position bias (torchvision's), the mask of the rolled map's regions."""
    n, h, w, _ = x.shape
    (wh, ww), heads, c = m.window_size, m.num_heads, m.proj.in_features
    d, v2 = c // heads, isinstance(m, ShiftedWindowAttentionV2)
    ph, pw = -(-h // wh) * wh, -(-w // ww) * ww
    sh, sw = (m.shift_size[0] if wh < ph else 0), (m.shift_size[1] if ww < pw else 0)
    xs = x.new_zeros(n, ph, pw, len(in_idx))
    xs[:, :h, :w] = x[..., in_idx]
    xs = torch.roll(xs, (-sh, -sw), (1, 2))
    region = torch.zeros(ph, pw)
    for i, rows in enumerate(_regions(ph, wh, sh)):
        for j, cols in enumerate(_regions(pw, ww, sw)):
            region[rows, cols] = 3 * i + j
    wq, bq = m.qkv.weight[:, in_idx], m.qkv.bias.clone()
    if v2:
        bq[c:2 * c] = 0
    bias = m.get_relative_position_bias()[0]
    out = x.new_zeros(n, ph, pw, len(out_idx))
    for a in range(ph // wh):
        for b in range(pw // ww):
            win = (slice(a * wh, (a + 1) * wh), slice(b * ww, (b + 1) * ww))
            rid = region[win].reshape(-1)
            mask = torch.where(rid[:, None] != rid[None, :], -100.0, 0.0).double()
            tokens = xs[:, win[0], win[1]].reshape(n, wh * ww, -1)
            heads_out = []
            for j in range(heads):
                qr = [i for i in qk_idx.tolist() if i // d == j]
                vr = [i + 2 * c for i in v_idx.tolist() if i // d == j]
                kr = [i + c for i in qr]
                q, k, v = (tokens @ wq[r].T + bq[r] for r in (qr, kr, vr))
                if v2:
                    s = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(1, 2)
                    s = s * torch.clamp(m.logit_scale[j], max=math.log(100)).exp()
                else:
                    s = q @ k.transpose(1, 2) / math.sqrt(d)
                heads_out.append(torch.softmax(s + bias[j] + (mask if sh or sw else 0), -1) @ v)
            o = torch.cat(heads_out, -1) @ m.proj.weight[out_idx][:, v_idx].T
            out[:, win[0], win[1]] = (o + m.proj.bias[out_idx]).reshape(n, wh, ww, -1)
    return torch.roll(out, (sh, sw), (1, 2))[:, :h, :w]


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("size", [(5, 7), (8, 9), (4, 7)])  # padded, not, one window tall
def test_slim_window_attention_is_the_original_on_the_kept_channels(v2: bool, size) -> None:
    m = _window_attention(v2)
    x = torch.randn(2, *size, 12, dtype=torch.float64)
    in_idx, out_idx = torch.tensor([0, 1, 4, 6, 7, 11]), torch.tensor([2, 3, 5, 9])
    qk_idx, v_idx = torch.tensor([1, 3, 4, 6, 8, 11]), torch.tensor([0, 5, 9])  # 2 and 1 per head
    want = _brute_window_attention(m, x, in_idx, qk_idx, v_idx, out_idx)
    got = SlimWindowAttention(m, in_idx, qk_idx, v_idx, out_idx)(x[..., in_idx])
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    mask = torch.zeros(36, dtype=torch.float64)  # the masked reference, as gates apply it
    mask[torch.cat([qk_idx, qk_idx + 12, v_idx + 24])] = 1
    s_in = torch.zeros(2, 12, dtype=torch.float64)  # per sample, as gates draw in training
    s_in[:, in_idx] = 1
    masked = masked_window_attention(m, x, s_in, mask.expand(2, -1))[..., out_idx]
    assert torch.allclose(masked, want, rtol=0, atol=1e-12)
    full = torch.arange(12)
    with torch.no_grad():  # all channels kept: torchvision's own window attention
        ref = m(x)
        assert torch.allclose(SlimWindowAttention(m, full, full, full, full)(x), ref, atol=1e-13)
        assert torch.allclose(masked_window_attention(m, x, None, torch.ones(36).double()), ref,
                              atol=1e-13)


@pytest.mark.parametrize("v2", [False, True])
def test_per_sample_vectors_scale_each_sample_in_all_its_windows(v2: bool) -> None:
    m = _window_attention(v2)
    x = torch.randn(3, 5, 7, 12, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    s_in = (torch.rand(3, 12, generator=gen) > 0.3).double()
    s_proj = (torch.rand(3, 36, generator=gen) > 0.3).double()
    out = masked_window_attention(m, x, s_in, s_proj)
    for n in range(3):
        one = masked_window_attention(m, x[n:n + 1], s_in[n], s_proj[n])
        assert torch.allclose(out[n:n + 1], one, rtol=0, atol=1e-13)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), v2=st.booleans())
def test_slim_equals_masked_and_flops_are_exact_for_random_plans(seed: int, v2: bool) -> None:
    check_random_plan(*tiny_swin(v2), seed)


@pytest.mark.parametrize("v2", [False, True])
def test_empty_plan_changes_no_tensor(v2: bool) -> None:
    check_empty_plan(*tiny_swin(v2))


def test_converted_swin_keeps_torchvision_forward_and_exports_to_onnx(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from gator_hw.export import export_onnx

    torch.manual_seed(2)  # two stages, one V2 attention in a V1 net: both kinds, one export
    m = SwinTransformer([4, 4], 8, [2, 1], [2, 2], [4, 3], num_classes=5)
    m.features[1][1].attn = ShiftedWindowAttentionV2(8, [4, 3], [2, 1], 2)
    m = randomize_weights(m.double().eval())
    g = build_hypergraph(m, SHAPE)
    plan = half_plan(g)
    small = converted_like_masked(m, g, plan, 1)
    assert type(small) is SwinTransformer
    assert all(isinstance(blk.attn, SlimWindowAttention) for i in (1, 3)
               for blk in small.features[i])
    assert export_onnx(small.float(), SHAPE, tmp_path / "swin.onnx").verified


@pytest.mark.parametrize("v2", [False, True])
def test_an_emptied_mlp_folds_into_a_constant(v2: bool) -> None:
    m, g = tiny_swin(v2)
    plan = {**half_plan(g), g.edge("features.3.1.mlp.0").gid: []}
    small = converted_like_masked(m, g, plan, 2)
    assert not any("features.3.1.mlp" in n for n, _ in small.named_modules())


@pytest.mark.parametrize("v2", [False, True])
def test_gates_trained_on_a_swin_convert_to_the_gated_model(v2: bool) -> None:
    m, g = tiny_swin(v2)
    gates, small = train_gates_then_convert(m, g, steps=3, batch=4)
    x = sample_input(SHAPE, 3)
    ref = gates.gated_output(m, g, x)
    with torch.no_grad():
        assert rel_error(small(x), ref) <= 1e-12
    keep = gates.kept_indices()
    assert sum(map(len, keep.values())) < sum(e.channels for e in g.edges)


class RolledWindows(nn.Module):
    """A window attention and a patch merging reading features that an op without a channel
    rule (``torch.roll``) produced."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 8, stride=8)
        self.attn = ShiftedWindowAttention(8, [2, 2], [1, 1], 2)
        self.merge = SwinTransformer([4, 4], 8, [1, 1], [2, 2], [2, 2]).features[2]
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.roll(self.stem(x).permute(0, 2, 3, 1), 1, dims=3)
        return self.head(self.merge(self.attn(t)).mean((1, 2)))


def test_window_attention_it_cannot_follow_freezes_with_the_reason() -> None:
    m = RolledWindows().eval()
    g = build_hypergraph(m, (1, 3, 32, 32))
    reasons = [r for grp in g.frozen for r in grp.frozen_reasons]
    assert any("attn reads features no channel rule follows" in r for r in reasons), reasons
    assert any("merges patches of features no channel rule follows" in r for r in reasons)
    assert network_cost(g).flops == flop_counter_flops(m, (1, 3, 32, 32))
    assert all(torch.equal(slim(m, g, {}).state_dict()[k], v) for k, v in m.state_dict().items())
