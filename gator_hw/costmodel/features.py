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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gator_hw.accounting import layer_cost, network_cost
from gator_hw.graph.hypergraph import HyperGraph, LayerCall

__all__ = ["ALIGNMENTS", "FeatureMap", "padded_excess"]

ALIGNMENTS = (8, 16, 32, 64)
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _pad(n: np.ndarray, m: int) -> np.ndarray:
    return np.ceil(n / m) * m


def padded_excess(call: LayerCall, n_in: np.ndarray, n_out: np.ndarray, m: int) -> np.ndarray:
    """Factor of extra work when ``call`` computes its channels in whole blocks of ``m``.

    Dense convs and linears scale with in x out channels, depthwise convs with their channels.
    """
    n_in = np.maximum(np.asarray(n_in, dtype=float), 1.0)
    n_out = np.maximum(np.asarray(n_out, dtype=float), 1.0)
    if call.kind == "conv" and call.depthwise:
        return _pad(n_out, m) / n_out - 1.0
    return _pad(n_in, m) * _pad(n_out, m) / (n_in * n_out) - 1.0


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

    @staticmethod
    def _side(layout, wd: dict[int, np.ndarray]):
        return sum(wd.get(s.gid, s.length) * s.repeat for s in layout)

    def _calls(self):
        return [c for c in self.graph.calls if c.kind != "norm"]

    def layer_names(self) -> list[str]:
        names = [f"{k}:{c.module}" for c in self._calls() for k in ("gflops", "mbytes")]
        return names + ["mbytes", "flops_mis8", "flops_mis32"] + [
            f"flops_pad{m}" for m in ALIGNMENTS
        ]

    def layer(self, widths: np.ndarray) -> np.ndarray:
        """Per-layer GFLOPs and MB, total MB, misaligned and padding GFLOPs; a row per width."""
        wd = self._widths(widths)
        n = len(next(iter(wd.values()))) if wd else 1
        cols, mis = [], {8: np.zeros(n), 32: np.zeros(n)}
        pad = {m: np.zeros(n) for m in ALIGNMENTS}
        for c in self._calls():
            cost = layer_cost(c, wd, batch=self.batch, bytes_per_element=self.bytes_per_element)
            f = np.broadcast_to(cost.flops / 1e9, (n,))
            cols += [f, np.broadcast_to(cost.bytes / 1e6, (n,))]
            n_in, n_out = self._side(c.in_layout, wd), self._side(c.out_layout, wd)
            for m in mis:
                off = (np.mod(n_in, m) != 0) | (np.mod(n_out, m) != 0)
                mis[m] = mis[m] + f * off
            for m in pad:
                pad[m] = pad[m] + f * padded_excess(c, n_in, n_out, m)
        total = network_cost(self.graph, wd, batch=self.batch,
                             bytes_per_element=self.bytes_per_element)
        cols += [np.broadcast_to(total.bytes / 1e6, (n,)), mis[8], mis[32], *pad.values()]
        return np.stack(cols, axis=1).astype(float)

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

    def flops(self, widths: np.ndarray) -> np.ndarray:
        """Total FLOPs of each width vector (at the batch)."""
        w = np.atleast_2d(np.asarray(widths, dtype=float))
        f = network_cost(self.graph, self._widths(w), batch=self.batch).flops
        return np.broadcast_to(np.asarray(f, dtype=float), (len(w),)).copy()
