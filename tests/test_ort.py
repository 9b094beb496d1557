"""Timing on ONNX Runtime: sessions equal PyTorch, the protocol around them, tables, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from gator_hw.errors import GatorError
from gator_hw.profile import ort as ort_mod
from gator_hw.profile.ort import ORT_RTOL, OrtNet
from gator_hw.profile.runner import ProfileRequest, cells_path, run
from gator_hw.profile.timing import TimingSpec, device_slug, make_spec, time_model
from gator_hw.train.calibration import calibration_spec
from tests.test_profile import TINY, FakeMeasure

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, groups=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5)).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "tiny.py"
    path.write_text(TINY)
    return f"{path}:factory"


def test_session_equals_pytorch_and_runs_on_the_bound_input():
    model, x = _net(), torch.randn(2, 3, 12, 12)
    net = OrtNet(model, x, threads=1)
    assert net.rel_error <= ORT_RTOL
    net()
    with torch.inference_mode():
        want = model(x).numpy()
    np.testing.assert_allclose(net.output(), want, rtol=1e-4, atol=1e-5)


def test_a_session_that_differs_from_pytorch_is_refused(monkeypatch):
    real = ort_mod.onnx_bytes
    other = _net(seed=1)  # another network's weights: the export is wrong
    monkeypatch.setattr(ort_mod, "onnx_bytes", lambda model, x, **kw: real(other, x))
    with pytest.raises(GatorError, match="differs from PyTorch.*--backend torch"):
        OrtNet(_net(), torch.randn(2, 3, 12, 12), threads=1)


@pytest.mark.filterwarnings("ignore:Casting complex")
def test_an_export_failure_is_one_line():
    class Bad(nn.Module):
        def forward(self, x):
            return torch.linalg.eigvals(x[0, 0])  # complex output: no ONNX export

    with pytest.raises(GatorError, match="ONNX export for --backend onnxruntime failed"):
        OrtNet(Bad(), torch.randn(1, 1, 4, 4), threads=1)


def test_spec_and_slug_name_the_runtime():
    spec = make_spec("m", device="cpu", batch=2, input_size=8, threads=1,
                     backend="onnxruntime")
    assert spec.backend == "onnxruntime" and "in onnxruntime" in str(spec)
    assert spec.key()["backend"] == "onnxruntime"
    assert device_slug(spec).endswith("-ort") and not device_slug(
        make_spec("m", device="cpu", batch=2, input_size=8)).endswith("-ort")
    with pytest.raises(GatorError, match="float32 contiguous networks on the CPU"):
        make_spec("m", device="cpu", batch=2, input_size=8, dtype="bfloat16",
                  backend="onnxruntime")
    with pytest.raises(GatorError, match="unknown --backend 'tensorflow'"):
        TimingSpec(model="m", batch=1, input_size=8, backend="tensorflow")


def test_time_model_in_onnxruntime_pairs_with_the_reference(monkeypatch):
    built = []
    real_init = OrtNet.__init__

    def spy(self, model, x, *, threads):
        real_init(self, model, x, threads=threads)
        built.append((self.rel_error, threads))

    monkeypatch.setattr(OrtNet, "__init__", spy)
    spec = make_spec("m", device="cpu", batch=2, input_size=16, threads=1, repeats=4,
                     min_block_s=0.002, backend="onnxruntime")
    small = _net()
    big = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(),
                        nn.Conv2d(64, 5, 1))
    res = time_model(small, spec, reference=big)
    assert len(built) == 2 and all(e <= ORT_RTOL and t == 1 for e, t in built)
    assert len(res.times_s) == len(res.ref_times_s) == 4
    assert res.ref_median_ms > res.median_ms  # the reference does far more work


def test_profile_in_onnxruntime_checks_every_timed_variant(tiny, tmp_path, monkeypatch):
    checked = []
    real_init = OrtNet.__init__

    def spy(self, model, x, *, threads):
        real_init(self, model, x, threads=threads)
        checked.append(self.rel_error)

    monkeypatch.setattr(OrtNet, "__init__", spy)
    req = ProfileRequest.create(tiny, device="cpu", batch=2, input_size=16, rounds=1,
                                repeats=3, threads=1, backend="onnxruntime")
    res = run(req, tmp_path / "t.csv", progress=False)
    timed = len(res.table)
    assert timed >= 4 and len(checked) >= timed + 1  # each variant, and the full net it pairs with
    assert max(checked) <= ORT_RTOL
    meta = json.loads(res.json_path.read_text())
    assert meta["backend"] == "onnxruntime"
    info = meta["backend_info"]
    assert info["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert info["execution_provider"] == "CPUExecutionProvider" and info["onnxruntime"]
    assert meta["timing_spec"]["backend"] == "onnxruntime"


def test_resume_keeps_runtimes_apart(tiny, tmp_path):
    out = tmp_path / "r.csv"
    torch_req = ProfileRequest.create(tiny, device="cpu", batch=2, input_size=16, rounds=1,
                                      repeats=3, threads=1)
    run(torch_req, out, progress=False, measure=FakeMeasure())
    ort_req = ProfileRequest.create(tiny, device="cpu", batch=2, input_size=16, rounds=1,
                                    repeats=3, threads=1, backend="onnxruntime")
    with pytest.raises(GatorError, match="backend 'torch' -> 'onnxruntime'"):
        run(ort_req, out, progress=False, measure=FakeMeasure())
    # a resume file from before the backend was recorded is a torch one
    cells = cells_path(out)
    doc = json.loads(cells.read_text())
    doc["protocol"].pop("backend")
    cells.write_text(json.dumps(doc))
    again = FakeMeasure()
    run(torch_req, out, progress=False, measure=again)
    assert again.calls == []  # every cell reused


def test_resume_keeps_runtime_builds_and_options_apart(tiny, tmp_path, monkeypatch):
    out = tmp_path / "o.csv"
    req = ProfileRequest.create(tiny, device="cpu", batch=2, input_size=16, rounds=1,
                                repeats=3, threads=1, backend="onnxruntime")
    run(req, out, progress=False, measure=FakeMeasure())
    again = FakeMeasure()
    run(req, out, progress=False, measure=again)
    assert again.calls == []  # same runtime, same options: every cell reused
    monkeypatch.setattr(ort_mod, "ORT_OPT_LEVEL", "ORT_ENABLE_BASIC")
    with pytest.raises(GatorError, match="other settings.*runtime.*ORT_ENABLE_BASIC"):
        run(req, out, progress=False, measure=FakeMeasure())
    monkeypatch.undo()
    cells = cells_path(out)
    doc = json.loads(cells.read_text())
    doc["protocol"]["runtime"]["onnxruntime"] = "0.0.1"  # timed under another ORT build
    cells.write_text(json.dumps(doc))
    with pytest.raises(GatorError, match="other settings.*runtime.*0.0.1"):
        run(req, out, progress=False, measure=FakeMeasure())
    doc["protocol"].pop("runtime")  # from before the runtime was recorded: unknown, refused
    cells.write_text(json.dumps(doc))
    with pytest.raises(GatorError, match="other settings.*runtime None"):
        run(req, out, progress=False, measure=FakeMeasure())


def test_calibration_times_in_the_tables_runtime():
    ctx = {"model": "resnet18", "batch": 8, "input_size": 64, "threads": 1,
           "device_name": make_spec("m", device="cpu", batch=1, input_size=8).device_name}
    spec, _ = calibration_spec({"context": {**ctx, "backend": "onnxruntime"}},
                               torch.device("cpu"))
    assert spec is not None and spec.backend == "onnxruntime"
    spec, _ = calibration_spec({"context": ctx}, torch.device("cpu"))
    assert spec is not None and spec.backend == "torch"


def test_the_reference_session_is_reused_until_the_network_changes(monkeypatch):
    built = []
    real_init = OrtNet.__init__

    def spy(self, model, x, *, threads):
        real_init(self, model, x, threads=threads)
        built.append(model)

    monkeypatch.setattr(OrtNet, "__init__", spy)
    spec = make_spec("m", device="cpu", batch=2, input_size=12, threads=1, repeats=2,
                     min_block_s=0.001, backend="onnxruntime")
    ref = _net(seed=3)
    for _ in range(3):
        time_model(_net(), spec, reference=ref)
    assert sum(m is ref for m in built) == 1 and len(built) == 4
    with torch.no_grad():
        ref[0].weight.mul_(2.0)  # edited in place: a new session, checked against the new net
    time_model(_net(), spec, reference=ref)
    assert sum(m is ref for m in built) == 2
