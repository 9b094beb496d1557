"""Features of a network at given edge widths, all from the hypergraph's exact accounting.

Two views of the same network:

* ``layer`` features: the FLOPs and bytes moved of every conv / linear call and the bytes of
  the network at those widths (exact and bilinear in the widths), plus FLOPs of layers whose
  channel counts are not multiples of 8 / 32, and the FLOPs that padding every layer's channels
  up to a multiple of 8 / 16 / 32 / 64 would add (the latency staircase: kernels compute whole
  channel blocks, e.g. 16 for AVX-512 oneDNN convs). A linear model on them is a per-layer
  latency model that generalises to any combination of widths.
* for tables timed in ONNX Runtime, also the FLOPs and bytes of the convs that its CPU provider
  cannot run in its blocked NCHWc layout (dense convs reading more than
  :data:`ORT_NCHW_INPUT_MAX` channels and depthwise convs, when the channels are not a multiple
  of :data:`ORT_CHANNEL_ALIGN`): those run in plain NCHW at several times the time per FLOP, a
  cliff the other features only blur.
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

It runs every step of a pruning run (the cost loss, its per-edge weights, the budget's
projection), so it is a handful of array operations over all layer calls at once
(:class:`_CallForms`), not a loop over them: each call's channel counts are affine in the edge
widths and its costs bilinear in those two counts, with coefficients read off
:func:`~gator_hw.accounting.call_cost` once per graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from gator_hw.accounting import call_cost, network_cost
from gator_hw.graph.hypergraph import HyperGraph, LayerCall

__all__ = ["ALIGNMENTS", "ORT_CHANNEL_ALIGN", "ORT_NCHW_INPUT_MAX", "FeatureMap", "padded_excess",
           "padded_width"]

ALIGNMENTS = (8, 16, 32, 64)

#: ONNX Runtime's CPU provider (MLAS) runs a dense conv in its blocked NCHWc layout only when
#: the conv's input channels are at most ``ORT_NCHW_INPUT_MAX`` or a multiple of
#: ``ORT_CHANNEL_ALIGN``, and a depthwise conv only when its channels are a multiple of
#: ``ORT_CHANNEL_ALIGN``; any other conv runs in plain NCHW (``FusedConv``: im2col + GEMM, with
#: layout reorders around it), about 2.8x the time per FLOP. Read off ORT 1.32's optimised
#: graphs on x86-64 (AVX-512): dense inputs 3-16, 20, 24, 36, 44, 52, 100, 104, 184, 368, 404
#: blocked, 17, 18, 22, 25, 29, 62, 102, 194, 406, 425, 503 not; depthwise 8, 12, 20, 24, 40, 64
#: blocked, 9, 10, 17, 21, 25, 33 not (``docs/results/ort_amd_rerun``). Other grouped convs
#: are never blocked: that costs the same at every width, which the per-layer features carry.
ORT_NCHW_INPUT_MAX = 16
ORT_CHANNEL_ALIGN = 4
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def padded_width(n: torch.Tensor, m: int) -> torch.Tensor:
    """``ceil(n / m) * m`` in value; in the backward pass the gradient of ``n`` itself."""
    return n + (torch.ceil(n / m) * m - n).detach()


def _excess(n_in: torch.Tensor, n_out: torch.Tensor, depthwise: torch.Tensor,
            m: int) -> torch.Tensor:
    """:func:`padded_excess` of many calls at once (``depthwise`` a bool mask of the calls)."""
    n_in, n_out = n_in.clamp(min=1.0), n_out.clamp(min=1.0)
    pad_out = padded_width(n_out, m)
    dense = padded_width(n_in, m) * pad_out / (n_in * n_out)
    return torch.where(depthwise, pad_out / n_out, dense) - 1.0


def padded_excess(call: LayerCall, n_in, n_out, m: int):
    """Factor of extra work when ``call`` computes its channels in whole blocks of ``m``.

    Dense convs and linears scale with in x out channels, depthwise convs with their channels.
    Takes and returns numpy arrays or torch tensors.
    """
    depthwise = torch.tensor(call.kind == "conv" and call.depthwise)
    if isinstance(n_in, torch.Tensor):
        return _excess(n_in, n_out, depthwise, m)
    t = _excess(torch.as_tensor(np.asarray(n_in, dtype=float)),
                torch.as_tensor(np.asarray(n_out, dtype=float)), depthwise, m)
    return t.numpy()


def _bilinear(coef: torch.Tensor, n_in: torch.Tensor, n_out: torch.Tensor) -> torch.Tensor:
    """``c0 + c_in n_in + c_out n_out + c_io n_in n_out`` per call; ``coef`` is (4, C)."""
    return coef[0] + coef[1] * n_in + coef[2] * n_out + coef[3] * n_in * n_out


@dataclass(frozen=True)
class _CallForms:
    """Every layer call of a graph as arrays over the calls (C of them, E edges).

    A call's input channels are ``widths @ in_map + in_const`` (its layout's edge segments
    times their repeat, plus its frozen segments), likewise its output channels; its FLOPs,
    bytes and its share of the network's bytes (a shared layer's weights read once) are
    bilinear in the two counts, ``(4, C)`` coefficient rows each.
    """

    in_map: torch.Tensor
    in_const: torch.Tensor
    out_map: torch.Tensor
    out_const: torch.Tensor
    flops: torch.Tensor
    bytes: torch.Tensor
    net_bytes: torch.Tensor
    feature: torch.Tensor  # bool (C,): calls with features of their own (not norm / param)
    depthwise: torch.Tensor  # bool (C,)
    dense_conv: torch.Tensor  # bool (C,): convs with one group
    fixed_flops: float

    @classmethod
    def read(cls, graph: HyperGraph, batch: int, bpe: int) -> _CallForms:
        """Read every call's forms off :func:`~gator_hw.accounting.call_cost`."""
        e_count, calls = graph.n_edges, graph.calls
        maps = {k: torch.zeros(e_count, len(calls), dtype=torch.float64) for k in ("in", "out")}
        consts = {k: torch.zeros(len(calls), dtype=torch.float64) for k in ("in", "out")}
        coefs = {k: torch.zeros(4, len(calls), dtype=torch.float64)
                 for k in ("flops", "bytes", "net_bytes")}
        seen: set[str] = set()
        for j, c in enumerate(calls):
            for side, layout in (("in", c.in_layout), ("out", c.out_layout)):
                for seg in layout:
                    if seg.gid < e_count:
                        maps[side][seg.gid, j] += seg.repeat
                    else:
                        consts[side][j] += seg.length * seg.repeat
            corners = [call_cost(c, a, b, batch=batch, bytes_per_element=bpe)
                       for a, b in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0))]
            shared = c.module in seen
            seen.add(c.module)
            for key, value in (("flops", lambda k: k.flops), ("bytes", lambda k: k.bytes),
                               ("net_bytes", lambda k, shared=shared: k.bytes - k.params * bpe
                                if shared else k.bytes)):
                v00, v10, v01, v11 = (value(k) for k in corners)
                coefs[key][:, j] = torch.tensor([v00, v10 - v00, v01 - v00,
                                                 v11 - v10 - v01 + v00], dtype=torch.float64)
        return cls(maps["in"], consts["in"], maps["out"], consts["out"], coefs["flops"],
                   coefs["bytes"], coefs["net_bytes"],
                   torch.tensor([c.kind not in ("norm", "param") for c in calls]),
                   torch.tensor([c.kind == "conv" and c.depthwise for c in calls]),
                   torch.tensor([c.kind == "conv" and c.groups == 1 for c in calls]),
                   float(graph.fixed_flops * batch))

    def to(self, device: torch.device) -> _CallForms:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                 for k, v in self.__dict__.items()}
        return _CallForms(**moved)

    def counts(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input and output channels of every call for each row of ``w``, (n, C) each."""
        return w @ self.in_map + self.in_const, w @ self.out_map + self.out_const


@dataclass(frozen=True)
class FeatureMap:
    """Turns width vectors (n, E) into feature matrices for one graph, batch and dtype."""

    graph: HyperGraph
    batch: int = 1
    dtype: str = "float32"
    backend: str = "torch"  # the runtime the tables were timed in (adds its own features)
    _on: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def bytes_per_element(self) -> int:
        return _BYTES.get(self.dtype, 4)

    @cached_property
    def _forms_cpu(self) -> _CallForms:
        return _CallForms.read(self.graph, self.batch, self.bytes_per_element)

    def _forms(self, device: torch.device) -> _CallForms:
        """The call forms on ``device`` (read once, copied once per device)."""
        if device.type == "cpu":
            return self._forms_cpu
        if device not in self._on:
            self._on[device] = self._forms_cpu.to(device)
        return self._on[device]

    def _widths(self, widths: np.ndarray) -> dict[int, np.ndarray]:
        """Edge index -> column of widths: accounting then computes every sample at once."""
        w = np.atleast_2d(np.asarray(widths, dtype=float))
        return {i: w[:, i] for i in range(w.shape[1])}

    def _calls(self):
        return [c for c in self.graph.calls if c.kind not in ("norm", "param")]

    def layer_names(self) -> list[str]:
        names = [f"{k}:{c.module}" for c in self._calls() for k in ("gflops", "mbytes")]
        names += ["mbytes", "flops_mis8", "flops_mis32"] + [f"flops_pad{m}" for m in ALIGNMENTS]
        if self.backend == "onnxruntime":
            names += ["flops_ort_nchw", "mbytes_ort_nchw"]
        return names

    def layer_torch(self, widths: torch.Tensor) -> torch.Tensor:
        """The layer features of each row of ``widths`` (float64, differentiable), (n, F).

        Column order is :meth:`layer_names`: per-layer GFLOPs and MB, total MB, misaligned and
        padding GFLOPs (then, for ONNX Runtime, the GFLOPs and MB of its unblocked convs).
        """
        w = torch.atleast_2d(widths.to(torch.float64))
        f = self._forms(w.device)
        n_in, n_out = f.counts(w)
        net_mb = _bilinear(f.net_bytes, n_in, n_out).sum(1) / 1e6
        n_in, n_out = n_in[:, f.feature], n_out[:, f.feature]
        gflops = _bilinear(f.flops[:, f.feature], n_in, n_out) / 1e9
        mbytes = _bilinear(f.bytes[:, f.feature], n_in, n_out) / 1e6
        per_call = torch.stack([gflops, mbytes], dim=2).reshape(len(w), -1)
        whole_in, whole_out = n_in.detach().round(), n_out.detach().round()
        mis = [(gflops * ((torch.remainder(whole_in, m) != 0)
                          | (torch.remainder(whole_out, m) != 0))).sum(1) for m in (8, 32)]
        depthwise = f.depthwise[f.feature]
        pad = [(gflops * _excess(n_in, n_out, depthwise, m)).sum(1) for m in ALIGNMENTS]
        extra = []
        if self.backend == "onnxruntime":
            misaligned = torch.remainder(whole_in, ORT_CHANNEL_ALIGN) != 0
            unblocked = misaligned & (depthwise | (f.dense_conv[f.feature]
                                                   & (whole_in > ORT_NCHW_INPUT_MAX)))
            extra = [(gflops * unblocked).sum(1), (mbytes * unblocked).sum(1)]
        return torch.cat([per_call, torch.stack([net_mb, *mis, *pad, *extra], dim=1)], dim=1)

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
        f = self._forms(w.device)
        return _bilinear(f.flops, *f.counts(w)).sum(1) + f.fixed_flops

    def flops(self, widths: np.ndarray) -> np.ndarray:
        """Total FLOPs of each width vector (at the batch)."""
        w = np.atleast_2d(np.asarray(widths, dtype=float))
        f = network_cost(self.graph, self._widths(w), batch=self.batch).flops
        return np.broadcast_to(np.asarray(f, dtype=float), (len(w),)).copy()
