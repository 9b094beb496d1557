"""The profiler: timing protocol, variants, rounds and resume, tables, and the CLI command."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from torch import nn
from typer.testing import CliRunner

from gator_hw.commands.profile import register
from gator_hw.costmodel.gator import gator_multipliers, read_gator_csv
from gator_hw.errors import GatorError
from gator_hw.network import load_network
from gator_hw.profile import runner as runner_mod
from gator_hw.profile.runner import ProfileRequest, cells_path, default_out, run, schedule
from gator_hw.profile.spec import TimingOptions
from gator_hw.profile.tables import (
    Cell,
    build_table,
    gator_frame,
    read_table,
    sidecar_path,
    summarize,
)
from gator_hw.profile.timing import (
    NOISY_REL_IQR,
    LatencyResult,
    TimingSpec,
    device_info,
    device_slug,
    make_spec,
    resolve_device,
    time_model,
    torch_settings,
)
from gator_hw.profile.variants import build_variants, keep_count, parse_widths, random_variants
from gator_hw.slim import slim

TINY = """
from torch import nn

def factory(num_classes=10):
    # edge 0: 4 channels feeding a cheap 1x1 conv; edges 1 and 2: 128 channels around a 3x3
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes),
    )
"""

SIDECAR_KEYS = {
    "device",
    "dtype",
    "channels_last",
    "batch",
    "input_size",
    "threads",
    "tf32",
    "tf32_flags",
    "cudnn_benchmark",
    "cuda_graphs",
    "date",
    "seed",
    "gator_hw_version",
    "noise_floor",
    "regime",
    "regime_note",
    "timing_spec",
    "widths",
    "rounds",
    "random_nets",
    "n_edges",
}
DEVICE_KEYS = {"device_name", "driver", "torch", "cuda", "cudnn"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "tiny.py"
    path.write_text(TINY)
    return f"{path}:factory"


def _request(model: str, **kw) -> ProfileRequest:
    opts = dict(device="cpu", batch=2, input_size=16, rounds=2, repeats=5, threads=1)
    opts.update(kw)
    return ProfileRequest.create(model, **opts)


def fake_ms(model: nn.Module) -> float:
    """The fake timer's true latency of a model: grows with its parameter count."""
    return 1.0 + sum(p.numel() for p in model.parameters()) / 1e5


class FakeMeasure:
    """Deterministic stand-in for time_model. ``speeds`` cycles the machine's speed per cell
    (a shared CPU switching state); an interleaved reference is timed at the same speed."""

    def __init__(self, noisy_first: bool = False, speeds: tuple[float, ...] = (1.0,)) -> None:
        self.calls: list[str] = []
        self.noisy_first = noisy_first
        self.speeds = speeds

    def __call__(
        self, model: nn.Module, spec: TimingSpec, reference: nn.Module | None = None
    ) -> LatencyResult:
        self.calls.append(spec.variant)
        slow = self.speeds[(len(self.calls) - 1) % len(self.speeds)]
        spread = 0.5 if self.noisy_first and len(self.calls) % 2 == 1 else 0.01

        def times(m: nn.Module, spread: float) -> tuple[float, ...]:
            return tuple(1e-3 * slow * fake_ms(m) * (1 + spread * (i - 2) / 4) for i in range(5))

        ref = times(reference, 0.0) if reference is not None else ()
        return LatencyResult(spec, times(model, spread), 1, ref)


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------
def test_latency_result_stats_and_warnings():
    spec = TimingSpec(model="m", batch=1, input_size=8)
    quiet = LatencyResult(spec, (1e-3, 1.01e-3, 0.99e-3, 1e-3, 1e-3))
    assert math.isclose(quiet.median_ms, 1.0)
    assert quiet.iqr_ms == pytest.approx(0.0, abs=1e-9) and not quiet.noisy
    assert quiet.mean_ms == pytest.approx(1.0) and not quiet.has_warnings
    noisy = LatencyResult(spec, (1e-3, 1.5e-3, 0.7e-3, 2e-3, 1e-3))
    assert noisy.rel_iqr > NOISY_REL_IQR and noisy.noisy
    assert any("noisy" in w for w in noisy.warnings)
    assert "WARNING" in str(noisy) and "m [full]" in str(noisy)
    edge = LatencyResult(spec, (1.125, 1.125, 1.25, 1.25, 1.25))  # rel IQR 0.125 / 1.25
    assert edge.noise == NOISY_REL_IQR and not edge.noisy  # noisy means above the threshold
    assert LatencyResult(spec, (1.12, 1.12, 1.25, 1.25, 1.25)).noisy
    short = LatencyResult(spec, (1e-3,))
    assert any("blocks" in w for w in short.warnings)
    with pytest.raises(ValueError):
        LatencyResult(spec, ())


def test_timing_spec_validates_and_describes():
    spec = TimingSpec(model="m", batch=4, input_size=32, dtype="bfloat16", channels_last=True)
    assert spec.torch_dtype is torch.bfloat16 and spec.memory_format is torch.channels_last
    assert spec.input_shape == (4, 3, 32, 32) and spec.torch_device.type == "cpu"
    assert spec.for_variant("e001-k2").variant == "e001-k2"
    assert "variant" not in spec.key() and "channels-last" in str(spec)
    with pytest.raises(GatorError, match="dtype"):
        TimingSpec(model="m", batch=1, input_size=8, dtype="int8")
    with pytest.raises(GatorError, match="batch"):
        TimingSpec(model="m", batch=0, input_size=8)
    with pytest.raises(GatorError, match="regime"):
        TimingSpec(model="m", batch=1, input_size=8, regime="magic")


def test_torch_settings_restores_state():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    model.train()
    model[0].eval()
    threads, bench, grad = torch.get_num_threads(), torch.backends.cudnn.benchmark, True
    with torch_settings(threads=1, cudnn_benchmark=not bench, grad_enabled=False, model=model):
        assert torch.get_num_threads() == 1 and not torch.is_grad_enabled()
        assert torch.backends.cudnn.benchmark is (not bench) and not model.training
    assert torch.get_num_threads() == threads and torch.is_grad_enabled() is grad
    assert torch.backends.cudnn.benchmark is bench
    assert model.training and not model[0].training and model[1].training
    # TF32 is set from the spec for convs and matmuls alike, and restored
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    for want in (True, False):
        with torch_settings(tf32=want):
            assert torch.backends.cudnn.allow_tf32 is want
            assert torch.backends.cuda.matmul.allow_tf32 is want
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == old


def test_time_model_cpu_protocol():
    spec = make_spec("conv", device="cpu", batch=2, input_size=8, threads=1, repeats=6)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    model.train()
    res = time_model(model, spec)
    assert len(res.times_s) >= 6 and res.number >= 1 and res.median_ms > 0
    assert res.spec is spec and spec.regime == "cpu" and spec.threads == 1
    assert not any(p.requires_grad for p in model.parameters())
    assert spec.interleave and res.ref_times_s == () and res.noise == res.rel_iqr


def test_time_model_interleaved_with_a_reference():
    spec = make_spec("conv", device="cpu", batch=2, input_size=16, threads=1, repeats=6,
                     min_block_s=0.005)
    small = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    big = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3))
    big.train()
    res = time_model(small, spec, reference=big)
    assert len(res.ref_times_s) == len(res.times_s) == 6 and big.training
    assert res.ref_median_ms > res.median_ms  # the reference does ~300x the work
    ratios = [t / r for t, r in zip(res.times_s, res.ref_times_s, strict=True)]
    q1, q3 = np.quantile(ratios, [0.25, 0.75])
    assert res.noise == pytest.approx((q3 - q1) / np.median(ratios))
    assert "reference" in str(res)
    with pytest.raises(ValueError, match="pair"):
        LatencyResult(spec, (1e-3, 1e-3), 1, (1e-3,))
    assert TimingSpec(model="m", batch=1, input_size=8, regime="cuda-graph",
                      interleave=True).interleave  # ABBA on CUDA too (opt-in)


def test_devices_and_slugs(monkeypatch):
    assert resolve_device("CPU").type == "cpu"
    for bad in ("tpu", "cuda:x", "gpu0"):
        with pytest.raises(GatorError, match="unknown device"):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(GatorError, match="needs a CUDA GPU"):
        resolve_device("cuda:0")
    spec = TimingSpec(model="m", batch=1, input_size=8)
    assert device_slug(spec).startswith("cpu") and set(device_info(spec)) >= DEVICE_KEYS
    for name, slug in [
        ("AMD EPYC", "cpu-amd-epyc"),
        ("Intel(R) Xeon(R) Processor", "cpu-intel-xeon"),
        ("Intel(R) Core(TM) i7-12700K CPU @ 3.60GHz", "cpu-intel-core-i7"),
        ("AMD EPYC 7B13 64-Core Processor", "cpu-amd-epyc-7b13"),
        ("", "cpu"),
    ]:
        assert device_slug(TimingSpec(model="m", batch=1, input_size=8, device_name=name)) == slug
    for name, slug in [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA H200 NVL", "h200-nvl"),
        ("NVIDIA A100-SXM4-80GB", "a100-sxm4"),
        ("NVIDIA A100 80GB PCIe", "a100-pcie"),
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "h100-mig-1g10gb"),
        ("NVIDIA A100-SXM4-40GB MIG 3g.20gb", "a100-sxm4-mig-3g20gb"),
        ("NVIDIA GeForce RTX 4090", "rtx-4090"),
    ]:
        gpu = TimingSpec(model="m", batch=1, input_size=8, device="cuda:0", device_name=name)
        assert device_slug(gpu) == slug


# ---------------------------------------------------------------------------
# variants
# ---------------------------------------------------------------------------
def test_parse_widths():
    assert parse_widths("0.25, 0.5,0.5,1") == (0.25, 0.5, 1.0)
    assert parse_widths([0.5]) == (0.5,)
    for bad in ("0", "1.5", "-0.1", "abc", "", "nan"):
        with pytest.raises(GatorError, match="widths"):
            parse_widths(bad)


def test_variants_are_stable_and_valid(tiny):
    graph = load_network(tiny, input_size=16).graph
    vs = build_variants(graph, (0.5, 0.75), round_to=None, random_nets=4, seed=3)
    assert vs[0].vid == "full" and vs[0].kind == "baseline" and not vs[0].narrowed(graph)
    edges = [v for v in vs if v.kind == "edge"]
    assert [v.vid for v in edges] == [
        "e000-k2",
        "e000-k3",
        "e001-k64",
        "e001-k96",
        "e002-k64",
        "e002-k96",
    ]
    assert edges[0].narrowed(graph) == {0: 2} and "edge 0" in str(edges[0])
    again = build_variants(graph, (0.5, 0.75), round_to=None, random_nets=4, seed=3)
    assert [v.vid for v in again] == [v.vid for v in vs]
    rand = random_variants(graph, 40, seed=0)
    full = [e.channels for e in graph.edges]
    for i, v in enumerate(rand):
        assert all(1 <= w <= c for w, c in zip(v.widths, full, strict=True))
        if i % 2:  # rounded half: multiples of 8 on edges wider than 8
            assert all(w % 8 == 0 for w, c in zip(v.widths, full, strict=True) if c > 8)
    ratios = np.array([w / c for v in rand for w, c in zip(v.widths, full, strict=True)])
    assert ratios.min() >= 0.2 and ratios.max() <= 1.0 and "random" in str(rand[0])
    assert [v.vid for v in random_variants(graph, 4, seed=4)] != [v.vid for v in vs[-4:]]
    assert keep_count(graph, 1, 0.3, round_to=8) == 40


def test_schedule_interleaves_with_baseline_first(tiny):
    graph = load_network(tiny, input_size=16).graph
    vs = build_variants(graph, (0.5,))
    plan = schedule(vs, 3, seed=1)
    assert len(plan) == 3 * len(vs)
    for r in range(3):
        cells = [v.vid for rr, v in plan if rr == r]
        assert cells[0] == "full" and sorted(cells) == sorted(v.vid for v in vs)


# ---------------------------------------------------------------------------
# a real CPU profile of the tiny net (timed once for several checks)
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_profile(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("prof") / "tiny.csv"
    return run(_request(tiny), out, progress=False)


def test_wide_edge_saves_more_than_narrow(real_profile):
    summary = real_profile.summary().set_index("edge")
    wide, narrow = summary.loc[1], summary.loc[0]  # 128 channels vs 4 channels
    assert wide["flops_saved_pct"] > 40 > 1 > narrow["flops_saved_pct"]
    assert wide["saving_pct"] > narrow["saving_pct"] + 10
    assert wide["saving_ms"] > 0


def test_gator_csv_round_trips(real_profile):
    gator = read_gator_csv(real_profile.gator_path)
    assert sorted(set(gator["label"])) == [0, 1, 2, 3]
    assert (gator.groupby("label").size() == 2).all()  # one row per round
    assert (gator.loc[gator["label"] == 0, "flops_pct"] == 100.0).all()
    mu = gator_multipliers(gator)
    assert mu.shape == (3,) and np.isfinite(mu).all()
    table = real_profile.table
    full = table.loc[table["variant"] == "full", "median_ms"].to_numpy()
    np.testing.assert_allclose(gator.loc[gator["label"] == 0, "time_ms"], full)


def test_metadata_complete(real_profile):
    meta = json.loads(real_profile.json_path.read_text())
    assert set(meta) >= SIDECAR_KEYS and set(meta["device"]) >= DEVICE_KEYS
    assert meta["batch"] == 2 and meta["input_size"] == 16 and meta["dtype"] == "float32"
    assert meta["regime"] == "cpu" and meta["threads"] == 1 and not meta["cuda_graphs"]
    assert 0 <= meta["noise_floor"] < 1 and meta["noise_floor"] == real_profile.noise_floor
    assert meta["files"]["gator"] == real_profile.gator_path.name
    assert real_profile.regime == "cpu" and "noise floor" in str(real_profile)
    assert real_profile.json_path == sidecar_path(real_profile.table_path)


def test_read_table_accepts_own_and_rejects_others(real_profile, tiny, tmp_path):
    graph = load_network(tiny, input_size=16).graph
    df = read_table(real_profile.table_path, graph)
    assert df["round"].dtype == np.int64 and df["noisy"].dtype == bool
    assert set(df["kind"]) == {"baseline", "edge"}
    pd.testing.assert_frame_equal(df, real_profile.table, check_exact=False)
    other = load_network("resnet18", input_size=32).graph
    with pytest.raises(GatorError, match="resnet18"):
        read_table(real_profile.table_path, other)
    # table alone (no sidecar), edited to claim another channel count
    text = real_profile.table_path.read_text().replace(",3,128,", ",3,64,")
    lone = tmp_path / "lone.csv"
    lone.write_text(text)
    with pytest.raises(GatorError, match="channels"):
        read_table(lone, graph)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\x00\xff\xfe garbage \x00", "corrupt|lacks"),
        (b"", "corrupt"),
        (b"variant,kind\nfull,baseline\n", "lacks column"),
        (None, "must hold int"),
    ],
)
def test_read_table_rejects_corrupt_files(real_profile, tiny, tmp_path, content, match):
    graph = load_network(tiny, input_size=16).graph
    path = tmp_path / "bad.csv"
    if content is None:  # a damaged number in an int column
        lines = real_profile.table_path.read_text().splitlines()
        lines[1] = lines[1].replace("full,baseline,0,", "full,baseline,zero,")
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_bytes(content)
    with pytest.raises(GatorError, match=match) as info:
        read_table(path, graph)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(GatorError, match="not found"):
        read_table(tmp_path / "missing.csv", graph)


# ---------------------------------------------------------------------------
# resume, re-measurement, errors (fake timer: fast and deterministic)
# ---------------------------------------------------------------------------
def test_resume_after_interrupt_retimes_nothing_finished(tiny, tmp_path):
    out = tmp_path / "resume.csv"
    request = _request(tiny, rounds=3, random_nets=2)
    total = 3 * 6  # (baseline + 3 edges + 2 random) x 3 rounds
    first = FakeMeasure()
    done: list[Cell] = []

    def stop_after_5(cell: Cell, n_done: int, n_total: int) -> None:
        done.append(cell)
        assert n_total == total
        if len(done) == 5:
            raise KeyboardInterrupt

    messages: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run(request, out, progress=False, measure=first, on_cell=stop_after_5, log=messages.append)
    assert len(first.calls) == 5 and "resume" in messages[0]
    assert not out.exists() and cells_path(out).exists()

    second = FakeMeasure()
    result = run(request, out, progress=False, measure=second)
    assert len(second.calls) == total - 5 and (result.timed, result.reused) == (total - 5, 5)
    finished = {(c.round, c.variant) for c in done}
    timed_keys = set(zip(result.table["round"], result.table["variant"], strict=True))
    assert len(result.table) == total and finished <= timed_keys
    third = FakeMeasure()
    again = run(request, out, progress=False, measure=third)
    assert third.calls == [] and again.reused == total
    pd.testing.assert_frame_equal(again.table, result.table)
    rand = again.table[again.table["kind"] == "random"]
    assert len(json.loads(rand["widths"].iloc[0])) == 3


def test_more_rounds_reuse_finished_cells(tiny, tmp_path):
    out = tmp_path / "grow.csv"
    run(_request(tiny, rounds=1), out, progress=False, measure=FakeMeasure())
    more = FakeMeasure()
    result = run(_request(tiny, rounds=2), out, progress=False, measure=more)
    assert len(more.calls) == 4 and result.reused == 4


def test_noisy_cells_are_remeasured_once(tiny, tmp_path):
    fake = FakeMeasure(noisy_first=True)
    result = run(_request(tiny, rounds=1), tmp_path / "n.csv", progress=False, measure=fake)
    assert len(fake.calls) == 8  # every cell timed twice
    assert result.table["flags"].str.endswith("remeasured").all()
    assert not result.table["noisy"].any()
    assert result.metadata["remeasured_cells"] == 4


@pytest.mark.parametrize("interleave", [True, False])
def test_interleaving_cancels_a_machine_changing_speed(tiny, tmp_path, interleave):
    speeds = (1.0, 2.0, 1.0, 3.0, 1.5)  # the machine's speed changes from cell to cell
    req = _request(tiny, rounds=2, interleave=interleave)
    result = run(req, tmp_path / "s.csv", progress=False, measure=FakeMeasure(speeds=speeds))
    net = load_network(tiny, input_size=16)
    full_ms = fake_ms(net.model)
    t = result.table
    edges = t[t["kind"] == "edge"]
    truth = np.array([
        100.0 * (1.0 - fake_ms(slim(net.model, net.graph,
                                    net.graph.first_channels_plan({int(e): int(k)}))) / full_ms)
        for e, k in zip(edges["edge"], edges["kept"], strict=True)
    ])  # fmt: skip
    err = np.abs(edges["saving_pct"].to_numpy() - truth)
    flagged = edges["flags"].str.contains("interleaved")
    if interleave:
        assert err.max() < 1e-9 and flagged.all()
        assert not t.loc[t["kind"] == "baseline", "flags"].str.contains("interleaved").any()
        assert result.metadata["pair_noise_floor"] == pytest.approx(0.005)  # the fake's spread
        gator = gator_frame(t)
        base = float(t.loc[t["kind"] == "baseline", "median_ms"].median())
        want = base * (1.0 - truth / 100.0)
        got = gator[gator["label"] > 0].sort_values("label", kind="stable")["time_ms"]
        order = np.lexsort((edges["round"].to_numpy(), edges["edge"].to_numpy()))
        assert got.to_numpy() == pytest.approx(want[order], rel=1e-9)
    else:
        assert err.max() > 10.0 and not flagged.any()  # round pairing cannot see the switches
        assert result.metadata["pair_noise_floor"] is None


def test_stalled_rounds_are_flagged_and_skipped_by_summary(tiny):
    graph = load_network(tiny, input_size=16).graph
    variants = build_variants(graph, (0.5,))[:2]  # full and e000-k2
    spec = TimingSpec(model=tiny, batch=2, input_size=16)
    base_ms, edge_ms = [1.0, 1.02, 10.0], [0.5, 0.51, 0.5]
    cells = [Cell(r, "full", (base_ms[r] * 1e-3,) * 4) for r in range(3)]
    cells += [Cell(r, "e000-k2", (edge_ms[r] * 1e-3,) * 4) for r in range(3)]
    table = build_table(graph, variants, cells, spec)
    keys = zip(table["round"], table["variant"], strict=True)
    flags = dict(zip(keys, table["flags"], strict=True))
    assert flags[(2, "full")] == "outlier" and flags[(2, "e000-k2")] == "baseline-outlier"
    assert flags[(0, "full")] == "" and flags[(1, "e000-k2")] == ""
    edge = summarize(table).set_index("variant").loc["e000-k2"]
    assert edge["rounds"] == 2 and edge["saving_ms"] == pytest.approx(0.505)
    assert str(cells[0]).startswith("round 0 full: 1 ms")
    assert Cell.from_json(cells[0].to_json()) == cells[0]


def test_resume_file_mismatch_and_corruption(tiny, tmp_path):
    out = tmp_path / "m.csv"
    run(_request(tiny, rounds=1), out, progress=False, measure=FakeMeasure())
    with pytest.raises(GatorError, match="other settings.*dtype"):
        run(_request(tiny, rounds=1, dtype="bfloat16"), out, progress=False, measure=FakeMeasure())
    cells_path(out).write_text("{not json")
    with pytest.raises(GatorError, match="corrupt; delete it"):
        run(_request(tiny, rounds=1), out, progress=False, measure=FakeMeasure())
    with pytest.raises(GatorError, match=r"\.csv"):
        run(_request(tiny), tmp_path / "x.txt", progress=False, measure=FakeMeasure())


def test_request_validation_and_default_out(tiny):
    req = _request(tiny, channels_last=True, dtype="bfloat16")
    here = Path("profiles") / device_slug(req.spec)  # this CPU's own folder
    assert here.name.startswith("cpu")
    assert default_out(req.spec) == here / "tiny_factory_16px_b2_bfloat16_cl.csv"
    spec = make_spec("resnet50", device="cpu", batch=32, input_size=224)
    assert default_out(spec) == here / "resnet50_b32_float32.csv"
    spec = make_spec("resnet18", device="cpu", batch=8, input_size=64)  # not its own size
    assert default_out(spec) == here / "resnet18_64px_b8_float32.csv"
    assert "random nets" in str(req)
    for kw, match in [
        (dict(batch=0), "batch"),
        (dict(rounds=0), "rounds"),
        (dict(random_nets=-1), "random-nets"),
        (dict(round_to=0), "round-to"),
        (dict(threads=0), "threads"),
    ]:
        with pytest.raises(GatorError, match=match):
            _request(tiny, **kw)


def test_one_options_object_carries_the_timing_options(tiny):
    opts = TimingOptions(device="cpu", batch=2, input_size=16, threads=1, repeats=5,
                         channels_last=True, interleave=False)
    by_object = ProfileRequest.create(tiny, opts, rounds=2)
    assert by_object == _request(tiny, channels_last=True, interleave=False)
    assert by_object.spec == opts.spec(tiny)
    assert TimingOptions(batch=8).spec("resnet18", 64).input_size == 64  # size left open
    assert TimingOptions(batch=8, input_size=32).spec("resnet18", 64).input_size == 32
    with pytest.raises(TypeError, match="either"):
        ProfileRequest.create(tiny, opts, batch=4)
    with pytest.raises(GatorError, match="--input-size"):
        TimingOptions().spec("m")


# ---------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------
def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Throwaway app holding only the profile command."""

    register(app)
    return app


@pytest.mark.parametrize(
    "args, match",
    [
        (["--device", "cuda"], "needs a CUDA GPU"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--device", "cpu", "--widths", "0"], "outside \\(0, 1\\]"),
        (["--device", "cpu", "--widths", "0.5,1.2"], "outside \\(0, 1\\]"),
    ],
)
def test_cli_errors_are_one_clear_line(monkeypatch, tiny, args, match):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(_app(), ["profile", tiny, "--batch-size", "2", *args])
    assert isinstance(result.exception, GatorError), result.output
    message = str(result.exception)
    assert "\n" not in message and re.search(match, message)


def test_cli_profile_writes_tables_and_summary(monkeypatch, tiny, tmp_path):
    fake = FakeMeasure()
    monkeypatch.setattr(runner_mod, "time_model", fake)
    out = tmp_path / "cli.csv"
    args = ["profile", tiny, "--device", "cpu", "--batch-size", "2", "--input-size", "16"]
    args += ["--rounds", "1", "--widths", "0.5,0.75", "--random-nets", "2", "--quiet"]
    result = CliRunner().invoke(_app(), [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "noise floor" in result.output and "regime: cpu" in result.output
    assert "top" in result.output and out.exists() and sidecar_path(out).exists()
    assert len(fake.calls) == 1 + 6 + 2


# ---------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ---------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("eager", [False, True])
def test_time_model_cuda(eager):
    spec = make_spec("conv", device="cuda", batch=4, input_size=32, eager=eager, repeats=5)
    assert spec.regime == ("cuda-eager" if eager else "cuda-graph")
    res = time_model(nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU()), spec)
    assert len(res.times_s) == 5 and res.median_ms > 0 and not spec.interleave
    assert device_info(spec)["cudnn"] is not None


def test_cuda_specs_replay_graphs_without_interleaving(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    spec = make_spec("resnet50", device="cuda", batch=32, input_size=224)
    assert spec.regime == "cuda-graph" and not spec.interleave and spec.device == "cuda:0"
    assert default_out(spec) == Path("profiles/h100/resnet50_b32_float32.csv")
    assert make_spec("m", device="cuda", input_size=8, eager=True).regime == "cuda-eager"
    assert not make_spec("m", device="cuda", input_size=8).interleave
    assert make_spec("m", device="cuda", input_size=8, interleave=True).interleave


@cuda
def test_cuda_profile_records_regime_check(tiny, tmp_path):
    req = ProfileRequest.create(tiny, device="cuda", batch=2, input_size=16, rounds=1)
    result = run(req, tmp_path / "gpu.csv", progress=False)
    check = result.metadata["regime_check"]
    assert check["graph_ms"] > 0 and check["eager_ms"] > 0 and result.metadata["cuda_graphs"]


@cuda
def test_cuda_interleaved_timing_pairs_blocks(tiny):
    from gator_hw.profile.timing import time_model

    net = load_network(tiny, input_size=16)
    spec = make_spec(tiny, device="cuda", batch=2, input_size=16, interleave=True)
    res = time_model(slim(net.model, net.graph, {0: [0]}), spec, reference=net.model)
    assert len(res.times_s) == len(res.ref_times_s) == spec.repeats and res.ref_median_ms > 0


def test_cuda_failures_map_to_one_line_errors_with_the_fix():
    from gator_hw.profile.timing import cuda_error

    spec = TimingSpec(model="resnet50", batch=512, input_size=224, device="cuda:0",
                      device_name="NVIDIA H200", regime="cuda-graph")
    oom = cuda_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                     spec, graph=True)
    assert isinstance(oom, GatorError) and "smaller --batch-size" in str(oom)
    assert "batch 512" in str(oom) and "\n" not in str(oom)
    cap = cuda_error(RuntimeError("operation not permitted when stream is capturing\nmore"),
                     spec, graph=True)
    assert isinstance(cap, GatorError) and "--eager" in str(cap) and "\n" not in str(cap)
    # eager timing has no capture; a plain bug stays a bug
    assert cuda_error(RuntimeError("operation not permitted when stream is capturing"),
                      spec, graph=False) is None
    assert cuda_error(RuntimeError("index out of range"), spec, graph=True) is None


def test_a_resumed_round_pairs_with_a_baseline_of_its_own_process(tiny, tmp_path):
    """Not interleaved (as on CUDA): the process that resumes a round runs at another speed
    (other clocks, other cudnn choices); pairing with the first process's baseline would
    turn that speed change into savings."""
    out = tmp_path / "pair.csv"
    request = _request(tiny, rounds=2, interleave=False)
    n = {"cells": 0}

    def stop_after_3(cell: Cell, done: int, total: int) -> None:
        n["cells"] += 1
        if n["cells"] == 3:  # round 0: the baseline and two edges
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(request, out, progress=False, measure=FakeMeasure(), on_cell=stop_after_3)
    second = FakeMeasure(speeds=(1.3,))
    result = run(request, out, progress=False, measure=second)
    assert second.calls.count("full") == 2  # round 0 again, round 1
    t = result.table
    assert len(t[(t["kind"] == "baseline") & (t["round"] == 0)]) == 2
    net = load_network(tiny, input_size=16)
    full = fake_ms(net.model)
    by_id = {v.vid: v for v in build_variants(net.graph, request.fractions)}
    for row in t[t["kind"] == "edge"].itertuples():
        true = 100 * (1 - fake_ms(runner_mod._build(net, by_id[row.variant])) / full)
        assert row.saving_pct == pytest.approx(true, abs=1e-6), row.variant


def test_abba_alternates_and_pairs_blocks():
    from gator_hw.profile.timing import abba

    order: list[str] = []

    def block(name: str):
        def run() -> str:
            order.append(name)
            return f"{name}{len(order)}"
        return run

    a, b = abba(block("A"), block("B"), 4)
    assert "".join(order) == "BAABBAAB"
    assert a == ["A2", "A3", "A6", "A7"] and b == ["B1", "B4", "B5", "B8"]


def test_gpu_state_is_read_through_nvml_and_kept_with_the_cell(monkeypatch):
    from gator_hw.profile.device import gpu_state
    from gator_hw.profile.runner import _clock_range

    monkeypatch.setattr(torch.cuda, "clock_rate", lambda d=None: 1980)
    monkeypatch.setattr(torch.cuda, "power_draw", lambda d=None: 350_000)  # mW
    monkeypatch.setattr(torch.cuda, "temperature", lambda d=None: 41)
    state = gpu_state("cuda:0")
    assert state == {"sm_clock_mhz": 1980.0, "power_w": 350.0, "temperature_c": 41.0}
    cell = Cell(0, "full", (1e-3,), gpu={"before": state, "after": {**state,
                                                                      "sm_clock_mhz": 1755.0}})
    back = Cell.from_json(json.loads(json.dumps(cell.to_json())))
    assert back == cell and _clock_range([back, Cell(1, "full", (1e-3,))]) == [1755.0, 1980.0]

    def no_nvml(d=None):
        raise ModuleNotFoundError("pynvml")

    monkeypatch.setattr(torch.cuda, "clock_rate", no_nvml)
    assert gpu_state("cuda:0") == {} and _clock_range([Cell(0, "full", (1e-3,))]) is None
