"""Learned channel gates: one logit per channel of every hyperedge (GATOR, METHOD.md §2).

In training, gate ``c`` of edge ``e`` is a hard straight-through logistic gate::

    L ~ Logistic(0, 1)          (per sample and channel, once per forward, on the logits' device)
    h = 1[theta + L > 0]        forward value (0 or 1), so P(open) = sigmoid(theta)
    dh/dtheta := d sigmoid(theta + L) / dtheta     (straight-through backward)

and ``mask`` (permanent, see :meth:`GateSet.update_masks`) multiplies it. In eval mode, or once
the gates are frozen, a gate is open iff ``mask and sigmoid(theta) > 0.5`` (no noise).

The gates act where channels are read (:func:`gator_hw.masking.scale_inputs`), which is the
same as removing a closed channel everywhere at once. The gates of every edge are drawn once per
forward in a pre-hook of the root model, so every reader site of an edge sees the same sample
(the original drew fresh noise at every site). With every gate open the vectors are
ones and the model's outputs are unchanged.

Example
-------
>>> gates = GateSet.from_graph(net.graph, init_prob=0.995)   # doctest: +SKIP
>>> gates.attach(net.model, net.graph)                        # doctest: +SKIP
>>> loss = ce(net.model(x), y)                                # doctest: +SKIP
>>> gates.update_masks(); gates.kept_channels()               # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from gator_hw.errors import GatorError
from gator_hw.graph.cuts import min_keep_counts
from gator_hw.graph.hypergraph import HyperGraph
from gator_hw.masking import scale_inputs

__all__ = ["GateSet", "hard_logistic_gate", "logistic_noise"]

#: Smallest uniform draw turned into logistic noise (keeps log() finite in float32).
_EPS = 1e-6


def logistic_noise(
    shape: tuple[int, ...],
    *,
    device: torch.device,
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Standard logistic noise ``log(u) - log(1 - u)``, drawn directly on ``device``."""
    u = torch.rand(shape, device=device, dtype=dtype, generator=generator)
    u = u.clamp_(_EPS, 1.0 - _EPS)
    return torch.log(u) - torch.log1p(-u)


def hard_logistic_gate(theta: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward ``1[theta + noise > 0]``, backward the gradient of ``sigmoid(theta + noise)``."""
    soft = torch.sigmoid(theta + noise)
    hard = (theta + noise > 0).to(theta.dtype)
    return hard + (soft - soft.detach())


class GateSet(nn.Module):
    """One gate logit per channel of each prunable edge, with permanent masks.

    Parameters
    ----------
    channels : sequence of int
        Channel count of each edge, in edge order.
    init_prob : float
        Initial open probability ``p0``; logits start at ``logit(p0)``.
    names : sequence of str, optional
        Edge names (for messages and logs); default ``edge0, edge1, ...``.
    min_keep : sequence of int, optional
        Channels each edge always keeps (0 or 1): 1 for edges whose removal would cut the
        network (see ``gator_hw.graph.cuts``); there the gate with the largest logit stays
        open when all others close. Default 0 everywhere.
    round_to : int
        Keep every edge's width a multiple of this (or its full width): the deterministic
        gates and the permanent masks round a count up by re-opening the closed channels
        with the largest logits. Default 1 (any width).
    conv_groups : sequence of int, optional
        Conv groups of each edge (``ChannelGroup.groups``): the deterministic gates and the
        masks keep the same count in every group (rounding up, best logits first), so every
        plan converts. Default 1 everywhere.

    Attributes
    ----------
    logits : nn.ParameterList
        ``logits[e]`` has shape ``(channels[e],)``.
    last_gates : dict of int to Tensor
        The vectors of the latest root forward (edge -> gate vector), for logs and tests.
    """

    def __init__(
        self,
        channels: Sequence[int],
        init_prob: float = 0.995,
        names: Sequence[str] | None = None,
        min_keep: Sequence[int] | None = None,
        round_to: int = 1,
        conv_groups: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < init_prob < 1.0:
            raise GatorError(f"gate_init_prob must be in (0, 1), got {init_prob}; use e.g. 0.995")
        if int(round_to) < 1:
            raise GatorError(f"--round-to must be >= 1, got {round_to}; use e.g. 8")
        self.channels = [int(c) for c in channels]
        self.init_prob = float(init_prob)
        self.names = (
            list(names) if names is not None else [f"edge{i}" for i in range(len(channels))]
        )
        self.min_keep = [int(k) for k in min_keep] if min_keep is not None else [0] * len(channels)
        self.conv_groups = [int(g) for g in conv_groups or [1] * len(self.channels)]
        for c, g in zip(self.channels, self.conv_groups, strict=True):
            if g < 1 or c % g:
                raise GatorError(f"an edge of {c} channels cannot split into {g} conv groups")
        theta0 = math.log(init_prob / (1.0 - init_prob))
        self.logits = nn.ParameterList(
            [nn.Parameter(torch.full((c,), theta0)) for c in self.channels]
        )
        for i, c in enumerate(self.channels):
            self.register_buffer(f"mask_{i}", torch.ones(c, dtype=torch.bool))
        self.register_buffer("frozen_flag", torch.zeros((), dtype=torch.bool))
        self.register_buffer("round_to_n", torch.tensor(int(round_to), dtype=torch.int64))
        total = sum(self.channels)
        self.register_buffer("importance", torch.zeros(total))
        self.register_buffer("importance_steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("importance_scale", torch.zeros(len(self.channels)))
        self._grad_sum = torch.zeros(total)
        self.last_gates: dict[int, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @classmethod
    def from_graph(
        cls, graph: HyperGraph, init_prob: float = 0.995, *, round_to: int = 1
    ) -> GateSet:
        """Gates for every prunable edge of ``graph``; edges that cut the network keep one."""
        return cls(
            [e.channels for e in graph.edges], init_prob, [e.name for e in graph.edges],
            min_keep_counts(graph), round_to=round_to, conv_groups=[e.groups for e in graph.edges],
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        defaults = {  # checkpoints from before these buffers: any width, no importance yet
            "round_to_n": torch.ones((), dtype=torch.int64),
            "importance": torch.zeros(sum(self.channels)),
            "importance_steps": torch.zeros((), dtype=torch.int64),
            "importance_scale": torch.zeros(len(self.channels)),
        }
        for key, value in defaults.items():
            state_dict.setdefault(prefix + key, value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ state
    def __len__(self) -> int:
        return len(self.channels)

    def mask(self, edge: int) -> torch.Tensor:
        """The permanent boolean mask of ``edge`` (False: pruned for good)."""
        return getattr(self, f"mask_{edge}")

    @property
    def masks(self) -> list[torch.Tensor]:
        return [self.mask(i) for i in range(len(self))]

    @property
    def round_to(self) -> int:
        return int(self.round_to_n)

    def valid_count(self, edge: int, k: int) -> int:
        """The smallest width >= ``k`` that ``edge`` may keep (``round_to``, ``min_keep``)."""
        k = max(int(k), self.min_keep[edge])
        n, live = self.round_to, int(self.mask(edge).sum())
        return min(-(-k // n) * n, live) if n > 1 else min(k, live)

    def _top_up(self, edge: int, chosen: torch.Tensor, count: int) -> torch.Tensor:
        """Add to ``chosen`` the live, unchosen channels with the largest logits up to ``count``."""
        missing = count - int(chosen.sum())
        if missing <= 0:
            return chosen
        theta = self.logits[edge].detach().masked_fill(~self.mask(edge) | chosen, float("-inf"))
        out = chosen.clone()
        out[torch.topk(theta, missing).indices] = True
        return out

    def _balance(self, edge: int, chosen: torch.Tensor) -> torch.Tensor:
        """``chosen`` with the same count in every conv group of ``edge``: the total rounded
        up to a multiple of the groups, each group keeping its chosen, then live, then
        largest-logit channels."""
        g = self.conv_groups[edge]
        if g <= 1:
            return chosen
        per = -(-int(chosen.sum()) // g)
        theta = torch.sigmoid(self.logits[edge].detach().float())
        key = (chosen.float() * 4 + self.mask(edge).float() * 2 + theta).reshape(g, -1)
        top = torch.argsort(key, dim=1, descending=True, stable=True)[:, :per]
        out = torch.zeros_like(chosen).reshape(g, -1)
        out.scatter_(1, top, True)
        return out.reshape(-1)

    @property
    def frozen(self) -> bool:
        """True once gate training has stopped: gates are deterministic even in training."""
        return bool(self.frozen_flag)

    def freeze(self) -> None:
        """Stop gate training: prune every closed gate, make gates deterministic, no grads."""
        self.update_masks()
        with torch.no_grad():
            for i, (theta, keep) in enumerate(zip(self.logits, self.deterministic(), strict=True)):
                self.mask(i).logical_and_(keep.bool())
                theta.requires_grad_(False)
        self.frozen_flag.fill_(True)

    @property
    def device(self) -> torch.device:
        return self.logits[0].device if len(self) else torch.device("cpu")

    def open_prob(self) -> list[torch.Tensor]:
        """``sigmoid(theta) * mask`` per edge: each gate's probability of being open."""
        return [torch.sigmoid(t) * self.mask(i) for i, t in enumerate(self.logits)]

    def expected_channels(self) -> torch.Tensor:
        """Expected open channels per edge, shape ``(E,)``, differentiable in the logits."""
        if not len(self):
            return torch.zeros(0)
        return torch.stack([p.sum() for p in self.open_prob()])

    @torch.no_grad()
    def deterministic(self) -> list[torch.Tensor]:
        """Eval gates: open (1.0) iff mask and ``sigmoid(theta) > 0.5``.

        ``min_keep`` and ``round_to`` round each edge's count up with its largest closed logits;
        a grouped-conv edge keeps the same count in every group.
        """
        out = []
        for i, t in enumerate(self.logits):
            g = self.mask(i) & (t > 0)
            g = self._balance(i, self._top_up(i, g, self.valid_count(i, int(g.sum()))))
            out.append(g.to(t.dtype))
        return out

    def kept_channels(self) -> list[int]:
        """Channels each edge keeps with deterministic gates."""
        return [int(g.sum()) for g in self.deterministic()]

    def kept_widths(self) -> torch.Tensor:
        """:meth:`kept_channels` as a float64 width vector (what the cost functions take)."""
        return torch.tensor(self.kept_channels(), dtype=torch.float64)

    def kept_indices(self) -> dict[int, list[int]]:
        """Edge -> indices of the channels kept with deterministic gates (a slimming plan)."""
        return {i: torch.nonzero(g).flatten().tolist() for i, g in enumerate(self.deterministic())}

    @torch.no_grad()
    def update_masks(self) -> int:
        """Prune for good every channel whose logit is negative; return how many were new.

        An edge that must keep ``min_keep`` channels or a multiple of ``round_to`` keeps its
        largest negative logits as needed.
        """
        new = 0
        for i, theta in enumerate(self.logits):
            m = self.mask(i)
            keep = m & (theta >= 0)
            keep = self._balance(i, self._top_up(i, keep, self.valid_count(i, int(keep.sum()))))
            new += int((m & ~keep).sum())
            m.copy_(keep)
        return new

    def mask_digest(self) -> torch.Tensor:
        """A float64 checksum of the masks (equal masks give equal digests), for DDP checks."""
        out = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i in range(len(self)):
            m = self.mask(i).to(torch.float64)
            idx = torch.arange(1, m.numel() + 1, dtype=torch.float64, device=m.device)
            out[0] += m.sum() * (i + 1)
            out[1] += (m * idx).sum() * (i + 1)
        return out

    # ------------------------------------------------------------------ importance
    def _collect(self, grad: torch.Tensor) -> None:
        g = grad.detach()
        g = g.sum(0) if g.dim() == 2 else g
        if self._grad_sum.device != g.device:
            self._grad_sum = self._grad_sum.to(g.device)
        self._grad_sum += g.to(self._grad_sum.dtype)

    @torch.no_grad()
    def update_importance(
        self, *, scale: float = 1.0, beta: float = 0.95, reduce=None
    ) -> None:
        """Fold this step's gate gradients into each channel's importance, then reset them.

        The importance of a channel is the running mean of ``(dL/dg)^2``, ``g`` its gate and
        ``dL/dg`` summed over the batch: the first-order (Taylor) estimate of what closing it
        costs the task (Molchanov et al., 2019). ``scale`` divides a loss-scaled gradient;
        ``reduce`` (e.g. an all-reduce) sums the gradient over data-parallel ranks first.
        """
        s = self._grad_sum.to(self.importance.device) / scale
        if reduce is not None:
            reduce(s)
        k = int(self.importance_steps) + 1
        b = min(beta, 1.0 - 1.0 / k)
        self.importance.mul_(b).add_((1.0 - b) * s.to(self.importance.dtype) ** 2)
        self.importance_steps.fill_(k)
        self._grad_sum = torch.zeros_like(self._grad_sum)

    @torch.no_grad()
    def fix_importance_scale(self) -> bool:
        """Record each edge's mean importance as its scale, once (edges already set keep
        theirs): called when pruning starts, while every channel is open, so that it is the
        mean cost to the task of closing one of the edge's channels. One device sync; returns
        whether every edge now has a scale."""
        if not len(self):
            return True
        means = torch.stack([t.mean() for t in torch.split(self.importance, self.channels)])
        scale = self.importance_scale
        scale.copy_(torch.where(scale > 0, scale, means.to(scale.dtype)))
        return bool((scale > 0).all())

    def edge_importance(self, edge: int) -> torch.Tensor:
        """Importance of each channel of ``edge`` (zeros before any update)."""
        start = sum(self.channels[:edge])
        return self.importance[start:start + self.channels[edge]]

    # ------------------------------------------------------------------ sampling
    def sample(self, training: bool, batch: int | None = None) -> dict[int, torch.Tensor]:
        """Gate vectors per edge: noisy hard gates if ``training`` and not frozen.

        With ``batch``, noise is drawn per sample and channel (vectors ``(batch, C)``), as in
        GATOR; without it, one draw per channel serves the whole batch (vectors ``(C,)``).
        Deterministic gates are always ``(C,)``.
        """
        if not len(self):
            return {}
        if not training or self.frozen:
            vecs = self.deterministic()
        else:
            theta = torch.cat(list(self.logits))
            shape = theta.shape if batch is None else (batch, theta.shape[0])
            noise = logistic_noise(shape, device=theta.device, dtype=theta.dtype)
            mask = torch.cat(self.masks).to(theta.dtype)
            gates = hard_logistic_gate(theta.expand(shape), noise) * mask
            if gates.requires_grad:
                gates.register_hook(self._collect)
            vecs = list(torch.split(gates, self.channels, dim=-1))
        return dict(enumerate(vecs))

    # ------------------------------------------------------------------ hooks
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def check_graph(self, graph: HyperGraph) -> None:
        """Raise GatorError unless ``graph``'s edges have exactly these channel counts."""
        widths = [e.channels for e in graph.edges]
        if widths != self.channels:
            raise GatorError(
                f"gates were made for {len(self.channels)} edges {self.channels[:6]}..., but "
                f"{graph.model_name} has {len(widths)} edges {widths[:6]}...; build the gates "
                "(or load a checkpoint) for this model"
            )

    def attach(self, model: nn.Module, graph: HyperGraph) -> GateSet:
        """Insert the gates into ``model`` (hooks only; the model's weights are untouched).

        A pre-hook on ``model`` draws the gates of every edge once per forward of ``model``
        (per sample and channel in training); every layer reading an edge multiplies its input
        by that edge's gates, so all sites of an edge agree. Returns ``self``.
        """
        self.check_graph(graph)
        if self.attached:
            raise GatorError("these gates are already attached; call detach() first")

        def draw(mod: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            batch = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() > 1 else None
            self.last_gates = self.sample(mod.training, batch)

        def current() -> dict[int, torch.Tensor]:
            if not self.last_gates:  # a sub-module called on its own
                self.last_gates = self.sample(False)
            return self.last_gates

        self._handles = [model.register_forward_pre_hook(draw)]
        self._handles += scale_inputs(model, graph, current)
        return self

    def detach(self) -> None:
        """Remove every hook: the model is exactly as before :meth:`attach`."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.last_gates = {}

    @torch.no_grad()
    def gated_output(self, model: nn.Module, graph: HyperGraph, x: torch.Tensor) -> torch.Tensor:
        """``model(x)`` with these gates attached for this call only, deterministic (eval);
        the model's own mode is left as it is. The reference a converted model must equal."""
        self.eval().attach(model, graph)
        try:
            return model(x)
        finally:
            self.detach()

    def __str__(self) -> str:
        kept = self.kept_channels()
        return (
            f"GateSet({len(self)} edges, {sum(kept)}/{sum(self.channels)} channels kept, "
            f"{'frozen' if self.frozen else 'training'}, "
            f"{'attached' if self.attached else 'detached'})"
        )
