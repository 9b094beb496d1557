"""Channel rules: how each op passes channel index spaces from its inputs to its output.

A rule is a small function registered for a module type, a function or a method name. It gets
the ``Builder`` (the union-find of channel spaces under construction) and the traced ``Call``
and returns the output's channel layout (a tuple of ``(space, length, repeat)`` runs), or
``None`` for a non-tensor result. An op with no rule freezes every channel it touches and
records the op as the reason: we never guess.

Register a rule for your own layer with::

    @channel_rule(MyLayer)
    def _my_layer(b: Builder, call: Call) -> Layout:
        return b.passthrough(call)
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gator_hw.errors import GatorError

__all__ = [
    "CHANNELS_LAST_RULES", "CONST_RULES", "TUPLE_RULES",
    "Builder", "Call", "Const", "LastDim", "Layout", "Run", "ShapeOf", "Space", "TupleOf",
    "channel_rule", "known_leaves", "layer_norms_2d", "layer_norms_last", "read_shape",
    "relative_attentions", "rule_for", "window_attentions", "window_partitions",
]


@dataclass
class Space:
    """A channel index space under construction (union-find node)."""

    sid: int
    size: int
    parent: int
    sites: list = field(default_factory=list)  # (order, module, role, offset, repeat)
    reasons: list[str] = field(default_factory=list)
    groups: int = 1
    name: str | None = None  # a name the group keeps (attention's ``:qk`` / ``:v``)


@dataclass(frozen=True)
class Run:
    """``length`` channels of space ``sid``, each covering ``repeat`` positions."""

    sid: int
    length: int
    repeat: int = 1


Layout = tuple[Run, ...]


class LastDim(tuple):
    """The layout of a channels-last tensor's last dim, ``(batch, ..., features)``: what a
    Linear on tokens writes. Only Linear and pointwise ops pass it on; any other op freezes it
    (see ``CHANNELS_LAST_RULES``)."""

    __slots__ = ()


@dataclass(frozen=True)
class Const:
    """A parameter or buffer read with ``get_attr`` (``target``), possibly expanded to
    ``shape``: it has no channels of its own until an elementwise op or a concatenation lines
    one of its dims up with channels (layer scale, class token, position embedding). Any other
    op sees it as a frozen constant."""

    target: str
    param_shape: tuple[int, ...]
    shape: tuple[int, ...]
    dims: tuple[int, ...] = ()  # per dim of ``shape``: the parameter's dim there (-1: none)

    @classmethod
    def of(cls, target: str, shape: tuple[int, ...]) -> Const:
        return cls(target, shape, shape, tuple(range(len(shape))))

    def reshaped(self, shape: tuple[int, ...]) -> Const | None:
        """As reshaped to ``shape`` when that only adds or drops size-1 dims (else None)."""
        if [n for n in self.shape if n != 1] != [n for n in shape if n != 1]:
            return None
        real = iter(d for d, n in zip(self.dims, self.shape, strict=True) if n != 1)
        return Const(self.target, self.param_shape, shape,
                     tuple(next(real) if n != 1 else -1 for n in shape))


@dataclass(frozen=True)
class ShapeOf:
    """The shape of a tensor with channels (``x.shape``, ``x.size()``): which of its ``rank``
    entries is the channel count (``cdim``). Reading that entry as a number ties the code to
    the channel count (timm's ``B, N, C = x.shape`` then ``reshape(B, N, C)``), so a used read
    freezes the channels."""

    layout: tuple
    rank: int
    cdim: int


class TupleOf(tuple):
    """The layouts of a tuple result (``MultiheadAttention``'s (output, weights)), one per
    element (None where it has none); only ``getitem`` reads it."""

    __slots__ = ()


@dataclass
class Call:
    """One traced op: its target, module (for call_module), inputs and output metadata."""

    order: int
    kind: str  # call_module | call_function | call_method
    target: Any
    name: str  # module qualified name, or a readable op name
    module: nn.Module | None
    args: tuple
    kwargs: dict
    in_layouts: list[Layout | None]  # per tensor argument (flattened args order)
    in_shapes: list[tuple[int, ...] | None]
    out_shape: tuple[int, ...] | None
    used: bool = True  # whether any node reads the result

    def arg(self, i: int, key: str, default: Any = None) -> Any:
        if i < len(self.args):
            return self.args[i]
        return self.kwargs.get(key, default)


RuleFn = Callable[["Builder", Call], "Layout | None"]
_RULES: dict[Any, RuleFn] = {}


def _check_key(key: Any) -> None:
    """GatorError for a key no traced call can ever have."""
    if isinstance(key, str):
        name = key.removeprefix("method:")
        if key.startswith("method:") and name.isidentifier():
            return
        fix = f"'method:{name}' for the Tensor method" if name.isidentifier() else "a name"
        raise GatorError(
            f"channel_rule key {key!r} can never match a traced call: give a module class "
            f"(nn.ReLU), a function (torch.relu, F.relu) or {fix}"
        )
    if not callable(key):
        raise GatorError(
            f"channel_rule key {key!r} is not a module class, a function or 'method:NAME'"
        )


def channel_rule(*keys: Any) -> Callable[[RuleFn], RuleFn]:
    """Register a rule for module types, functions or method names (``"method:relu"``).

    A key that no traced call can have (a bare ``"relu"``, a number) is a GatorError.
    """
    if not keys:
        raise GatorError("channel_rule needs at least one key (a module class, a function or "
                         "'method:NAME')")
    for key in keys:
        _check_key(key)

    def deco(fn: RuleFn) -> RuleFn:
        for key in keys:
            if key in _RULES:
                raise ValueError(f"a channel rule for {key!r} is already registered")
            _RULES[key] = fn
        return fn

    return deco


def rule_for(call: Call) -> RuleFn | None:
    """The registered rule for a call (module types by exact type, then by base class)."""
    if call.kind == "call_module":
        for cls in type(call.module).__mro__:
            if cls in _RULES:
                return _RULES[cls]
        return None
    if call.kind == "call_method":
        return _RULES.get(f"method:{call.target}")
    return _RULES.get(call.target)


class Builder:
    """Union-find over channel spaces, plus the weighted layer calls seen so far."""

    def __init__(self) -> None:
        self.spaces: list[Space] = []
        self.layer_calls: list[dict] = []
        self.const_sites: dict[str, list[Layout]] = {}  # constant -> layouts it is a site of
        self.const_other: set[str] = set()  # constants also read by an op without a rule
        self.modules: dict[str, nn.Module] = {}  # the traced model's modules, by name

    # -- union-find -----------------------------------------------------------------------
    def new_space(self, size: int, reason: str | None = None) -> int:
        sid = len(self.spaces)
        self.spaces.append(Space(sid, size, sid, reasons=[reason] if reason else []))
        return sid

    def find(self, sid: int) -> int:
        root = sid
        while self.spaces[root].parent != root:
            root = self.spaces[root].parent
        while self.spaces[sid].parent != root:  # path compression
            self.spaces[sid].parent, sid = root, self.spaces[sid].parent
        return root

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        sa, sb = self.spaces[ra], self.spaces[rb]
        if sa.size != sb.size:
            raise RuntimeError(f"channel spaces of size {sa.size} and {sb.size} cannot be joined")
        if rb < ra:
            ra, rb, sa, sb = rb, ra, sb, sa
        sb.parent = ra
        sa.sites += sb.sites
        sa.reasons += sb.reasons
        sa.groups = math.lcm(sa.groups, sb.groups)
        sa.name = sa.name or sb.name
        return ra

    def freeze(self, layout: Layout | None, reason: str) -> None:
        if isinstance(layout, TupleOf):
            for part in layout:
                self.freeze(part, reason)
            return
        if isinstance(layout, Const):
            self.const_other.add(layout.target)
            return
        for run in layout or ():
            reasons = self.spaces[self.find(run.sid)].reasons
            if reason not in reasons:
                reasons.append(reason)

    def add_site(self, layout: Layout, order: int, module: str, role: str) -> None:
        offset = 0
        for run in layout:
            self.spaces[self.find(run.sid)].sites.append((order, module, role, offset, run.repeat))
            offset += run.length * run.repeat

    # -- helpers for rules ----------------------------------------------------------------
    def fresh(self, shape: tuple[int, ...] | None, reason: str | None = None) -> Layout | None:
        """A new space for the channel dim (dim 1) of ``shape``; None for non-tensors/scalars."""
        if shape is None or len(shape) < 2:
            return None
        return (Run(self.new_space(shape[1], reason), shape[1]),)

    def unknown(self, call: Call, why: str | None = None) -> Layout | None:
        """Freeze every channel the op touches; its output gets a new frozen space."""
        reason = why or f"used by {call.name}, which has no channel rule"
        for layout in call.in_layouts:
            self.freeze(layout, reason)
        return self.fresh(call.out_shape, f"produced by {call.name}, which has no channel rule")

    def passthrough(self, call: Call) -> Layout | None:
        """Per-channel op (activation, pooling, dropout): output channels are input channels."""
        first = call.in_layouts[0] if call.in_layouts else None
        in_shape = call.in_shapes[0] if call.in_shapes else None
        out = call.out_shape
        if first is None or out is None or in_shape is None:
            return self.unknown(call)
        if len(out) < 2 or len(in_shape) < 2 or out[1] != in_shape[1] or out[0] != in_shape[0]:
            return self.unknown(call, f"{call.name} changes the channel dimension")
        return first

    def join_all(self, what: str, layouts: list[Layout]) -> Layout:
        """``join`` over several channel-aligned layouts, in order."""
        out = layouts[0]
        for lay in layouts[1:]:
            out = self.join(what, out, lay)
        return out

    def join(self, what: str, a: Layout, b: Layout) -> Layout:
        """Elementwise op of two channel-aligned tensors: their channels become one space."""
        if [r.length for r in a] == [r.length for r in b] and all(
            ra.repeat == rb.repeat for ra, rb in zip(a, b, strict=True)
        ):
            return tuple(
                Run(self.union(ra.sid, rb.sid), ra.length, ra.repeat)
                for ra, rb in zip(a, b, strict=True)
            )
        reason = f"{what} combines tensors with different channel concatenations"
        self.freeze(a, reason)
        self.freeze(b, reason)
        return a

    def materialize(self, layout: Any, shape: tuple[int, ...] | None) -> Layout | None:
        """A ``Const`` as the frozen channel space of its dim 1 (what every rule that does not
        know constants gets); other layouts unchanged."""
        if not isinstance(layout, Const):
            return layout
        self.const_other.add(layout.target)
        return self.fresh(shape, f"constant tensor {layout.target}")

    def const_site(self, call: Call, const: Const, dim: int, layout: Layout) -> None:
        """``const``'s dim ``dim`` (in its own shape) carries the channels of ``layout``."""
        if any(r.repeat != 1 for r in layout):
            self.freeze(layout, f"constant tensor {const.target} meets flattened channels")
            return
        self.add_site(layout, call.order, const.target, "param")
        per = math.prod(const.param_shape) // max(1, const.param_shape[dim])
        self.record_layer(call, "param", layout, layout, module=const.target, dim=dim,
                          spatial_in=per, spatial_out=per)
        self.const_sites.setdefault(const.target, []).append(layout)

    def freeze_shared_consts(self) -> None:
        """A constant that is a channel site and also read by an op without a rule cannot be
        sliced: freeze the channels it lines up with."""
        for target, layouts in self.const_sites.items():
            if target in self.const_other:
                for lay in layouts:
                    self.freeze(lay, f"constant tensor {target} is also read by an op without "
                                     "a channel rule")

    def record_layer(self, call: Call, kind: str, in_layout: Layout, out_layout: Layout, *,
                     module: str | None = None, **kw: Any):
        self.layer_calls.append(
            dict(
                module=module or call.name,
                kind=kind,
                order=call.order,
                in_layout=in_layout,
                out_layout=out_layout,
                **kw,
            )
        )


def _spatial(shape: tuple[int, ...] | None) -> tuple[int, tuple[int, ...]]:
    hw = tuple(shape[2:]) if shape is not None else ()
    return math.prod(hw) if hw else 1, hw


# -------------------------------------------------------------------------------------------
# weighted layers
# -------------------------------------------------------------------------------------------
@channel_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(b: Builder, call: Call) -> Layout | None:
    m = call.module
    x = call.in_layouts[0] if call.in_layouts else None
    if x is None or call.out_shape is None or any(r.repeat != 1 for r in x):
        return b.unknown(call, f"{call.name} reads a flattened input")
    cin, cout, g = m.in_channels, m.out_channels, m.groups
    k = math.prod(m.kernel_size)
    s_in, hw_in = _spatial(call.in_shapes[0])
    s_out, hw_out = _spatial(call.out_shape)
    stride = int(m.stride[0]) if isinstance(m.stride, tuple) else int(m.stride)
    common = dict(
        kernel=k,
        groups=g,
        bias=m.bias is not None,
        spatial_in=s_in,
        spatial_out=s_out,
        stride=stride,
        in_hw=hw_in,
        out_hw=hw_out,
    )
    if g == 1:
        out = b.fresh(call.out_shape)
        b.add_site(x, call.order, call.name, "in")
        b.add_site(out, call.order, call.name, "out")
        b.record_layer(call, "conv", x, out, **common)
        return out
    if g == cin == cout:  # depthwise: output channel c reads input channel c only
        b.add_site(x, call.order, call.name, "dw")
        b.record_layer(call, "conv", x, x, depthwise=True, **common)
        return x
    if cin == cout and len(x) == 1:  # grouped, in == out: one space, pruned evenly per group
        sp = b.spaces[b.find(x[0].sid)]
        sp.groups = math.lcm(sp.groups, g)
        b.add_site(x, call.order, call.name, "gconv")
        b.record_layer(call, "conv", x, x, **common)
        return x
    out = b.unknown(call, f"{call.name} is a grouped conv with in != out channels")
    b.record_layer(call, "conv", x, out, **common)
    return out


@channel_rule(nn.Linear)
def _linear(b: Builder, call: Call) -> Layout | None:
    m = call.module
    x = call.in_layouts[0] if call.in_layouts else None
    shape = call.in_shapes[0] if call.in_shapes else None
    if shape is not None and len(shape) > 2:
        return _linear_on_last_dim(b, call, shape)
    if x is None or shape is None or len(shape) != 2:
        return b.unknown(call, f"{call.name} reads a tensor that is not (batch, features)")
    out = b.fresh(call.out_shape)
    b.add_site(x, call.order, call.name, "in")
    b.add_site(out, call.order, call.name, "out")
    b.record_layer(call, "linear", x, out, bias=m.bias is not None)
    return out


def _linear_on_last_dim(b: Builder, call: Call, shape: tuple[int, ...]) -> Layout | None:
    """A Linear on a (B, ..., C) tensor (ViT, Swin, ConvNeXt MLPs): features are the last dim.

    It reads the input's last-dim layout where a Linear or a pointwise op made it (an MLP's
    hidden channels: prunable), else a new frozen space (the tokens' features come from an op
    without a rule: LayerNorm, a permute); whatever dim 1 carried is frozen, the dims between
    batch and features count as positions. The output is a new channels-last space.
    """
    m = call.module
    x = call.in_layouts[0] if call.in_layouts else None
    tokens = math.prod(shape[1:-1])
    if isinstance(x, LastDim) and sum(r.length * r.repeat for r in x) == m.in_features:
        feat_in: Layout = x
    else:
        why = f"{call.name} reads channels-last features that no channel rule follows"
        b.freeze(x, why)
        feat_in = LastDim((Run(b.new_space(m.in_features, why), m.in_features),))
    out = LastDim((Run(b.new_space(m.out_features), m.out_features),))
    b.add_site(feat_in, call.order, call.name, "in")
    b.add_site(out, call.order, call.name, "out")
    b.record_layer(call, "linear", feat_in, out, bias=m.bias is not None,
                   spatial_in=tokens, spatial_out=tokens, channels_last=True)
    return out


@channel_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batchnorm(b: Builder, call: Call) -> Layout | None:
    x = b.passthrough(call)
    if x is not None and call.in_layouts[0] is x:
        _norm_site(b, call, x, call.name, call.module.affine)
    return x


def _norm_site(b: Builder, call: Call, x: Layout, module: str, affine: bool) -> None:
    """``module`` is a per-channel affine norm (batch norm) of ``x``'s channels."""
    b.add_site(x, call.order, module, "norm")
    s, hw = _spatial(call.out_shape)
    b.record_layer(call, "norm", x, x, module=module, bias=affine, spatial_in=s, spatial_out=s,
                   in_hw=hw, out_hw=hw)


# -------------------------------------------------------------------------------------------
# per-channel ops
# -------------------------------------------------------------------------------------------
_PASS_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.AlphaDropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
def _stochastic_depth() -> tuple[Callable, ...]:
    """torchvision's ``stochastic_depth``: it drops whole samples (or the whole batch), so it is
    per element on channels-first and channels-last tensors alike."""
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return ()
    return (stochastic_depth,)


_PASS_FUNCTIONS = tuple(
    dict.fromkeys(
        (  # some F.* are the torch.* builtins themselves
            F.relu,
            F.relu_,
            F.relu6,
            F.silu,
            F.gelu,
            F.hardswish,
            F.hardsigmoid,
            F.leaky_relu,
            F.elu,
            F.mish,
            F.sigmoid,
            F.tanh,
            torch.relu,
            torch.relu_,
            torch.sigmoid,
            torch.tanh,
            F.dropout,
            F.dropout2d,
            F.max_pool2d,
            F.avg_pool2d,
            F.adaptive_avg_pool2d,
            F.adaptive_max_pool2d,
            torch.clone,
            *_stochastic_depth(),
        )
    )
)
_PASS_METHODS = tuple(
    f"method:{m}" for m in ("relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float")
)


#: per-channel ops that are also per-element (no pooling, no whole-channel dropout): the only
#: ones a channels-last layout passes through
_POINTWISE = (
    *(m for m in _PASS_MODULES if not issubclass(m, nn.modules.pooling._MaxPoolNd
                                                  | nn.modules.pooling._AvgPoolNd
                                                  | nn.modules.pooling._AdaptiveAvgPoolNd
                                                  | nn.modules.pooling._AdaptiveMaxPoolNd
                                                  | nn.Dropout2d)),
    *(f for f in _PASS_FUNCTIONS if "pool" not in getattr(f, "__name__", "")
      and f is not F.dropout2d),
    *_PASS_METHODS,
)


def _pointwise(call: Call) -> bool:
    if call.kind == "call_module":
        return isinstance(call.module, tuple(m for m in _POINTWISE if isinstance(m, type)))
    key = f"method:{call.target}" if call.kind == "call_method" else call.target
    return key in _POINTWISE


@channel_rule(*_PASS_MODULES, *_PASS_FUNCTIONS, *_PASS_METHODS)
def _per_channel(b: Builder, call: Call) -> Layout | None:
    x = call.in_layouts[0] if call.in_layouts else None
    if isinstance(x, LastDim):
        if _pointwise(call) and call.out_shape == call.in_shapes[0]:
            return x
        return b.unknown(call, f"{call.name} is not per-element on channels-last features")
    return b.passthrough(call)


@channel_rule(nn.Flatten, torch.flatten, "method:flatten")
def _flatten(b: Builder, call: Call) -> Layout | None:
    start = call.arg(1, "start_dim", 1)
    end = call.arg(2, "end_dim", -1)
    if call.kind == "call_module":
        start, end = call.module.start_dim, call.module.end_dim
    x, shape = call.in_layouts[0], call.in_shapes[0]
    if x is None or shape is None:
        return b.unknown(call, f"{call.name} flattens other than (batch, features)")
    start, end = start % len(shape), end % len(shape)
    if start >= 2 and not isinstance(x, LastDim) and all(r.repeat == 1 for r in x):
        return x  # positions only (a patch embedding's (N, C, H, W) -> (N, C, H*W))
    if isinstance(x, LastDim) and start >= 1 and end < len(shape) - 1:
        return x
    if isinstance(x, LastDim) or start != 1 or end != len(shape) - 1:
        return b.unknown(call, f"{call.name} flattens other than (batch, features)")
    return _flattened(x, shape)


def _flattened(x: Layout, shape: tuple[int, ...]) -> Layout:
    """``x``'s channels after flattening ``shape`` into (batch, features): each channel
    covers its H x W (...) positions."""
    rep = math.prod(shape[2:]) if len(shape) > 2 else 1
    return tuple(Run(r.sid, r.length, r.repeat * rep) for r in x)


@channel_rule("method:view", "method:reshape", torch.reshape)
def _reshape(b: Builder, call: Call) -> Layout | None:
    """Flatten into (batch, features); or a reshape of the positions only, which keeps the
    batch and the channel dim (dim 1, or the last dim of channels-last features); a constant
    given or stripped of size-1 dims (timm's ``gamma.reshape(1, -1, 1, 1)``) stays one."""
    shape, out, x = call.in_shapes[0], call.out_shape, call.in_layouts[0]
    if isinstance(x, Const):
        const = x.reshaped(tuple(out)) if out is not None else None
        return const if const is not None else b.unknown(call)
    if shape is None or out is None or x is None or len(shape) < 2 or out[0] != shape[0]:
        return b.unknown(call, f"{call.name} reshapes channels")
    if isinstance(x, LastDim):
        if len(out) >= 3 and out[-1] == shape[-1]:
            return x
    elif len(out) == 2:
        return _flattened(x, shape)
    elif len(out) >= 3 and out[1] == shape[1] and all(r.repeat == 1 for r in x):
        return x
    return b.unknown(call, f"{call.name} reshapes channels")


def _permutation(call: Call) -> tuple[int, ...] | None:
    rest = call.args[1:] if call.kind == "call_method" else call.args[1:2]
    dims = call.kwargs.get("dims", rest[0] if len(rest) == 1 else rest)
    if isinstance(dims, int):
        dims = (dims,)
    if not isinstance(dims, tuple | list) or not all(isinstance(d, int) for d in dims):
        return None
    return tuple(d % len(dims) for d in dims)


#: ops that swap two dims (``swapaxes`` names them axis0 / axis1)
_SWAPS = (torch.transpose, "transpose", torch.swapaxes, "swapaxes", torch.swapdims, "swapdims")


def _swap(call: Call, rank: int) -> tuple[int, ...] | None:
    """``transpose(a, b)`` (``swapaxes``, ``swapdims``) as a permutation of ``rank`` dims."""
    a = call.arg(1, "dim0", call.kwargs.get("axis0"))
    c = call.arg(2, "dim1", call.kwargs.get("axis1"))
    if not isinstance(a, int) or not isinstance(c, int):
        return None
    dims = list(range(rank))
    dims[a % rank], dims[c % rank] = dims[c % rank], dims[a % rank]
    return tuple(dims)


@channel_rule(torch.permute, "method:permute", torch.transpose, "method:transpose",
              torch.swapaxes, "method:swapaxes", torch.swapdims, "method:swapdims")
def _permute(b: Builder, call: Call) -> Layout | None:
    """Channels-first <-> channels-last (ConvNeXt's blocks, a ViT's patch tokens): the channel
    dim moves to the last place or back to dim 1; the batch stays first. Positions may swap
    among themselves (MaxViT's grid attention swaps its windows and their tokens)."""
    x, shape = call.in_layouts[0], call.in_shapes[0]
    swap = call.target in _SWAPS
    dims = (_swap(call, len(shape)) if shape is not None else None) if swap else _permutation(call)
    if x is None or shape is None or dims is None or len(dims) != len(shape) or dims[0] != 0:
        return b.unknown(call)
    last = len(shape) - 1
    if any(r.repeat != 1 for r in x):
        return b.unknown(call, f"{call.name} permutes flattened channels")
    if isinstance(x, LastDim):
        if dims[1] == last:
            return tuple(x)
        return x if dims[-1] == last else b.unknown(call)
    if dims[-1] == 1:
        return LastDim(x)
    return x if dims[1] == 1 else b.unknown(call)


@channel_rule("method:expand")
def _expand(b: Builder, call: Call) -> Layout | None:
    """A constant expanded to the batch (ViT's class token) stays a constant."""
    x, out = call.in_layouts[0], call.out_shape
    if isinstance(x, Const) and out is not None:
        lead = (-1,) * (len(out) - len(x.shape))
        return Const(x.target, x.param_shape, tuple(out), lead + x.dims)
    return b.unknown(call, f"{call.name} expands a tensor with channels")


@channel_rule("method:mean", torch.mean, "method:amax", torch.amax)
def _reduce(b: Builder, call: Call) -> Layout | None:
    dims = call.arg(1, "dim", None)
    dims = (dims,) if isinstance(dims, int) else dims
    shape = call.in_shapes[0]
    if dims is None or shape is None:
        return b.unknown(call)
    dims = {d % len(shape) for d in dims}
    if 0 in dims or 1 in dims:
        return b.unknown(call, f"{call.name} reduces over channels")
    return call.in_layouts[0]


# -------------------------------------------------------------------------------------------
# joins: residual add, channel-wise multiply (squeeze-excitation), concatenation
# -------------------------------------------------------------------------------------------
@channel_rule(
    operator.add,
    operator.iadd,
    torch.add,
    operator.sub,
    torch.sub,
    operator.mul,
    operator.imul,
    torch.mul,
    operator.truediv,
    torch.div,
    "method:add",
    "method:add_",
    "method:mul",
    "method:mul_",
)
def _elementwise(b: Builder, call: Call) -> Layout | None:
    """Residual adds, layer scales, channel-wise multiplies (squeeze-excitation).

    Inputs broadcast from the right, so an input's channel dim is the one lined up with the
    output's (dim 1, or the last dim of channels-last features); an input whose lined-up dim
    is 1 (or missing) has no channels. Channel inputs become one space; a constant lined up
    with the channels (layer scale, position embedding) becomes a ``param`` site of it.
    """
    out_shape = call.out_shape
    if out_shape is None:
        return None
    tensors = [(lay, shp) for lay, shp in zip(call.in_layouts, call.in_shapes, strict=True)
               if shp is not None]
    if len(out_shape) < 2:
        return b.unknown(call) if any(lay is not None for lay, _ in tensors) else None
    last = any(isinstance(lay, LastDim) for lay, _ in tensors)
    cdim = len(out_shape) - 1 if last else 1
    channel: list[Layout] = []
    consts: list[tuple[Const, int]] = []
    for lay, shp in tensors:
        d = cdim - (len(out_shape) - len(shp))
        if d < 0 or shp[d] == 1:
            continue  # broadcast over the channels
        if isinstance(lay, Const):
            consts.append((lay, d))
        elif lay is None or isinstance(lay, TupleOf):
            return b.unknown(call)
        elif isinstance(lay, LastDim) or d == 1 and (not last or d == len(shp) - 1):
            channel.append(lay)
        else:
            return b.unknown(call, f"{call.name} broadcasts over channels")
    if not channel:
        if consts or any(isinstance(lay, Const) for lay, _ in tensors):
            return b.unknown(call)
        return tensors[0][0] if tensors else None
    out = b.join_all(call.name, channel)
    for const, d in consts:
        _const_on(b, call, const, d, out)
    return LastDim(out) if last else tuple(out)


def _const_on(b: Builder, call: Call, const: Const, d: int, layout: Layout) -> None:
    """``const``'s dim ``d`` (of its expanded shape) lines up with ``layout``'s channels."""
    dim = const.dims[d]
    if dim < 0 or const.param_shape[dim] == 1:
        return  # expanded over the channels: it has none of its own
    b.const_site(call, const, dim, layout)


@channel_rule(torch.cat, torch.concat)
def _cat(b: Builder, call: Call) -> Layout | None:
    """Along the channels: their runs in order. Along the positions of channels-last features
    (ViT's class token before its patch tokens): one space, constants become sites of it."""
    out = call.out_shape
    if out is None or len(out) < 2:
        return b.unknown(call)
    dim = call.arg(1, "dim", 0) % len(out)
    layouts = call.in_layouts
    if any(isinstance(lay, LastDim) for lay in layouts):
        if dim == len(out) - 1 and all(isinstance(lay, LastDim) for lay in layouts):
            return LastDim(run for lay in layouts for run in lay)
        if dim in (0, len(out) - 1) or not all(isinstance(lay, LastDim | Const)
                                               for lay in layouts):
            return b.unknown(call, f"{call.name} concatenates along a dimension other than "
                                   "channels")
        joined = b.join_all(call.name, [lay for lay in layouts if isinstance(lay, LastDim)])
        for lay in layouts:
            if isinstance(lay, Const):
                _const_on(b, call, lay, len(lay.shape) - 1, joined)
        return LastDim(joined)
    if dim != 1:
        return b.unknown(call, f"{call.name} concatenates along a dimension other than channels")
    if any(lay is None or isinstance(lay, Const | TupleOf) for lay in layouts):
        return b.unknown(call)
    return tuple(run for lay in layouts for run in lay)


def _getattr_like(b: Builder, call: Call) -> Layout | ShapeOf | None:
    """Shape queries pass on which entry is the channel count (``ShapeOf``); a used
    ``x.size(channel dim)`` freezes the channels; other non-tensor results pass nothing on."""
    if call.out_shape is not None:
        return b.unknown(call)
    x, shape = (call.in_layouts[0], call.in_shapes[0]) if call.in_layouts else (None, None)
    if not isinstance(x, tuple) or isinstance(x, TupleOf) or shape is None or len(shape) < 2:
        return None
    cdim = len(shape) - 1 if isinstance(x, LastDim) else 1
    of = ShapeOf(x, len(shape), cdim)
    if call.kind == "call_function" and call.target is getattr:
        return of if call.arg(1, "name") == "shape" else None
    if call.kind == "call_method" and call.target == "size":
        dim = call.arg(1, "dim")
        if dim is None:
            return of
        if isinstance(dim, int) and dim % len(shape) == cdim and call.used:
            read_shape(b, of)
    return None


#: why a read channel count freezes the channels
_READS_CHANNELS = "its channel count is read as a number (x.shape / x.size())"

channel_rule(getattr, "method:size", "method:dim")(_getattr_like)


def read_shape(b: Builder, of: ShapeOf) -> None:
    """A shape passed whole to an op (``x.view(s)``): its channel count is read."""
    b.freeze(of.layout, _READS_CHANNELS)


def _keeps_last_dim(index: Any, rank: int) -> bool:
    """Whether ``x[index]`` keeps the batch whole and leaves the last dim alone."""
    items = index if isinstance(index, tuple) else (index,)
    if any(not isinstance(i, int | slice) and i is not Ellipsis for i in items):
        return False  # tensors (advanced indexing), None (new axes)
    if not items or items[0] != slice(None):
        return False
    if Ellipsis in items:
        tail = items[items.index(Ellipsis) + 1:]
        return not tail or tail[-1] == slice(None)
    return len(items) < rank or items[-1] == slice(None)


@channel_rule(operator.getitem)
def _getitem(b: Builder, call: Call) -> Layout | None:
    """An element of a tuple result; positions picked from channels-last features (ViT's
    ``x[:, 0]``: the class token, a (batch, features) tensor)."""
    src = call.in_layouts[0] if call.in_layouts else None
    index = call.args[1] if len(call.args) > 1 else None
    if isinstance(src, ShapeOf):
        return _shape_entry(b, call, src, index)
    if isinstance(src, TupleOf):
        if isinstance(index, int) and -len(src) <= index < len(src):
            return src[index]
        return b.unknown(call)
    shape, out = call.in_shapes[0] if call.in_shapes else None, call.out_shape
    if (isinstance(src, LastDim) and shape is not None and out is not None and len(out) >= 2
            and out[0] == shape[0] and out[-1] == shape[-1]
            and _keeps_last_dim(index, len(shape))):
        return src if len(out) > 2 else tuple(src)
    return _getattr_like(b, call)


def _shape_entry(b: Builder, call: Call, of: ShapeOf, index: Any) -> ShapeOf | None:
    """``x.shape[i]`` (used: freezes the channels if ``i`` is the channel dim) or a slice."""
    if isinstance(index, slice):
        picked = list(range(of.rank))[index]
        return ShapeOf(of.layout, len(picked), picked.index(of.cdim)) if of.cdim in picked else None
    if call.used and (not isinstance(index, int) or index % of.rank == of.cdim):
        read_shape(b, of)
    return None


# -------------------------------------------------------------------------------------------
# transformers: layer norm over the channels, multi-head attention
# -------------------------------------------------------------------------------------------
def _classes(*paths: str) -> tuple[type, ...]:
    """The classes of ``module:Name`` paths, from torchvision and from packages a model already
    imported (timm is never imported here: a timm model has imported it)."""
    import importlib
    import sys

    found = []
    for path in paths:
        module, _, name = path.partition(":")
        if not module.startswith("torchvision") and module.split(".")[0] not in sys.modules:
            continue
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def layer_norms_2d() -> tuple[type, ...]:
    """Layer norms that normalise dim 1 of a channels-first tensor (torchvision's and timm's
    LayerNorm2d: ConvNeXt's stem, downsampling and head); traced as leaves."""
    return _classes("torchvision.models.convnext:LayerNorm2d", "timm.layers:LayerNorm2d")


def layer_norms_last() -> tuple[type, ...]:
    """Layer-norm classes whose forward is ``nn.LayerNorm``'s (timm's LayerNorm); leaves too."""
    return (nn.LayerNorm, *_classes("timm.layers:LayerNorm"))


def known_leaves() -> tuple[type, ...]:
    """Layers traced as one call whose forward gator-hw knows: the layer norms above, timm's
    ``Conv2dSame`` (a conv after padding computed from the input's size, which torch.fx cannot
    trace; per channel it is its conv) and timm's ``Linear`` (``nn.Linear``'s forward through
    ``F.linear``), torchvision's Swin window attention (``window_attentions``), and MaxViT's
    attention and window (de)partitions (``relative_attentions``, ``window_partitions``)."""
    return (*layer_norms_2d(), *layer_norms_last(), *window_attentions(),
            *relative_attentions(), *window_partitions(),
            *_classes("timm.layers:Conv2dSame", "timm.layers:Linear"))


@channel_rule(nn.LayerNorm)
def _layer_norm(b: Builder, call: Call) -> Layout | None:
    """A layer norm over the channels (the last dim, or dim 1 for ``layer_norms_2d``): its
    affine terms are sliced, and masking takes its statistics over the kept channels only."""
    m, x, shape = call.module, call.in_layouts[0], call.in_shapes[0]
    dim2d = type(m) in layer_norms_2d()
    if (not dim2d and type(m) not in layer_norms_last()) or x is None or shape is None:
        return b.unknown(call, f"{call.name} is a layer norm whose forward gator-hw does not know")
    width = sum(r.length * r.repeat for r in x)
    on_channels = (dim2d and not isinstance(x, LastDim)) or (
        not dim2d and (isinstance(x, LastDim) or len(shape) == 2))
    if len(m.normalized_shape) != 1 or m.normalized_shape[0] != width or not on_channels:
        return b.unknown(call, f"{call.name} normalises over more than the channels")
    if any(r.repeat != 1 for r in x):
        return b.unknown(call, f"{call.name} normalises flattened channels")
    b.add_site(x, call.order, call.name, "ln")
    positions = math.prod(shape[1:]) // width
    b.record_layer(call, "norm", x, x, bias=m.elementwise_affine, spatial_in=positions,
                   spatial_out=positions, channels_last=isinstance(x, LastDim))
    return x


@channel_rule(F.batch_norm)
def _functional_batch_norm(b: Builder, call: Call) -> Layout | None:
    """``F.batch_norm`` with the statistics and affine terms of one batch-norm module (timm's
    ``BatchNormAct2d`` calls it): that module's norm site, as for ``nn.BatchNorm2d``."""
    x, consts = call.in_layouts[0], call.in_layouts[1:]
    owners = {c.target.rpartition(".")[0] for c in consts if isinstance(c, Const)}
    m = b.modules.get(next(iter(owners))) if len(owners) == 1 else None
    width = sum(r.length * r.repeat for r in x) if isinstance(x, tuple) else -1
    if (x is None or isinstance(x, LastDim | Const | TupleOf) or not all(
            isinstance(c, Const) for c in consts) or not isinstance(
            m, nn.modules.batchnorm._BatchNorm) or m.num_features != width
            or any(r.repeat != 1 for r in x)):
        return b.unknown(call, f"{call.name} normalises with tensors of no one batch-norm layer")
    _norm_site(b, call, x, next(iter(owners)), m.affine)
    return x


def _self_attention(call: Call) -> str | None:
    """Why ``call`` is not a self-attention gator-hw can prune (None when it is)."""
    m, args, kw = call.module, call.args, call.kwargs
    if len(args) < 3 or not (args[0] is args[1] is args[2]):
        return "is not a self-attention (query, key and value differ)"
    if not (m.batch_first and m._qkv_same_embed_dim and m.bias_k is None and m.bias_v is None
            and not m.add_zero_attn):
        return "is not batch-first with one packed projection"
    if len(args) > 3 or any(kw.get(k) is not None for k in
                            ("key_padding_mask", "attn_mask")) or kw.get("is_causal"):
        return "takes a mask"
    if kw.get("need_weights", True):
        return "returns its attention weights (call it with need_weights=False)"
    x, shape = call.in_layouts[0], call.in_shapes[0]
    if not isinstance(x, LastDim) or shape is None or len(shape) != 3:
        return "reads features that are not (batch, tokens, features)"
    if sum(r.length * r.repeat for r in x) != m.embed_dim or any(r.repeat != 1 for r in x):
        return "reads features no channel rule follows"
    return None


@channel_rule(nn.MultiheadAttention)
def _attention(b: Builder, call: Call) -> Layout | None:
    """Batch-first self-attention: its input features (read by the packed q/k/v projection),
    the query/key channels and the value channels of its heads (each kept evenly over the
    heads, so every head keeps its own), and its output features (``out_proj``)."""
    why = _self_attention(call)
    if why is not None:
        return b.unknown(call, f"{call.name} {why}")
    m, tokens = call.module, call.in_shapes[0][1]
    out = _attention_edges(b, call, m.embed_dim, m.num_heads, f"{call.name}.out_proj",
                           tokens=tokens, keys=tokens, bias=(m.in_proj_bias is not None,
                                                             m.out_proj.bias is not None))
    return TupleOf((out, None))


def _attention_edges(b: Builder, call: Call, e: int, heads: int, out_module: str, *,
                     tokens: int, keys: int, bias: tuple[bool, bool]) -> LastDim:
    """The edges and layer calls of a self-attention on ``call``'s first input (``e``
    features, ``heads`` heads): its query/key and its value channels (each a new space kept
    evenly over the heads) and its output features, written by ``out_module``. Each of the
    ``tokens`` queries attends to ``keys`` tokens; ``bias``: whether the q/k/v projection and
    the output projection have biases.

    Three layer calls record it: ``attention`` (the packed projection), ``attention_core``
    (the score and weighting matmuls) and ``attention_out`` (the output projection).
    """
    x = call.in_layouts[0]
    qk, v = b.new_space(e), b.new_space(e)
    for sid, part in ((qk, "qk"), (v, "v")):
        b.spaces[sid].groups, b.spaces[sid].name = heads, f"{call.name}:{part}"
    projected = LastDim((Run(qk, e), Run(qk, e), Run(v, e)))
    values = LastDim((Run(v, e),))
    out = LastDim((Run(b.new_space(e), e),))
    b.add_site(x, call.order, call.name, "in")
    b.add_site(projected, call.order, call.name, "out")
    b.add_site(LastDim((Run(qk, e), Run(v, e))), call.order, call.name, "attn")
    b.add_site(values, call.order, out_module, "in")
    b.add_site(out, call.order, out_module, "out")
    common = dict(spatial_in=tokens, spatial_out=tokens, channels_last=True, groups=heads)
    b.record_layer(call, "attention", x, projected, bias=bias[0], **common)
    b.record_layer(call, "attention_core", (Run(qk, e),), values, module=f"{call.name}.core",
                   **{**common, "spatial_out": keys})
    b.record_layer(call, "attention_out", values, out, module=out_module, bias=bias[1], **common)
    return out


def window_attentions() -> tuple[type, ...]:
    """torchvision's Swin attention, V1 and V2 (``ShiftedWindowAttention(V2)``): traced as
    leaves and pruned as self-attention."""
    return _classes("torchvision.models.swin_transformer:ShiftedWindowAttention",
                    "torchvision.models.swin_transformer:ShiftedWindowAttentionV2")


def _window_attention(b: Builder, call: Call) -> Layout | None:
    """torchvision's shifted window attention (Swin V1 and V2) on (B, H, W, C) features: the
    features it reads and writes, and the query/key and value channels of its heads, each kept
    evenly over the heads (the relative position bias, the logit scale and the head count stay).

    Its tokens are the feature map zero-padded to whole windows; each query attends to the
    tokens of its window.
    """
    if not _channels_last(call.in_layouts[0]):
        return b.unknown(call, f"{call.name} reads features no channel rule follows")
    m, shape = call.module, call.in_shapes[0]
    (wh, ww), (h, w) = m.window_size, shape[1:3]
    tokens = -(-h // wh) * wh * (-(-w // ww) * ww)
    return _attention_edges(b, call, m.proj.in_features, m.num_heads, f"{call.name}.proj",
                            tokens=tokens, keys=wh * ww,
                            bias=(m.qkv.bias is not None, m.proj.bias is not None))


def _patch_merging(b: Builder, call: Call) -> Layout | None:
    """torchvision Swin's ``_patch_merging_pad``: (..., H, W, C) -> (..., H/2, W/2, 4C), each
    2x2 neighbourhood's features side by side (zero-padded to even H and W): the same
    channels four times over."""
    x = call.in_layouts[0]
    if not _channels_last(x):
        return b.unknown(call, f"{call.name} merges patches of features no channel rule follows")
    return LastDim(tuple(x) * 4)


def _channels_last(x: Any) -> bool:
    """Whether ``x`` is the layout of channels-last features, none of them flattened."""
    return isinstance(x, LastDim) and all(r.repeat == 1 for r in x)


def _register_swin() -> None:
    """The rules of torchvision's Swin: its window attention and its patch merging."""
    if window_attentions():
        channel_rule(*window_attentions())(_window_attention)
    try:
        from torchvision.models.swin_transformer import _patch_merging_pad
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return
    channel_rule(_patch_merging_pad)(_patch_merging)


_register_swin()


def relative_attentions() -> tuple[type, ...]:
    """torchvision MaxViT's attention (``RelativePositionalMultiHeadAttention``): traced as a
    leaf and pruned as self-attention."""
    return _classes("torchvision.models.maxvit:RelativePositionalMultiHeadAttention")


def window_partitions() -> tuple[type, ...]:
    """torchvision MaxViT's ``WindowPartition`` and ``WindowDepartition``: each reads its
    channel count from its input (``B, C, H, W = x.shape``), so, traced as leaves, they
    follow any width."""
    return _classes("torchvision.models.maxvit:WindowPartition",
                    "torchvision.models.maxvit:WindowDepartition")


def _relative_attention(b: Builder, call: Call) -> Layout | None:
    """torchvision MaxViT's attention on (B, windows, tokens, C) features (its block and grid
    attention alike): the features it reads and writes, and the query/key and value channels of
    its heads, each kept evenly over the heads (the relative position bias, the head count and
    the score scale ``1 / sqrt(C)`` of the full width stay). Each query attends to the tokens of
    its window."""
    x, shape, m = call.in_layouts[0], call.in_shapes[0], call.module
    if not _channels_last(x) or shape is None or len(shape) != 4:
        return b.unknown(call, f"{call.name} reads features no channel rule follows")
    return _attention_edges(b, call, m.merge.out_features, m.n_heads, f"{call.name}.merge",
                            tokens=shape[1] * shape[2], keys=shape[2],
                            bias=(m.to_qkv.bias is not None, m.merge.bias is not None))


def _window_partition(b: Builder, call: Call) -> Layout | None:
    """MaxViT's ``WindowPartition``: (B, C, H, W) -> (B, windows, tokens, C), the channels
    moved last."""
    x = call.in_layouts[0]
    if x is None or isinstance(x, LastDim) or any(r.repeat != 1 for r in x):
        return b.unknown(call, f"{call.name} partitions features no channel rule follows")
    return LastDim(x)


def _window_departition(b: Builder, call: Call) -> Layout | None:
    """MaxViT's ``WindowDepartition``: (B, windows, tokens, C) -> (B, C, H, W), the channels
    moved back to dim 1."""
    x = call.in_layouts[0]
    if not _channels_last(x):
        return b.unknown(call, f"{call.name} departitions features no channel rule follows")
    return tuple(x)


def _register_maxvit() -> None:
    """The rules of torchvision's MaxViT: its attention and its window (de)partitions."""
    part = "torchvision.models.maxvit:Window"
    for classes, rule in ((relative_attentions(), _relative_attention),
                          (_classes(f"{part}Partition"), _window_partition),
                          (_classes(f"{part}Departition"), _window_departition)):
        if classes:
            channel_rule(*classes)(rule)


_register_maxvit()


#: the rules that accept a channels-last (``LastDim``) input; any other op freezes it
CHANNELS_LAST_RULES = (_linear, _per_channel, _getattr_like, _reshape, _permute, _elementwise,
                       _cat, _getitem, _layer_norm, _attention, _window_attention, _patch_merging,
                       _relative_attention, _window_partition, _window_departition)

#: the rules that know ``Const`` inputs; any other rule gets them as frozen constants
CONST_RULES = (_expand, _reshape, _elementwise, _cat, _functional_batch_norm)

#: the rules that read a tuple result (``TupleOf``); any other op freezes it
TUPLE_RULES = (_getitem,)
