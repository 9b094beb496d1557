"""The peer benchmark's Torch-Pruning bisection (benchmarks/torch_pruning_peer.py) lands on a
target; skipped without torch-pruning (a benchmark extra the package never imports)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from torch_pruning_peer import VARIANTS, bisect_ratio, tp_prune  # noqa: E402

from gator_hw.accounting import flop_counter_flops  # noqa: E402
from gator_hw.models import build_model  # noqa: E402


def test_bisection_lands_within_two_percent_of_a_noisy_monotone_target():
    rng = random.Random(0)
    for target in (0.7, 0.5, 0.35, 0.2):
        res = bisect_ratio(lambda r: (1 - r) ** 1.7 * (1 + rng.uniform(-0.005, 0.005)), target)
        assert abs(res.error) <= 0.02, (target, res)
        assert len(res.probes) <= 9


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.name in
                                     ("tp_taylor_r8", "uniform")], ids=lambda v: v.name)
def test_torch_pruning_net_lands_within_two_percent_of_a_target(variant):
    """On a tiny ResNet, the bisected Torch-Pruning net's cost is within 2 % of the target; the
    cost here is the FLOPs ratio (deterministic), recomputed independently of the bisection."""
    pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    model = build_model("resnet20", 10, seed=0).eval()
    shape = (1, 3, 16, 16)
    example = torch.zeros(shape)
    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)))]
    full = flop_counter_flops(model, shape)

    def flops_at(r: float) -> float:
        pruned = tp_prune(model, example, variant, r, batches=batches, num_classes=10)
        return flop_counter_flops(pruned, shape) / full

    res = bisect_ratio(flops_at, 0.5, aim=0.01)
    assert abs(res.error) <= 0.02, res.probes
    pruned = tp_prune(model, example, variant, res.ratio, batches=batches, num_classes=10)
    assert abs(flop_counter_flops(pruned, shape) / full / 0.5 - 1) <= 0.02
    assert pruned(example).shape == (1, 10)
    if variant.round_to > 1:
        widths = [m.out_channels for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]
        assert all(w % variant.round_to == 0 for w in widths[1:]), widths


def test_the_package_never_imports_torch_pruning():
    pkg = Path(__file__).resolve().parents[1] / "gator_hw"
    users = [p.name for p in pkg.rglob("*.py") if "torch_pruning" in p.read_text()]
    assert users == []
