"""Cost-model accuracy over repeated random holdouts of one profile table.

``validate`` scores one split (the half of the random nets a config was not fitted on). One split
of 20-30 nets is noisy, so this refits the whole procedure (candidate selection included) on
``--splits`` seeded halves and reports, per predictor, the mean of every metric and the mean
absolute signed error, with how often the cost model beat each baseline.

Run: ``python benchmarks/bench_costmodel.py profiles/cpu/resnet18_b8_float32.csv --splits 10``
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from gator_hw.costmodel.dataset import load_samples
from gator_hw.costmodel.model import fit_cost_model
from gator_hw.costmodel.validate import Scores, validate
from gator_hw.network import load_network
from gator_hw.profile.tables import sidecar_path

METRICS = ("mape", "within5", "within10", "spearman", "mean_signed", "worst")


def _network(table: Path):
    meta = json.loads(sidecar_path(table).read_text())
    return load_network(meta["model"], input_size=meta["input_size"],
                        num_classes=meta.get("num_classes", 1000))


def _better(ours: Scores, base: Scores) -> bool:
    """Cost model at least as good as ``base`` on every metric."""
    return (ours.mape <= base.mape and ours.within5 >= base.within5
            and ours.within10 >= base.within10 and ours.spearman >= base.spearman
            and abs(ours.mean_signed) <= abs(base.mean_signed) and ours.worst <= base.worst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table", type=Path)
    ap.add_argument("--splits", type=int, default=10)
    args = ap.parse_args()
    net = _network(args.table)
    samples = load_samples([args.table], net.graph)
    runs: dict[str, list[Scores]] = {}
    chosen: Counter[str] = Counter()
    wins: Counter[str] = Counter()
    for seed in range(args.splits):
        cm = fit_cost_model([args.table], net.graph, holdout_seed=seed)
        chosen[cm.method] += 1
        scores, _ = validate(cm, samples)
        by = {s.predictor: s for s in scores}
        for s in scores:
            runs.setdefault(s.predictor, []).append(s)
        for base in ("flops_linear", "gator_additive"):
            wins[base] += _better(by["cost model"], by[base])
    table = Table(title=f"{args.table.name}: mean over {args.splits} random holdouts "
                        f"(chosen: {dict(chosen)})")
    for col in ("predictor", "MAPE%", "±5%", "±10%", "rho", "bias%", "|bias|%", "worst%"):
        table.add_column(col, justify="left" if col == "predictor" else "right")
    for name, scores in runs.items():
        mean = {m: float(np.mean([getattr(s, m) for s in scores])) for m in METRICS}
        abs_bias = float(np.mean([abs(s.mean_signed) for s in scores]))
        table.add_row(name, f"{mean['mape']:.2f}", f"{mean['within5']:.0f}",
                      f"{mean['within10']:.0f}", f"{mean['spearman']:.3f}",
                      f"{mean['mean_signed']:+.2f}", f"{abs_bias:.2f}", f"{mean['worst']:.2f}")
    console = Console()
    console.print(table)
    for base, n in wins.items():
        console.print(f"cost model at least as good as {base} on every metric: "
                      f"{n}/{args.splits} splits")


if __name__ == "__main__":
    main()
