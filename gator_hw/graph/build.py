"""Trace a model with torch.fx, apply the channel rules, and build the ``HyperGraph``."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
from collections import defaultdict
from types import MappingProxyType

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode

from gator_hw.errors import GatorError
from gator_hw.graph.hypergraph import ChannelGroup, HyperGraph, LayerCall, Seg, Site
from gator_hw.graph.rules import (
    CHANNELS_LAST_RULES,
    CONST_RULES,
    TUPLE_RULES,
    Builder,
    Call,
    Const,
    LastDim,
    Layout,
    ShapeOf,
    TupleOf,
    known_leaves,
    read_shape,
    rule_for,
)

__all__ = ["build_hypergraph", "trace"]


def trace(model: nn.Module, input_shape: tuple[int, ...], name: str = "model") -> fx.GraphModule:
    """Symbolically trace ``model`` (eval mode) and annotate every node with its real shapes.

    The run also counts the forward's FLOPs with ``FlopCounterMode``: ``gm.meta["flops"]``.
    """
    was_training = model.training
    model.eval()
    try:
        try:
            tracer = _Tracer()
            gm = fx.GraphModule(model, tracer.trace(model), type(model).__name__)
        except Exception as exc:  # data-dependent control flow etc.: the user's model
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GatorError(
                f"{name} cannot be traced with torch.fx ({type(exc).__name__}: {msg[:200]}); "
                "remove data-dependent Python control flow from forward()"
            ) from exc
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        example = torch.zeros(input_shape, device=param.device if param is not None else "cpu",
                              dtype=param.dtype if param is not None else None)
        # torch's ShapeProp prints a traceback before it re-raises: keep stderr until the run
        # is known to have worked (then pass on what the model itself printed)
        err = io.StringIO()
        try:
            with (contextlib.redirect_stderr(err), _counted_paths(),
                  FlopCounterMode(display=False) as counter):
                ShapeProp(gm).propagate(example)
            gm.meta["flops"] = int(counter.get_total_flops())
        except Exception as exc:
            raise _run_error(exc, name, tuple(input_shape)) from exc
        sys.stderr.write(err.getvalue())
    finally:
        model.train(was_training)
    return gm


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with the layers of ``known_leaves`` kept as leaves (layer norms
    whose forwards call ``F.layer_norm``: as one call they get the layer-norm rule, and masking
    hooks them as modules; timm's ``Conv2dSame``)."""

    def __init__(self) -> None:
        super().__init__()
        self.leaves = known_leaves()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) in self.leaves or super().is_leaf_module(m, qualname)


def _counted_paths():
    from gator_hw.accounting import _counted_paths as paths  # accounting reads the graph module

    return paths()


#: Words of torch's messages for an input the layers cannot take (the shape is the fix).
_SHAPE_WORDS = ("size", "shape", "dimension", "mat1", "kernel", "expected input", "must match",
                "output size", "too small", "height", "width")


def _run_error(exc: Exception, name: str, shape: tuple[int, ...]) -> GatorError:
    """The one-line error for a model that fails on zeros of ``shape``: out of memory, an input
    its layers cannot take (pass another --input-size), or anything else (its own forward)."""
    while exc.__cause__ is not None and "ShapeProp error" in str(exc):  # fx wraps the real one
        exc = exc.__cause__
    msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, MemoryError) or "out of memory" in msg.lower():
        return GatorError(f"{name} ran out of memory on one input of shape {shape} ({msg}); "
                          "free memory or trace it on the CPU")
    if isinstance(exc, RuntimeError | ValueError | AssertionError) and any(
            w in msg.lower() for w in _SHAPE_WORDS):
        return GatorError(f"{name} does not run on an input of shape {shape} ({msg}); pass an "
                          "--input-size the model accepts")
    return GatorError(f"{name}'s forward raised {type(exc).__name__} on an input of shape "
                      f"{shape} ({msg}); fix the model (it fails outside gator-hw too)")


def _shape(node: object) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _tensor_args(args: tuple, kwargs: dict) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((args, kwargs), lambda n: found.append(n) or n)
    return found


def _readable(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_method":
        return f"Tensor.{node.target} ({node.name})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{target} ({node.name})"


def _run_rules(gm: fx.GraphModule, model: nn.Module) -> tuple[Builder, dict[str, Layout]]:
    b = Builder()
    layouts: dict[fx.Node, Layout | None] = {}
    # the model's own modules: the traced copy shares its leaves but keeps bare shells of the
    # modules it traced through (whose tensors F.batch_norm reads)
    b.modules = modules = dict(model.named_modules())
    for order, node in enumerate(gm.graph.nodes):
        shape = _shape(node)
        if node.op == "placeholder":
            layouts[node] = b.fresh(shape, "network input")
        elif node.op == "get_attr":
            layouts[node] = Const.of(str(node.target), shape) if shape else None
        elif node.op == "output":
            for arg in _tensor_args(node.args, node.kwargs):
                b.freeze(layouts.get(arg), "network output")
        else:
            args = _tensor_args(node.args, node.kwargs)
            call = Call(
                order=order,
                kind=node.op,
                target=node.target,
                name=_readable(node),
                module=modules.get(node.target) if node.op == "call_module" else None,
                args=node.args,
                kwargs=dict(node.kwargs),
                in_layouts=[layouts.get(a) for a in args],
                in_shapes=[_shape(a) for a in args],
                out_shape=shape,
                used=bool(node.users),
            )
            rule = rule_for(call)
            if rule not in TUPLE_RULES:  # a shape read whole: its channel count is read
                for lay in call.in_layouts:
                    if isinstance(lay, ShapeOf):
                        read_shape(b, lay)
                call.in_layouts = [None if isinstance(lay, ShapeOf) else lay
                                   for lay in call.in_layouts]
            if rule not in CONST_RULES:
                call.in_layouts = [b.materialize(lay, shp) for lay, shp in
                                   zip(call.in_layouts, call.in_shapes, strict=True)]
            if rule not in CHANNELS_LAST_RULES and any(
                    isinstance(lay, LastDim) for lay in call.in_layouts):
                rule = None  # channels-last features reach an op that cannot follow them
            if rule not in TUPLE_RULES and any(
                    isinstance(lay, TupleOf) for lay in call.in_layouts):
                rule = None  # a tuple result read other than element by element
            layouts[node] = rule(b, call) if rule is not None else b.unknown(call)
    b.freeze_shared_consts()
    return b, {n.name: lay for n, lay in layouts.items()
               if lay is not None and not isinstance(lay, Const | TupleOf | ShapeOf)}


def _channels_last(node_layouts: dict[str, Layout]) -> frozenset[str]:
    return frozenset(n for n, lay in node_layouts.items() if isinstance(lay, LastDim))


def _unify_shared_modules(b: Builder) -> None:
    """A module called several times reads (and writes) one channel space in every call."""
    by_module: dict[str, list[dict]] = defaultdict(list)
    for lc in b.layer_calls:
        by_module[lc["module"]].append(lc)
    for name, calls in by_module.items():
        for other in calls[1:]:
            b.join(f"shared layer {name}", calls[0]["in_layout"], other["in_layout"])
            b.join(f"shared layer {name}", calls[0]["out_layout"], other["out_layout"])


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix: list[str] = []
    for items in zip(*parts, strict=False):
        if len(set(items)) != 1:
            break
        prefix.append(items[0])
    return ".".join(prefix)


def _group_name(writers: list[str], sites: list[tuple], reasons: list[str]) -> str:
    if not writers:
        if "network input" in reasons:
            return "input"
        return f"{sites[0][1]}:{sites[0][2]}" if sites else "unnamed"
    if len(writers) == 1:
        return writers[0]
    prefix = _common_prefix(writers)
    return f"{prefix}.*" if prefix else f"{writers[0]}+{len(writers) - 1}"


def _finalize(
    b: Builder,
    node_layouts: dict[str, Layout],
    dataflow: dict[str, tuple[str, str, tuple[str, ...]]],
    model_name: str,
    input_shape: tuple[int, ...],
    traced_flops: float,
) -> HyperGraph:
    roots = sorted({b.find(s.sid) for s in b.spaces})
    entries = []
    for sid in roots:
        sp = b.spaces[sid]
        if not sp.sites:
            continue
        sites = sorted(set(sp.sites))
        writers = list(dict.fromkeys(s[1] for s in sites if s[2] in ("out", "dw", "gconv")))
        reasons = list(dict.fromkeys(sp.reasons))
        if not reasons and not any(s[2] == "out" for s in sites):
            reasons.append("no conv or linear layer writes these channels")
        if not reasons and not any(s[2] in ("in", "dw", "gconv", "attn") for s in sites):
            reasons.append("no layer reads these channels")
        last_write = max((s[0] for s in sites if s[2] in ("out", "dw", "gconv")), default=-1)
        key = (bool(reasons), last_write if not reasons else sites[0][0], sid)
        entries.append((key, sid, sp, sites, writers, reasons))
    entries.sort(key=lambda e: e[0])
    gid_of: dict[int, int] = {}
    groups: list[ChannelGroup] = []
    used: set[str] = set()
    for gid, (_, sid, sp, sites, writers, reasons) in enumerate(entries):
        gid_of[sid] = gid
        name = sp.name or _group_name(writers, sites, reasons)
        base, k = name, 1
        while name in used:
            k += 1
            name = f"{base}#{k}"
        used.add(name)
        site_objs = tuple(dict.fromkeys(Site(m, r, off, rep) for _, m, r, off, rep in sites))
        groups.append(ChannelGroup(gid, name, sp.size, site_objs, sp.groups, tuple(reasons)))
    n_edges = sum(1 for g in groups if g.prunable)

    def seg(layout: Layout) -> tuple[Seg, ...]:
        out = []
        for r in layout:
            root = b.find(r.sid)
            if root not in gid_of:  # a space with no site at all: give it a frozen group
                gid_of[root] = len(groups)
                groups.append(
                    ChannelGroup(
                        len(groups),
                        f"unnamed#{root}",
                        b.spaces[root].size,
                        (),
                        1,
                        tuple(b.spaces[root].reasons) or ("no layer reads it",),
                    )
                )
            out.append(Seg(gid_of[root], r.length, r.repeat))
        return tuple(out)

    calls = tuple(
        LayerCall(**{**lc, "in_layout": seg(lc["in_layout"]), "out_layout": seg(lc["out_layout"])})
        for lc in b.layer_calls
    )
    nodes = {name: seg(lay) for name, lay in node_layouts.items()}
    graph = HyperGraph(
        model_name, tuple(input_shape), tuple(groups), n_edges, calls, MappingProxyType(nodes),
        MappingProxyType(dataflow), channels_last=_channels_last(node_layouts),
    )
    from gator_hw.accounting import network_cost  # accounting reads the graph module

    batch = max(1, int(input_shape[0]))
    layers = network_cost(graph, batch=batch).flops
    return dataclasses.replace(graph, fixed_flops=max(0.0, traced_flops - layers) / batch)


def build_hypergraph(
    model: nn.Module, input_shape: tuple[int, ...], name: str = "model"
) -> HyperGraph:
    """Discover the hyperedges of ``model`` for inputs of ``input_shape``, e.g. (1, 3, 224, 224).

    The model is traced with torch.fx in eval mode and run once on zeros to learn every shape.
    Ops without a channel rule freeze the channels they touch (see ``ChannelGroup.frozen_reasons``);
    the FLOPs they do (attention matmuls, functional convs) are ``HyperGraph.fixed_flops``.
    """
    gm = trace(model, input_shape, name)
    b, node_layouts = _run_rules(gm, model)
    _unify_shared_modules(b)
    return _finalize(b, node_layouts, _dataflow(gm), name, input_shape, gm.meta["flops"])


def _dataflow(gm: fx.GraphModule) -> dict[str, tuple[str, str, tuple[str, ...]]]:
    """Node name -> (op, target for call_module else "", input node names), in forward order."""
    return {
        n.name: (n.op, str(n.target) if n.op == "call_module" else "",
                 tuple(a.name for a in n.all_input_nodes))
        for n in gm.graph.nodes
    }
