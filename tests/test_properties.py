"""Properties over random nets and plans (hypothesis): the core's three exactness claims.

* slimming equals masking: the smaller net computes what the full one computes with the removed
  channels zeroed where they are read (float64, so equality is to rounding);
* accounting equals measurement: ``network_cost`` at the kept widths is the FLOPs that
  ``FlopCounterMode`` counts in the slimmed net;
* the differentiable costs equal accounting: the quadratic form of the loss and the cost
  model's latency function (``FeatureMap.flops_torch``, ``LatencyFunction``) at any width.

Examples are few and small (a net is traced per example) and derandomised, so the suite stays
fast and a failure reproduces.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LinearRegression

from gator_hw.accounting import flop_counter_flops, network_cost
from gator_hw.costmodel.differentiable import LatencyFunction
from gator_hw.costmodel.features import FeatureMap
from gator_hw.costmodel.model import CostModel, _estimator
from gator_hw.graph import HyperGraph, build_hypergraph
from gator_hw.loss import quadratic_cost
from gator_hw.masking import masked_output
from gator_hw.slim import slim
from tests.randnets import INPUT, NetSpec, build, draw_plan, inputs

PROPS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])


@st.composite
def net_specs(draw: st.DrawFn) -> NetSpec:
    """Any small ``NetSpec`` (grouped convs get 2 or 3 groups of 1..3 channels)."""
    grouped = draw(st.booleans())
    return NetSpec(
        stem_per_group=draw(st.integers(1, 3)),
        groups=draw(st.integers(2, 3)) if grouped else 1,
        inner=draw(st.integers(1, 4)),
        branch_a=draw(st.integers(1, 4)),
        branch_b=draw(st.integers(1, 4)),
        residual=draw(st.booleans()),
        grouped=grouped,
        depthwise=draw(st.booleans()),
        cat_conv=draw(st.sampled_from([0, 0, 2, 5])),
        flatten_head=draw(st.booleans()),
        bias=draw(st.booleans()),
    )


def _graph(s: NetSpec, seed: int) -> tuple[torch.nn.Module, HyperGraph]:
    model = build(s, seed)
    return model, build_hypergraph(model, INPUT, "randnet")




@PROPS
@given(s=net_specs(), seed=st.integers(0, 2**16), rnd=st.randoms(use_true_random=False))
def test_slim_equalsmasked_output(s: NetSpec, seed: int, rnd: random.Random) -> None:
    model, graph = _graph(s, seed)
    plan = draw_plan(graph, rnd)
    x = inputs(seed + 1)
    small = slim(model, graph, plan)
    with torch.no_grad():
        got = small(x)
    want = masked_output(model, graph, plan, x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    for gid, kept in plan.items():  # every layer writing an edge now has its kept width
        for writer in graph.edges[gid].writers:
            w = dict(small.named_modules())[writer].weight
            assert w.shape[0] == len(kept)


@PROPS
@given(s=net_specs(), rnd=st.randoms(use_true_random=False))
def test_network_cost_equals_counted_flops_of_the_slimmed_net(
    s: NetSpec, rnd: random.Random
) -> None:
    model, graph = _graph(s, 0)
    assert network_cost(graph).flops == flop_counter_flops(model, INPUT)
    plan = draw_plan(graph, rnd)
    small = slim(model, graph, plan)
    widths = {g: len(k) for g, k in plan.items()}
    assert network_cost(graph, widths).flops == flop_counter_flops(small, INPUT)
    params = sum(p.numel() for p in small.parameters())
    assert network_cost(graph, widths).params == params


def _random_widths(graph: HyperGraph, rnd: random.Random, rows: int) -> np.ndarray:
    """Real-valued widths between 0 and twice each edge's channels (quadratic forms are exact
    everywhere, not only at integers)."""
    return np.array([[rnd.uniform(0.0, 2.0 * e.channels) for e in graph.edges]
                     for _ in range(rows)])


@PROPS
@given(s=net_specs(), rnd=st.randoms(use_true_random=False))
def test_quadratic_cost_equals_network_cost(s: NetSpec, rnd: random.Random) -> None:
    _, graph = _graph(s, 0)
    w = _random_widths(graph, rnd, 3)
    for metric in ("flops", "params", "bytes"):
        q = quadratic_cost(graph, metric)
        for row in w:
            want = getattr(network_cost(graph, dict(enumerate(row))), metric)
            assert float(q(torch.tensor(row))) == pytest.approx(want, rel=1e-12, abs=1e-9)
            # its gradient is the cost's derivative (exact: the cost is quadratic per edge)
            grad = q.grad(torch.tensor(row))
            for e in range(len(row)):
                up = getattr(network_cost(graph, {**dict(enumerate(row)), e: row[e] + 1}),
                             metric)
                down = getattr(network_cost(graph, {**dict(enumerate(row)), e: row[e] - 1}),
                               metric)
                assert float(grad[e]) == pytest.approx((up - down) / 2, rel=1e-9, abs=1e-6)


def _cost_model(graph: HyperGraph, method: str, batch: int, rnd: random.Random) -> CostModel:
    """A cost model fitted on random widths: flops_linear on an exact law a + b * GFLOPs,
    ridge / nnls on a random positive layer law."""
    fmap = FeatureMap(graph, batch)
    if method == "flops_linear":  # latency = 0.3 ms + 7 ms per GFLOP, fitted on two points
        est = LinearRegression().fit([[0.0], [1.0]], [0.3, 7.3])
    else:
        x = fmap.layer(np.round(_random_widths(graph, rnd, 12)).clip(1))
        y = x @ np.array([rnd.uniform(0.5, 2.0) for _ in range(x.shape[1])]) + 0.2
        est = _estimator(method).fit(x, y)
    return CostModel(graph, fmap, method, est, 1.0, [])


@PROPS
@given(s=net_specs(), batch=st.integers(1, 3), rnd=st.randoms(use_true_random=False))
def test_latency_function_follows_network_cost(
    s: NetSpec, batch: int, rnd: random.Random
) -> None:
    _, graph = _graph(s, 0)
    fmap = FeatureMap(graph, batch)
    w = _random_widths(graph, rnd, 4)
    flops = fmap.flops_torch(torch.tensor(w)).numpy()
    want = [network_cost(graph, dict(enumerate(r)), batch=batch).flops for r in w]
    np.testing.assert_allclose(flops, want, rtol=1e-12)
    # the per-layer FLOPs columns add up to the network's layer FLOPs
    cols = fmap.layer_torch(torch.tensor(w)).numpy()
    gflops = cols[:, [i for i, n in enumerate(fmap.layer_names()) if n.startswith("gflops:")]]
    np.testing.assert_allclose(gflops.sum(1) * 1e9 + graph.fixed_flops * batch, want, rtol=1e-9)

    lf = LatencyFunction(_cost_model(graph, "flops_linear", batch, rnd))
    n = torch.tensor(w[0], requires_grad=True)
    out = lf(n)
    assert float(out.detach()) == pytest.approx(0.3 + 7.0 * want[0] / 1e9, rel=1e-9)
    (grad,) = torch.autograd.grad(out, n)
    q = quadratic_cost(graph, "flops", scale=batch * 7.0 / 1e9)
    torch.testing.assert_close(grad, q.grad(torch.tensor(w[0])), rtol=1e-9, atol=1e-12)
    for method in ("ridge", "nnls"):
        cm = _cost_model(graph, method, batch, rnd)
        ints = np.round(w).clip(1)
        np.testing.assert_allclose(LatencyFunction(cm).predict(ints), cm.predict(ints),
                                   rtol=1e-9)
