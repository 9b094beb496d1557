"""Physical slimming: a plan (edge -> kept channel indices) becomes a real, smaller model.

Every layer that touches an edge is sliced at every site of the edge: conv / linear weights
along their output and input dimensions, batch-norm affine parameters and running statistics,
depthwise convs (``groups`` follows the channel count) and grouped convs (each group keeps the
same number of channels, so ``groups`` is unchanged). The result equals the original model with
the removed channels zeroed where they are read (see ``gator_hw.masking``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from gator_hw.errors import GatorError
from gator_hw.graph.hypergraph import HyperGraph, LayerCall, Plan, Seg

__all__ = ["layout_index", "slim"]


def layout_index(layout: Sequence[Seg], keep: Mapping[int, Sequence[int]]) -> torch.Tensor:
    """Positions kept along a layer dimension laid out as ``layout``.

    Groups named in ``keep`` keep those channels (each covering ``repeat`` positions);
    the others keep everything.
    """
    parts, offset = [], 0
    for seg in layout:
        idx = torch.as_tensor(keep.get(seg.gid, range(seg.length)), dtype=torch.long)
        if seg.repeat > 1:
            idx = (idx[:, None] * seg.repeat + torch.arange(seg.repeat)).reshape(-1)
        parts.append(idx + offset)
        offset += seg.length * seg.repeat
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=True)


def _slice_conv(m: nn.Module, call: LayerCall, out_idx: torch.Tensor, in_idx: torch.Tensor):
    w = m.weight.data
    if call.depthwise:
        m.weight = _param(w[out_idx])
        m.in_channels = m.out_channels = m.groups = len(out_idx)
    elif m.groups > 1:
        if call.in_layout != call.out_layout:  # frozen grouped conv: untouched
            return
        g, size = m.groups, m.in_channels // m.groups
        w_out = w[out_idx]
        local = torch.stack([in_idx[in_idx // size == j // size] % size for j in out_idx.tolist()])
        gather = local.reshape(local.shape + (1,) * (w.dim() - 2)).expand(-1, -1, *w.shape[2:])
        m.weight = _param(torch.gather(w_out, 1, gather))
        m.in_channels, m.out_channels = len(in_idx), len(out_idx)
        if len(out_idx) % g:
            raise GatorError(f"{call.module}: kept channels must split evenly over {g} groups")
    else:
        m.weight = _param(w[out_idx][:, in_idx])
        m.in_channels, m.out_channels = len(in_idx), len(out_idx)
    if m.bias is not None:
        m.bias = _param(m.bias.data[out_idx])


def _slice_linear(m: nn.Linear, out_idx: torch.Tensor, in_idx: torch.Tensor) -> None:
    m.weight = _param(m.weight.data[out_idx][:, in_idx])
    if m.bias is not None:
        m.bias = _param(m.bias.data[out_idx])
    m.in_features, m.out_features = len(in_idx), len(out_idx)


def _slice_norm(m: nn.Module, idx: torch.Tensor) -> None:
    if m.weight is not None:
        m.weight = _param(m.weight.data[idx])
    if m.bias is not None:
        m.bias = _param(m.bias.data[idx])
    for name in ("running_mean", "running_var"):
        buf = getattr(m, name, None)
        if buf is not None:
            setattr(m, name, buf[idx].clone())
    m.num_features = len(idx)


def _touches(call: LayerCall, keep: Mapping[int, Sequence[int]]) -> bool:
    """Whether ``keep`` removes a channel on either side of ``call`` (else: leave it alone)."""
    return any(s.gid in keep for s in (*call.in_layout, *call.out_layout))


def _dims(m: nn.Module, call: LayerCall) -> tuple[int, int] | None:
    """(output, input) channel counts of a layer as its weights say, or None if not a layer."""
    if call.kind == "norm":
        n = getattr(m, "num_features", None)
        return (n, n) if n is not None else None
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() < 2:
        return None
    groups = getattr(m, "groups", 1)
    return (w.shape[0], w.shape[0]) if call.depthwise else (w.shape[0], w.shape[1] * groups)


def _check_shape(m: nn.Module, call: LayerCall) -> None:
    """GatorError unless ``m``'s weights have the channel counts its graph recorded."""
    want = (sum(s.width for s in call.out_layout), sum(s.width for s in call.in_layout))
    have = _dims(m, call)
    if have != want:
        raise GatorError(
            f"layer {call.module} has {have[0] if have else '?'} outputs and "
            f"{have[1] if have else '?'} inputs but its graph says {want[0]} and {want[1]}; "
            "the model does not match the graph it was traced as (rebuild the graph)"
        )


def slim(model: nn.Module, graph: HyperGraph, plan: Plan, *, missing_ok: bool = False) -> nn.Module:
    """Return a smaller copy of ``model`` keeping the channels of ``plan`` (original untouched).

    ``plan`` maps edge index (or name) to kept channel indices; edges it does not name keep all
    their channels. Every edge must keep at least one channel. With ``missing_ok``, layers of
    the graph that the model no longer has (folded away by conversion) are skipped.
    """
    keep = {g: idx for g, idx in graph.normalize_plan(plan).items()
            if len(idx) < graph.edges[g].channels}
    new = copy.deepcopy(model)
    modules = dict(new.named_modules())
    done: set[str] = set()
    for call in graph.calls:
        if call.module in done or not _touches(call, keep):
            continue
        done.add(call.module)
        m = modules.get(call.module)
        if m is None and missing_ok:
            continue
        if m is None:
            raise GatorError(f"the model has no layer {call.module}; it does not match its graph")
        _check_shape(m, call)
        out_idx = layout_index(call.out_layout, keep)
        in_idx = layout_index(call.in_layout, keep)
        with torch.no_grad():
            if call.kind == "conv":
                _slice_conv(m, call, out_idx, in_idx)
            elif call.kind == "linear":
                _slice_linear(m, out_idx, in_idx)
            elif call.kind == "norm":
                _slice_norm(m, out_idx)
    return new
