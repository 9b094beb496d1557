"""Self-checks of one model's hyperedges against the model itself (the zoo coverage matrix).

Every check compares gator-hw with an independent reference: the FLOPs with
``FlopCounterMode`` (full width and slimmed at half width), the empty plan with the model's own
weights (it must change nothing), the slimmed model with the masked one on a random plan, and
the converted model with the gated one for random gate logits, all in float64 so that rounding
amplified by random weights does not hide or fake a difference, and with every parameter and
batch-norm statistic redrawn so that the model's output depends on every channel (its
``input_sensitivity`` says how much the output differs between two inputs).
"""

from __future__ import annotations

import copy
import math
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from gator_hw.accounting import flop_counter_flops, network_cost
from gator_hw.convert import convert
from gator_hw.gates import GateSet
from gator_hw.graph import HyperGraph, build_hypergraph
from gator_hw.masking import masked_output
from gator_hw.slim import slim

__all__ = [
    "ModelCheck", "check_model", "half_plan", "random_plan", "randomize_norms",
    "randomize_weights", "reason_kind",
    "zoo_input_size",
]

#: torchvision families whose builders only take their native 224 px input
_NATIVE_224 = ("vit_", "swin_", "maxvit")


def zoo_input_size(name: str) -> int:
    """The input side the coverage matrix uses: 224 for ViT / Swin / MaxViT (fixed sizes),
    96 for Inception-v3 (its stem needs >= 75), 64 for every other CNN (cheap on a CPU)."""
    if name.startswith(_NATIVE_224):
        return 224
    return 96 if name.startswith("inception") else 64


@dataclass
class ModelCheck:
    """One row of the coverage matrix (errors are relative to the reference's largest value)."""

    model: str
    input_size: int
    edges: int = 0
    prunable_share: float = 0.0  # channels in prunable edges / channels layers write
    discovery_s: float = 0.0
    flops_error: float = 0.0  # |ours - FlopCounterMode| / FlopCounterMode, full width
    fixed_flops_share: float = 0.0  # FLOPs in ops without a channel rule
    half_flops_ratio: float = 1.0  # every prunable edge at half width
    half_flops_error: float = 0.0  # ours vs FlopCounterMode of the half-width slimmed model
    empty_plan_changes: int = 0  # tensors the empty plan changed (must be 0)
    slim_error: float = 0.0  # slimmed vs masked, random plan
    convert_error: float = 0.0  # converted vs gated, random gate logits
    input_sensitivity: float = 0.0  # how much the output differs between two inputs
    freeze_reasons: dict[str, int] = field(default_factory=dict)
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def half_plan(graph: HyperGraph) -> dict[int, list[int]]:
    """Every prunable edge at half width (its first channels, balanced over conv groups)."""
    return graph.first_channels_plan({e.gid: max(1, e.channels // 2) for e in graph.edges})


def random_plan(graph: HyperGraph, seed: int | random.Random = 0) -> dict[int, list[int]]:
    """Random kept channels for every edge (1..C, balanced over conv groups); ``seed`` may be
    a ``random.Random`` to draw from."""
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    plan = {}
    for e in graph.edges:
        n = graph.valid_keep_count(e.gid, rng.randint(1, e.channels))
        size, per = e.channels // e.groups, n // e.groups
        plan[e.gid] = sorted(
            g * size + i for g in range(e.groups) for i in rng.sample(range(size), per)
        )
    return plan


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give batch norms non-trivial statistics and affine terms (in place), so that zeroed
    channels show up in the output of a randomly initialised model."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 2 - 1)
    return model


def randomize_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Redraw every parameter (in place): weights ~ N(0, 1/fan_in), 1-D scales in [0.5, 1.5],
    biases in [-0.1, 0.1]. Zero-initialised heads (ViT) and tiny layer scales (ConvNeXt) would
    otherwise make a random model's output blind to the channels a check compares."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:  # drawn in float32: twice as fast, and any weights will do
                fan_in = max(1, p.numel() // p.shape[0])
                p.copy_(torch.randn(p.shape, generator=g).to(p) / math.sqrt(fan_in))
                continue
            r = torch.rand(p.shape, generator=g, dtype=torch.float64).to(p)
            if name.endswith("bias"):
                p.copy_((r - 0.5) * 0.2)
            else:
                p.copy_(r + 0.5)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _prunable_share(graph: HyperGraph) -> float:
    written = [g for g in graph.groups if any(s.role in ("out", "dw", "gconv") for s in g.sites)]
    total = sum(g.channels for g in written)
    return sum(e.channels for e in graph.edges) / total if total else 0.0


_NODE = re.compile(r"\s*\([A-Za-z_]\w*\)")
_PATH = re.compile(r"\b\w+(?:\.\w+)+\b")


def reason_kind(reason: str) -> str:
    """A freeze reason without its layer path or node name ("used by permute, which ...")."""
    return _PATH.sub("a layer", _NODE.sub("", reason))


def _freeze_reasons(graph: HyperGraph) -> dict[str, int]:
    """Frozen groups per kind of reason (network input and output left out)."""
    counts: Counter[str] = Counter()
    for g in graph.frozen:
        for r in dict.fromkeys(reason_kind(r) for r in g.frozen_reasons):
            if r not in ("network input", "network output"):
                counts[r] += 1
    return dict(counts.most_common())


def _empty_plan_changes(model: nn.Module, graph: HyperGraph) -> int:
    small = slim(model, graph, {})
    before, after = model.state_dict(), small.state_dict()
    return sum(
        1 for k, v in before.items()
        if k not in after or after[k].shape != v.shape or not torch.equal(after[k], v)
    )


def _gated_vs_converted(model: nn.Module, graph: HyperGraph, x: torch.Tensor,
                        seed: int) -> float:
    gates = GateSet.from_graph(graph).to(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in gates.logits:
            t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) + 1.0)
    gates.update_masks()
    small = convert(model, graph, gates.kept_indices())
    ref = gates.gated_output(model, graph, x)
    with torch.no_grad():
        return _rel(small(x), ref)


def _run_checks(row: ModelCheck, model: nn.Module, graph: HyperGraph, seed: int) -> None:
    shape = graph.input_shape
    full = flop_counter_flops(model, shape)
    ours = network_cost(graph).flops
    row.flops_error = abs(ours - full) / full if full else 0.0
    row.fixed_flops_share = graph.fixed_flops * shape[0] / ours if ours else 0.0
    row.empty_plan_changes = _empty_plan_changes(model, graph)
    if not graph.n_edges:
        return
    half = half_plan(graph)
    widths = {g: len(idx) for g, idx in half.items()}
    half_ours = network_cost(graph, widths).flops
    row.half_flops_ratio = half_ours / ours
    half_ref = flop_counter_flops(slim(model, graph, half), shape)
    row.half_flops_error = abs(half_ours - half_ref) / half_ref
    x = torch.randn((2, *shape[1:]), generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
    row.input_sensitivity = _rel(y[0], y[1]) if len(y) > 1 else 0.0
    plan = random_plan(graph, seed)
    with torch.no_grad():
        row.slim_error = _rel(slim(model, graph, plan)(x), masked_output(model, graph, plan, x))
    row.convert_error = _gated_vs_converted(model, graph, x, seed)


def check_model(name: str, model: nn.Module, input_size: int, *, seed: int = 0) -> ModelCheck:
    """Discover ``model``'s hyperedges (timed, float32 as users run it) and check them.

    The checks run on a float64 copy in eval mode; an exception is recorded in ``error``
    (type and first line) rather than raised, so a matrix of models always completes.
    """
    row = ModelCheck(name, input_size)
    shape = (1, 3, input_size, input_size)
    try:
        t0 = time.perf_counter()
        graph = build_hypergraph(model.eval(), shape, name)
        row.discovery_s = time.perf_counter() - t0
        row.edges = graph.n_edges
        row.prunable_share = _prunable_share(graph)
        row.freeze_reasons = _freeze_reasons(graph)
        checked = copy.deepcopy(model).double().eval()
        checked = randomize_norms(randomize_weights(checked, seed), seed)
        _run_checks(row, checked, graph, seed)
    except Exception as exc:  # the matrix records every failure, it never stops on one
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        row.error = f"{type(exc).__name__}: {first}"
    for key in ("flops_error", "half_flops_error", "slim_error", "convert_error"):
        value = getattr(row, key)
        if isinstance(value, float) and not math.isfinite(value):
            row.error = row.error or f"{key} is {value}"
    return row
