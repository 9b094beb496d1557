"""Hyperedge discovery time (trace + shape propagation + rules) per model, on this machine.

Run: ``python benchmarks/bench_discovery.py [resnet50 mobilenet_v2 ...]``. Goal: ResNet-50 in
under 2 s on a 2-core CPU.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from gator_hw.graph import build_hypergraph
from gator_hw.models import build_model, default_input_size


def main(names: list[str]) -> None:
    torch.set_num_threads(torch.get_num_threads())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in names:
        model = build_model(name)
        size = default_input_size(name)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            g = build_hypergraph(model, (1, 3, size, size), name)
            times.append(time.perf_counter() - t0)
        print(f"{name:20s} {g.n_edges:4d} edges  median {statistics.median(times):.3f} s  "
              f"max {max(times):.3f} s")


if __name__ == "__main__":
    main(sys.argv[1:] or ["resnet50", "mobilenet_v2", "efficientnet_b0", "densenet121"])
