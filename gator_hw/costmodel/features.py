"""Features of a network at given edge widths, all from the hypergraph's exact accounting.

Two views of the same network:

* ``layer`` features: the FLOPs and bytes moved of every conv / linear call and the bytes of
  the network at those widths (exact and bilinear in the widths), plus FLOPs of layers whose
  channel counts are not multiples of 8 / 32, and the FLOPs that padding every layer's channels
  up to a multiple of 8 / 16 / 32 / 64 would add (the latency staircase: kernels compute whole
  channel blocks, e.g. 16 for AVX-512 oneDNN convs). A linear model on them is a per-layer
  latency model that generalises to any combination of widths.
* ``edge`` features: totals (FLOPs, params, bytes, arithmetic intensity), and per edge its
  relative width and its alignment (width mod 8, 16, 32, 64 == 0), for tree ensembles.

Layer properties (kernel size, stride, groups, resolution, batch) enter through the exact
FLOPs and bytes of each layer; they are constants of a layer, so a per-layer coefficient
absorbs them.

The layer view is computed in torch (:meth:`FeatureMap.layer_torch`), so that the same code
gives the numbers the cost model is fitted on and a differentiable function of the widths for
pruning (:mod:`gator_hw.costmodel.differentiable`). Its values are exact at every width; the
staircase parts get surrogate gradients: a padded width ``ceil(n / m) * m`` passes the gradient
of ``n`` (the slope of the staircase's envelope) and the misalignment flags are constants.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gator_hw.accounting import layer_cost, network_cost
from gator_hw.graph.hypergraph import HyperGraph, LayerCall

__all__ = ["ALIGNMENTS", "FeatureMap", "padded_excess", "padded_width"]

ALIGNMENTS = (8, 16, 32, 64)
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def padded_width(n: torch.Tensor, m: int) -> torch.Tensor:
    """``ceil(n / m) * m`` in value; in the backward pass the gradient of ``n`` itself."""
    return n + (torch.ceil(n / m) * m - n).detach()


def _padded_excess_t(call: LayerCall, n_in: torch.Tensor, n_out: torch.Tensor,
                     m: int) -> torch.Tensor:
    n_in, n_out = n_in.clamp(min=1.0), n_out.clamp(min=1.0)
    if call.kind == "conv" and call.depthwise:
        return padded_width(n_out, m) / n_out - 1.0
    return padded_width(n_in, m) * padded_width(n_out, m) / (n_in * n_out) - 1.0


def padded_excess(call: LayerCall, n_in, n_out, m: int):
    """Factor of extra work when ``call`` computes its channels in whole blocks of ``m``.

    Dense convs and linears scale with in x out channels, depthwise convs with their channels.
    Takes and returns numpy arrays or torch tensors.
    """
    if isinstance(n_in, torch.Tensor):
        return _padded_excess_t(call, n_in, n_out, m)
    t = _padded_excess_t(call, torch.as_tensor(np.asarray(n_in, dtype=float)),
                         torch.as_tensor(np.asarray(n_out, dtype=float)), m)
    return t.numpy()


def _side(layout, wd: dict[int, torch.Tensor]):
    return sum(wd.get(s.gid, s.length) * s.repeat for s in layout)


@dataclass(frozen=True)
class FeatureMap:
    """Turns width vectors (n, E) into feature matrices for one graph, batch and dtype."""

    graph: HyperGraph
    batch: int = 1
    dtype: str = "float32"

    @property
    def bytes_per_element(self) -> int:
        return _BYTES.get(self.dtype, 4)

    def _widths(self, widths: np.ndarray) -> dict[int, np.ndarray]:
        """Edge index -> column of widths: accounting then computes every sample at once."""
        w = np.atleast_2d(np.asarray(widths, dtype=float))
        return {i: w[:, i] for i in range(w.shape[1])}

    def _calls(self):
        return [c for c in self.graph.calls if c.kind not in ("norm", "param")]

    def layer_names(self) -> list[str]:
        names = [f"{k}:{c.module}" for c in self._calls() for k in ("gflops", "mbytes")]
        return names + ["mbytes", "flops_mis8", "flops_mis32"] + [
            f"flops_pad{m}" for m in ALIGNMENTS
        ]

    def layer_torch(self, widths: torch.Tensor) -> torch.Tensor:
        """The layer features of each row of ``widths`` (float64, differentiable), (n, F).

        Column order is :meth:`layer_names`: per-layer GFLOPs and MB, total MB, misaligned and
        padding GFLOPs.
        """
        w = torch.atleast_2d(widths.to(torch.float64))
        n = w.shape[0]
        wd = {i: w[:, i] for i in range(w.shape[1])}
        zero = w.new_zeros(n)
        cols: list[torch.Tensor] = []
        mis = {8: zero, 32: zero}
        pad = dict.fromkeys(ALIGNMENTS, zero)
        bpe = self.bytes_per_element
        for c in self._calls():
            cost = layer_cost(c, wd, batch=self.batch, bytes_per_element=bpe)
            f = zero + cost.flops / 1e9
            cols += [f, zero + cost.bytes / 1e6]
            n_in, n_out = zero + _side(c.in_layout, wd), zero + _side(c.out_layout, wd)
            for m in mis:
                off = (torch.remainder(n_in.detach().round(), m) != 0) | (
                    torch.remainder(n_out.detach().round(), m) != 0)
                mis[m] = mis[m] + f * off
            for m in pad:
                pad[m] = pad[m] + f * _padded_excess_t(c, n_in, n_out, m)
        total = network_cost(self.graph, wd, batch=self.batch, bytes_per_element=bpe)
        cols += [zero + total.bytes / 1e6, mis[8], mis[32], *pad.values()]
        return torch.stack(cols, dim=1)

    def layer(self, widths: np.ndarray) -> np.ndarray:
        """Per-layer GFLOPs and MB, total MB, misaligned and padding GFLOPs; a row per width."""
        w = torch.as_tensor(np.atleast_2d(np.asarray(widths, dtype=float)))
        with torch.no_grad():
            return self.layer_torch(w).numpy().astype(float)

    def edge_names(self) -> list[str]:
        names = ["gflops", "mparams", "mbytes", "intensity"]
        for e in self.graph.edges:
            names.append(f"rel:{e.name}")
            names += [f"mod{m}:{e.name}" for m in ALIGNMENTS]
        return names

    def edge(self, widths: np.ndarray) -> np.ndarray:
        """Totals plus per-edge relative width and alignment flags, one row per width vector."""
        w = np.atleast_2d(np.asarray(widths, dtype=float))
        full = np.array([e.channels for e in self.graph.edges], dtype=float)
        c = network_cost(self.graph, self._widths(w), batch=self.batch,
                         bytes_per_element=self.bytes_per_element)
        cols = [c.flops / 1e9, c.params / 1e6, c.bytes / 1e6, c.flops / np.maximum(c.bytes, 1.0)]
        for i in range(w.shape[1]):
            cols.append(w[:, i] / full[i])
            cols += [(np.mod(w[:, i], m) == 0).astype(float) for m in ALIGNMENTS]
        return np.stack([np.broadcast_to(x, (len(w),)) for x in cols], axis=1).astype(float)

    def flops_torch(self, widths: torch.Tensor) -> torch.Tensor:
        """Total FLOPs (at the batch) of each row of ``widths``, differentiable, shape (n,)."""
        w = torch.atleast_2d(widths.to(torch.float64))
        wd = {i: w[:, i] for i in range(w.shape[1])}
        return w.new_zeros(w.shape[0]) + network_cost(self.graph, wd, batch=self.batch).flops

    def flops(self, widths: np.ndarray) -> np.ndarray:
        """Total FLOPs of each width vector (at the batch)."""
        w = np.atleast_2d(np.asarray(widths, dtype=float))
        f = network_cost(self.graph, self._widths(w), batch=self.batch).flops
        return np.broadcast_to(np.asarray(f, dtype=float), (len(w),)).copy()
