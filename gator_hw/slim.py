"""Physical slimming: a plan (edge -> kept channel indices) becomes a real, smaller model.

Every layer that touches an edge is sliced at every site of the edge: conv / linear weights
along their output and input dimensions, batch-norm affine parameters and running statistics,
depthwise convs (``groups`` follows the channel count) and grouped convs (each group keeps the
same number of channels, so ``groups`` is unchanged), layer norms, parameters lined up with
channels (layer scale, class token, position embedding), and self-attention, which becomes a
``SlimAttention`` (Swin's window attention: a ``SlimWindowAttention``; MaxViT's: a
``SlimRelativeAttention``). Sizes the model stores
for its forward follow (torchvision ViT's ``hidden_dim``; the channel counts written into a
traced model's reshapes). The result equals the original model with the removed channels
zeroed where they are read (see ``gator_hw.masking``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import fx, nn

from gator_hw.attention import SlimAttention, SlimRelativeAttention, SlimWindowAttention
from gator_hw.errors import GatorError
from gator_hw.graph.hypergraph import HyperGraph, LayerCall, Plan, Seg
from gator_hw.graph.rules import relative_attentions, window_attentions

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
    if isinstance(m, nn.LayerNorm):
        m.normalized_shape = (len(idx),)
    else:
        m.num_features = len(idx)


def _owner(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, attr = path.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


def _slice_param(model: nn.Module, call: LayerCall, idx: torch.Tensor) -> None:
    owner, attr = _owner(model, call.module)
    t = getattr(owner, attr)
    new = t.data.index_select(call.dim, idx.to(t.device)).clone()
    setattr(owner, attr, _param(new) if isinstance(t, nn.Parameter) else new)


def _slim_attention(model: nn.Module, m: nn.Module, call: LayerCall, out_call: LayerCall,
                    keep: Mapping[int, Sequence[int]]) -> None:
    """Replace the self-attention ``m`` (``nn.MultiheadAttention``, Swin's window attention or
    MaxViT's attention) with its slim twin keeping the channels of ``keep``."""
    e = sum(s.width for s in call.out_layout) // 3  # the projection writes q, k, v
    rows = layout_index(call.out_layout, keep)
    idx = (layout_index(call.in_layout, keep), rows[rows < e], rows[rows >= 2 * e] - 2 * e,
           layout_index(out_call.out_layout, keep))
    if isinstance(m, nn.MultiheadAttention):
        new = SlimAttention.from_mha(m, *idx)
    elif isinstance(m, window_attentions()):
        new = SlimWindowAttention(m, *idx)
    elif isinstance(m, relative_attentions()):
        new = SlimRelativeAttention(m, *idx)
    else:
        raise GatorError(f"layer {call.module} is not the self-attention its graph recorded; "
                         "the model does not match the graph it was traced as")
    owner, attr = _owner(model, call.module)
    setattr(owner, attr, new)


def _vit_sizes() -> tuple[type, ...]:
    try:
        from torchvision.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return ()
    return (VisionTransformer,)


_VIT = _vit_sizes()


def _stored_sizes(model: nn.Module) -> None:
    """Sizes torchvision models keep for their forward follow the slimmed layers."""
    for m in model.modules():
        if isinstance(m, _VIT):
            m.hidden_dim = m.conv_proj.out_channels


def _reshape_sizes(gm: fx.GraphModule, graph: HyperGraph, keep: Mapping[int, Sequence[int]]
                   ) -> None:
    """A traced model writes channel counts into its reshapes as numbers: slim them too."""
    changed = False
    for node in gm.graph.nodes:
        reshape = (node.op == "call_method" and node.target in ("reshape", "view")) or (
            node.op == "call_function" and node.target is torch.reshape)
        layout = graph.node_layouts.get(node.name)
        if not reshape or layout is None or not any(s.gid in keep for s in layout):
            continue
        old, new = sum(s.width for s in layout), len(layout_index(layout, keep))
        pos = -1 if node.name in graph.channels_last else 1
        args = list(node.args)
        nested = len(args) == 2 and isinstance(args[1], tuple | list)
        sizes = list(args[1]) if nested else args[1:]
        if len(sizes) > 1 and sizes[pos] == old:
            sizes[pos] = new
            node.args = (args[0], tuple(sizes)) if nested else (args[0], *sizes)
            changed = True
    if changed:
        gm.recompile()


def _touches(call: LayerCall, keep: Mapping[int, Sequence[int]]) -> bool:
    """Whether ``keep`` removes a channel on either side of ``call`` (else: leave it alone)."""
    return any(s.gid in keep for s in (*call.in_layout, *call.out_layout))


def _dims(m: nn.Module, call: LayerCall) -> tuple[int, int] | None:
    """(output, input) channel counts of a layer as its weights say, or None if not a layer."""
    if call.kind == "norm":
        n = getattr(m, "num_features", None)
        if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
            n = m.normalized_shape[0]
        for name in ("running_mean", "weight"):  # a traced model's shell of a norm layer
            t = getattr(m, name, None)
            if n is None and isinstance(t, torch.Tensor):
                n = t.shape[0]
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
    outs = {c.order: c for c in graph.calls if c.kind == "attention_out"}
    done: set[str] = set()
    for call in graph.calls:
        if call.kind in ("attention_core", "attention_out") or call.module in done:
            continue
        out_call = outs.get(call.order) if call.kind == "attention" else None
        if not (_touches(call, keep) or (out_call is not None and _touches(out_call, keep))):
            continue
        done.add(call.module)
        if call.kind == "param":
            if _has_attr(new, call.module):
                with torch.no_grad():
                    _slice_param(new, call, layout_index(call.out_layout, keep))
            elif not missing_ok:
                raise GatorError(f"the model has no parameter {call.module}; it does not match "
                                 "its graph")
            continue
        m = modules.get(call.module)
        if m is None and missing_ok:
            continue
        if m is None:
            raise GatorError(f"the model has no layer {call.module}; it does not match its graph")
        if call.kind == "attention":
            _slim_attention(new, m, call, out_call, keep)
            continue
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
    _stored_sizes(new)
    if isinstance(new, fx.GraphModule) and keep:
        _reshape_sizes(new, graph, keep)
    return new


def _has_attr(model: nn.Module, path: str) -> bool:
    try:
        owner, attr = _owner(model, path)
    except AttributeError:
        return False
    return isinstance(getattr(owner, attr, None), torch.Tensor)
