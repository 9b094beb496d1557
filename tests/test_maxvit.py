"""MaxViT (torchvision's MaxVit): residual streams through its window and grid partitions, its
attention's query/key and value channels per head, its MLPs and MBConv blocks, checked against
brute force, the masked model and torchvision's own forward, in float64."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models.maxvit import (
    MaxVit,
    RelativePositionalMultiHeadAttention,
    WindowDepartition,
    WindowPartition,
)

from gator_hw.accounting import flop_counter_flops, network_cost
from gator_hw.attention import SlimRelativeAttention
from gator_hw.graph import HyperGraph, build_hypergraph
from gator_hw.masking import masked_relative_attention
from gator_hw.slim import slim
from gator_hw.soundness import half_plan, randomize_norms, randomize_weights
from tests.conftest import (
    check_empty_plan,
    check_random_plan,
    converted_like_masked,
    rel_error,
    sample_input,
    train_gates_then_convert,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: threads only contend

#: 16 x 16 after the stem, 8 x 8 in block 0 (windows of 2 x 2, a 4 x 4 grid: the grid
#: attention's swap matters), 4 x 4 in block 1
SHAPE = (1, 3, 32, 32)


@functools.cache
def _tiny() -> tuple[MaxVit, HyperGraph]:
    torch.manual_seed(0)
    m = MaxVit((32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16],
               block_layers=[2, 1], head_dim=4, stochastic_depth_prob=0.1, mlp_ratio=2,
               num_classes=5)
    m = randomize_norms(randomize_weights(m.double().eval()))
    return m, build_hypergraph(m, SHAPE, "maxvit")


def tiny_maxvit() -> tuple[MaxVit, HyperGraph]:
    """A two-block MaxViT (a fresh copy) and its graph."""
    m, g = _tiny()
    return copy.deepcopy(m), g


def test_streams_heads_and_mlps_are_edges() -> None:
    _, g = tiny_maxvit()
    assert len(g.frozen) == 2  # the network input and output only
    # the stem's two convs, a stream per block, the head's hidden layer; per layer the MBConv's
    # inner and squeeze channels, and per attention layer q/k, v and the MLP
    assert g.n_edges == 2 + 2 + 1 + 3 * (2 + 2 * 3)
    assert g.fixed_flops == 0  # every matmul of attention is a layer call
    for block, heads in ((0, 2), (1, 4)):
        for kind in ("window", "grid"):
            attn = f"blocks.{block}.layers.0.layers.{kind}_attention.attn_layer.1"
            qk, v = g.edge(f"{attn}:qk"), g.edge(f"{attn}:v")
            assert qk.groups == v.groups == heads and qk.channels == v.channels == 8 * (block + 1)
    stream = next(e for e in g.edges if "blocks.0.layers.0.layers.MBconv.proj.1" in e.writers)
    sites = {(s.module, s.role) for s in stream.sites}
    layer = "blocks.0.layers.{}.layers.{}"
    want = {(layer.format(0, "MBconv.layers.conv_c"), "out"),
            (layer.format(0, "window_attention.attn_layer.0"), "ln"),
            (layer.format(0, "window_attention.attn_layer.1"), "in"),
            (layer.format(0, "window_attention.attn_layer.1.merge"), "out"),
            (layer.format(0, "grid_attention.attn_layer.1"), "in"),
            (layer.format(0, "grid_attention.mlp_layer.3"), "out"),
            (layer.format(1, "MBconv.layers.pre_norm"), "norm"),  # through the departition
            (layer.format(1, "MBconv.layers.conv_a.0"), "in"),
            (layer.format(1, "grid_attention.mlp_layer.3"), "out"),
            ("blocks.1.layers.0.layers.MBconv.proj.1", "in")}
    assert want <= sites and stream.channels == 8


def test_flops_are_exact_full_and_at_half_width() -> None:
    m, g = tiny_maxvit()
    assert network_cost(g).flops == flop_counter_flops(m, SHAPE)
    half = half_plan(g)
    widths = {k: len(v) for k, v in half.items()}
    assert network_cost(g, widths).flops == flop_counter_flops(slim(m, g, half), SHAPE)
    assert network_cost(g, widths).flops < 0.3 * network_cost(g).flops


def _attention() -> RelativePositionalMultiHeadAttention:
    """12 features, 3 heads of 4, windows of 2 x 2 tokens; random biases everywhere."""
    torch.manual_seed(1)
    m = RelativePositionalMultiHeadAttention(12, 4, 4).double().eval()
    with torch.no_grad():
        for t in (m.to_qkv.bias, m.merge.bias, m.relative_position_bias_table):
            t.uniform_(-1, 1)
    return m


def _brute_attention(m: nn.Module, x: torch.Tensor, in_idx, qk_idx, v_idx, out_idx
                     ) -> torch.Tensor:
    """Per sample, window and head, by explicit loops: the original's weights on the kept
    channels, keys scaled by 1 / sqrt(the original's full width), its head's relative position
    bias gathered from its table by the two tokens' offsets."""
    n, windows, tokens, c = x.shape
    d, side = c // m.n_heads, m.size
    w, bias = m.to_qkv.weight[:, in_idx], m.to_qkv.bias
    out = x.new_zeros(n, windows, tokens, len(out_idx))
    for s in range(n):
        for g in range(windows):
            xs, heads_out = x[s, g][:, in_idx], []
            for j in range(m.n_heads):
                qr = [i for i in qk_idx.tolist() if i // d == j]
                q, k, v = (xs @ w[r].T + bias[r] for r in (qr, [i + c for i in qr],
                                                          [i + 2 * c for i in v_idx.tolist()
                                                           if i // d == j]))
                score = q @ (k * c ** -0.5).T
                for a in range(tokens):
                    for b in range(tokens):
                        dy, dx = a // side - b // side, a % side - b % side
                        row = (dy + side - 1) * (2 * side - 1) + dx + side - 1
                        score[a, b] += m.relative_position_bias_table[row, j]
                heads_out.append(torch.softmax(score, -1) @ v)
            merged = torch.cat(heads_out, -1) @ m.merge.weight[out_idx][:, v_idx].T
            out[s, g] = merged + m.merge.bias[out_idx]
    return out


def test_slim_attention_is_the_original_on_the_kept_channels() -> None:
    m = _attention()
    x = torch.randn(2, 3, 4, 12, dtype=torch.float64)
    in_idx, out_idx = torch.tensor([0, 1, 4, 6, 7, 11]), torch.tensor([2, 3, 5, 9])
    qk_idx, v_idx = torch.tensor([1, 3, 4, 6, 8, 11]), torch.tensor([0, 5, 9])  # 2 and 1 per head
    want = _brute_attention(m, x, in_idx, qk_idx, v_idx, out_idx)
    got = SlimRelativeAttention(m, in_idx, qk_idx, v_idx, out_idx)(x[..., in_idx])
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    mask = torch.zeros(36, dtype=torch.float64)  # the masked reference, as gates apply it
    mask[torch.cat([qk_idx, qk_idx + 12, v_idx + 24])] = 1
    s_in = torch.zeros(2, 12, dtype=torch.float64)  # per sample, as gates draw in training
    s_in[:, in_idx] = 1
    masked = masked_relative_attention(m, x, s_in, mask.expand(2, -1))[..., out_idx]
    assert torch.allclose(masked, want, rtol=0, atol=1e-12)
    full = torch.arange(12)
    with torch.no_grad():  # all channels kept: torchvision's own attention
        ref = m(x)
        assert torch.allclose(_brute_attention(m, x, full, full, full, full), ref, atol=1e-13)
        assert torch.allclose(SlimRelativeAttention(m, full, full, full, full)(x), ref,
                              atol=1e-13)
        assert torch.allclose(masked_relative_attention(m, x, None, None), ref, atol=1e-13)


def test_per_sample_vectors_scale_each_sample_alone() -> None:
    m = _attention()
    x = torch.randn(3, 2, 4, 12, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    s_in = (torch.rand(3, 12, generator=gen) > 0.3).double()
    s_proj = (torch.rand(3, 36, generator=gen) > 0.3).double()
    out = masked_relative_attention(m, x, s_in, s_proj)
    for n in range(3):
        one = masked_relative_attention(m, x[n:n + 1], s_in[n], s_proj[n])
        assert torch.allclose(out[n:n + 1], one, rtol=0, atol=1e-13)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_slim_equals_masked_and_flops_are_exact_for_random_plans(seed: int) -> None:
    check_random_plan(*tiny_maxvit(), seed)


def test_empty_plan_changes_no_tensor() -> None:
    check_empty_plan(*tiny_maxvit())


def test_converted_maxvit_keeps_torchvision_forward_and_exports_to_onnx(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from gator_hw.export import export_onnx

    torch.manual_seed(2)  # one block of one layer: its window and its grid attention
    m = MaxVit((32, 32), stem_channels=8, partition_size=2, block_channels=[8], block_layers=[1],
               head_dim=4, stochastic_depth_prob=0.0, mlp_ratio=2, num_classes=5)
    m = randomize_norms(randomize_weights(m.double().eval()))
    g = build_hypergraph(m, SHAPE)
    plan = half_plan(g)
    small = converted_like_masked(m, g, plan, 1)
    assert type(small) is MaxVit
    attns = [mod for name, mod in small.named_modules() if name.endswith("attn_layer.1")]
    assert len(attns) == 2 and all(isinstance(a, SlimRelativeAttention) for a in attns)
    assert export_onnx(small.float(), SHAPE, tmp_path / "maxvit.onnx").verified


def test_an_emptied_mlp_folds_into_a_constant() -> None:
    m, g = tiny_maxvit()
    mlp = "blocks.0.layers.1.layers.grid_attention.mlp_layer"
    plan = {**half_plan(g), g.edge(f"{mlp}.1").gid: []}
    small = converted_like_masked(m, g, plan, 2)
    assert not any(mlp in n for n, _ in small.named_modules())


def test_gates_trained_on_a_maxvit_convert_to_the_gated_model() -> None:
    m, g = tiny_maxvit()
    gates, small = train_gates_then_convert(m, g, steps=3, batch=4)
    x = sample_input(SHAPE, 3)
    ref = gates.gated_output(m, g, x)
    with torch.no_grad():
        assert rel_error(small(x), ref) <= 1e-12
    keep = gates.kept_indices()
    assert sum(map(len, keep.values())) < sum(e.channels for e in g.edges)


class RolledWindows(nn.Module):
    """MaxViT's attention and window (de)partitions reading features that an op without a
    channel rule (``torch.roll``) or a permute to channels-last produced."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.part, self.depart = WindowPartition(), WindowDepartition()
        self.attn = RelativePositionalMultiHeadAttention(8, 4, 4)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.attn(torch.roll(self.part(self.stem(x), 2), 1, dims=3))  # (B, 16, 4, 8)
        y = self.depart(torch.roll(t, 1, dims=3), 2, 4, 4)  # (B, 8, 8, 8)
        z = self.part(y.permute(0, 2, 3, 1), 2)  # the channels-last map taken for (B, C, H, W)
        return self.head(z.mean((1, 2)))


def test_maxvit_layers_it_cannot_follow_freeze_with_the_reason() -> None:
    m = RolledWindows().eval()
    g = build_hypergraph(m, SHAPE)
    reasons = [r for grp in g.frozen for r in grp.frozen_reasons]
    for why in ("attn reads features no channel rule follows",
                "depart departitions features no channel rule follows",
                "part partitions features no channel rule follows"):
        assert any(why in r for r in reasons), (why, reasons)
    assert g.n_edges == 0 and g.fixed_flops > 0  # the attention's matmuls: fixed
    assert network_cost(g).flops == flop_counter_flops(m, SHAPE)
    assert all(torch.equal(slim(m, g, {}).state_dict()[k], v) for k, v in m.state_dict().items())
