"""Discovery time against Torch-Pruning's dependency graph, per torchvision CNN, on this machine.

Run: ``python benchmarks/compare_torch_pruning.py [--repeats 3] [NAME ...]`` (needs
``pip install torch-pruning``; random init, never a download). For each model, gator-hw's
``build_hypergraph`` and ``tp.DependencyGraph().build_dependency`` are timed in turn on the same
model and input (the zoo's sizes), ``repeats`` times each, interleaved; prints the median time of
each and their ratio, then the median ratio over the models. Default: every torchvision CNN (the
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


def compare(name: str, repeats: int) -> tuple[float, float]:
    """Median seconds of (gator-hw discovery, Torch-Pruning's dependency graph)."""
    import torch_pruning as tp

    model = build_model(name).eval()
    size = zoo_input_size(name)
    shape = (1, 3, size, size)
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(_time(lambda: build_hypergraph(model, shape, name)))
        theirs.append(_time(lambda: tp.DependencyGraph().build_dependency(
            model, example_inputs=torch.zeros(shape))))
    return statistics.median(ours), statistics.median(theirs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    names = a.names or [n for n in _torchvision_names() if not n.startswith(TRANSFORMERS)]
    ratios = []
    print(f"{'model':24s} {'gator-hw':>9s} {'TP 1.6':>9s} {'ratio':>6s}")
    for name in names:
        try:
            ours, theirs = compare(name, a.repeats)
        except Exception as exc:  # Torch-Pruning's failure on a model is a result too
            print(f"{name:24s} failed: {type(exc).__name__}: {str(exc)[:80]}")
            continue
        ratios.append(ours / theirs)
        print(f"{name:24s} {ours:8.3f}s {theirs:8.3f}s {ours / theirs:6.2f}", flush=True)
    if ratios:
        print(f"median ratio over {len(ratios)} models: {statistics.median(ratios):.2f} "
              f"(range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
