"""Behaviours a planted-bug exercise found untested (issue #15), each pinned so the wrong code
fails: concatenations flattened into a linear, medians of skewed timings, resuming under any
changed timing setting, tampered plans, exports that must be rejected, reductions over
channels, grouped-conv accounting and the half-width multiplier probe."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from gator_hw.accounting import flop_counter_flops, layer_cost, network_cost
from gator_hw.convert import convert
from gator_hw.costmodel.features import FeatureMap
from gator_hw.costmodel.model import CostModel
from gator_hw.errors import GatorError
from gator_hw.export import (
    EXPORT_RTOL,
    ExportReport,
    _rel_error,
    export_onnx,
    export_program,
    export_torchscript,
)
from gator_hw.graph import HyperGraph, LayerCall, Seg, build_hypergraph
from gator_hw.io import PLAN_FILE, load, save
from gator_hw.masking import masked_output
from gator_hw.profile.runner import ProfileRequest, _Store, cells_path, run
from gator_hw.profile.tables import (
    Cell,
    build_table,
    gator_frame,
    noise_floor,
    summarize,
    table_metadata,
)
from gator_hw.profile.timing import LatencyResult, TimingSpec
from gator_hw.profile.variants import build_variants
from gator_hw.slim import layout_index, slim
from tests.conftest import cached_network, random_plan
from tests.randnets import INPUT, NetSpec, build, inputs

SPEC = TimingSpec(model="m", batch=1, input_size=8)




# ---------------------------------------------------------------------------------------------
# slim: two prunable edges concatenated, then flattened into a linear
# ---------------------------------------------------------------------------------------------
class CatFlatten(nn.Module):
    """Two convs (4 and 5 channels) concatenated, pooled to 2x2 and flattened into a linear:
    the linear's input is [edge a x 4 positions, edge b x 4 positions]."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 5, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(9 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return self.fc(torch.flatten(self.pool(y), 1))


def test_layout_index_offsets_each_part_by_the_positions_before_it() -> None:
    layout = (Seg(0, 4, 4), Seg(1, 5, 4))
    got = layout_index(layout, {0: [0, 2], 1: [1, 3, 4]}).tolist()
    assert got == [0, 1, 2, 3, 8, 9, 10, 11] + [16 + p for p in (4, 5, 6, 7, 12, 13, 14, 15,
                                                                 16, 17, 18, 19)]
    # an untouched first part still shifts the second by all its positions
    assert layout_index(layout, {1: [4]}).tolist() == list(range(16)) + [32, 33, 34, 35]
    assert layout_index((Seg(0, 3), Seg(1, 2)), {0: [2], 1: [1]}).tolist() == [2, 4]
    assert layout_index((), {}).tolist() == []


def test_slim_of_a_flattened_concatenation_equals_masked() -> None:
    torch.manual_seed(0)
    model = CatFlatten().double().eval()
    graph = build_hypergraph(model, INPUT, "catflatten")
    a, b = graph.edge("a"), graph.edge("b")
    fc = next(c for c in graph.calls if c.module == "fc")
    assert fc.in_layout == (Seg(a.gid, 4, 4), Seg(b.gid, 5, 4))
    plan = {a.gid: [0, 2], b.gid: [1, 3, 4]}
    small = slim(model, graph, plan)
    cols = [c * 4 + r for c in (0, 2) for r in range(4)] + [16 + c * 4 + r for c in (1, 3, 4)
                                                             for r in range(4)]
    assert torch.equal(small.fc.weight, model.fc.weight[:, cols])
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked_output(model, graph, plan, x))
    assert network_cost(graph, {a.gid: 2, b.gid: 3}).flops == flop_counter_flops(small, INPUT)


# ---------------------------------------------------------------------------------------------
# timing statistics: medians of skewed times (a mean or a wrong quantile differs)
# ---------------------------------------------------------------------------------------------
def test_latency_result_statistics_of_skewed_times() -> None:
    res = LatencyResult(SPEC, (1e-3, 2e-3, 3e-3, 4e-3, 100e-3))
    assert res.median_ms == pytest.approx(3.0)
    assert res.mean_ms == pytest.approx(22.0)
    assert res.iqr_ms == pytest.approx(2.0)  # q1 = 2, q3 = 4 (linear interpolation)
    assert res.rel_iqr == pytest.approx(2.0 / 3.0)
    assert res.noisy and "very noisy" in res.warnings[0]
    paired = LatencyResult(SPEC, (2e-3, 2e-3, 2e-3, 2e-3, 2e-3),
                           ref_times_s=(1e-3, 1e-3, 2e-3, 4e-3, 100e-3))
    assert paired.ref_median_ms == pytest.approx(2.0)
    assert paired.noise == pytest.approx((2.0 - 0.5) / 1.0)  # ratios 2, 2, 1, .5, .02
    steady = LatencyResult(SPEC, (1e-3, 1.01e-3, 1.02e-3, 1.03e-3))
    assert not steady.noisy and steady.warnings == ()
    assert LatencyResult(SPEC, (1e-3,) * 3).warnings == ("only 3 timed blocks; the IQR is "
                                                         "unreliable",)


@pytest.fixture(scope="module")
def small_graph() -> HyperGraph:
    model = build(NetSpec(residual=False))
    return build_hypergraph(model, INPUT, "m")


def _cells(graph: HyperGraph, base_ms: list[float], edge_ms: list[float], spread: tuple):
    """Cells of every 0.5 probe and the baseline, per round, with skewed per-block times."""
    variants = build_variants(graph, (0.5,))
    cells = []
    for r, (b, e) in enumerate(zip(base_ms, edge_ms, strict=True)):
        for v in variants:
            ms = b if v.kind == "baseline" else e
            cells.append(Cell(r, v.vid, tuple(ms * f * 1e-3 for f in spread)))
    return variants, cells


def test_table_columns_are_medians_of_skewed_blocks(small_graph) -> None:
    spread = (1.0, 1.0, 1.0, 1.2, 9.0)  # median 1, mean 2.64
    variants, cells = _cells(small_graph, [1.0], [0.5], spread)
    t = build_table(small_graph, variants, cells, SPEC)
    base = t[t["kind"] == "baseline"].iloc[0]
    edge = t[t["kind"] == "edge"].iloc[0]
    assert base["median_ms"] == pytest.approx(1.0) and edge["median_ms"] == pytest.approx(0.5)
    assert edge["baseline_ms"] == pytest.approx(1.0)
    assert edge["saving_ms"] == pytest.approx(0.5) and edge["saving_pct"] == pytest.approx(50.0)
    assert base["iqr_ms"] == pytest.approx(0.2) and base["rel_iqr"] == pytest.approx(0.2)
    assert str(cells[0]).startswith("round 0 full: 1 ms")


def test_interleaved_cells_pair_with_their_own_median_baseline(small_graph) -> None:
    variants = build_variants(small_graph, (0.5,))
    skew = (1.0, 1.0, 1.0, 1.2, 9.0)
    cells = [Cell(0, v.vid, tuple(0.5e-3 * f for f in skew),
                  ref_times_s=tuple(2e-3 * f for f in skew)) for v in variants[1:]]
    t = build_table(small_graph, variants, cells, SPEC)  # no baseline cell: own baselines
    assert len(t) == len(variants) - 1
    assert t["baseline_ms"].to_numpy() == pytest.approx(2.0)
    assert t["saving_pct"].to_numpy() == pytest.approx(75.0)


def test_summaries_over_rounds_are_medians(small_graph) -> None:
    # three rounds, none an outlier (< 1.5 x the fastest); median and mean differ
    variants, cells = _cells(small_graph, [1.0, 1.1, 1.45], [0.5, 0.55, 0.72], (1.0,) * 5)
    t = build_table(small_graph, variants, cells, SPEC)
    assert not t["flags"].str.contains("outlier").any()
    row = summarize(t).set_index("kind").loc["edge"].iloc[0]
    assert row["median_ms"] == pytest.approx(0.55)
    assert row["saving_ms"] == pytest.approx(0.55)  # rounds' savings .5, .55, .73
    meta = table_metadata(t, small_graph, SPEC, settings={})
    assert meta["baseline_median_ms"] == pytest.approx(1.1)
    assert meta["baseline_drift"] == pytest.approx(0.45 / 1.1)
    frame = gator_frame(t)
    assert frame is not None and frame.loc[frame["label"] == 0, "time_ms"].tolist() == \
        pytest.approx([1.0, 1.1, 1.45])
    floor = pd.DataFrame({"kind": ["baseline"] * 3 + ["edge"], "rel_iqr": [0.01, 0.09, 0.02, 5]})
    assert noise_floor(floor) == pytest.approx(0.02)


def test_gator_frame_scales_interleaved_ratios_by_the_median_baseline(small_graph) -> None:
    variants, cells = _cells(small_graph, [1.0, 1.1, 1.45], [0.5, 0.5, 0.5], (1.0,) * 5)
    cells = [c if c.variant == "full" else dataclasses.replace(
        c, ref_times_s=(2e-3,) * 5) for c in cells]  # each probe: a quarter of its own ref
    frame = gator_frame(build_table(small_graph, variants, cells, SPEC))
    probes = frame[frame["label"] > 0]["time_ms"].to_numpy()
    assert probes == pytest.approx(0.25 * 1.1)


# ---------------------------------------------------------------------------------------------
# resume: every field of the timing spec (and the class count) is part of the protocol
# ---------------------------------------------------------------------------------------------
def _changed(value: object) -> object:
    """Another value of the same type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2
    return {"float32": "bfloat16", "cpu": "cuda:0", "torch": "onnxruntime"}.get(
        value, f"{value}-other")


SPEC_FIELDS = [f.name for f in dataclasses.fields(TimingSpec) if f.name != "variant"]


@pytest.mark.parametrize("name", SPEC_FIELDS)
def test_resume_refuses_cells_timed_under_any_other_setting(name: str, tmp_path: Path) -> None:
    path = tmp_path / "t.cells.json"
    store = _Store(path, SPEC, 10)
    store.add(Cell(0, "full", (1e-3,) * 4))
    other = _changed(getattr(SPEC, name))
    if name == "regime":
        other = "cuda-eager"
    changed = dataclasses.replace(SPEC, **{name: other})
    assert changed.key() != SPEC.key() and name in changed.key()
    with pytest.raises(GatorError, match=f"other settings.*{name}"):
        _Store(path, changed, 10)
    assert _Store(path, SPEC, 10).cells == store.cells  # the same protocol resumes
    # the variant is not part of the protocol
    assert _Store(path, SPEC.for_variant("e000-k1"), 10).cells == store.cells
    with pytest.raises(GatorError, match="num_classes"):
        _Store(path, SPEC, 11)


def _fake_measure(model: nn.Module, spec: TimingSpec, reference: nn.Module | None = None):
    n = sum(p.numel() for p in model.parameters())
    times = tuple(1e-3 * (1 + n / 1e4) * (1 + 0.001 * i) for i in range(5))
    return LatencyResult(spec, times, 1, times if reference is not None else ())


@pytest.mark.parametrize("field, value", [("threads", 2), ("warmup", 7), ("repeats", 6),
                                          ("min_block_s", 0.01), ("interleave", True),
                                          ("cudnn_benchmark", False), ("device_name", "other")])
def test_profile_run_refuses_to_resume_with_another_setting(
    field: str, value: object, tmp_path: Path
) -> None:
    model = str(_write_factory(tmp_path)) + ":factory"
    spec = TimingSpec(model=model, batch=1, input_size=8, repeats=5)
    out = tmp_path / "p.csv"
    run(ProfileRequest(spec, rounds=1), out, progress=False, measure=_fake_measure)
    assert cells_path(out).exists()
    again = ProfileRequest(dataclasses.replace(spec, **{field: value}), rounds=1)
    with pytest.raises(GatorError, match=f"other settings.*{field}"):
        run(again, out, progress=False, measure=_fake_measure)


def _write_factory(tmp_path: Path) -> Path:
    path = tmp_path / "net.py"
    path.write_text(
        "from torch import nn\n"
        "def factory(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),\n"
        "                         nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(6, num_classes))\n"
    )
    return path


# ---------------------------------------------------------------------------------------------
# loading a converted model: plan.json must name the model's own edges and channel counts
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    net = cached_network("resnet20")
    plan = random_plan(net.graph, seed=3)
    d = tmp_path / "conv"
    save(d, convert(net.model, net.graph, plan), name="resnet20", num_classes=10, input_size=32,
         graph=net.graph, keep=plan)
    return d


def _edit_plan(d: Path, edit) -> None:
    doc = json.loads((d / PLAN_FILE).read_text())
    edit(doc["edges"])
    (d / PLAN_FILE).write_text(json.dumps(doc))


@pytest.mark.parametrize("what", ["name", "channels", "both"])
def test_load_refuses_a_plan_with_other_edges(saved: Path, what: str) -> None:
    assert isinstance(load(saved), nn.Module)  # the untouched plan loads

    def edit(edges: list) -> None:
        e = edges[1]
        if what in ("name", "both"):
            e["name"] = e["name"] + "_renamed"
        if what in ("channels", "both"):
            e["channels"] = e["channels"] * 2  # kept indices stay valid: only the count lies

    _edit_plan(saved, edit)
    with pytest.raises(GatorError, match="does not match the edges of resnet20"):
        load(saved)


def test_export_command_refuses_a_renamed_edge(saved: Path, tmp_path: Path) -> None:
    from gator_hw.cli import app

    _edit_plan(saved, lambda edges: edges[0].update(name=edges[0]["name"] + "_x"))
    res = CliRunner().invoke(app, ["export", str(saved), "--torchscript",
                                   str(tmp_path / "m.pt")])
    assert res.exit_code != 0 and isinstance(res.exception, GatorError)
    assert "does not match the edges" in str(res.exception)
    assert not (tmp_path / "m.pt").exists()


# ---------------------------------------------------------------------------------------------
# export verification rejects exports that compute something else
# ---------------------------------------------------------------------------------------------
class BatchTwoTrick(nn.Module):
    """Doubles its output only for a batch of two: a trace (taken at batch 2) keeps the doubling
    for every batch, so the exported module differs from PyTorch at batch 3."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x.flatten(1))
        return y * 2 if x.shape[0] == 2 else y


SHAPE = (1, 3, 4, 4)


def test_rel_error_and_verified_threshold(tmp_path: Path) -> None:
    assert _rel_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])) == pytest.approx(0.5)
    assert _rel_error(torch.tensor([-1.0, 0.0]), torch.tensor([-3.0, 1.0])) == pytest.approx(2 / 3)
    assert _rel_error(torch.zeros(2), torch.zeros(2)) == 0.0
    p = tmp_path / "x"
    assert ExportReport("onnx", p, EXPORT_RTOL).verified
    assert not ExportReport("onnx", p, EXPORT_RTOL * 1.01).verified
    assert not ExportReport("onnx", p, None, "no runtime").verified
    assert "not verified: no runtime" in str(ExportReport("onnx", p, None, "no runtime"))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchscript_export_that_differs_is_rejected(tmp_path: Path) -> None:
    # a trace taken at batch 2 doubles at batch 3 too: |2y - y| / max|y| = 1
    with pytest.raises(GatorError, match=r"torchscript export .* from PyTorch by 1\.00e\+00"):
        export_torchscript(BatchTwoTrick().eval(), SHAPE, tmp_path / "m.pt")
    ok = export_torchscript(nn.Sequential(nn.Flatten(), nn.Linear(48, 2)), SHAPE,
                            tmp_path / "ok.pt")
    assert ok.verified and ok.rel_error < 1e-6


class _Off:
    """Wraps a module and scales its output by ``1 + eps`` (an export off by that much)."""

    def __init__(self, module: nn.Module, eps: float) -> None:
        self.m, self.eps = module, eps

    def module(self):
        return lambda x: self.m(x) * (1 + self.eps)


@pytest.mark.parametrize("eps, rejected", [(1e-3, True), (2e-5, False)])
def test_program_export_is_checked_against_pytorch(
    tmp_path: Path, monkeypatch, eps: float, rejected: bool
) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2)).eval()
    real_load = torch.export.load
    monkeypatch.setattr(torch.export, "load", lambda p: _Off(real_load(p).module(), eps))
    if rejected:
        with pytest.raises(GatorError, match="torch.export export .* differs from PyTorch"):
            export_program(model, SHAPE, tmp_path / "m.pt2")
    else:
        rep = export_program(model, SHAPE, tmp_path / "m.pt2")
        assert rep.verified and rep.rel_error == pytest.approx(eps, rel=0.1)


def test_onnx_export_is_checked_against_onnxruntime(tmp_path: Path, monkeypatch) -> None:
    ort = pytest.importorskip("onnxruntime")
    real = ort.InferenceSession

    class OffSession:
        def __init__(self, *a, **kw) -> None:
            self.s = real(*a, **kw)

        def get_inputs(self):
            return self.s.get_inputs()

        def run(self, names, feeds):
            return [o * 1.01 for o in self.s.run(names, feeds)]

    monkeypatch.setattr(ort, "InferenceSession", OffSession)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2)).eval()
    with pytest.raises(GatorError, match=r"onnx export .* differs from PyTorch by 1\.00e-02"):
        export_onnx(model, SHAPE, tmp_path / "m.onnx")


# ---------------------------------------------------------------------------------------------
# reductions over channels read every channel: the edge is frozen
# ---------------------------------------------------------------------------------------------
REDUCTIONS = {
    "mean1": lambda h: h.mean(1),
    "mean_dim_kw": lambda h: h.mean(dim=1),
    "mean_keepdim": lambda h: h.mean(1, keepdim=True),
    "mean_neg3": lambda h: h.mean(-3),
    "mean_tuple": lambda h: h.mean((1, 2)),
    "torch_mean": lambda h: torch.mean(h, 1),
    "amax1": lambda h: h.amax(1),
    "torch_amax": lambda h: torch.amax(h, dim=(-3,)),
    "batch": lambda h: h.mean(0, keepdim=True),
}


class Reduce(nn.Module):
    """conv a (4 channels) -> conv b (6 channels) -> a reduction -> a linear on what is left."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 6, 3, padding=1)
        with torch.no_grad():
            out = REDUCTIONS[how](self.b(self.a(torch.zeros(INPUT))))
        self.fc = nn.Linear(out.flatten(1).shape[1], 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.fc(torch.flatten(REDUCTIONS[self.how](h), 1))


@pytest.mark.parametrize("how", list(REDUCTIONS))
def test_a_reduction_over_channels_freezes_the_edge(how: str) -> None:
    graph = build_hypergraph(Reduce(how).eval(), INPUT, how)
    b = next(g for g in graph.groups if "b" in {s.module for s in g.sites if s.role == "out"})
    assert not b.prunable, graph.summary()
    assert any("reduces over channels" in r or "no channel rule" in r for r in b.frozen_reasons)
    assert [e.name for e in graph.edges] == ["a"]  # the edge before it stays prunable


@pytest.mark.parametrize("dims", [(2, 3), (-1, -2), 2])
def test_a_reduction_over_space_passes_channels_on(dims) -> None:
    class Pool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 5, 3, padding=1)
            self.fc = nn.Linear(5 * (8 if dims == 2 else 1), 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))
            return self.fc(torch.flatten(h.amax(dims) if dims == 2 else h.mean(dims), 1))

    model = Pool().double().eval()
    graph = build_hypergraph(model, INPUT, "pool")
    assert [e.name for e in graph.edges] == ["a"]
    plan = {0: [1, 4]}
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(slim(model, graph, plan)(x),
                                   masked_output(model, graph, plan, x))


# ---------------------------------------------------------------------------------------------
# grouped convs: weights and FLOPs divide by the groups
# ---------------------------------------------------------------------------------------------
def test_grouped_conv_layer_cost_divides_by_groups() -> None:
    call = LayerCall("g", "conv", 0, (Seg(0, 8),), (Seg(0, 8),), kernel=9, groups=4,
                     spatial_in=16, spatial_out=16)
    c = layer_cost(call, {})
    assert c.params == 9 * 8 / 4 * 8
    assert c.flops == 2 * 9 * 8 / 4 * 8 * 16
    assert c.bytes == (8 * 16 * 2 + 9 * 8 / 4 * 8) * 4
    dw = dataclasses.replace(call, groups=8, depthwise=True)
    assert layer_cost(dw, {0: 6}).flops == 2 * 9 * 6 * 16
    half = layer_cost(call, {0: 4})  # 4 groups of 1 channel in, 1 out
    assert half.params == 9 * 4 / 4 * 4


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_conv_accounting_equals_counted_flops(groups: int) -> None:
    s = NetSpec(stem_per_group=2, groups=groups, grouped=True, residual=False)
    model = build(s)
    graph = build_hypergraph(model, INPUT, "grouped")
    assert graph.fixed_flops == 0.0
    assert network_cost(graph).flops == flop_counter_flops(model, INPUT)
    stem = next(e for e in graph.edges if "gconv" in e.writers)
    assert stem.groups == groups
    plan = graph.first_channels_plan({stem.gid: groups})  # one channel per group
    small = slim(model, graph, plan)
    assert small.gconv.groups == groups and small.gconv.weight.shape[:2] == (groups, 1)
    assert network_cost(graph, {stem.gid: groups}).flops == flop_counter_flops(small, INPUT)
    assert network_cost(graph, {stem.gid: groups}).params == sum(
        p.numel() for p in small.parameters())


# ---------------------------------------------------------------------------------------------
# multipliers: latency saved over FLOPs saved when an edge is halved
# ---------------------------------------------------------------------------------------------
class SqrtLatency:
    """A latency law FLOPs alone do not give linearly: ms = sqrt(GFLOPs) (so the probe width
    changes the multiplier)."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.sqrt(np.asarray(x)[:, 0])


def _expected_multiplier(graph: HyperGraph, w0: list[int], e: int) -> float:
    half = dict(enumerate(w0))
    half[e] = graph.valid_keep_count(e, max(1, w0[e] // 2))
    f0, f1 = network_cost(graph, dict(enumerate(w0))).flops, network_cost(graph, half).flops
    t0, t1 = math.sqrt(f0 / 1e9), math.sqrt(f1 / 1e9)
    if f0 == f1:
        return 1.0
    return max(0.01, ((t0 - t1) / t0) / ((f0 - f1) / f0))


def test_multipliers_probe_each_edge_at_half_its_current_width() -> None:
    s = NetSpec(stem_per_group=4, groups=2, grouped=True, inner=5, branch_a=6, branch_b=3)
    graph = build_hypergraph(build(s), INPUT, "m")
    cm = CostModel(graph, FeatureMap(graph), "flops_linear", SqrtLatency(), 1.0, [])
    full = [e.channels for e in graph.edges]
    got = cm.multipliers()
    want = [_expected_multiplier(graph, full, e) for e in range(graph.n_edges)]
    assert got == pytest.approx(want, rel=1e-12)
    assert len(set(np.round(got, 6))) > 1 and all(0.5 < m < 1.0 for m in got)
    now = [max(1, c // 2) if i == 0 else c for i, c in enumerate(full)]  # edge 0 narrowed
    got_now = cm.multipliers(now)
    assert got_now == pytest.approx(
        [_expected_multiplier(graph, now, e) for e in range(graph.n_edges)], rel=1e-12)
    assert got_now[1:] != pytest.approx(got[1:], rel=1e-9)  # other edges see edge 0 as is
