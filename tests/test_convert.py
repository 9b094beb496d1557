"""Conversion equals the gated (masked) model, whole branches included; save and load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gator_hw.convert import CONST_PREFIX, convert, removable_edges
from gator_hw.errors import GatorError
from gator_hw.io import PLAN_FILE, WEIGHTS_FILE, load, save
from gator_hw.masking import masked_output
from gator_hw.network import load_network
from tests.conftest import cached_network, random_plan, randomize_norms


def _inner_edges(graph) -> list[int]:
    """Edges that may keep no channel (residual-branch inner edges)."""
    return sorted(removable_edges(graph))


@pytest.mark.parametrize(
    ("name", "size"),
    [("resnet50", 64), ("resnet18", 64), ("resnet56", 32), ("densenet121", 64),
     ("regnet_y_400mf", 64), ("mobilenet_v2", 64), ("efficientnet_b0", 64),
     ("resnext50_32x4d", 64), ("googlenet", 64), ("vgg16_bn", 64), ("mobilenet_v3_small", 64)],
)
def test_converted_equals_gated(name: str, size: int) -> None:
    """Random gate states, a whole branch removed and an edge at its minimum of one channel."""
    from gator_hw.gates import GateSet

    net = load_network(name, input_size=size)
    model, g = randomize_norms(net.model), net.graph
    plan = random_plan(g, seed=4)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    branches = _inner_edges(g)
    for gid in branches[:6:2]:  # whole residual branches go
        plan[gid] = []
    narrowest = next(e for e in g.edges if e.gid not in branches and e.groups == 1)
    plan[narrowest.gid] = [narrowest.channels - 1]  # an edge at its minimum
    gates = GateSet.from_graph(g)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for e in g.edges:  # open logits for kept channels, negative ones for the rest
            theta = -torch.rand(e.channels, generator=gen) - 0.1
            theta[plan[e.gid]] = torch.rand(len(plan[e.gid]), generator=gen) + 0.1
            gates.logits[e.gid].copy_(theta)
    gates.update_masks()
    keep = gates.kept_indices()
    assert keep == {k: sorted(v) for k, v in plan.items()}
    ref = gates.gated_output(model, g, x)
    assert not gates.attached
    assert torch.allclose(ref, masked_output(model, g, plan, x), rtol=1e-5, atol=1e-6)
    small = convert(model, g, keep)
    with torch.no_grad():
        out = small(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_removed_block_keeps_its_constant_and_block_zero_can_go() -> None:
    """The original dropped a removed block's BN shift and crashed on an empty first edge."""
    net = load_network("resnet50", input_size=32)
    model, g = randomize_norms(net.model), net.graph
    plan = {1: [], 2: []}  # both inner edges of layer1.0: the whole first branch
    small = convert(model, g, plan)
    consts = [n for n, _ in small.named_buffers() if n.startswith(CONST_PREFIX)]
    assert len(consts) == 1
    assert not hasattr(small.get_submodule("layer1.0"), "conv1")  # the branch is gone
    x = torch.randn(2, 3, 32, 32)
    ref = masked_output(model, g, plan, x)
    with torch.no_grad():
        assert torch.allclose(small(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # dropping the constant (the original's bug) would change the output
    getattr(small, consts[0]).zero_()
    with torch.no_grad():
        assert not torch.allclose(small(x), ref, rtol=1e-3, atol=1e-3)


def test_classifier_bias_is_kept() -> None:
    net = cached_network("resnet18", 32)
    small = convert(net.model, net.graph, {net.graph.n_edges - 1: list(range(100))})
    assert torch.equal(small.fc.bias, net.model.fc.bias)
    assert torch.equal(small.fc.weight, net.model.fc.weight[:, :100])


def test_disconnecting_plan_is_refused_with_the_culprit() -> None:
    net = cached_network("resnet18", 32)
    highway = net.graph.edge("layer2.*")
    with pytest.raises(GatorError, match=f"removing every channel of {highway.name} disconnects"):
        convert(net.model, net.graph, {highway.gid: []})


def test_emptying_a_concatenated_edge_is_refused() -> None:
    net = cached_network("densenet121", 32)
    growth = next(e for e in net.graph.edges if e.gid not in removable_edges(net.graph))
    with pytest.raises(GatorError, match="read together with other channels"):
        convert(net.model, net.graph, {growth.gid: []})


def test_save_load_round_trip_in_a_fresh_process(tmp_path: Path) -> None:
    net = load_network("resnet50", input_size=32)
    model, g = randomize_norms(net.model), net.graph
    plan = random_plan(g, seed=5)
    plan[_inner_edges(g)[0]] = []
    small = convert(model, g, plan)
    out_dir = tmp_path / "pruned"
    save(out_dir, small, name="resnet50", num_classes=1000, input_size=32, graph=g, keep=plan)
    assert sorted(p.name for p in out_dir.iterdir()) == [WEIGHTS_FILE, PLAN_FILE]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(small(x), tmp_path / "y.pt")
    script = (
        "import sys, torch\n"
        "from gator_hw.io import load\n"
        f"m = load({str(out_dir)!r})\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}); y = torch.load({str(tmp_path / 'y.pt')!r})\n"
        "with torch.no_grad(): err = (m(x) - y).abs().max().item()\n"
        "assert err <= 1e-5 * y.abs().max().item(), err\n"
        "assert not any(k.startswith(('gator_hw.train', 'gator_hw.gates')) for k in sys.modules)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(GatorError, match="does not exist"):
        load(tmp_path / "nothing")
    net = cached_network("resnet20")
    d = tmp_path / "m"
    plan = random_plan(net.graph, seed=1)
    save(d, convert(net.model, net.graph, plan), name="resnet20", num_classes=10,
         input_size=32, graph=net.graph, keep=plan)
    doc = json.loads((d / PLAN_FILE).read_text())
    doc["model"] = "resnet32"
    (d / PLAN_FILE).write_text(json.dumps(doc))
    with pytest.raises(GatorError, match="does not match the edges of resnet32"):
        load(d)
    doc["model"] = "resnet20"
    doc["edges"][0]["kept"] = doc["edges"][0]["kept"][:-1]
    (d / PLAN_FILE).write_text(json.dumps(doc))
    with pytest.raises(GatorError, match="has shape .* but the plan gives"):
        load(d)
    (d / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(GatorError, match="not a readable safetensors file"):
        load(d)
    (d / PLAN_FILE).write_text("{")
    with pytest.raises(GatorError, match="not valid JSON"):
        load(d)
    good = json.loads(json.dumps(doc))
    for drop in ("model", "edges"):
        (d / PLAN_FILE).write_text(json.dumps({k: v for k, v in good.items() if k != drop}))
        with pytest.raises(GatorError, match=f"lacks {drop}"):
            load(d)
    del good["edges"][3]["kept"]
    (d / PLAN_FILE).write_text(json.dumps(good))
    with pytest.raises(GatorError, match="lacks edges"):
        load(d)


def test_convert_of_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path: Path) -> None:
    from gator_hw.gated import convert_checkpoint

    table = tmp_path / "t.csv"
    table.write_text("edge,width\n0,1\n")
    with pytest.raises(GatorError) as exc:
        convert_checkpoint(table)
    assert "is not a checkpoint" in str(exc.value) and "\n" not in str(exc.value)
    blob = tmp_path / "last.json"
    blob.write_bytes(bytes(range(128, 256)))
    with pytest.raises(GatorError) as exc:
        convert_checkpoint(tmp_path)
    assert "cannot read checkpoint" in str(exc.value) and "\n" not in str(exc.value)


def test_save_creates_parents_and_replaces_an_earlier_save(tmp_path: Path) -> None:
    net = load_network("resnet18", input_size=32, num_classes=10)
    g = net.graph
    full = {e: list(range(edge.channels)) for e, edge in enumerate(g.edges)}
    half = {e: list(range(edge.channels // 2)) for e, edge in enumerate(g.edges)}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out_dir = tmp_path / "a" / "b" / "pruned"  # parents do not exist yet
    for plan in (full, half):
        small = convert(net.model, g, plan).eval()
        save(out_dir, small, name="resnet18", num_classes=10, input_size=32, graph=g, keep=plan)
        with torch.no_grad():
            assert torch.equal(load(out_dir)(x), small(x))
    assert sorted(p.name for p in out_dir.parent.iterdir()) == ["pruned"]  # no temporaries
