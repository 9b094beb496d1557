"""Scale channels where layers read them: the reference semantics of removing a channel.

Every channel of an edge reaches the rest of the network only through the layers that read it
(``in``, ``dw`` and ``gconv`` sites: convs and linears). Multiplying a layer's input by a
per-channel vector at each of those sites therefore acts on the channel everywhere at once:
a 0/1 mask gives exactly the network with those channels removed (``gator_hw.slim``), and a
gate vector gives the gated network. Two readers mix channels and are recomputed instead: a
layer norm over channels takes its mean and variance weighted by the vector (over the kept
channels only, for a mask), and self-attention scales its input features, query channels and
value channels (``masked_attention``; Swin's window attention: ``masked_window_attention``;
MaxViT's: ``masked_relative_attention``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gator_hw.attention import (
    attend,
    from_windows,
    maxvit_position_bias,
    relative_attend,
    shift_mask,
    swin_position_bias,
    swin_qkv_bias,
    swin_scale,
    to_windows,
    window_attend,
)
from gator_hw.graph.hypergraph import READ_ROLES, HyperGraph, LayerCall, Seg
from gator_hw.graph.rules import relative_attentions

__all__ = ["expand_layout", "mask_model", "masked_attention", "masked_layer_norm", "masked_output",
           "masked_relative_attention", "masked_window_attention", "reader_layouts",
           "scale_inputs"]


def reader_layouts(graph: HyperGraph) -> dict[str, tuple[Seg, ...]]:
    """Module name -> input layout, for every layer that reads at least one prunable edge."""
    return {name: lay for name, (lay, _) in _readers(graph).items()}


def _readers(graph: HyperGraph) -> dict[str, tuple[tuple[Seg, ...], bool]]:
    """Module name -> (input layout, channels-last) of every layer reading a prunable edge."""
    readers = {s.module for e in graph.edges for s in e.sites if s.role in READ_ROLES}
    out: dict[str, tuple[tuple[Seg, ...], bool]] = {}
    for call in graph.calls:
        if call.kind in ("conv", "linear") and call.module in readers and call.module not in out:
            out[call.module] = (call.in_layout, call.channels_last)
    return out


def _broadcast(scale: torch.Tensor, x: torch.Tensor, last: bool) -> torch.Tensor:
    """``scale`` (``(C,)`` or ``(N, C)``) shaped to multiply ``x`` along its channel dim (dim 1,
    or the last dim of a channels-last input)."""
    lead = tuple(scale.shape[:-1]) or (1,)
    ones = (1,) * (x.dim() - 2)
    shape = (*lead, *ones, scale.shape[-1]) if last else (*lead, scale.shape[-1], *ones)
    return scale.to(x.dtype).reshape(shape)


def expand_layout(
    layout: Sequence[Seg], vectors: Mapping[int, torch.Tensor]
) -> torch.Tensor | None:
    """Concatenate per-edge vectors along a layer's input dimension (ones for other groups).

    Vectors are ``(C,)`` (one scale per channel) or ``(N, C)`` (one per sample and channel);
    the result has the same leading shape. Returns None when no group of the layout has a
    vector (nothing to scale).
    """
    if not any(seg.gid in vectors for seg in layout):
        return None
    ref = next(v for v in vectors.values())
    lead = ref.shape[:-1]
    parts = []
    for seg in layout:
        v = vectors.get(seg.gid)
        if v is None:
            v = torch.ones(*lead, seg.length, device=ref.device, dtype=ref.dtype)
        parts.append(v.repeat_interleave(seg.repeat, dim=-1) if seg.repeat > 1 else v)
    return torch.cat(parts, dim=-1)


def scale_inputs(
    model: nn.Module,
    graph: HyperGraph,
    vectors: Callable[[], Mapping[int, torch.Tensor]],
) -> list[torch.utils.hooks.RemovableHandle]:
    """Install forward pre-hooks that multiply each reader's input by its edges' vectors.

    ``vectors()`` is called at every reader call and returns edge index -> vector of that edge's
    channel count, shared by the batch ``(C,)`` or per sample ``(N, C)``. Remove the hooks
    with ``handle.remove()``.
    """
    modules = dict(model.named_modules())
    handles = []
    for name, (layout, last) in _readers(graph).items():

        def hook(_m: nn.Module, args: tuple, layout=layout, last=last):
            scale = expand_layout(layout, vectors())
            if scale is None:
                return None
            x = args[0]
            return (x * _broadcast(scale, x, last), *args[1:])

        handles.append(modules[name].register_forward_pre_hook(hook))
    handles += _mixing_hooks(modules, graph, vectors)
    return handles


def _touching(graph: HyperGraph, kind: str) -> dict[str, LayerCall]:
    """The first call of each layer of ``kind`` that touches a prunable edge."""
    out: dict[str, LayerCall] = {}
    for call in graph.calls:
        if call.kind == kind and call.module not in out and any(
                s.gid < graph.n_edges for s in (*call.in_layout, *call.out_layout)):
            out[call.module] = call
    return out


def masked_layer_norm(m: nn.LayerNorm, x: torch.Tensor, weights: torch.Tensor, dim: int
                      ) -> torch.Tensor:
    """``m(x)`` with its statistics over ``dim`` weighted by ``weights`` (0/1: over the kept
    channels only, as the slimmed layer norm computes them)."""
    total = weights.sum(dim, keepdim=True).clamp_min(1e-12)
    mean = (x * weights).sum(dim, keepdim=True) / total
    var = (weights * (x - mean) ** 2).sum(dim, keepdim=True) / total
    y = (x - mean) * torch.rsqrt(var + m.eps)
    if m.weight is not None:
        shape = [1] * x.dim()
        shape[dim] = -1
        y = y * m.weight.reshape(shape)
        if m.bias is not None:
            y = y + m.bias.reshape(shape)
    return y


def _scaled(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return x if scale is None else x * _broadcast(scale, x, True)


def masked_attention(m: nn.MultiheadAttention, x: torch.Tensor, s_in: torch.Tensor | None,
                     s_proj: torch.Tensor | None) -> tuple[torch.Tensor, None]:
    """``m(x, x, x, need_weights=False)`` with its input features scaled by ``s_in`` and its
    query and value channels by ``s_proj`` (a (…, 3E) vector over q, k, v; k's part unused:
    a query channel at zero removes the pair from every score)."""
    e = m.embed_dim
    s_q, s_v = (None, None) if s_proj is None else (s_proj[..., :e], s_proj[..., 2 * e:])
    x = _scaled(x, s_in)
    q, k, v = F.linear(x, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1)
    p = m.dropout if m.training else 0.0
    out = attend(_scaled(q, s_q), k, _scaled(v, s_v), m.num_heads,
                 1.0 / math.sqrt(e // m.num_heads), p)
    return F.linear(out, m.out_proj.weight, m.out_proj.bias), None


def masked_window_attention(m: nn.Module, x: torch.Tensor, s_in: torch.Tensor | None,
                            s_proj: torch.Tensor | None) -> torch.Tensor:
    """``m(x)`` for torchvision's shifted window attention ``m`` (Swin V1 or V2) with its input
    features scaled by ``s_in`` and its query and value channels by ``s_proj`` (a (…, 3C)
    vector over q, k, v). V2 scales its keys too: its cosine scores normalise q and k over
    the kept channels only, as the slimmed attention does."""
    c = m.proj.in_features
    win, grid = to_windows(_scaled(x, s_in), m.window_size, m.shift_size)
    cosine = getattr(m, "logit_scale", None) is not None
    q, k, v = F.linear(win, m.qkv.weight, swin_qkv_bias(m, (c, c, c))).chunk(3, dim=-1)
    if s_proj is not None:  # per sample: the same vector in each of its windows
        s = s_proj.repeat_interleave(grid.count, dim=0) if s_proj.dim() > 1 else s_proj
        q, v = _scaled(q, s[..., :c]), _scaled(v, s[..., 2 * c:])
        k = _scaled(k, s[..., c:2 * c]) if cosine else k
    out = window_attend(q, k, v, m.num_heads, swin_position_bias(m), shift_mask(grid, win),
                        scale=swin_scale(m), logit_scale=m.logit_scale if cosine else None,
                        dropout=m.attention_dropout, training=m.training)
    out = F.dropout(F.linear(out, m.proj.weight, m.proj.bias), p=m.dropout, training=m.training)
    return from_windows(out, grid)


def masked_relative_attention(m: nn.Module, x: torch.Tensor, s_in: torch.Tensor | None,
                              s_proj: torch.Tensor | None) -> torch.Tensor:
    """``m(x)`` for torchvision MaxViT's attention ``m`` (on (B, windows, tokens, C) features)
    with its input features scaled by ``s_in`` and its query and value channels by ``s_proj``
    (a (…, 3C) vector over q, k, v; k's part unused, as for ``masked_attention``)."""
    c = m.merge.in_features
    q, k, v = F.linear(_scaled(x, s_in), m.to_qkv.weight, m.to_qkv.bias).chunk(3, dim=-1)
    if s_proj is not None:
        q, v = _scaled(q, s_proj[..., :c]), _scaled(v, s_proj[..., 2 * c:])
    out = relative_attend(q, k, v, m.n_heads, m.scale_factor, maxvit_position_bias(m))
    return F.linear(out, m.merge.weight, m.merge.bias)


def _masked_for(m: nn.Module) -> Callable:
    """The masked reference of a self-attention module of the graph."""
    if isinstance(m, nn.MultiheadAttention):
        return masked_attention
    return masked_relative_attention if isinstance(m, relative_attentions()) else (
        masked_window_attention)


def _mixing_hooks(modules: dict[str, nn.Module], graph: HyperGraph,
                  vectors: Callable[[], Mapping[int, torch.Tensor]]) -> list:
    """Forward hooks that recompute layer norms and self-attention under the vectors."""
    handles = []
    for name, call in _touching(graph, "norm").items():
        if not isinstance(modules[name], nn.LayerNorm):
            continue

        def norm_hook(m: nn.Module, args: tuple, out, call=call):
            scale = expand_layout(call.in_layout, vectors())
            if scale is None:
                return None
            x = args[0]
            dim = x.dim() - 1 if call.channels_last else 1
            w = _broadcast(scale, x, call.channels_last)
            return masked_layer_norm(m, x, w, dim)

        handles.append(modules[name].register_forward_hook(norm_hook))
    for name, call in _touching(graph, "attention").items():

        masked = _masked_for(modules[name])

        def attention_hook(m: nn.Module, args: tuple, out, call=call, masked=masked):
            vec = vectors()
            s_in, s_proj = expand_layout(call.in_layout, vec), expand_layout(call.out_layout, vec)
            if s_in is None and s_proj is None:
                return None
            return masked(m, args[0], s_in, s_proj)

        handles.append(modules[name].register_forward_hook(attention_hook))
    return handles


def mask_model(
    model: nn.Module, graph: HyperGraph, keep: Mapping[int, Sequence[int]]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Zero every channel not in ``keep`` (edge -> kept indices) wherever it is read."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    masks = {}
    for gid, kept in keep.items():
        m = torch.zeros(graph.groups[gid].channels, device=device)
        m[torch.as_tensor(list(kept), dtype=torch.long)] = 1.0
        masks[gid] = m
    return scale_inputs(model, graph, lambda: masks)


def masked_output(model: nn.Module, graph: HyperGraph, plan: Mapping, x: torch.Tensor
                  ) -> torch.Tensor:
    """``model(x)`` (no grad) with every channel not in ``plan`` zeroed where it is read: the
    reference a slimmed or converted model must equal. ``plan`` may empty an edge."""
    handles = mask_model(model, graph, graph.normalize_plan(plan, min_keep=0))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in handles:
            h.remove()
