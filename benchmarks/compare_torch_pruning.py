"""Discovery time against Torch-Pruning's dependency graph, per torchvision CNN, on this machine.

Run: ``python benchmarks/compare_torch_pruning.py [--repeats 3] [NAME ...]`` (needs
``pip install torch-pruning``; random init, never a download). For each model, gator-hw's
``build_hypergraph`` and Torch-Pruning are timed in turn on the same model and input (the zoo's
sizes), ``repeats`` times each, interleaved. Torch-Pruning needs two steps for what
``build_hypergraph`` returns: ``DependencyGraph().build_dependency`` traces the model, and
``get_all_groups`` walks that graph into the coupled channel groups (its counterpart of our
hyperedges). Prints the median time of ours, of TP's graph alone and of TP's graph + groups, the
two ratios, then their medians over the models. Default: every torchvision CNN (the
transformers are left out: Torch-Pruning errors or hangs on Swin and MaxViT).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gator_hw.graph import build_hypergraph
from gator_hw.models import _torchvision_names, build_model
from gator_hw.soundness import zoo_input_size

TRANSFORMERS = ("vit_", "swin_", "maxvit")


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _tp_graph(model, shape):
    import torch_pruning as tp

    return tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(shape))


def _tp_groups(model, shape) -> int:
    return sum(1 for _ in _tp_graph(model, shape).get_all_groups())


def compare(name: str, repeats: int) -> tuple[float, float, float]:
    """Median seconds of (gator-hw discovery, TP's dependency graph, TP's graph + groups)."""
    model = build_model(name).eval()
    size = zoo_input_size(name)
    shape = (1, 3, size, size)
    ours, graph, groups = [], [], []
    for _ in range(repeats):
        ours.append(_time(lambda: build_hypergraph(model, shape, name)))
        graph.append(_time(lambda: _tp_graph(model, shape)))
        groups.append(_time(lambda: _tp_groups(model, shape)))
    return statistics.median(ours), statistics.median(graph), statistics.median(groups)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    names = a.names or [n for n in _torchvision_names() if not n.startswith(TRANSFORMERS)]
    to_graph, to_groups = [], []
    print(f"{'model':24s} {'gator-hw':>9s} {'TP graph':>9s} {'+groups':>9s} "
          f"{'ratio':>6s} {'ratio':>6s}")
    for name in names:
        try:
            ours, graph, groups = compare(name, a.repeats)
        except Exception as exc:  # Torch-Pruning's failure on a model is a result too
            print(f"{name:24s} failed: {type(exc).__name__}: {str(exc)[:80]}")
            continue
        to_graph.append(ours / graph)
        to_groups.append(ours / groups)
        print(f"{name:24s} {ours:8.3f}s {graph:8.3f}s {groups:8.3f}s {ours / graph:6.2f} "
              f"{ours / groups:6.2f}", flush=True)
    for what, ratios in (("TP's graph", to_graph), ("TP's graph + groups", to_groups)):
        if ratios:
            print(f"gator-hw / {what}: median {statistics.median(ratios):.2f} over "
                  f"{len(ratios)} models (range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
