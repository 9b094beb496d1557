"""Exact cost accounting from traced shapes: FLOPs, parameters and memory traffic.

Counting conventions (per sample, i.e. batch 1, unless ``batch`` is given):

* FLOPs are ``2 x MAC`` of conv and linear layers and of attention's matmuls, as
  ``torch.utils.flop_counter`` counts them; biases, batch and layer norm, activations, pooling
  and additions are not counted. What
  ``FlopCounterMode`` counts in ops without a channel rule (matmuls of attention, functional or
  transposed convs) is the graph's ``fixed_flops``, part of every network total.
* Parameters are the learnable weights and biases of conv, linear and norm layers, and the
  parameters lined up with channels (layer scale, class token, position embedding); running
  statistics are buffers, not parameters.
* Bytes are the memory traffic of conv, linear and batch-norm layers: input activations read,
  output activations written and parameters read, at ``bytes_per_element`` (4 for float32).

Costs are exact functions of the edge widths: every layer's cost is bilinear in the live channel
counts of the edges on its two sides, so ``network_cost(graph, widths)`` gives the cost of any
slimmed network without building it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gator_hw.graph.hypergraph import HyperGraph, LayerCall, Seg

__all__ = [
    "Cost",
    "EdgeCost",
    "call_cost",
    "edge_costs",
    "flop_counter_flops",
    "gator_units",
    "layer_cost",
    "network_cost",
]


@dataclass(frozen=True)
class Cost:
    """FLOPs (2 x MAC), parameters and bytes moved, for one forward of the given batch."""

    flops: float
    params: float
    bytes: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.params + other.params, self.bytes + other.bytes)

    def __sub__(self, other: Cost) -> Cost:
        return Cost(self.flops - other.flops, self.params - other.params, self.bytes - other.bytes)

    def __str__(self) -> str:
        return (
            f"{self.flops / 1e9:.3f} GFLOPs, {self.params / 1e6:.3f} M params, "
            f"{self.bytes / 2**20:.1f} MiB moved"
        )


@dataclass(frozen=True)
class EdgeCost:
    """What removing one channel of an edge saves, at the current widths (first order)."""

    edge: int
    name: str
    channels: int
    flops_per_channel: float
    params_per_channel: float
    bytes_per_channel: float
    flops_share: float  # flops_per_channel * channels / network FLOPs


def _width(layout: Sequence[Seg], widths: Mapping[int, float]) -> float:
    return sum(widths.get(s.gid, s.length) * s.repeat for s in layout)


def layer_cost(
    call: LayerCall, widths: Mapping[int, float], *, batch: int = 1, bytes_per_element: int = 4
) -> Cost:
    """Cost of one layer call when its edges have the given (possibly fractional) widths."""
    n_in, n_out = _width(call.in_layout, widths), _width(call.out_layout, widths)
    return call_cost(call, n_in, n_out, batch=batch, bytes_per_element=bytes_per_element)


def call_cost(call: LayerCall, n_in, n_out, *, batch: int = 1, bytes_per_element: int = 4
              ) -> Cost:
    """Cost of one layer call with ``n_in`` input and ``n_out`` output channels (numbers,
    arrays or tensors): bilinear in the two counts for every kind of call."""
    if call.kind == "param":  # a parameter lined up with channels: spatial_out values each
        params = n_out * call.spatial_out
        return Cost(0.0, params, params * bytes_per_element)
    if call.kind == "attention_core":  # q.k over every token pair, then the weighted values
        macs = (n_in + n_out) * call.spatial_in * call.spatial_out * batch
        acts = (2 * n_in + 2 * n_out) * call.spatial_in * batch
        return Cost(2.0 * macs, 0.0, acts * bytes_per_element)
    if call.kind == "norm":
        params = 2.0 * n_out if call.bias else 0.0
        acts = (n_in * call.spatial_in + n_out * call.spatial_out) * batch
        return Cost(0.0, params, (acts + params) * bytes_per_element)
    if call.kind == "conv" and call.depthwise:
        weights = call.kernel * n_out
    elif call.kind == "conv":
        weights = call.kernel * n_in / call.groups * n_out
    else:  # linear, attention's packed projection and out_proj
        weights = n_in * n_out
    macs = weights * call.spatial_out * batch
    params = weights + (n_out if call.bias else 0.0)
    acts = (n_in * call.spatial_in + n_out * call.spatial_out) * batch
    return Cost(2.0 * macs, params, (acts + params) * bytes_per_element)


def network_cost(
    graph: HyperGraph,
    widths: Mapping[int, float] | None = None,
    *,
    batch: int = 1,
    bytes_per_element: int = 4,
) -> Cost:
    """Total cost of the network with edge ``gid`` at ``widths[gid]`` channels (default: full)."""
    widths = widths or {}
    total = Cost(graph.fixed_flops * batch, 0.0, 0.0)
    seen: set[str] = set()
    for call in graph.calls:
        c = layer_cost(call, widths, batch=batch, bytes_per_element=bytes_per_element)
        if call.module in seen:  # a shared layer's weights count once, its FLOPs every call
            c = Cost(c.flops, 0.0, c.bytes - c.params * bytes_per_element)
        seen.add(call.module)
        total = total + c
    return total


def edge_costs(
    graph: HyperGraph, widths: Mapping[int, float] | None = None, *, bytes_per_element: int = 4
) -> list[EdgeCost]:
    """Per edge: the FLOPs, params and bytes that removing one channel saves.

    This is the derivative of the cost in the edge's width: exactly the one-channel saving for
    edges on one side of each layer; for an edge on both sides of a grouped conv it differs from
    a one-channel step by one term.
    """
    widths = dict(widths or {})
    base = network_cost(graph, widths, bytes_per_element=bytes_per_element)
    out = []
    for e in graph.edges:
        n = widths.get(e.gid, e.channels)
        # costs are at most quadratic in one edge's width, so a central difference is exact
        up = network_cost(graph, {**widths, e.gid: n + 1}, bytes_per_element=bytes_per_element)
        down = network_cost(graph, {**widths, e.gid: n - 1}, bytes_per_element=bytes_per_element)
        d = up - down
        out.append(
            EdgeCost(
                e.gid, e.name, int(n), d.flops / 2, d.params / 2, d.bytes / 2,
                d.flops / 2 * n / base.flops if base.flops else 0.0,
            )
        )
    return out


def gator_units(graph: HyperGraph, cost: Cost) -> float:
    """FLOPs in the original GATOR units: MACs divided by the input's pixel count.

    ResNet-50 at 224x224 has 81456 units in its convs; CIFAR ResNet-56 122800.625 with its fc.
    """
    pixels = 1
    for d in graph.input_shape[2:]:
        pixels *= d
    return cost.flops / 2.0 / pixels


def _register_cpu_attention() -> None:
    """Give ``FlopCounterMode`` the CPU flash-attention kernel it lacks (the CPU path of
    ``F.scaled_dot_product_attention``), counted as its CUDA twin is."""
    from torch.utils import flop_counter as fc

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    count = getattr(fc, "sdpa_flop_count", None)
    if op is None or count is None or op in fc.flop_registry:
        return

    @fc.register_flop_formula(op, get_raw=True)
    def _cpu_sdpa(query, key, value, *args, out_val=None, **kwargs) -> int:
        return count(query.shape, key.shape, value.shape)


_register_cpu_attention()


def _counted_paths() -> contextlib.AbstractContextManager:
    """Grad mode on for a counting forward: without it ``nn.MultiheadAttention`` takes its
    fused inference kernel, whose FLOPs ``FlopCounterMode`` does not see (ViT: a third)."""
    return torch.enable_grad()


def flop_counter_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward as ``torch.utils.flop_counter.FlopCounterMode`` counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    x = torch.zeros(input_shape, device=param.device if param is not None else "cpu",
                    dtype=param.dtype if param is not None else None)
    was_training = model.training
    model.eval()
    try:
        with _counted_paths(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
