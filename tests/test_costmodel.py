"""The regression cost model on tables with a known latency law, and make-config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.base import clone

from gator_hw.config import read_config
from gator_hw.costmodel.dataset import load_samples
from gator_hw.costmodel.features import FeatureMap
from gator_hw.costmodel.make import make_config
from gator_hw.costmodel.model import _estimator, fit_cost_model, holdout_mask, load_cost_model
from gator_hw.costmodel.validate import additive_predict, repeated_holdout, score, validate
from gator_hw.errors import GatorError
from gator_hw.slim import slim
from tests.conftest import cached_network, one_line_error
from tests.synthetic import true_latency_ms, write_synthetic_table


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    net = cached_network("resnet18", 32)
    return write_synthetic_table(tmp_path_factory.mktemp("t") / "r18_b4.csv", net)


@pytest.fixture(scope="module")
def fitted(table):
    return fit_cost_model([table], cached_network("resnet18", 32).graph)


def test_random_nets_are_split_and_held_out(table) -> None:
    s = load_samples([table], cached_network("resnet18", 32).graph)
    held = holdout_mask(s)
    assert held.sum() == 15 and set(s.kind[held]) == {"random"}
    rounded = np.array([all(w % 8 == 0 for w in ws) for ws in s.widths])
    assert 0 < (held & rounded).sum() < held.sum()  # both kinds of random nets are held out


LAYER_MODELS = ("ridge", "nnls")


def test_selection_recovers_the_layer_law(fitted) -> None:
    assert fitted.method in LAYER_MODELS  # the law is linear in per-layer FLOPs
    assert fitted.cv_mape[fitted.method] < fitted.cv_mape["flops_linear"] / 5
    assert not set(fitted.fit_variants) & set(_held(fitted))


def _held(model) -> list[str]:
    s = load_samples([model.tables[0]["path"]], model.graph)
    return s.variant[(s.kind == "random") & ~np.isin(s.variant, model.fit_variants)].tolist()


def test_validation_beats_both_baselines(fitted, table) -> None:
    s = load_samples([table], fitted.graph)
    scores, detail = validate(fitted, s)
    by = {x.predictor: x for x in scores}
    ours = by["cost model"]
    assert ours.n == 15 and ours.mape <= 5.0 and ours.within10 >= 90.0 and ours.spearman >= 0.95
    for base in ("flops_linear", "gator_additive"):
        b = by[base]
        assert ours.mape < b.mape and ours.worst < b.worst
        assert ours.within5 >= b.within5 and ours.within10 >= b.within10
        assert ours.spearman > b.spearman and abs(ours.mean_signed) < abs(b.mean_signed)
    held_widths = np.stack([s.widths[list(s.variant).index(v)] for v in detail["variants"]])
    truth = true_latency_ms(cached_network("resnet18", 32), held_widths)
    assert np.allclose(detail["measured_ms"], truth * 1.01, rtol=0.02)


def test_multipliers_follow_the_latency_law(fitted) -> None:
    mu = fitted.multipliers()
    g = fitted.graph
    assert len(mu) == g.n_edges and min(mu) > 0
    stem = next(e.gid for e in g.edges if "conv1" in e.writers)
    deep = [e.gid for e in g.edges if e.name.startswith("layer4")]
    assert all(mu[stem] > 2 * mu[d] for d in deep)  # the 3x-per-FLOP stage costs more


def test_score_against_hand_values() -> None:
    s = score("x", np.array([10.0, 20.0, 40.0]), np.array([11.0, 19.0, 40.0]))
    assert s.mape == pytest.approx((10 + 5 + 0) / 3)
    assert s.within5 == pytest.approx(200 / 3) and s.within10 == 100.0
    assert s.worst == pytest.approx(10.0) and s.mean_signed == pytest.approx((10 - 5) / 3)
    assert s.spearman == pytest.approx(1.0)


def test_save_and_refit_on_load(fitted, tmp_path: Path, table) -> None:
    path = fitted.save(tmp_path / "cm.json")
    doc = json.loads(path.read_text())
    assert doc["method"] in LAYER_MODELS and len(doc["multipliers"]) == fitted.graph.n_edges
    assert len(doc["features"]) == fitted.estimator.n_features_in_  # one name per column
    assert b"pickle" not in path.read_bytes()
    again = load_cost_model(path, fitted.graph)
    w = np.array([[max(1, e.channels // 3) for e in fitted.graph.edges]])
    assert again.predict(w) == pytest.approx(fitted.predict(w), rel=1e-9)
    with pytest.raises(GatorError, match="models resnet18, not resnet20"):
        load_cost_model(path, cached_network("resnet20").graph)


def test_changed_table_is_detected(tmp_path: Path) -> None:
    net = cached_network("resnet18", 32)
    t = write_synthetic_table(tmp_path / "t.csv", net, fractions=(0.5,), random_nets=6)
    cm = fit_cost_model([t], net.graph, method="flops_linear")
    path = cm.save(tmp_path / "cm.json")
    t.write_text(t.read_text().replace("\n", "\n", 1) + "\n")
    with pytest.raises(GatorError, match="changed since cost model"):
        load_cost_model(path, net.graph)


def test_estimators_follow_sklearn_conventions(table) -> None:
    s = load_samples([table], cached_network("resnet18", 32).graph)
    x = np.random.default_rng(0).normal(size=(len(s), 5))
    for name in ("ridge", "nnls", "hgb", "rf"):
        a = clone(_estimator(name)).fit(x, s.latency_ms).predict(x)
        b = clone(_estimator(name)).fit(x, s.latency_ms).predict(x)
        assert np.array_equal(a, b), name


def test_make_config_model_method(table, tmp_path: Path) -> None:
    result = make_config([table], method="model")
    cfg = result.config
    assert len(cfg.edge_multipliers) == 12
    assert cfg.provenance["method"] in {f"model:{m}" for m in LAYER_MODELS}
    assert cfg.provenance["batch"] == 4
    assert cfg.provenance["tables"][0]["sha256"]
    from gator_hw.config import write_config

    write_config(cfg, tmp_path / "c.json")
    assert read_config(tmp_path / "c.json").edge_multipliers == cfg.edge_multipliers


def test_make_config_gator_method_reproduces_reference(reference_dir) -> None:
    result = make_config(
        [reference_dir / "timinig_resnet_50_edges_7_runs_batch_32.csv"], method="gator",
        model="resnet50",
    )
    ref_path = reference_dir / "resnet_50_flops_rel_timing_config_batch_32.json"
    ref = json.loads(ref_path.read_text())
    np.testing.assert_allclose(result.config.edge_multipliers, ref["edge_multipliers"], rtol=1e-9)


def test_make_config_bad_input(table, tmp_path: Path) -> None:
    with pytest.raises(GatorError, match="unknown method 'magic'"):
        make_config([table], method="magic")
    with pytest.raises(GatorError, match="does not exist"):
        make_config([tmp_path / "none.csv"])
    with pytest.raises(GatorError, match="not measured on resnet50"):
        make_config([table], method="model", model="resnet50")
    few = write_synthetic_table(tmp_path / "few.csv", cached_network("resnet18", 32),
                                fractions=(0.5,), random_nets=0)
    with pytest.raises(GatorError, match="held-out random nets"):
        validate(fit_cost_model([few], cached_network("resnet18", 32).graph),
                 load_samples([few], cached_network("resnet18", 32).graph))


def test_padding_features_against_hand_counts() -> None:
    from gator_hw.costmodel.features import padded_excess

    g = cached_network("resnet18", 32).graph
    fm = FeatureMap(g, batch=2)
    calls = [c for c in g.calls if c.kind != "norm"]
    dense = next(c for c in calls if c.kind == "conv")
    assert padded_excess(dense, np.array([20.0]), np.array([33.0]), 16) == pytest.approx(
        32 * 48 / (20 * 33) - 1
    )
    dw = type(dense)(**{**dense.__dict__, "depthwise": True, "groups": 33})
    assert padded_excess(dw, np.array([33.0]), np.array([33.0]), 8) == pytest.approx(40 / 33 - 1)
    # at full width only the 3-channel stem input and the 1000-way classifier are misaligned
    full = np.array([[e.channels for e in g.edges]])
    names = fm.layer_names()
    x = fm.layer(full)[0]
    stem, fc = calls[0], calls[-1]
    f_stem = x[names.index(f"gflops:{stem.module}")]
    f_fc = x[names.index(f"gflops:{fc.module}")]
    for m in (8, 16, 32, 64):
        want = f_stem * (m / 3 - 1) + f_fc * (np.ceil(1000 / m) * m / 1000 - 1)
        assert x[names.index(f"flops_pad{m}")] == pytest.approx(want, rel=1e-12)
    # brute force on the real slimmed networks
    for widths in ({}, {g.edges[-1].gid: 20, g.edges[0].gid: 13}):
        w = full.copy()
        for e, k in widths.items():
            w[0, e] = k
        model = slim(cached_network("resnet18", 32).model, g, g.first_channels_plan(widths))
        want = _padded_flops_brute_force(model, torch.zeros(2, 3, 32, 32))
        got = fm.layer(w)[0]
        for m, v in want.items():
            assert got[names.index(f"flops_pad{m}")] * 1e9 == pytest.approx(v, rel=1e-9)


def test_padding_features_of_depthwise_nets_against_brute_force() -> None:
    net = cached_network("mobilenet_v2", 32)
    g = net.graph
    fm = FeatureMap(g, batch=2)
    names = fm.layer_names()
    rng = np.random.default_rng(0)
    widths = {e.gid: int(rng.integers(1, e.channels + 1)) for e in g.edges}
    w = np.array([[widths[e.gid] for e in g.edges]])
    want = _padded_flops_brute_force(slim(net.model, g, g.first_channels_plan(widths)),
                                     torch.zeros(2, 3, 32, 32))
    got = fm.layer(w)[0]
    for m, v in want.items():
        assert got[names.index(f"flops_pad{m}")] * 1e9 == pytest.approx(v, rel=1e-9)


def _padded_flops_brute_force(model: torch.nn.Module, x: torch.Tensor) -> dict[int, float]:
    """Every conv / linear's FLOPs (from its output and weight shapes) times the padding excess
    of its real channel counts, summed."""
    out: dict[int, float] = {m: 0.0 for m in (8, 16, 32, 64)}

    def hook(mod, inp, y):
        c_in, c_out = mod.weight.shape[1] * getattr(mod, "groups", 1), mod.weight.shape[0]
        flops = 2.0 * y.numel() * mod.weight[0].numel()
        depthwise = getattr(mod, "groups", 1) == c_in == c_out > 1
        for m in out:
            if depthwise:  # each channel on its own: only the channel count is padded
                pad = np.ceil(c_out / m) * m / c_out
            else:
                pad = np.ceil(c_in / m) * m * np.ceil(c_out / m) * m / (c_in * c_out)
            out[m] += flops * (pad - 1.0)

    handles = [mod.register_forward_hook(hook) for mod in model.modules()
               if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return out


def test_repeated_holdout_refits_each_split(table) -> None:
    graph = cached_network("resnet18", 32).graph
    rep = repeated_holdout([table], graph, splits=2, method="ridge")
    assert rep.splits == 2 and rep.chosen == {"ridge": 2}
    s = load_samples([table], graph)
    for seed in range(2):
        alone, _ = validate(fit_cost_model([table], graph, method="ridge", holdout_seed=seed), s)
        assert [x.as_dict() for x in alone] == [rep.runs[x.predictor][seed].as_dict()
                                                for x in alone]
    ours = rep.runs["cost model"]
    assert rep.mean("cost model")["mape"] == pytest.approx((ours[0].mape + ours[1].mape) / 2)
    assert rep.mean("cost model")["abs_bias"] == pytest.approx(
        (abs(ours[0].mean_signed) + abs(ours[1].mean_signed)) / 2)
    for base in ("flops_linear", "gator_additive"):
        want = sum(o.at_least_as_good_as(b) for o, b in zip(ours, rep.runs[base], strict=True))
        assert rep.wins[base] == want
    assert rep.runs["cost model"][0].mape != rep.runs["cost model"][1].mape  # other halves
    with pytest.raises(GatorError, match="splits"):
        repeated_holdout([table], graph, splits=0)


def test_at_least_as_good_compares_every_metric() -> None:
    a = score("a", np.array([10.0, 20.0, 40.0]), np.array([10.5, 19.5, 40.0]))
    b = score("b", np.array([10.0, 20.0, 40.0]), np.array([12.0, 18.0, 41.0]))
    assert a.at_least_as_good_as(b) and not b.at_least_as_good_as(a)
    assert a.at_least_as_good_as(a)


def test_a_saved_cost_model_travels_and_checks_what_it_recorded(table, tmp_path,
                                                                monkeypatch) -> None:
    """Saved next to a copy of its table, the pair loads from any working directory; an
    edited multiplier or a changed table is a one-line error."""
    import shutil

    from gator_hw.profile.tables import sidecar_path

    graph = cached_network("resnet18", 32).graph
    work = tmp_path / "project"
    (work / "profiles").mkdir(parents=True)
    local = work / "profiles" / "t.csv"
    shutil.copy(table, local)
    shutil.copy(sidecar_path(table), sidecar_path(local))
    monkeypatch.chdir(work)
    cm = fit_cost_model([Path("profiles/t.csv")], graph, method="ridge")
    saved = cm.save(work / "cfg" / "m.costmodel.json")
    doc = json.loads(saved.read_text())
    assert doc["tables"][0]["relpath"] == "../profiles/t.csv" and doc["versions"]
    monkeypatch.chdir(tmp_path)  # elsewhere: found beside the file
    moved = tmp_path / "elsewhere"
    shutil.copytree(work, moved)
    shutil.rmtree(work)
    again = load_cost_model(moved / "cfg" / "m.costmodel.json", graph)
    assert again.multipliers() == pytest.approx(cm.multipliers(), rel=1e-9)
    doc["multipliers"][0] *= 1.5
    bad = moved / "cfg" / "bad.costmodel.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(GatorError) as exc:
        load_cost_model(bad, graph)
    one_line_error(exc, "other multipliers", "refit")
    (moved / "profiles" / "t.csv").unlink()
    with pytest.raises(GatorError) as exc:
        load_cost_model(moved / "cfg" / "m.costmodel.json", graph)
    one_line_error(exc, "missing", "refit")


def test_the_additive_baseline_reproduces_its_probes_and_adds_their_savings(fitted, table) -> None:
    """GATOR's additive model: each half-width probe exactly, two probes' savings summed."""
    s = load_samples([table], fitted.graph)
    probes = s.subset(s.kind == "edge")
    half = []
    for e in (0, 3):
        own = np.flatnonzero(probes.edge == e)
        half.append(own[np.argmin(np.abs(probes.fraction[own] - 0.5))])
    w = probes.widths[half]
    t = probes.latency_ms[half]
    np.testing.assert_allclose(additive_predict(fitted, s, w), t, rtol=1e-12)
    both = np.minimum(w[0], w[1])[None]
    saved = (s.baseline_ms - t[0]) + (s.baseline_ms - t[1])
    np.testing.assert_allclose(additive_predict(fitted, s, both), [s.baseline_ms - saved],
                               rtol=1e-12)


def test_cost_models_fit_on_one_thread() -> None:
    from threadpoolctl import threadpool_info

    from gator_hw.costmodel.model import _one_thread

    with _one_thread():
        assert {p["num_threads"] for p in threadpool_info()} == {1}
