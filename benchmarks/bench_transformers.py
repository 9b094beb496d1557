"""Measured speed of transformers and ConvNeXt slimmed at half width, on this machine.

Run: ``python benchmarks/bench_transformers.py [--rounds 3] [--threads 1] [NAME ...]``. Each
model (random init) is converted with every prunable edge at half width (``half_plan``); the full
and the converted model are timed in turn with ``torch.utils.benchmark`` (batch 1, 224 px,
``--rounds`` interleaved rounds). Prints FLOPs kept and the latency ratio (median over rounds,
with the range of per-round ratios).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch.utils import benchmark

from gator_hw.accounting import network_cost
from gator_hw.convert import convert
from gator_hw.graph import build_hypergraph
from gator_hw.models import build_model
from gator_hw.soundness import half_plan


def _time(model: torch.nn.Module, x: torch.Tensor) -> float:
    t = benchmark.Timer("m(x)", globals={"m": model, "x": x}, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=1.0).median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=["convnext_tiny", "vit_b_32", "vit_b_16"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} thread(s), batch 1, 224 px")
    for name in a.names:
        model = build_model(name).eval()
        shape = (1, 3, 224, 224)
        graph = build_hypergraph(model, shape, name)
        plan = half_plan(graph)
        small = convert(model, graph, plan)
        flops = network_cost(graph, {g: len(i) for g, i in plan.items()}).flops / network_cost(
            graph).flops
        x = torch.randn(shape)
        ratios = []
        with torch.inference_mode():
            for _ in range(a.rounds):
                full, half = _time(model, x), _time(small, x)
                ratios.append(half / full)
        print(f"{name:16s} FLOPs {flops:.3f}  latency {statistics.median(ratios):.3f} "
              f"({min(ratios):.3f}-{max(ratios):.3f})  full {full * 1e3:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
