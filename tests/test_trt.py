"""Timing on TensorRT: specs, engines equal PyTorch, the build cache and flags, the sidecar.

Without a GPU the engine is :mod:`tests.fake_tensorrt` (ONNX Runtime behind TensorRT's API, on
tensors bound by address); with CUDA and the real ``tensorrt`` the last test times for real.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from torch import nn

from gator_hw.errors import GatorError
from gator_hw.profile import trt as trt_mod
from gator_hw.profile.backends import backend_info, reference_net
from gator_hw.profile.timing import TimingSpec, device_slug, make_spec, time_model
from gator_hw.profile.trt import TRT_RTOL, TrtNet

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(6, 5)).eval()


@pytest.fixture
def fake_trt(monkeypatch):
    from tests import fake_tensorrt

    fake_tensorrt.BUILDS.clear()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    monkeypatch.setattr(trt_mod, "_ENGINES", {})
    monkeypatch.setattr(trt_mod, "_STATE", {})
    return fake_tensorrt


def _cuda_spec(**kw) -> TimingSpec:
    return TimingSpec(model="m", batch=2, input_size=12, device="cuda:0",
                      device_name="NVIDIA H200", regime="cuda-graph", backend="tensorrt", **kw)


def test_tensorrt_needs_a_gpu_and_says_so_in_one_line():
    with pytest.raises(GatorError, match="--backend tensorrt times networks on an NVIDIA GPU"):
        TimingSpec(model="m", batch=1, input_size=8, backend="tensorrt")
    with pytest.raises(GatorError, match="picks its own layouts"):
        _cuda_spec(channels_last=True)
    with pytest.raises(GatorError, match="unknown --backend 'tensorrtx'.*tensorrt"):
        TimingSpec(model="m", batch=1, input_size=8, backend="tensorrtx")


def test_a_missing_tensorrt_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorrt" else real(name, *a))
    with pytest.raises(GatorError, match="needs tensorrt.*pip install tensorrt"):
        make_spec("m", device="cpu", batch=1, input_size=8, backend="tensorrt")


def test_the_engine_equals_pytorch_on_the_bound_tensors(fake_trt):
    model, x = _net(), torch.randn(2, 3, 12, 12)
    net = TrtNet(model, x)
    assert net.rel_error <= TRT_RTOL["float32"]
    x.copy_(torch.randn(2, 3, 12, 12))  # the bound input is read at every call
    net()
    with torch.inference_mode():
        want = model(x)
    torch.testing.assert_close(net.out, want, rtol=1e-4, atol=1e-5)
    (build,) = fake_trt.BUILDS
    assert build["strongly_typed"] and not build["tf32"] and build["timing_cache"] is not None


def test_tf32_is_allowed_only_when_the_spec_allows_it(fake_trt):
    x = torch.randn(2, 3, 12, 12)
    TrtNet(_net(), x, tf32=False)
    TrtNet(_net(), x, tf32=True)
    assert [b["tf32"] for b in fake_trt.BUILDS] == [False, True]
    assert fake_trt.BUILDS[0]["timing_cache"] is fake_trt.BUILDS[1]["timing_cache"] is not None


def test_an_engine_is_built_once_per_network(fake_trt):
    x = torch.randn(2, 3, 12, 12)
    for _ in range(3):
        TrtNet(_net(seed=0), x)
    assert len(fake_trt.BUILDS) == 1
    TrtNet(_net(seed=1), x)  # other weights: another engine
    TrtNet(_net(seed=0), torch.randn(4, 3, 12, 12))  # another shape: another engine
    assert len(fake_trt.BUILDS) == 3


def test_an_engine_that_differs_from_pytorch_is_refused(fake_trt, monkeypatch):
    real = trt_mod.onnx_bytes
    other = _net(seed=1)
    monkeypatch.setattr(trt_mod, "onnx_bytes", lambda model, x, **kw: real(other, x))
    with pytest.raises(GatorError, match="TensorRT engine differs from PyTorch.*--backend torch"):
        TrtNet(_net(), torch.randn(2, 3, 12, 12))


def test_the_reference_engine_is_reused_until_the_network_changes(fake_trt, monkeypatch):
    spec = _cuda_spec()
    monkeypatch.setattr("gator_hw.profile.backends._REFERENCE", {})
    ref, x = _net(seed=3), torch.randn(2, 3, 12, 12)
    first = reference_net(ref, x, spec)
    assert reference_net(ref, x, spec) is first
    with torch.no_grad():
        ref[0].weight.mul_(2.0)
    assert reference_net(ref, x, spec) is not first


def test_the_sidecar_and_the_folder_name_the_runtime(fake_trt):
    spec = _cuda_spec(tf32=True)
    info = backend_info(spec)
    assert info["tensorrt"] == fake_trt.__version__ and info["strongly_typed"] and info["tf32"]
    assert device_slug(spec) == "h200-trt"
    assert device_slug(TimingSpec(model="m", batch=1, input_size=8, device="cuda:0",
                                  device_name="NVIDIA H200", regime="cuda-graph")) == "h200"


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("tensorrt") is None,
                    reason="needs CUDA and tensorrt")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tensorrt_times_a_network_on_the_gpu(dtype):
    spec = make_spec("m", device="cuda", batch=2, input_size=32, dtype=dtype,
                     backend="tensorrt", repeats=4)
    res = time_model(_net(), spec, reference=_net(seed=1))
    assert res.median_ms > 0 and len(res.times_s) >= 4
