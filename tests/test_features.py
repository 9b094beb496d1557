"""The vectorised layer features against brute force: ``layer_cost`` call by call.

``FeatureMap.layer_torch`` and ``flops_torch`` compute every call at once from forms read off
``call_cost``; the reference below is the plain loop over the graph's calls (the accounting
itself). Values must agree to rounding and gradients (the cost loss's) to 1e-9, on nets with
every kind of call: plain, depthwise and grouped convs, concatenations, attention.
"""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path

import pytest
import torch

from gator_hw.accounting import layer_cost, network_cost
from gator_hw.costmodel.features import (
    ALIGNMENTS,
    ORT_CHANNEL_ALIGN,
    ORT_NCHW_INPUT_MAX,
    FeatureMap,
    padded_excess,
)
from gator_hw.graph import build_hypergraph
from tests.conftest import cached_network
from tests.test_transformers import tiny_vit


def reference_layer_features(fm: FeatureMap, w: torch.Tensor) -> torch.Tensor:
    """The layer features, one call at a time from the accounting (brute force)."""
    w = torch.atleast_2d(w)
    wd = {i: w[:, i] for i in range(w.shape[1])}
    zero = w.new_zeros(len(w))
    cols: list[torch.Tensor] = []
    mis = {8: zero, 32: zero}
    pad = dict.fromkeys(ALIGNMENTS, zero)
    ort_flops, ort_mb = zero, zero
    for c in fm.graph.calls:
        if c.kind in ("norm", "param"):
            continue
        cost = layer_cost(c, wd, batch=fm.batch, bytes_per_element=fm.bytes_per_element)
        f = zero + cost.flops / 1e9
        cols += [f, zero + cost.bytes / 1e6]
        n_in = zero + sum(wd.get(s.gid, s.length) * s.repeat for s in c.in_layout)
        n_out = zero + sum(wd.get(s.gid, s.length) * s.repeat for s in c.out_layout)
        for m in mis:
            off = (torch.remainder(n_in.detach().round(), m) != 0) | (
                torch.remainder(n_out.detach().round(), m) != 0)
            mis[m] = mis[m] + f * off
        for m in pad:
            pad[m] = pad[m] + f * padded_excess(c, n_in, n_out, m)
        whole = n_in.detach().round()
        dense = c.kind == "conv" and c.groups == 1
        depthwise = c.kind == "conv" and c.depthwise
        unblocked = (torch.remainder(whole, ORT_CHANNEL_ALIGN) != 0) & (
            depthwise | (dense & (whole > ORT_NCHW_INPUT_MAX)))
        ort_flops = ort_flops + f * unblocked
        ort_mb = ort_mb + cost.bytes / 1e6 * unblocked
    total = network_cost(fm.graph, wd, batch=fm.batch, bytes_per_element=fm.bytes_per_element)
    cols += [zero + total.bytes / 1e6, mis[8], mis[32], *pad.values()]
    if fm.backend == "onnxruntime":
        cols += [ort_flops, ort_mb]
    return torch.stack(cols, dim=1)


class _Shared(torch.nn.Module):
    """A conv called twice: its weights are read once per call but stored once."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.body = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.body(self.stem(x)).relu())
        return self.head(x.mean((2, 3)))


def _graphs():
    yield "shared", build_hypergraph(_Shared(), (1, 3, 16, 16), "shared")
    yield "resnet18", cached_network("resnet18", 32).graph
    yield "mobilenet_v2", cached_network("mobilenet_v2", 32).graph  # depthwise
    yield "resnext50_32x4d", cached_network("resnext50_32x4d", 32).graph  # grouped
    yield "densenet121", cached_network("densenet121", 32).graph  # concatenations
    yield "vit", build_hypergraph(tiny_vit(), (1, 3, 32, 32), "vit")  # attention, params


@pytest.mark.parametrize(("name", "graph"), list(_graphs()), ids=lambda v: v
                         if isinstance(v, str) else "")
@pytest.mark.parametrize(("batch", "dtype", "backend"),
                         [(1, "float32", "torch"), (3, "bfloat16", "torch"),
                          (2, "float32", "onnxruntime")])
def test_layer_features_equal_the_call_by_call_accounting(name, graph, batch, dtype,
                                                          backend) -> None:
    fm = FeatureMap(graph, batch, dtype, backend)
    gen = torch.Generator().manual_seed(len(name) + batch)
    full = torch.tensor([float(e.channels) for e in graph.edges], dtype=torch.float64)
    rows = [full, torch.ones_like(full), (full * 0.5).round()]
    rows += [torch.randint(1, 1 << 30, full.shape, generator=gen) % full + 1 for _ in range(5)]
    rows += [full * torch.rand(full.shape, generator=gen, dtype=torch.float64) + 0.5]
    w = torch.stack(rows).to(torch.float64)
    got, want = fm.layer_torch(w), reference_layer_features(fm, w)
    assert got.shape == (len(w), len(fm.layer_names()))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    flops = [network_cost(graph, dict(enumerate(r.tolist())), batch=batch).flops for r in w]
    torch.testing.assert_close(fm.flops_torch(w), torch.tensor(flops, dtype=torch.float64),
                               rtol=1e-12, atol=0.0)
    # the gradient the cost loss takes, for a random positive law over the features
    coef = torch.rand(got.shape[1], generator=gen, dtype=torch.float64)

    def grad(fn) -> torch.Tensor:
        n = w[3:].clone().requires_grad_(True)
        (g,) = torch.autograd.grad((fn(n) @ coef).sum(), n)
        return g

    torch.testing.assert_close(grad(fm.layer_torch),
                               grad(lambda n: reference_layer_features(fm, n)),
                               rtol=1e-9, atol=1e-12)


def test_layer_features_run_on_another_device_copy_of_the_forms() -> None:
    """The forms are read once and kept per device; a second call reuses them."""
    fm = FeatureMap(cached_network("resnet18", 32).graph)
    w = torch.tensor([[float(e.channels) for e in fm.graph.edges]], dtype=torch.float64)
    first = fm.layer_torch(w)
    assert fm._forms_cpu is fm._forms(torch.device("cpu"))
    torch.testing.assert_close(fm.layer_torch(w), first, rtol=0, atol=0)
    meta = torch.device("meta")  # another device, without a GPU: the forms are copied once
    assert fm._forms(meta) is fm._forms(meta) and fm._forms(meta).in_map.device == meta
    if torch.cuda.is_available():
        torch.testing.assert_close(fm.layer_torch(w.cuda()).cpu(), first, rtol=1e-12, atol=0)


def test_onnxruntime_adds_the_unblocked_conv_features_only_to_its_own_tables() -> None:
    graph = cached_network("resnet18", 32).graph
    torch_names = FeatureMap(graph).layer_names()
    ort = FeatureMap(graph, backend="onnxruntime")
    assert ort.layer_names() == [*torch_names, "flops_ort_nchw", "mbytes_ort_nchw"]
    full = torch.tensor([[float(e.channels) for e in graph.edges]], dtype=torch.float64)
    assert ort.layer_torch(full)[0, -2:].tolist() == [0.0, 0.0]  # 64..512: all blocked
    odd = full.clone()
    odd[0, 3] = 101.0  # layer2.0.conv1's output: layer2.0.conv2 reads 101 channels
    got = ort.layer_torch(odd)[0]
    conv2 = torch.tensor([n == "gflops:layer2.0.conv2" for n in ort.layer_names()])
    assert got[-2] == got[conv2].sum() > 0  # that conv alone, all of its FLOPs


def _ort_blocks(c_in: int, groups: int = 1) -> bool:
    """Whether ONNX Runtime's optimiser runs a 3x3 conv reading ``c_in`` channels in NCHWc."""
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from gator_hw.profile.ort import onnx_bytes

    out = c_in if groups > 1 else 32
    conv = torch.nn.Sequential(torch.nn.Conv2d(c_in, out, 3, padding=1, groups=groups),
                               torch.nn.ReLU()).eval()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory() as tmp:
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(onnx_bytes(conv, torch.randn(1, c_in, 8, 8)), opts,
                             providers=["CPUExecutionProvider"])
        ops = {(n.domain, n.op_type) for n in onnx.load(opts.optimized_model_filepath).graph.node}
    return ("com.microsoft.nchwc", "Conv") in ops


@pytest.mark.parametrize(("c_in", "depthwise"), [
    *((c, False) for c in (3, 16, 17, 18, 20, 22, 24, 62, 64, 101, 104)),
    *((c, True) for c in (9, 12, 18, 20, 33, 64))])
def test_the_unblocked_conv_rule_is_onnxruntimes_own(c_in, depthwise) -> None:
    """The feature's rule against the installed ONNX Runtime's graph optimiser (x86-64)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the NCHWc rule was read off x86-64 builds")
    aligned = c_in % ORT_CHANNEL_ALIGN == 0
    want = aligned if depthwise else (c_in <= ORT_NCHW_INPUT_MAX or aligned)
    assert _ort_blocks(c_in, groups=c_in if depthwise else 1) == want
