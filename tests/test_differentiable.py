"""The cost model in the loss: exact at integer widths, true gradients, embedded in configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gator_hw.accounting import layer_cost, network_cost
from gator_hw.config import GatingConfig, read_config, write_config
from gator_hw.costmodel.differentiable import LINEAR_METHODS, LatencyFunction
from gator_hw.costmodel.embedded import embed_cost_model, embedded_cost_model
from gator_hw.costmodel.features import FeatureMap
from gator_hw.costmodel.make import make_config
from gator_hw.costmodel.model import fit_cost_model
from gator_hw.errors import GatorError
from gator_hw.loss import CostCriterion
from gator_hw.network import load_network
from tests.conftest import cached_network, one_line_error
from tests.synthetic import write_synthetic_table


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    return write_synthetic_table(tmp_path_factory.mktemp("d") / "r18_b4.csv",
                                 cached_network("resnet18", 32))


@pytest.fixture(scope="module")
def graph():
    return cached_network("resnet18", 32).graph


def _random_widths(graph, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    full = np.array([e.channels for e in graph.edges])
    rows = [full, np.ones_like(full)]
    rows += [rng.integers(1, full + 1) for _ in range(n)]
    return np.stack(rows)


@pytest.mark.parametrize("method", [*LINEAR_METHODS, "hgb"])
def test_latency_function_equals_predict_at_integer_widths(table, graph, method) -> None:
    cm = fit_cost_model([table], graph, method=method)
    fn = LatencyFunction(cm)
    w = _random_widths(graph, 30)
    want = cm.predict(w)
    got = fn.predict(w)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=0)
    if method in LINEAR_METHODS:  # the torch form itself, not a call to sklearn
        with torch.no_grad():
            t = fn(torch.from_numpy(w.astype(float))).numpy()
        np.testing.assert_allclose(t, want, rtol=1e-9, atol=0)
        assert fn.full_ms == pytest.approx(cm.predict(w[:1])[0], rel=1e-12)


def _smooth_only(cm):
    """The same fitted model with the staircase (misaligned / padding) coefficients zeroed."""
    fn = LatencyFunction(cm)
    names = cm.feature_names()
    for i, name in enumerate(names):
        if name.startswith(("flops_mis", "flops_pad")):
            fn.coef[i] = 0.0
    return fn


@pytest.mark.parametrize("method", ["flops_linear", "ridge", "nnls"])
def test_gradient_equals_finite_differences(table, graph, method) -> None:
    fn = _smooth_only(fit_cost_model([table], graph, method=method))
    rng = np.random.default_rng(1)
    full = np.array([e.channels for e in graph.edges], dtype=float)
    for _ in range(3):
        n = torch.tensor(rng.uniform(0.3, 1.0, len(full)) * full, requires_grad=True)
        (g,) = torch.autograd.grad(fn(n), n)
        for e in range(len(full)):
            h = torch.zeros_like(n)
            h[e] = 0.5  # the function is quadratic: central differences are exact
            fd = (fn(n.detach() + h) - fn(n.detach() - h)) / 1.0
            assert float(g[e]) == pytest.approx(float(fd), rel=1e-7, abs=1e-12)


def test_padding_surrogate_gradient_is_the_slope_over_one_block(graph) -> None:
    """The padded FLOPs are a staircase: their surrogate gradient at a block-aligned width is
    the secant slope over the next whole block (what narrowing by a block saves per channel)."""
    fm = FeatureMap(graph, batch=2)
    names = fm.layer_names()
    col = names.index("flops_pad16")
    full = torch.tensor([float(e.channels) for e in graph.edges], dtype=torch.float64)
    for e in (0, 5, 11):
        n = (full * 0.5).round().requires_grad_(True)  # 32, 64, ... : multiples of 16
        (g,) = torch.autograd.grad(fm.layer_torch(n)[0, col], n)
        lo = n.detach().clone()
        lo[e] -= 16
        secant = (fm.layer_torch(n.detach())[0, col] - fm.layer_torch(lo)[0, col]) / 16
        assert float(g[e]) == pytest.approx(float(secant), rel=1e-9, abs=1e-15)


def test_tree_models_are_relinearised_at_the_kept_widths(table, graph) -> None:
    cm = fit_cost_model([table], graph, method="rf")
    fn = LatencyFunction(cm)
    w = torch.tensor(_random_widths(graph, 1, seed=3)[-1], dtype=torch.float64)
    fn.relinearize(w)
    assert float(fn(w)) == pytest.approx(cm.predict(w.numpy()[None])[0], rel=1e-12)
    n = w.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(n), n)
    e = int(torch.argmax(w))
    lo = w.clone()
    lo[e] -= max(1.0, float(np.ceil(float(w[e]) / 8)))
    slope = (cm.predict(w.numpy()[None])[0] - cm.predict(lo.numpy()[None])[0]) / float(w[e] - lo[e])
    assert float(g[e]) == pytest.approx(slope, rel=1e-9, abs=1e-12)


def test_made_config_embeds_the_cost_model_and_the_loss_uses_it(table, graph, tmp_path) -> None:
    res = make_config([table], method="ridge", input_size=32)
    path = write_config(res.config, tmp_path / "cfg.json")
    cfg = read_config(path)
    assert cfg.cost_model is not None and cfg.edge_multipliers == res.config.edge_multipliers
    crit = CostCriterion(graph, cfg)
    assert "cost model (ridge)" in str(crit)
    w = torch.tensor(_random_widths(graph, 5, seed=4), dtype=torch.float64)
    cm = res.cost_model
    want = cm.predict(w.numpy()) / cm.predict(w[:1].numpy())[0]
    got = crit.fraction_batch("latency", w).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9)
    # the loss is the prediction at the expected widths, normalised by the full net
    assert float(crit.cost(w[2])) == pytest.approx(want[2], rel=1e-9)
    # the original recipe is one option away, and is exactly the multiplied cost
    old = CostCriterion(graph, cfg, cost_source="multipliers")
    plain = CostCriterion(graph, GatingConfig(edge_multipliers=cfg.edge_multipliers))
    assert float(old.cost(w[2])) == float(plain.cost(w[2]))
    assert old.fraction("latency", w[2]) == plain.fraction("latency", w[2])


def test_embedded_cost_model_checks_itself(table, graph, tmp_path) -> None:
    cm = fit_cost_model([table], graph, method="nnls")
    doc = json.loads(json.dumps(embed_cost_model(cm)))  # through JSON, as in a file
    again = embedded_cost_model(doc, graph)
    w = _random_widths(graph, 5)
    np.testing.assert_allclose(again.predict(w), cm.predict(w), rtol=1e-12)
    edited = json.loads(json.dumps(doc))
    edited["samples"]["latency_ms"][0] *= 1.5
    with pytest.raises(GatorError) as exc:
        embedded_cost_model(edited, graph)
    one_line_error(exc, "sha256", "make-config")
    for samples in ({"widths": doc["samples"]["widths"]}, [1, 2]):
        with pytest.raises(GatorError) as exc:
            embedded_cost_model({**doc, "samples": samples}, graph)
        one_line_error(exc, "has no samples", "make-config")
    wrong = json.loads(json.dumps(doc))
    wrong["check"]["full_ms"] *= 1.01
    with pytest.raises(GatorError) as exc:
        embedded_cost_model(wrong, graph)
    one_line_error(exc, "refits to other predictions")
    with pytest.raises(GatorError) as exc:
        embedded_cost_model(doc, cached_network("resnet18", 64).graph)
    one_line_error(exc, "64 px", "--input-size")
    with pytest.raises(GatorError) as exc:
        GatingConfig(cost_model=[1, 2])
    one_line_error(exc, "cost_model")


def test_a_config_from_a_table_without_num_classes_prunes_a_net_with_other_classes(
        table, tmp_path) -> None:
    """The table's net had its builder's 1000 classes (not recorded); the pruned net has 10:
    the embedded model refits on the profiled net and predicts the same for both."""
    cfg = read_config(write_config(make_config([table], method="nnls", input_size=32).config,
                                   tmp_path / "cfg.json"))
    assert cfg.cost_model.get("num_classes") in (None, 1000)
    ten = CostCriterion(load_network("resnet18", input_size=32, num_classes=10).graph, cfg)
    own = CostCriterion(cached_network("resnet18", 32).graph, cfg)
    w = torch.tensor(_random_widths(own.graph, 4, seed=2), dtype=torch.float64)
    np.testing.assert_allclose(ten.fraction_batch("latency", w).numpy(),
                               own.fraction_batch("latency", w).numpy(), rtol=1e-9)


def test_layer_features_are_in_their_named_units(graph) -> None:
    """GFLOPs and MB, per layer and in total, as the accounting counts them at batch 4."""
    fm = FeatureMap(graph, batch=4)
    w = _random_widths(graph, 1, seed=2)[-1]
    row = dict(zip(fm.layer_names(), fm.layer(w[None])[0], strict=True))
    wd = {i: float(v) for i, v in enumerate(w)}
    total = network_cost(graph, wd, batch=4)
    assert row["mbytes"] == pytest.approx(total.bytes / 1e6, rel=1e-12)
    for c in graph.calls:
        if c.kind != "norm":
            cost = layer_cost(c, wd, batch=4)
            assert row[f"gflops:{c.module}"] == pytest.approx(cost.flops / 1e9, rel=1e-12)
            assert row[f"mbytes:{c.module}"] == pytest.approx(cost.bytes / 1e6, rel=1e-12)


class _Stump:
    """A tree-like cost model of two edges: 3 ms, +5 ms once edge 0 keeps a channel, and
    2 ms x (edge 1's width) squared."""

    method = "hgb"

    def full_widths(self) -> np.ndarray:
        return np.array([4.0, 8.0])

    def predict(self, w: np.ndarray) -> np.ndarray:
        w = np.atleast_2d(w)
        return 3.0 + 5.0 * (w[:, 0] >= 1) + 2.0 * w[:, 1] ** 2


@pytest.mark.parametrize("n0", [1.0, 4.0])
def test_tree_slopes_at_small_widths_are_the_cost_of_one_channel(n0: float) -> None:
    """Widths <= 8 step by one channel, and the last channel's slope is what removing it saves."""
    fn = LatencyFunction(_Stump())
    fn.relinearize(torch.tensor([n0, 8.0]))
    n = torch.tensor([n0, 8.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(fn(n), n)
    assert g.tolist() == pytest.approx([5.0 if n0 == 1.0 else 0.0, 2.0 * (64 - 49)])
