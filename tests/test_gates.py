"""Gates: statistics, straight-through gradient, determinism, shared samples, permanence."""

from __future__ import annotations

import math

import pytest
import torch

from gator_hw.errors import GatorError
from gator_hw.gates import GateSet, hard_logistic_gate, logistic_noise
from gator_hw.graph.hypergraph import READ_ROLES
from gator_hw.network import load_network
from tests.conftest import cached_network, randomize_norms

pytestmark = pytest.mark.usefixtures("one_thread")


def test_open_probability_is_sigmoid_of_logit():
    torch.manual_seed(0)
    theta = torch.linspace(-3, 3, 13)
    gates = GateSet([13], init_prob=0.5)
    with torch.no_grad():
        gates.logits[0].copy_(theta)
    draws = 4000
    freq = torch.stack([gates.sample(True)[0] for _ in range(draws)]).detach().mean(0)
    p = torch.sigmoid(theta)
    tol = 4.5 * torch.sqrt(p * (1 - p) / draws) + 1e-3
    assert torch.all((freq - p).abs() <= tol), (freq, p)


def test_logistic_noise_has_unit_logistic_moments():
    torch.manual_seed(1)
    x = logistic_noise((200_000,), device=torch.device("cpu"), dtype=torch.float32)
    assert abs(float(x.mean())) < 0.03
    assert float(x.var()) == pytest.approx(math.pi**2 / 3, rel=0.03)


def test_straight_through_gradient():
    theta = torch.tensor([-1.0, 0.2, 2.0], requires_grad=True)
    noise = torch.tensor([0.5, -0.9, 0.1])
    g = hard_logistic_gate(theta, noise)
    assert g.tolist() == [0.0, 0.0, 1.0]  # forward is hard
    (g * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    s = torch.sigmoid(theta.detach() + noise)
    assert torch.allclose(theta.grad, torch.tensor([1.0, 2.0, 3.0]) * s * (1 - s))


def test_eval_is_deterministic_and_thresholded():
    gates = GateSet([4], init_prob=0.9)
    with torch.no_grad():
        gates.logits[0].copy_(torch.tensor([1.0, -0.5, 0.3, 2.0]))
    gates.mask(0)[3] = False
    a, b = gates.sample(False)[0], gates.sample(False)[0]
    assert a.tolist() == b.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert gates.kept_channels() == [2] and gates.kept_indices() == {0: [0, 2]}


def test_masks_are_permanent():
    torch.manual_seed(0)
    gates = GateSet([5, 3], init_prob=0.99)
    with torch.no_grad():
        gates.logits[0][1] = -0.1
        gates.logits[1][2] = -4.0
    assert gates.update_masks() == 2
    assert gates.update_masks() == 0
    with torch.no_grad():  # logits come back up: the channels stay pruned
        for t in gates.logits:
            t.fill_(20.0)
    assert gates.kept_channels() == [4, 2]
    for _ in range(20):
        s = gates.sample(True)
        assert float(s[0][1].detach()) == 0.0 and float(s[1][2].detach()) == 0.0
    gates.freeze()
    assert gates.frozen and not gates.logits[0].requires_grad
    assert "frozen" in str(gates)


def test_mask_digest_tells_masks_apart():
    a, b = GateSet([4, 4]), GateSet([4, 4])
    assert torch.equal(a.mask_digest(), b.mask_digest())
    b.mask(1)[2] = False
    assert not torch.equal(a.mask_digest(), b.mask_digest())


def test_all_open_gates_leave_outputs_unchanged_and_detach_restores():
    net = load_network("resnet20", num_classes=10)
    model = randomize_norms(net.model)
    for m in model.modules():  # train-mode forwards must not move the running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.0
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref_eval = model.eval()(x)
        ref_train = model.train()(x)
        gates = GateSet.from_graph(net.graph, 0.995).attach(model, net.graph)
        assert torch.equal(model.eval()(x), ref_eval)
        for t in gates.logits:
            t.fill_(50.0)  # noise can never close a gate
        assert torch.equal(model.train()(x), ref_train)
        gates.mask(3)[:] = False
        assert not torch.equal(model.eval()(x), ref_eval)
        gates.detach()
        assert not gates.attached
        assert torch.equal(model.eval()(x), ref_eval)
    with pytest.raises(GatorError):
        GateSet([1, 2]).attach(model, net.graph)


def test_one_noise_sample_reaches_every_site_of_an_edge():
    net = load_network("resnet20", num_classes=10)
    model, graph = net.model.train(), net.graph
    highway = max(graph.edges, key=lambda e: sum(s.role in READ_ROLES for s in e.sites))
    readers = [s.module for s in highway.sites if s.role in READ_ROLES]
    assert len(readers) >= 3
    mods = dict(model.named_modules())
    before, after = {}, {}
    for name in readers:  # registered before the gates' hook: sees the raw input
        mods[name].register_forward_pre_hook(lambda m, a, n=name: before.__setitem__(n, a[0]))
    gates = GateSet.from_graph(graph, 0.5).attach(model, graph)
    for name in readers:  # after: sees the gated input
        mods[name].register_forward_pre_hook(lambda m, a, n=name: after.__setitem__(n, a[0]))
    torch.manual_seed(0)
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32))
    expect = gates.last_gates[highway.gid]
    assert expect.shape == (2, highway.channels)  # per sample and channel, as in GATOR
    assert 0 < float(expect.sum()) < 2 * highway.channels  # a real random sample
    assert not torch.equal(expect[0], expect[1])  # the two samples drew their own gates
    for name in readers:
        raw = before[name].abs().sum((2, 3))
        seen = after[name].abs().sum((2, 3)) / raw.clamp_min(1e-12)
        live = raw > 0
        assert torch.allclose(seen[live], expect[live], atol=1e-6), name


def test_gates_check_graph_and_str():
    net = cached_network("resnet56")
    gates = GateSet.from_graph(net.graph)
    assert len(gates) == net.graph.n_edges and gates.names[0] == net.graph.edges[0].name
    assert "detached" in str(gates)
    with pytest.raises(GatorError, match="edges"):
        GateSet([3]).check_graph(net.graph)
    with pytest.raises(GatorError):
        GateSet([3], init_prob=1.0)


def test_noise_on_the_logits_device():
    gates = GateSet([3]).to(torch.float64)
    sample = gates.sample(True)[0]
    assert sample.device == gates.device and sample.dtype == torch.float64
    assert GateSet([]).sample(True) == {}


def test_edges_that_cut_the_network_keep_one_channel():
    net = cached_network("resnet20")
    gates = GateSet.from_graph(net.graph)
    from gator_hw.graph.cuts import removable_edges

    removable = removable_edges(net.graph)
    assert 0 < len(removable) < net.graph.n_edges
    with torch.no_grad():
        for theta in gates.logits:
            theta.fill_(-1.0)
        gates.logits[0][3] = -0.5  # the best of a bad lot
    gates.update_masks()
    kept = gates.kept_channels()
    for e in net.graph.edges:
        assert kept[e.gid] == (0 if e.gid in removable else 1), e.name
    if 0 not in removable:
        assert gates.kept_indices()[0] == [3]
    gates.freeze()
    assert gates.kept_channels() == kept


def test_round_to_rounds_kept_counts_up_with_the_largest_closed_logits():
    gates = GateSet([20, 24], 0.9, round_to=8, min_keep=[1, 0])
    with torch.no_grad():
        gates.logits[0].copy_(torch.linspace(-1, 1, 20))  # 10 positive
        gates.logits[1].fill_(-1.0)  # all closed: the edge may go empty
    det = gates.deterministic()
    assert gates.kept_channels() == [16, 0]
    # the six largest negative logits of edge 0 fill the count up to 16
    theta = gates.logits[0].detach()
    assert torch.equal(det[0].bool(), theta >= theta.sort(descending=True).values[15])
    gates.update_masks()
    assert [int(m.sum()) for m in gates.masks] == [16, 0]
    assert gates.kept_channels() == [16, 0]
    with torch.no_grad():
        gates.logits[0].fill_(-1.0)
        gates.logits[0][10] = 1.0
    gates.update_masks()  # edge 0 cuts the network: it keeps one block of 8
    assert gates.kept_channels()[0] == 8 and bool(gates.mask(0)[10])
    with pytest.raises(GatorError):
        GateSet([4], round_to=0)
    # the rounding travels with the gates' state
    again = GateSet([20, 24])
    again.load_state_dict(gates.state_dict())
    assert again.round_to == 8 and again.kept_channels() == gates.kept_channels()


def test_importance_is_the_squared_batch_gradient_of_each_gate():
    torch.manual_seed(0)
    gates = GateSet([3, 2], 0.7)
    weights = torch.randn(5, 5)
    steps = []
    for _ in range(3):
        vecs = gates.sample(True, batch=4)
        g = torch.cat([vecs[0], vecs[1]], dim=-1)  # (4, 5)
        x = torch.randn(4, 5)
        loss = ((g * x) @ weights).pow(2).mean()
        loss.backward()
        # the gradient the hook saw, recomputed by hand
        with torch.no_grad():
            y = (g * x) @ weights
            dl_dg = (2 * y / y.numel()) @ weights.T * x
        steps.append(dl_dg.sum(0) ** 2)
        gates.update_importance(beta=0.5)
    # a running mean for the first steps (bias-free), then the exponential average
    want = (steps[0] + steps[1]) / 2 * 0.5 + 0.5 * steps[2]
    assert torch.allclose(gates.importance, want, rtol=1e-5)
    assert torch.equal(gates.edge_importance(1), gates.importance[3:])
